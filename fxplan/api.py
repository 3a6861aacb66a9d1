"""fxplan.compile and the Compiled handle (README.md "Quickstart")."""

from __future__ import annotations

import os
import time
import warnings

from fxplan.cluster import Cluster
from fxplan.constraints import Constraints
from fxplan.errors import ClusterError, ConstraintError, DistributedSetupError, FxplanError, ModelError, PlanFileError
from fxplan.model_checks import check_forward_on_meta, check_input_devices, check_matmul_dtypes, preserved
from fxplan.passes.loss_ratio import unproven_message
from fxplan.plan import Plan
from fxplan.planner import PLANNERS, Analysis, analyse, check_given_plan, solve_plan, stderr_progress
from fxplan.search_space import check_plan_meets_pins


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

    def rank_program(self, rank: int, params=None, meta: bool = False, stage: int | None = None):
        from fxplan.codegen.emit import emit_rank
        from fxplan.runtime.collectives import GRAPH_OPS

        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < self.plan.world_size:
            raise DistributedSetupError(f"rank {rank!r} is outside the plan's {self.plan.world_size} ranks")
        if params is not None:
            return emit_rank(self.traced, self.layer_graph, self.space, self.plan, rank, params=params, ops=GRAPH_OPS,
                             stage=stage)
        key = (rank, meta, stage)
        if key not in self._programs:
            self._programs[key] = emit_rank(self.traced, self.layer_graph, self.space, self.plan, rank,
                                            params="meta" if meta else None, ops=GRAPH_OPS, stage=stage)
        return self._programs[key]

    def rank_module(self, rank: int):
        """The torch.fx.GraphModule that rank `rank` runs (its stage, its shards, collectives as calls)."""
        return self.rank_program(rank, meta=_is_meta(self.model)).gm

    def distribute(self, init_fn=None, timeout_s=None):
        """Join the torchrun process groups and return the Runner for this rank. `timeout_s` bounds every
        collective and p2p transfer (default 30 s, or FXPLAN_TIMEOUT_S): a stuck peer ends the job."""
        from fxplan.runtime.agreement import check_ranks_agree
        from fxplan.runtime.process import init_default_group, set_timeout
        from fxplan.runtime.runner import Runner

        set_timeout(timeout_s)
        init_default_group()
        check_ranks_agree(self.model, self.constraints, self.example_inputs)
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
    if plan is not None:
        check_plan_meets_pins(plan, constraints)

    distributed = _torchrun_env()
    rank = int(os.environ.get("RANK", 0)) if distributed else 0
    progress = stderr_progress if (verbose and rank == 0) else None
    start = time.perf_counter()
    check_input_devices(model, example_inputs)
    check_forward_on_meta(model, example_inputs)
    with preserved(model):
        analysis = analyse(model, example_inputs, cluster, constraints, progress)
    check_matmul_dtypes(analysis.traced)
    if plan is not None:
        chosen = check_given_plan(plan, analysis, cluster)
    elif distributed:
        chosen = _agree_on_plan(analysis, cluster, constraints, planner, time_limit_s, progress, start)
    else:
        chosen = solve_plan(analysis, cluster, constraints, planner, time_limit_s, progress, started=start)
    if (loss_warning := unproven_message(analysis.traced, chosen)) is not None:
        warnings.warn(loss_warning, stacklevel=2)
    if progress:
        progress(f"plan ready in {time.perf_counter() - start:.2f} s: estimated iteration "
                 f"{chosen.estimated_iteration_s * 1e3:.3f} ms")
    return Compiled(model, example_inputs, cluster, constraints, analysis, chosen)


def _agree_on_plan(analysis, cluster, constraints, planner, time_limit_s, progress, started=None) -> Plan:
    """Inside torchrun: rank 0 plans, every rank receives the same plan (measurements never diverge)."""
    import torch.distributed as dist

    from fxplan.runtime.process import init_default_group, plan_wait_group

    init_default_group()
    waiting = plan_wait_group(time_limit_s)
    payload: list = [None]
    failure = None
    if dist.get_rank() == 0:
        try:
            payload[0] = solve_plan(analysis, cluster, constraints, planner, time_limit_s, progress,
                                    started=started).to_json()
        except Exception as exc:  # noqa: BLE001 - every rank must raise, not wait for a broadcast that never comes
            failure = exc
            payload[0] = {"error": type(exc).__name__, "message": f"rank 0 could not plan: {exc}"}
    dist.broadcast_object_list(payload, src=0, group=waiting)
    dist.destroy_process_group(waiting)
    if failure is not None:
        raise failure
    received = payload[0]
    if isinstance(received, dict):
        import fxplan.errors as errors

        raise getattr(errors, received["error"], FxplanError)(received["message"])
    return Plan.from_json(received)


def load_checkpoint(path, model, optimizer=None):
    """Load a checkpoint written by runner.save (under any plan) into the plain single-device model and
    optionally its optimizer (built over model.parameters()); keys are the model's state_dict names."""
    from fxplan.runtime.checkpoint import load_plain

    load_plain(path, model, optimizer)
