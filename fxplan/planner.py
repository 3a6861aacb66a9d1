"""The planning pipeline: trace -> coarsen -> strategy space -> cost model -> search -> Plan.

This module orchestrates: fxplan/search_space.py says which candidates the pins leave, passes/solve/
searches them (grid.py for the baseline, search.py for miqp and exhaustive), and the choice becomes a
Plan scored by the same cost model.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, replace

from fxplan.cluster import Cluster
from fxplan.constraints import PINNED_ONLY_SCHEDULES, RUNNABLE_SCHEDULES, Constraints, chunks_of, enough_microbatches
from fxplan.errors import ConstraintError, InfeasiblePlanError, PlanFileError
from fxplan.passes.cost.model import CostModel
from fxplan.passes.cost.schedule_costs import GREEDY_SHARE
from fxplan.passes.ir import LayerGraph, StrategySpace, Traced
from fxplan.passes.sharding.replicated import replicated_warnings
from fxplan.passes.solve.grid import grid_search
from fxplan.passes.solve.balance import even_stages
from fxplan.passes.solve.problem import Evaluation, evaluate
from fxplan.passes.solve.search import Assignment, search
from fxplan.plan import Plan, SolverInfo, Stage, Strategy, stage_placement
from fxplan.schedule_plan import schedule_assumptions
from fxplan.search_space import (
    candidates, check_batch_coupling, dominated_by, pipeline_degrees, tensor_degrees, why_no_candidate)

PLANNERS = ("miqp", "grid", "exhaustive")

FINISH_SHARE = 0.1
"""Share of the time limit kept for what follows the search: the chosen plan scored, its schedule's
lists simulated in full (a second for 32 stages of 64 microbatches), its warnings."""


@dataclass(frozen=True, slots=True)
class Analysis:
    """What every rank derives from the model alone (deterministic, no measurement)."""

    traced: Traced
    layer_graph: LayerGraph
    space: StrategySpace
    tp_degrees: tuple[int, ...]


def analyse(model, example_inputs, cluster: Cluster, constraints: Constraints, progress=None) -> Analysis:
    from fxplan.passes.coarsen import coarsen
    from fxplan.passes.sharding.shard_prop import build_strategy_space
    from fxplan.passes.trace import trace

    say = progress or (lambda msg: None)
    start = time.perf_counter()
    traced = trace(model, example_inputs)
    layer_graph = coarsen(traced)
    stages = None if constraints.pp is None else constraints.pp * chunks_of(constraints.schedule)
    if stages is not None and stages > len(layer_graph.layers):
        # A pinned pipeline deeper than the default layers: cut the graph finer (at cut points).
        layer_graph = coarsen(traced, granularity=stages)
    say(f"traced ({traced.method}) and coarsened into {len(layer_graph.layers)} layers "
        f"in {time.perf_counter() - start:.2f} s")
    pps = pipeline_degrees(cluster, len(layer_graph.layers), constraints)
    tps = tensor_degrees(cluster, pps, constraints)
    start = time.perf_counter()
    space = build_strategy_space(traced, layer_graph, tps)
    say(f"sharding propagation for tp in {list(tps)}: {sum(len(v) for v in space.specs.values())} "
        f"layer shardings in {time.perf_counter() - start:.2f} s")
    return Analysis(traced=traced, layer_graph=layer_graph, space=space, tp_degrees=tps)


def solve_plan(analysis: Analysis, cluster: Cluster, constraints: Constraints, planner: str,
               time_limit_s: float, progress=None, mip_gap: float | None = None,
               started: float | None = None) -> Plan:
    """The best plan for `analysis`. `time_limit_s` is the whole budget from `started` (a
    time.perf_counter() value, default now; compile() passes its own start, so tracing counts)."""
    if planner not in PLANNERS:
        raise ConstraintError(f"unknown planner {planner!r}; use one of {', '.join(PLANNERS)}")
    say = progress or (lambda msg: None)
    start = time.perf_counter()
    # the search stops a little before the budget: scoring the chosen plan and its schedule follows
    deadline = (started if started is not None else start) + time_limit_s * (1 - FINISH_SHARE)
    lg = analysis.layer_graph
    batch = lg.batch_size
    check_batch_coupling(lg, constraints)
    cands = candidates(cluster, batch, len(lg.layers), constraints,
                       batch_coupled=any(layer.batch_coupled for layer in lg.layers))
    model = CostModel(lg, analysis.space, cluster, batch, constraints)
    bounding: dict = {}  # built once, on first use: the search reads them too, and only while it has time

    def bound_of(cand):
        if cand not in bounding:
            bounding[cand] = model.bound_problem(*cand)
        return bounding[cand]

    if planner != "miqp":
        cands = [cand for cand in cands if bound_of(cand) is not None]
    if not any(bound_of(cand) is not None for cand in cands):  # stops at the first that exists
        raise ConstraintError(why_no_candidate(cluster, batch, len(lg.layers), constraints))
    if planner == "exhaustive":
        _check_exhaustive_size(model, cands)
    if planner == "grid":
        grid = grid_search(model, cands)
        if grid is None:
            _raise_infeasible(cluster)
        chosen = Assignment(grid.candidate, grid.stage_of, grid.strategy_of)
        solver = SolverInfo(status="optimal", objective=grid.evaluation.iteration_s, gap=0.0,
                            seconds=time.perf_counter() - start, planner="grid", candidates=grid.tried)
    else:
        def grid_incumbent(cand):
            # The grid's plan of a candidate lies inside the MIQP's space and costs milliseconds to score:
            # a MILP stopped at its gap or time limit never returns a plan slower than the Megatron-style
            # baseline on the candidates it visited.
            grid = grid_search(model, [cand])
            return None if grid is None else Assignment(grid.candidate, grid.stage_of, grid.strategy_of)

        # Small chains are solved to optimality (they cost milliseconds); big ones stop at a 0.5 % gap,
        # inside the 1 % the plan promises, which is what keeps a 64-device search in seconds.
        target = mip_gap if mip_gap is not None else (1e-6 if len(lg.layers) <= 12 else 5e-3)
        res = search(model.problem, cands, deadline=deadline, progress=say,
                     method="miqp" if planner == "miqp" else "exhaustive", mip_gap=target,
                     incumbents=grid_incumbent if planner == "miqp" else (), dominated=dominated_by(cands),
                     bound_problem=lambda *cand: bound_of(cand),
                     costly=lambda cand: cand[2] in GREEDY_SHARE and cand[0] > 1)
        if res.best is None:
            _raise_infeasible(cluster, res.min_memory_needed)
        chosen = _same_price_simpler(model, Assignment(res.candidate, res.best.stage_of, res.best.strategy_of))
        solver = SolverInfo(status=res.best.status, objective=res.best.objective, gap=res.best.gap,
                            seconds=time.perf_counter() - start, planner=planner,
                            candidates=res.considered, pruned=res.pruned, solved=res.count("solved"),
                            cut=res.count("cut"), infeasible=res.count("infeasible"), bound=res.floor)
    pp, c, schedule = chosen.candidate
    problem = model.problem(pp, c, schedule)
    # where the iteration time is indifferent to the split (one microbatch), even the stages out
    chosen = Assignment(chosen.candidate, even_stages(problem, chosen.stage_of, chosen.strategy_of),
                        chosen.strategy_of)
    ev = evaluate(problem, chosen.stage_of, chosen.strategy_of)
    strategies = model.strategies(pp, c)
    assumptions = {**model.assumptions(), **schedule_assumptions(problem, chosen.stage_of, chosen.strategy_of)}
    plan = build_plan(lg, cluster, chosen, [strategies[u][k] for u, k in enumerate(chosen.strategy_of)], ev,
                      solver, assumptions)
    return with_warnings(plan, analysis)


def _same_price_simpler(model: CostModel, chosen: Assignment) -> Assignment:
    """zb-auto's lists come from the automatic scheduler (seconds to build for a long pipeline); where
    zb-h2's fixed lists price the same (equal bubble share and memory) the plan takes those."""
    pp, c, schedule = chosen.candidate
    if schedule != "zb-auto":
        return chosen
    auto, h2 = model.problem(pp, c, "zb-auto"), model.problem(pp, c, "zb-h2")
    if h2 is None or h2.bubble_share != auto.bubble_share or any(
            h2.in_flight(i) != auto.in_flight(i) for i in range(pp)):
        return chosen
    return Assignment((pp, c, "zb-h2"), chosen.stage_of, chosen.strategy_of)


