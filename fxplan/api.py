"""fxplan.compile and the Compiled handle (README.md "Quickstart")."""

from __future__ import annotations

import os
import time

from fxplan.cluster import Cluster
from fxplan.constraints import Constraints
from fxplan.errors import ClusterError, ConstraintError, DistributedSetupError, FxplanError, ModelError, PlanFileError
from fxplan.plan import Plan
from fxplan.planner import PLANNERS, Analysis, analyse, check_given_plan, solve_plan, stderr_progress


class Compiled:
    """A model, its analysis and the chosen plan; turns into per-rank modules and a runner."""

    def __init__(self, model, example_inputs, cluster: Cluster, constraints: Constraints, analysis: Analysis,
                 plan: Plan):
        self.model = model
        self.example_inputs = example_inputs
        self.cluster = cluster
        self.constraints = constraints
        self.analysis = analysis
        self.plan = plan
        self._programs: dict[int, object] = {}

    # the pieces codegen/runtime read
    @property
    def traced(self):
        return self.analysis.traced

    @property
    def layer_graph(self):
        return self.analysis.layer_graph

    @property
    def space(self):
        return self.analysis.space

    @property
    def source(self):
        """What every rank's program is emitted from (codegen's EmitSource)."""
        from fxplan.codegen.program import EmitSource

        return EmitSource(self.traced, self.layer_graph, self.space)

    def rank_program(self, rank: int, params=None, meta: bool = False):
        from fxplan.codegen.emit import emit_rank
        from fxplan.runtime.collectives import GRAPH_OPS

        if not isinstance(rank, int) or not 0 <= rank < self.plan.world_size:
            raise DistributedSetupError(f"rank {rank!r} is outside the plan's {self.plan.world_size} ranks")
        if params is not None:
            return emit_rank(self.traced, self.layer_graph, self.space, self.plan, rank, params=params, ops=GRAPH_OPS)
        key = (rank, meta)
        if key not in self._programs:
            self._programs[key] = emit_rank(self.traced, self.layer_graph, self.space, self.plan, rank,
                                            params="meta" if meta else None, ops=GRAPH_OPS)
        return self._programs[key]

    def rank_module(self, rank: int):
        """The torch.fx.GraphModule that rank `rank` runs (its stage, its shards, collectives as calls)."""
        return self.rank_program(rank, meta=_is_meta(self.model)).gm

    def distribute(self, init_fn=None):
        """Join the torchrun process groups and return the Runner for this rank."""
        from fxplan.runtime.runner import Runner

        return Runner(self.model, self.plan, self.source, init_fn=init_fn)


def _is_meta(model) -> bool:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.is_meta
    return False


def _validate_inputs(model, example_inputs):
    import torch

    from fxplan.passes.trace import check_inputs

    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"compile() takes an nn.Module, got {type(model).__name__}")
    return check_inputs(example_inputs)


def _torchrun_env() -> bool:
    from fxplan.runtime.process import in_torchrun

    return in_torchrun()


def compile(model, example_inputs, cluster: Cluster | None = None, constraints: Constraints | None = None,
            planner: str = "miqp", plan: Plan | None = None, time_limit_s: float = 60, verbose: bool = True):
    """Trace, plan and prepare `model` for hybrid-parallel training: trace, coarsen, propagate shardings, plan."""
    example_inputs = _validate_inputs(model, example_inputs)
    if cluster is None:
        raise ClusterError("compile() needs a cluster: fxplan.Cluster.preset('a100-80g', nodes=, devices_per_node=) "
                           "or fxplan.Cluster.local(world_size=)")
    if not isinstance(cluster, Cluster):
        raise ClusterError(f"cluster must be an fxplan.Cluster, got {type(cluster).__name__}")
    constraints = constraints or Constraints()
    if not isinstance(constraints, Constraints):
        raise ConstraintError(f"constraints must be an fxplan.Constraints, got {type(constraints).__name__}")
    if planner not in PLANNERS:
        raise ConstraintError(f"unknown planner {planner!r}; use one of {', '.join(PLANNERS)}")
    if plan is not None and not isinstance(plan, Plan):
        raise PlanFileError(f"plan= takes an fxplan.Plan (e.g. Plan.from_json(text)), got {type(plan).__name__}")
    if not (isinstance(time_limit_s, (int, float)) and time_limit_s > 0):
        raise ConstraintError(f"time_limit_s must be a positive number, got {time_limit_s!r}")

    distributed = _torchrun_env()
    rank = int(os.environ.get("RANK", 0)) if distributed else 0
    progress = stderr_progress if (verbose and rank == 0) else None
    start = time.perf_counter()
    analysis = analyse(model, example_inputs, cluster, constraints, progress)
    if plan is not None:
        chosen = check_given_plan(plan, analysis, cluster)
    elif distributed:
        chosen = _agree_on_plan(analysis, cluster, constraints, planner, time_limit_s, progress)
    else:
        chosen = solve_plan(analysis, cluster, constraints, planner, time_limit_s, progress)
    if progress:
        progress(f"plan ready in {time.perf_counter() - start:.2f} s: estimated iteration "
                 f"{chosen.estimated_iteration_s * 1e3:.3f} ms")
    return Compiled(model, example_inputs, cluster, constraints, analysis, chosen)


def _agree_on_plan(analysis, cluster, constraints, planner, time_limit_s, progress) -> Plan:
    """Inside torchrun: rank 0 plans, every rank receives the same plan (measurements never diverge)."""
    import torch
    import torch.distributed as dist

    from fxplan.runtime.process import init_default_group

    init_default_group()
    payload: list = [None]
    if dist.get_rank() == 0:
        try:
            payload[0] = solve_plan(analysis, cluster, constraints, planner, time_limit_s, progress).to_json()
        except FxplanError as exc:  # every rank must raise, not hang waiting for the broadcast
            payload[0] = {"error": type(exc).__name__, "message": str(exc)}
    dist.broadcast_object_list(payload, src=0)
    received = payload[0]
    if isinstance(received, dict):
        import fxplan.errors as errors

        raise getattr(errors, received["error"], FxplanError)(received["message"])
    return Plan.from_json(received)


def load_checkpoint(path, model, optimizer=None):
    raise FxplanError("fxplan.load_checkpoint is not implemented yet in this version (checkpointing is planned); "
                      "use runner.full_state_dict() and torch.save for now")
