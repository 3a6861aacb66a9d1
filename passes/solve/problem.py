"""One planning candidate as plain arrays, and THE iteration-time formula every planner uses.

This module imports no torch: the solver and its tests see arrays only. `evaluate` is the single
definition of `Plan.estimated_iteration_s` and of per-stage memory; the MIQP, the grid baseline and
brute force all score their assignments with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


Candidate = tuple[int, int, str]  # (pp, microbatches, schedule): one pass of the outer loop


@dataclass(frozen=True)
class Edge:
    """Tensors flowing from layer `src` to a later layer `dst`."""

    src: int
    dst: int
    reshard: np.ndarray  # [K_src, K_dst] s per microbatch, fwd+bwd, charged to dst's stage
    send: np.ndarray  # [K_src] s per microbatch, fwd+bwd, per pipeline boundary the tensors cross


@dataclass(frozen=True)
class Problem:
    """A (pp, microbatches, schedule) candidate. Layers are in pipeline (topological) order."""

    pp: int
    microbatches: int
    schedule: str  # one of fxplan.constraints.RUNNABLE_SCHEDULES; in_flight also models zb-h1 / zb-h2
    fwd: tuple[np.ndarray, ...]  # per layer [K_u]: forward of one microbatch on one device, s
    bwd: tuple[np.ndarray, ...]  # per layer [K_u]: input-gradient backward (B), s
    wgt: tuple[np.ndarray, ...]  # per layer [K_u]: weight-gradient backward (W), s
    sync: tuple[np.ndarray, ...]  # per layer [K_u]: per-iteration gradient sync not hidden, s
    mem_fixed: tuple[np.ndarray, ...]  # per layer [K_u]: params + grads + optimizer state, bytes
    mem_act: tuple[np.ndarray, ...]  # per layer [K_u]: activation bytes per in-flight microbatch
    edges: tuple[Edge, ...]
    memory_limit: float  # bytes per device
    labels: tuple[tuple[str, ...], ...] = ()  # per layer, a label per strategy (reports only)
    # per layer [K_u]: bytes held while gradients are synced and the optimizer steps (no activation
    # in flight then, but sync buffers are); () = that phase never exceeds the activation phase.
    # A stage's peak is max(sum mem_fixed + in_flight * sum mem_act, sum mem_peak): `stage_memory`.
    mem_peak: tuple[np.ndarray, ...] = ()

    @property
    def num_layers(self) -> int:
        return len(self.fwd)

    def num_strategies(self, layer: int) -> int:
        return len(self.fwd[layer])

    def in_flight(self, stage: int) -> int:
        """Microbatches whose activations stage `stage` holds at its peak under the schedule."""
        return in_flight(self.schedule, self.pp, self.microbatches, stage)


def in_flight(schedule: str, pp: int, microbatches: int, stage: int) -> int:
    if schedule == "gpipe":
        return microbatches
    if schedule in ("1f1b", "zb-h1"):
        return min(microbatches, pp - stage)
    if schedule == "zb-h2":
        return min(microbatches, 2 * (pp - stage) - 1)
    raise ValueError(f"no memory model for schedule {schedule!r}")


@dataclass(frozen=True)
class Evaluation:
    iteration_s: float
    stage_compute_s: tuple[float, ...]  # p_i: one microbatch's F+B+W on stage i incl. resharding
    boundary_s: tuple[float, ...]  # o_j: transfers across boundary j per microbatch
    stage_memory: tuple[float, ...]  # peak bytes per device of each stage
    feasible: bool  # every stage within memory_limit


def evaluate(problem: Problem, stage_of, strategy_of) -> Evaluation:
    """Steady-state time of one iteration for a layer->stage map and a layer->strategy map.

    GPipe / 1F1B (UniAP, iterations chained): sum_i p_i + sum_j o_j + (c-1) max(p_i, o_j) + max_i sync_i.
    """
    pp, c = problem.pp, problem.microbatches
    stage_of = [int(s) for s in stage_of]
    strategy_of = [int(k) for k in strategy_of]
    L = problem.num_layers
    if len(stage_of) != L or len(strategy_of) != L:
        raise ValueError("assignment length differs from the number of layers")
    p = np.zeros(pp)
    sync = np.zeros(pp)
    mem_fixed = np.zeros(pp)
    mem_act = np.zeros(pp)
    mem_peak = np.zeros(pp)
    for u in range(L):
        i, k = stage_of[u], strategy_of[u]
        p[i] += problem.fwd[u][k] + problem.bwd[u][k] + problem.wgt[u][k]
        sync[i] += problem.sync[u][k]
        mem_fixed[i] += problem.mem_fixed[u][k]
        mem_act[i] += problem.mem_act[u][k]
        if problem.mem_peak:
            mem_peak[i] += problem.mem_peak[u][k]
    o = np.zeros(max(pp - 1, 0))
    for edge in problem.edges:
        ku, kv = strategy_of[edge.src], strategy_of[edge.dst]
        p[stage_of[edge.dst]] += edge.reshard[ku, kv]
        for j in range(stage_of[edge.src], stage_of[edge.dst]):
            o[j] += edge.send[ku]
    bottleneck = max(p.max(initial=0.0), o.max(initial=0.0))
    total = p.sum() + o.sum() + (c - 1) * bottleneck + sync.max(initial=0.0)
    memory = [max(mem_fixed[i] + problem.in_flight(i) * mem_act[i], mem_peak[i]) for i in range(pp)]
    return Evaluation(
        iteration_s=float(total),
        stage_compute_s=tuple(float(x) for x in p),
        boundary_s=tuple(float(x) for x in o),
        stage_memory=tuple(float(x) for x in memory),
        feasible=all(m <= problem.memory_limit * (1 + 1e-9) for m in memory),
    )