def with_warnings(plan: Plan, analysis: Analysis) -> Plan:
    """The plan with the ops its strategies leave replicated named (passes/sharding/replicated.py)."""
    lg = analysis.layer_graph
    return dataclasses.replace(plan, warnings=replicated_warnings(analysis.traced, lg.layers, analysis.space,
                                                                  plan.strategy))


def _check_exhaustive_size(model: CostModel, cands) -> None:
    from fxplan.passes.solve.exhaustive import EXHAUSTIVE_LIMIT, count_assignments

    worst = max(cands, key=lambda cand: count_assignments(model.problem(*cand)))
    n = count_assignments(model.problem(*worst))
    if n > EXHAUSTIVE_LIMIT:
        raise ConstraintError(
            f"planner='exhaustive' would enumerate {n:,} assignments for (pp, microbatches, schedule) = {worst}, over "
            f"its limit of {EXHAUSTIVE_LIMIT:,}; use planner='miqp' (same space, proven gap), or pin pp/tp to shrink "
            f"the problem")


def _raise_infeasible(cluster: Cluster, need: float | None = None):
    have = cluster.memory_bytes
    if need and need != float("inf"):
        raise InfeasiblePlanError(
            f"no plan fits device memory: the best candidate needs {need / 2**30:.2f} GiB per device, a device "
            f"has {have / 2**30:.2f} GiB; use more devices, a smaller batch, or allow fsdp/recompute")
    raise InfeasiblePlanError(
        f"no plan fits device memory ({have / 2**30:.2f} GiB per device); use more devices, a smaller batch, "
        f"or allow fsdp/recompute")


