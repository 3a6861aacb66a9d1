"""The planning pipeline: trace -> coarsen -> strategy space -> cost model -> search -> Plan."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable

from fxplan.cluster import Cluster
from fxplan.constraints import Constraints
from fxplan.errors import ConstraintError, InfeasiblePlanError, PlanFileError
from fxplan.plan import Plan, SolverInfo, Stage, Strategy

PLANNERS = ("miqp", "grid", "exhaustive")
RUNNABLE_SCHEDULES = ("gpipe", "1f1b")  # what the cost model and the runtime both handle today


@dataclass(frozen=True)
class Analysis:
    """What every rank derives from the model alone (deterministic, no measurement)."""

    traced: object  # passes.trace.Traced
    layer_graph: object  # passes.ir.LayerGraph
    space: object  # passes.ir.StrategySpace
    tp_degrees: tuple[int, ...]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def pipeline_degrees(cluster: Cluster, num_layers: int, constraints: Constraints) -> list[int]:
    n = cluster.world_size
    if constraints.pp is not None:
        if n % constraints.pp:
            raise ConstraintError(f"pp={constraints.pp} does not divide the {n} devices; pick a divisor of {n}")
        if constraints.pp > num_layers:
            raise ConstraintError(f"pp={constraints.pp} exceeds the model's {num_layers} layers; pin a smaller pp")
        return [constraints.pp]
    return [pp for pp in divisors(n) if pp <= num_layers]


def tensor_degrees(cluster: Cluster, pps: list[int], constraints: Constraints) -> tuple[int, ...]:
    """tp degrees worth enumerating: divisors of a stage's device count, inside one node."""
    sizes = {cluster.world_size // pp for pp in pps}
    if constraints.tp is not None:
        if not any(size % constraints.tp == 0 for size in sizes):
            raise ConstraintError(f"tp={constraints.tp} does not divide the devices of any stage ({sorted(sizes)})")
        return tuple(sorted({1, constraints.tp}))
    degrees = {d for size in sizes for d in divisors(size) if d <= cluster.devices_per_node}
    return tuple(sorted(degrees))


def analyse(model, example_inputs, cluster: Cluster, constraints: Constraints, progress=None) -> Analysis:
    from fxplan.passes.coarsen import coarsen
    from fxplan.passes.sharding.shard_prop import build_strategy_space
    from fxplan.passes.trace import trace

    say = progress or (lambda msg: None)
    start = time.perf_counter()
    traced = trace(model, example_inputs)
    layer_graph = coarsen(traced)
    if constraints.pp is not None and constraints.pp > len(layer_graph.layers):
        # A pinned pipeline deeper than the default layers: cut the graph finer (at cut points).
        layer_graph = coarsen(traced, granularity=constraints.pp)
    say(f"traced ({traced.method}) and coarsened into {len(layer_graph.layers)} layers "
        f"in {time.perf_counter() - start:.2f} s")
    pps = pipeline_degrees(cluster, len(layer_graph.layers), constraints)
    tps = tensor_degrees(cluster, pps, constraints)
    start = time.perf_counter()
    space = build_strategy_space(traced, layer_graph, tps)
    say(f"sharding propagation for tp in {list(tps)}: {sum(len(v) for v in space.specs.values())} "
        f"layer shardings in {time.perf_counter() - start:.2f} s")
    return Analysis(traced=traced, layer_graph=layer_graph, space=space, tp_degrees=tps)


def check_batch_coupling(lg, constraints: Constraints) -> None:
    """Layers whose ops mix samples (training BatchNorm) only train as on one device when they see the
    whole batch: refuse pins that would split it, naming the layer and the op."""
    coupled = [layer for layer in lg.layers if layer.batch_coupled]
    if not coupled:
        return
    bad = [f"dp={constraints.dp}" for _ in [0] if constraints.dp not in (None, 1)]
    bad += [f"microbatches={constraints.microbatches}" for _ in [0] if constraints.microbatches not in (None, 1)]
    if bad:
        layer = coupled[0]
        raise ConstraintError(
            f"layer {layer.name} uses {layer.batch_coupled}, whose statistics come from the whole batch, so "
            f"{' and '.join(bad)} would change training; pin dp=1 and microbatches=1 (tp/pp still apply), "
            f"or use a per-sample norm (LayerNorm, GroupNorm) or eval-mode batch norm")


def candidates(cluster: Cluster, batch: int, num_layers: int, constraints: Constraints,
               batch_coupled: bool = False) -> list[tuple[int, int, str]]:
    """UniAP's outer loop: (pp, microbatches, schedule) triples worth solving."""
    if batch_coupled:  # one microbatch only (see check_batch_coupling)
        constraints = Constraints(**{**constraints.to_dict(), "microbatches": 1})
    out = []
    for pp in pipeline_degrees(cluster, num_layers, constraints):
        if constraints.microbatches is not None:
            counts = [constraints.microbatches]
        else:
            counts = sorted({c for c in divisors(batch) if c >= pp and (c & (c - 1) == 0 or c % pp == 0)})
            counts = [c for c in counts if c <= max(4 * pp, 8)] or [c for c in divisors(batch) if c >= pp][:1]
        if constraints.schedule not in (None,) + RUNNABLE_SCHEDULES:
            raise ConstraintError(f"schedule {constraints.schedule!r} is not supported by this version yet; "
                                  f"pin one of {', '.join(RUNNABLE_SCHEDULES)}")
        if pp == 1:
            schedules = [constraints.schedule or "1f1b"]
        else:
            schedules = [constraints.schedule] if constraints.schedule else ["1f1b", "gpipe"]
        for c in counts:
            if batch % c:
                continue
            for schedule in schedules:
                if schedule == "1f1b" and 1 < pp and c < pp:
                    # 1F1B needs a microbatch per stage in flight (torch's Schedule1F1B refuses fewer);
                    # with fewer it degenerates into GPipe anyway.
                    if constraints.schedule is None and "gpipe" not in schedules:
                        out.append((pp, c, "gpipe"))
                    continue
                out.append((pp, c, schedule))
    if not out:
        raise ConstraintError(
            f"no (pp, microbatches) fits a global batch of {batch} on {cluster.world_size} devices under "
            f"{constraints}; use a batch divisible by the microbatch count (and dp)")
    return out


def solve_plan(analysis: Analysis, cluster: Cluster, constraints: Constraints, planner: str,
               time_limit_s: float, progress=None, mip_gap: float | None = None) -> Plan:
    from fxplan.passes.cost.model import CostModel
    from fxplan.passes.solve.problem import evaluate

    if planner not in PLANNERS:
        raise ConstraintError(f"unknown planner {planner!r}; use one of {', '.join(PLANNERS)}")
    say = progress or (lambda msg: None)
    lg = analysis.layer_graph
    batch = lg.batch_size
    check_batch_coupling(lg, constraints)
    cands = candidates(cluster, batch, len(lg.layers), constraints,
                       batch_coupled=any(layer.batch_coupled for layer in lg.layers))
    model = CostModel(lg, analysis.space, cluster, batch, constraints)
    cands = [cand for cand in cands if model.problem(*cand) is not None]
    if not cands:
        raise ConstraintError(_why_no_candidate(cluster, batch, len(lg.layers), constraints))
    start = time.perf_counter()
    if planner == "grid":
        from fxplan.passes.solve.grid import grid_search

        result = grid_search(model, cands)
        if result is None:
            _raise_infeasible(model, cands, cluster)
        problem = result.problem
        pp, c, schedule = problem.pp, problem.microbatches, problem.schedule
        stage_of, strategy_of = result.stage_of, result.strategy_of
        solver = SolverInfo(status="optimal", objective=result.evaluation.iteration_s, gap=0.0,
                            seconds=time.perf_counter() - start, planner="grid", candidates=result.tried)
    else:
        from fxplan.passes.solve.search import search

        # Small chains are solved to optimality (they cost milliseconds); big ones stop at a 0.5 % gap,
        # inside the 1 % the plan promises, which is what keeps a 64-device search in seconds.
        target = mip_gap if mip_gap is not None else (1e-6 if len(lg.layers) <= 12 else 5e-3)
        res = search(model.problem, cands, time_limit_s=time_limit_s, progress=say,
                     method="miqp" if planner == "miqp" else "exhaustive", mip_gap=target)
        if res.best is None:
            _raise_infeasible(model, cands, cluster, res)
        (pp, c, schedule) = res.candidate
        stage_of, strategy_of = res.best.stage_of, res.best.strategy_of
        objective, gap, status = res.best.objective, res.best.gap, res.best.status
        if planner == "miqp":
            # The grid's plans lie inside the MIQP's space and cost ~0.1 s to score: use the best one
            # as an incumbent, so a MILP stopped at its gap or time limit never returns a plan slower
            # than the Megatron-style baseline. The proven floor is unchanged, so the gap only shrinks.
            from fxplan.passes.solve.grid import grid_search

            grid = grid_search(model, cands)
            if grid is not None and grid.evaluation.iteration_s < objective * (1 - 1e-12):
                floor = objective * (1 - gap) if gap < 1 else 0.0
                pp, c, schedule = grid.problem.pp, grid.problem.microbatches, grid.problem.schedule
                stage_of, strategy_of = grid.stage_of, grid.strategy_of
                objective = grid.evaluation.iteration_s
                gap = max(0.0, (objective - floor) / objective) if objective > 0 else 0.0
                status = "optimal" if gap <= target + 1e-9 else status
        solver = SolverInfo(status=status, objective=objective, gap=gap,
                            seconds=time.perf_counter() - start, planner=planner,
                            candidates=res.considered, pruned=res.pruned)
    problem = model.problem(pp, c, schedule)
    ev = evaluate(problem, stage_of, strategy_of)
    strategies = model.strategies(pp, c)
    return build_plan(lg, cluster, pp, c, schedule, stage_of,
                      [strategies[u][k] for u, k in enumerate(strategy_of)], ev, solver, model.assumptions())


def _why_no_candidate(cluster: Cluster, batch: int, num_layers: int, constraints: Constraints) -> str:
    """The pins or the batch leave no (pp, microbatches, strategy) at all: say which and what to do."""
    n = cluster.world_size
    stage_sizes = [n // pp for pp in pipeline_degrees(cluster, num_layers, constraints)]
    dp, tp = constraints.dp, constraints.tp
    if dp is not None and tp is not None and dp * tp not in stage_sizes:
        return (f"dp*tp = {dp}*{tp} = {dp * tp} must equal the devices of a stage ({n}/pp: {sorted(set(stage_sizes))}); "
                f"change dp, tp or pp")
    if dp is not None and not any(size % dp == 0 for size in stage_sizes):
        return f"dp={dp} does not divide the devices of any stage ({sorted(set(stage_sizes))}); pick a divisor"
    if dp is not None and batch % dp:
        return f"the global batch of {batch} does not split over dp={dp}; use a batch divisible by {dp}"
    if constraints.microbatches is not None and batch % constraints.microbatches:
        return (f"the global batch of {batch} does not split into {constraints.microbatches} microbatches; "
                f"use a batch divisible by it")
    return (f"no (pp, microbatches, strategy) fits a global batch of {batch} on {n} devices under {constraints}; "
            f"use a batch divisible by microbatches x dp, or relax the pins")


def _raise_infeasible(model, cands, cluster, res=None):
    need = getattr(res, "min_memory_needed", None) if res is not None else None
    have = cluster.memory_bytes
    if need and need != float("inf"):
        raise InfeasiblePlanError(
            f"no plan fits device memory: the best candidate needs {need / 2**30:.2f} GiB per device, a device "
            f"has {have / 2**30:.2f} GiB; use more devices, a smaller batch, or allow fsdp/recompute")
    raise InfeasiblePlanError(
        f"no plan fits device memory ({have / 2**30:.2f} GiB per device); use more devices, a smaller batch, "
        f"or allow fsdp/recompute")


def build_plan(lg, cluster: Cluster, pp: int, c: int, schedule: str, stage_of, strategy_list, ev,
               solver: SolverInfo, assumptions: dict) -> Plan:
    n_s = cluster.world_size // pp
    stages = []
    for i in range(pp):
        names = [lg.layers[u].name for u in range(len(lg.layers)) if stage_of[u] == i]
        strategies = {lg.layers[u].name: strategy_list[u] for u in range(len(lg.layers)) if stage_of[u] == i}
        stages.append(Stage(index=i, layers=tuple(names), devices=tuple(range(i * n_s, (i + 1) * n_s)),
                            strategies=strategies, estimated_memory_bytes=ev.stage_memory[i],
                            estimated_compute_s=ev.stage_compute_s[i]))
    return Plan(pp=pp, microbatches=c, schedule=schedule, stages=tuple(stages),
                estimated_iteration_s=ev.iteration_s, solver=solver, batch_size=lg.batch_size,
                world_size=cluster.world_size, assumptions=assumptions, model=model_signature(lg))


def model_signature(lg) -> dict:
    return {"layers": [layer.name for layer in lg.layers],
            "params": int(sum(layer.param_numel for layer in lg.layers))}


def check_given_plan(plan: Plan, analysis: Analysis, cluster: Cluster) -> Plan:
    """Validate a user-given plan against the model and cluster and re-estimate it with the cost model."""
    from fxplan.passes.cost.model import CostModel
    from fxplan.passes.solve.problem import evaluate

    lg = analysis.layer_graph
    names = [layer.name for layer in lg.layers]
    if list(plan.layers) != names:
        missing = sorted(set(names) - set(plan.layers))
        extra = sorted(set(plan.layers) - set(names))
        raise PlanFileError(
            f"plan layers do not match the model's layers in order (missing {missing[:5]}, unknown {extra[:5]}); "
            f"the model's layers are {names[:6]}{'...' if len(names) > 6 else ''}")
    params = int(sum(layer.param_numel for layer in lg.layers))
    if plan.model.get("params") not in (None, params):
        raise PlanFileError(f"plan was made for a model with {plan.model['params']:,} parameters; this model has "
                            f"{params:,}: re-plan it (layer names alone match)")
    if plan.schedule not in RUNNABLE_SCHEDULES:
        raise PlanFileError(f"plan schedule {plan.schedule!r} is not supported by this version yet; use one of "
                            f"{', '.join(RUNNABLE_SCHEDULES)}")
    if plan.world_size not in (0, cluster.world_size):
        raise PlanFileError(f"plan is for {plan.world_size} devices but the cluster has {cluster.world_size}")
    if plan.batch_size not in (0, lg.batch_size):
        raise PlanFileError(f"plan is for a global batch of {plan.batch_size} but the example batch has {lg.batch_size}")
    plan.check_shape()
    if sum(len(s.devices) for s in plan.stages) != cluster.world_size:
        raise PlanFileError(f"plan stages cover {sum(len(s.devices) for s in plan.stages)} devices, the cluster has "
                            f"{cluster.world_size}")
    if plan.schedule == "1f1b" and plan.microbatches < plan.pp:
        raise PlanFileError(f"1f1b needs at least one microbatch per stage: the plan has {plan.microbatches} "
                            f"microbatches for pp={plan.pp}; use more microbatches or gpipe")
    if lg.batch_size % plan.microbatches:
        raise PlanFileError(f"global batch {lg.batch_size} does not divide into {plan.microbatches} microbatches")
    for u, layer in enumerate(lg.layers):
        strat = plan.strategy(layer.name)
        if layer.batch_coupled and (strat.dp > 1 or plan.microbatches > 1):
            raise PlanFileError(
                f"layer {layer.name} uses {layer.batch_coupled}, whose statistics come from the whole batch; "
                f"the plan gives it dp={strat.dp} with {plan.microbatches} microbatches, which would change "
                f"training: use dp=1 for it and microbatches=1")
        if (lg.batch_size // plan.microbatches) % strat.dp:
            raise PlanFileError(f"layer {layer.name}: microbatch of {lg.batch_size // plan.microbatches} rows does not "
                                f"split over dp={strat.dp}")
        if strat.tp > 1 or strat.spec != "R":
            try:
                analysis.space.spec(u, strat.tp, strat.spec)
            except KeyError:
                labels = [s.label for s in analysis.space.for_layer(u, strat.tp)]
                raise PlanFileError(f"layer {layer.name}: no tp={strat.tp} sharding labelled {strat.spec!r}; "
                                    f"known: {labels or 'none (tp not enumerated)'}") from None
    # Re-estimate with the same formula the planners use.
    model = CostModel(lg, analysis.space, cluster, lg.batch_size, Constraints())
    problem = model.problem(plan.pp, plan.microbatches, plan.schedule)
    strategies = model.strategies(plan.pp, plan.microbatches)
    stage_of, strategy_of = [], []
    for u, layer in enumerate(lg.layers):
        stage_of.append(plan.stage_of(layer.name))
        wanted = plan.strategy(layer.name)
        matches = [k for k, s in enumerate(strategies[u]) if s == wanted]
        strategy_of.append(matches[0] if matches else None)
    if problem is None or None in strategy_of:
        return plan
    ev = evaluate(problem, stage_of, strategy_of)
    stages = [Stage(index=s.index, layers=s.layers, devices=s.devices, strategies=s.strategies,
                    estimated_memory_bytes=ev.stage_memory[s.index], estimated_compute_s=ev.stage_compute_s[s.index])
              for s in plan.stages]
    return Plan(pp=plan.pp, microbatches=plan.microbatches, schedule=plan.schedule, stages=tuple(stages),
                estimated_iteration_s=ev.iteration_s,
                solver=SolverInfo(status="given", objective=ev.iteration_s, planner="given"),
                batch_size=lg.batch_size, world_size=cluster.world_size, chunks=plan.chunks,
                assumptions=model.assumptions(), model=model_signature(lg))


def stderr_progress(msg: str) -> None:
    print(f"[fxplan] {msg}", file=sys.stderr, flush=True)
