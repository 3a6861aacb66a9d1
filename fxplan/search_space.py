"""What the pins and the cluster leave to search: pipeline and tensor-parallel degrees, the (pp,
microbatches, schedule) candidates, and, when nothing is left, which pin to change.

A pin's value is matched by `Constraints.allows`; here it is checked against the cluster, the batch
and the model, so every message about a pin that cannot hold comes from this file.
"""

from __future__ import annotations

from dataclasses import replace

from fxplan.cluster import Cluster
from fxplan.constraints import RUNNABLE_SCHEDULES, Constraints
from fxplan.errors import ConstraintError
from fxplan.passes.ir import LayerGraph
from fxplan.passes.solve.problem import Candidate


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enough_microbatches(schedule: str, pp: int, microbatches: int) -> bool:
    """1F1B needs a microbatch per stage in flight (torch's Schedule1F1B refuses fewer); with fewer it
    degenerates into GPipe anyway."""
    return not (schedule == "1f1b" and microbatches < pp)


def _fits_no_stage(name: str, value: int, stage_sizes) -> str | None:
    sizes = sorted(set(stage_sizes))
    if any(size % value == 0 for size in sizes):
        return None
    return f"{name}={value} does not divide the devices of any stage ({sizes})"


def pipeline_degrees(cluster: Cluster, num_layers: int, constraints: Constraints) -> list[int]:
    n = cluster.world_size
    if constraints.pp is not None:
        if n % constraints.pp:
            raise ConstraintError(f"pp={constraints.pp} does not divide the {n} devices; pick a divisor of {n}")
        if constraints.pp > num_layers:
            raise ConstraintError(f"pp={constraints.pp} exceeds the model's {num_layers} layers; pin a smaller pp")
    return [pp for pp in divisors(n) if pp <= num_layers and constraints.allows(pp=pp)]


def tensor_degrees(cluster: Cluster, pps: list[int], constraints: Constraints) -> tuple[int, ...]:
    """tp degrees worth enumerating: divisors of a stage's device count, inside one node."""
    sizes = {cluster.world_size // pp for pp in pps}
    if constraints.tp is not None:
        problem = _fits_no_stage("tp", constraints.tp, sizes)
        if problem:
            raise ConstraintError(problem)
        return tuple(sorted({1, constraints.tp}))
    degrees = {d for size in sizes for d in divisors(size) if d <= cluster.devices_per_node}
    return tuple(sorted(degrees))


def check_batch_coupling(layer_graph: LayerGraph, constraints: Constraints) -> None:
    """Layers whose ops mix samples (training BatchNorm) only train as on one device when they see the
    whole batch: refuse pins that would split it, naming the layer and the op."""
    coupled = [layer for layer in layer_graph.layers if layer.batch_coupled]
    if not coupled:
        return
    bad = [f"{name}={value}" for name, value in (("dp", constraints.dp), ("microbatches", constraints.microbatches))
           if value not in (None, 1)]
    if bad:
        layer = coupled[0]
        raise ConstraintError(
            f"layer {layer.name} uses {layer.batch_coupled}, whose statistics come from the whole batch, so "
            f"{' and '.join(bad)} would change training; pin dp=1 and microbatches=1 (tp/pp still apply), "
            f"or use a per-sample norm (LayerNorm, GroupNorm) or eval-mode batch norm")


def candidates(cluster: Cluster, batch: int, num_layers: int, constraints: Constraints,
               batch_coupled: bool = False) -> list[Candidate]:
    """UniAP's outer loop: (pp, microbatches, schedule) triples worth solving."""
    if batch_coupled:  # one microbatch only (see check_batch_coupling)
        constraints = replace(constraints, microbatches=1)
    if constraints.schedule not in (None,) + RUNNABLE_SCHEDULES:
        raise ConstraintError(f"schedule {constraints.schedule!r} is not supported by this version yet; "
                              f"pin one of {', '.join(RUNNABLE_SCHEDULES)}")
    searched = [constraints.schedule] if constraints.schedule else list(RUNNABLE_SCHEDULES)
    out = []
    for pp in pipeline_degrees(cluster, num_layers, constraints):
        if constraints.microbatches is not None:
            counts = [constraints.microbatches]
        else:
            counts = sorted({c for c in divisors(batch) if c >= pp and (c & (c - 1) == 0 or c % pp == 0)})
            counts = [c for c in counts if c <= max(4 * pp, 8)] or [c for c in divisors(batch) if c >= pp][:1]
        # one stage has no bubble: every runnable schedule takes the same time there, and the first
        # (best) one holds the fewest activations
        schedules = searched if pp > 1 else searched[:1]
        out += [(pp, c, schedule) for c in counts if batch % c == 0
                for schedule in schedules if enough_microbatches(schedule, pp, c)]
    if not out:
        raise ConstraintError(
            f"no (pp, microbatches) fits a global batch of {batch} on {cluster.world_size} devices under "
            f"{constraints}; use a batch divisible by the microbatch count (and dp)")
    return out


def why_no_candidate(cluster: Cluster, batch: int, num_layers: int, constraints: Constraints) -> str:
    """The pins or the batch leave no (pp, microbatches, strategy) at all: say which and what to do."""
    n = cluster.world_size
    stage_sizes = [n // pp for pp in pipeline_degrees(cluster, num_layers, constraints)]
    dp, tp = constraints.dp, constraints.tp
    if dp is not None and tp is not None and dp * tp not in stage_sizes:
        return (f"dp*tp = {dp}*{tp} = {dp * tp} must equal the devices of a stage ({n}/pp: {sorted(set(stage_sizes))}); "
                f"change dp, tp or pp")
    if dp is not None and (problem := _fits_no_stage("dp", dp, stage_sizes)):
        return f"{problem}; pick a divisor"
    if dp is not None and batch % dp:
        return f"the global batch of {batch} does not split over dp={dp}; use a batch divisible by {dp}"
    if constraints.microbatches is not None and batch % constraints.microbatches:
        return (f"the global batch of {batch} does not split into {constraints.microbatches} microbatches; "
                f"use a batch divisible by it")
    return (f"no (pp, microbatches, strategy) fits a global batch of {batch} on {n} devices under {constraints}; "
            f"use a batch divisible by microbatches x dp, or relax the pins")