def build_plan(lg: LayerGraph, cluster: Cluster, chosen: Assignment, strategy_list: list[Strategy],
               ev: Evaluation, solver: SolverInfo, assumptions: dict) -> Plan:
    pp, c, schedule = chosen.candidate
    n_s = cluster.world_size // pp
    placement = stage_placement(schedule, pp)
    stages = []
    for i in range(placement.num_stages):
        names = [lg.layers[u].name for u in range(len(lg.layers)) if chosen.stage_of[u] == i]
        strategies = {lg.layers[u].name: strategy_list[u] for u in range(len(lg.layers)) if chosen.stage_of[u] == i}
        r = placement.rank_of(i)  # the stage's place along the pipeline: its block of n/pp ranks
        stages.append(Stage(index=i, layers=tuple(names), devices=tuple(range(r * n_s, (r + 1) * n_s)),
                            strategies=strategies, estimated_memory_bytes=ev.stage_memory[i],
                            estimated_compute_s=ev.stage_compute_s[i]))
    return Plan(pp=pp, microbatches=c, schedule=schedule, stages=tuple(stages),
                estimated_iteration_s=ev.iteration_s, solver=solver, batch_size=lg.batch_size,
                world_size=cluster.world_size, chunks=placement.chunks, assumptions=assumptions,
                model=model_signature(lg))


def model_signature(lg: LayerGraph) -> dict:
    return {"layers": [layer.name for layer in lg.layers],
            "params": int(sum(layer.param_numel for layer in lg.layers))}


