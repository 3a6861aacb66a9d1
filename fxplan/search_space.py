"""What the pins and the cluster leave to search: pipeline and tensor-parallel degrees, the (pp,
microbatches, schedule) candidates, and, when nothing is left, which pin to change.

A pin's value is matched by `Constraints.allows`; here it is checked against the cluster, the batch
and the model, so every message about a pin that cannot hold comes from this file.
"""

from __future__ import annotations

import math
from dataclasses import replace

from fxplan.cluster import Cluster
from fxplan.constraints import (PINNED_ONLY_SCHEDULES, RUNNABLE_SCHEDULES, Constraints, chunks_of,
                                enough_microbatches, stages_fit)
from fxplan.errors import ConstraintError
from fxplan.passes.ir import LayerGraph
from fxplan.passes.solve.problem import Candidate


def divisors(n: int) -> list[int]:
    """Every divisor of n, ascending, in O(sqrt n) (a global batch of 10^9 has 100 divisors)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


DOMINATED = {"gpipe": "1f1b", "zb-h2": "zb-auto", "zb-auto": "zb-h1"}
"""schedule -> one never worse, or never worse where it holds no more microbatches: GPipe takes
1F1B's time with more activations; zb-auto (planned at zb-h2's memory of 2p-1 microbatches) has
zb-h2's list among the ones it picks the fastest of; with no more microbatches than stages zb-h1
holds as many as zb-auto at the same bubble (the same problem, solved once). The search checks
each claim on the candidates' arrays before it prunes by it (search._dominates)."""


def _fits_no_stage(name: str, value: int, stage_sizes) -> str | None:
    sizes = sorted(set(stage_sizes))
    if any(size % value == 0 for size in sizes):
        return None
    return f"{name}={value} does not divide the devices of any stage ({sizes})"


def pipeline_degrees(cluster: Cluster, num_layers: int, constraints: Constraints) -> list[int]:
    n = cluster.world_size
    chunks = chunks_of(constraints.schedule)  # stages per rank
    if constraints.pp is not None:
        if n % constraints.pp:
            raise ConstraintError(f"pp={constraints.pp} does not divide the {n} devices; pick a divisor of {n}")
        if constraints.pp * chunks > num_layers:
            more = f" ({chunks} stages per rank under {constraints.schedule})" if chunks > 1 else ""
            raise ConstraintError(f"pp={constraints.pp}{more} needs {constraints.pp * chunks} stages but the model has "
                                  f"{num_layers} layers; pin a smaller pp")
        if chunks > 1 and constraints.pp < 2:
            raise ConstraintError(f"schedule {constraints.schedule!r} spreads {chunks} stages per rank over a pipeline "
                                  f"of ranks; pp=1 has none: pin pp >= 2, or another schedule")
    return [pp for pp in divisors(n) if stages_fit(constraints.schedule, pp, num_layers) and constraints.allows(pp=pp)]


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
    """Layers whose ops mix samples (training BatchNorm) only train as on one device when each step's
    statistics come from its whole batch: dp synchronises them across ranks (codegen/batch_stats.py),
    microbatches cannot (each microbatch's forward normalises before the next one exists), so a pin
    of several microbatches is refused, naming the layer and the op."""
    coupled = [layer for layer in layer_graph.layers if layer.batch_coupled]
    if coupled and constraints.microbatches not in (None, 1):
        layer = coupled[0]
        raise ConstraintError(
            f"layer {layer.name} uses {layer.batch_coupled}, whose statistics come from the whole batch, so "
            f"microbatches={constraints.microbatches} would change training (each microbatch would be "
            f"normalised alone); pin microbatches=1 (dp, tp and pp still apply: dp synchronises the "
            f"statistics), or use a per-sample norm (LayerNorm, GroupNorm) or eval-mode batch norm")


def candidates(cluster: Cluster, batch: int, num_layers: int, constraints: Constraints,
               batch_coupled: bool = False) -> list[Candidate]:
    """UniAP's outer loop: every (pp, microbatches, schedule) triple the pins allow. Microbatch counts
    are every divisor of the batch (the cost model drops those no dp degree splits); only the search's
    lower bounds and dominance prune them."""
    if batch_coupled:  # one microbatch only (see check_batch_coupling)
        constraints = replace(constraints, microbatches=1)
    if constraints.schedule not in (None,) + RUNNABLE_SCHEDULES + PINNED_ONLY_SCHEDULES:
        raise ConstraintError(f"schedule {constraints.schedule!r} is not supported by this version yet; "
                              f"pin one of {', '.join(RUNNABLE_SCHEDULES + PINNED_ONLY_SCHEDULES)}")
    searched = [constraints.schedule] if constraints.schedule else list(RUNNABLE_SCHEDULES)
    counts = [constraints.microbatches] if constraints.microbatches is not None else divisors(batch)
    out = []
    for pp in pipeline_degrees(cluster, num_layers, constraints):
        # one stage has no bubble: every runnable schedule takes the same time there, and the first
        # (best) one holds the fewest activations
        schedules = searched if pp > 1 else searched[:1]
        for c in counts:
            if batch % c:
                continue
            out += [(pp, c, s) for s in schedules if enough_microbatches(s, pp, c)]
    if not out and (problem := _too_few_for_1f1b(cluster, num_layers, constraints)):
        raise ConstraintError(problem)
    if not out:
        raise ConstraintError(
            f"no (pp, microbatches) fits a global batch of {batch} on {cluster.world_size} devices under "
            f"{constraints}; use a batch divisible by the microbatch count (and dp)")
    return out


def dominated_by(cands: list[Candidate]) -> dict[Candidate, Candidate]:
    """candidate -> the candidate of the same (pp, microbatches) whose schedule DOMINATED names."""
    present = set(cands)
    return {(pp, c, s): (pp, c, DOMINATED[s]) for pp, c, s in cands
            if s in DOMINATED and (pp, c, DOMINATED[s]) in present}


def _too_few_for_1f1b(cluster: Cluster, num_layers: int, constraints: Constraints) -> str | None:
    """The message when pinned 1f1b has fewer microbatches than every allowed pipeline depth."""
    m = constraints.microbatches
    if constraints.schedule != "1f1b" or m is None:
        return None
    degrees = [pp for pp in pipeline_degrees(cluster, num_layers, constraints) if pp > 1]
    if not degrees or any(enough_microbatches("1f1b", pp, m) for pp in degrees):
        return None
    pp = min(degrees)
    return (f"schedule 1f1b needs at least one microbatch per stage: pp={pp} needs microbatches >= {pp}, "
            f"but microbatches={m} is pinned; pin microbatches>={pp} or schedule='gpipe'")


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


def check_plan_meets_pins(plan, constraints: Constraints) -> None:
    """compile(plan=, constraints=): a given plan is used as is, so a pin it breaks is named here (and
    not later as a strategy the pins left out of the model's space)."""
    if constraints == Constraints():
        return
    found = [("pp", plan.pp), ("microbatches", plan.microbatches), ("schedule", plan.schedule)]
    for stage in plan.stages:
        for layer, s in stage.strategies.items():
            found += [(name, getattr(s, name), layer) for name in ("dp", "tp", "fsdp", "recompute")]
            if s.fsdp:
                found.append(("reshard", s.reshard, layer))
    for name, value, *layer in found:
        if not constraints.allows(**{name: value}):
            where = f"layer {layer[0]} has" if layer else "has"
            raise ConstraintError(f"the plan given as plan= {where} {name}={value!r} but constraints pin "
                                  f"{name}={getattr(constraints, name)!r}; a given plan is used as is: drop the "
                                  f"pin, or edit the plan (or re-plan without plan=)")