def check_given_plan(plan: Plan, analysis: Analysis, cluster: Cluster) -> Plan:
    """Validate a user-given plan against the model and cluster and re-estimate it with the cost model."""
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
    if plan.schedule not in RUNNABLE_SCHEDULES + PINNED_ONLY_SCHEDULES:
        raise PlanFileError(f"plan schedule {plan.schedule!r} is not supported by this version yet; use one of "
                            f"{', '.join(RUNNABLE_SCHEDULES + PINNED_ONLY_SCHEDULES)}")
    if plan.chunks != chunks_of(plan.schedule):
        raise PlanFileError(f"plan has chunks={plan.chunks} but schedule {plan.schedule!r} runs "
                            f"{chunks_of(plan.schedule)} per rank; set chunks to {chunks_of(plan.schedule)}")
    if plan.world_size not in (0, cluster.world_size):
        raise PlanFileError(f"plan is for {plan.world_size} devices but the cluster has {cluster.world_size}")
    if plan.batch_size not in (0, lg.batch_size):
        raise PlanFileError(f"plan is for a global batch of {plan.batch_size} but the example batch has {lg.batch_size}")
    plan.check_shape()
    covered = len({d for s in plan.stages for d in s.devices})  # a rank holding several chunks counts once
    if covered != cluster.world_size:
        raise PlanFileError(f"plan stages cover {covered} devices, the cluster has {cluster.world_size}")
    if not enough_microbatches(plan.schedule, plan.pp, plan.microbatches):
        raise PlanFileError(f"{plan.schedule} needs at least one microbatch per stage: the plan has {plan.microbatches} "
                            f"microbatches for pp={plan.pp}; use more microbatches or gpipe")
    if lg.batch_size % plan.microbatches:
        raise PlanFileError(f"global batch {lg.batch_size} does not divide into {plan.microbatches} microbatches")
    for u, layer in enumerate(lg.layers):
        strat = plan.strategy(layer.name)
        if layer.batch_coupled and plan.microbatches > 1:
            raise PlanFileError(
                f"layer {layer.name} uses {layer.batch_coupled}, whose statistics come from the whole batch; "
                f"the plan runs {plan.microbatches} microbatches, each normalised alone, which would change "
                f"training: use microbatches=1 (dp synchronises the statistics)")
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
    # Re-estimate with the same formula the planners use. FSDP's keep-gathered policy is a pin
    # (Constraints(reshard=False)), so a plan keeping every FSDP layer gathered is scored under it.
    fsdp = [plan.strategy(layer.name) for layer in lg.layers if plan.strategy(layer.name).fsdp]
    keep = bool(fsdp) and not any(s.reshard for s in fsdp)
    model = CostModel(lg, analysis.space, cluster, lg.batch_size, Constraints(reshard=False if keep else None))
    problem = model.problem(plan.pp, plan.microbatches, plan.schedule)
    strategies = model.strategies(plan.pp, plan.microbatches)
    stage_of, strategy_of = [], []
    for u, layer in enumerate(lg.layers):
        stage_of.append(plan.stage_of(layer.name))
        wanted = plan.strategy(layer.name)
        matches = [k for k, s in enumerate(strategies[u]) if s == wanted]
        if not matches and wanted.fsdp and not layer.param_numel:
            # a pinned fsdp=True plan marks parameterless layers fsdp too; unpinned they have only the
            # fsdp=False twin, which costs exactly the same
            matches = [k for k, s in enumerate(strategies[u]) if s == replace(wanted, fsdp=False, reshard=s.reshard)]
        if not matches and not any(replace(s, reshard=wanted.reshard) == wanted for s in strategies[u]):
            known = sorted({str(s) for s in strategies[u]})
            raise PlanFileError(f"layer {layer.name}: strategy {wanted} is not one this model can have on a stage of "
                                f"{len(plan.stages[0].devices)} devices (known: {', '.join(known[:8])}"
                                f"{'...' if len(known) > 8 else ''}); pick one of them or re-plan")
        strategy_of.append(matches[0] if matches else None)
    if problem is None:
        raise PlanFileError(f"the plan's (pp={plan.pp}, microbatches={plan.microbatches}, {plan.schedule}) cannot run "
                            f"this model on this cluster; re-plan, or change pp/microbatches")
    if None in strategy_of:  # mixes FSDP policies: valid, but no one pin scores it
        return with_warnings(plan, analysis)
    ev = evaluate(problem, stage_of, strategy_of)
    stages = [Stage(index=s.index, layers=s.layers, devices=s.devices, strategies=s.strategies,
                    estimated_memory_bytes=ev.stage_memory[s.index], estimated_compute_s=ev.stage_compute_s[s.index])
              for s in plan.stages]
    return with_warnings(Plan(
        pp=plan.pp, microbatches=plan.microbatches, schedule=plan.schedule, stages=tuple(stages),
        estimated_iteration_s=ev.iteration_s,
        solver=SolverInfo(status="given", objective=ev.iteration_s, planner="given"),
        batch_size=lg.batch_size, world_size=cluster.world_size, chunks=plan.chunks,
        assumptions={**model.assumptions(), **schedule_assumptions(problem, stage_of, strategy_of)},
        model=model_signature(lg)), analysis)


def stderr_progress(msg: str) -> None:
    print(f"[fxplan] {msg}", file=sys.stderr, flush=True)
