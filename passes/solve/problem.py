"""One planning candidate as plain arrays, and THE iteration-time formula every planner uses.

This module imports no torch: the solver and its tests see arrays only. `evaluate` is the single
definition of `Plan.estimated_iteration_s` and of per-stage memory; the MIQP, the grid baseline and
brute force all score their assignments with it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from fxplan import schedules
from fxplan.errors import FxplanError


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
    # A stage's peak is `stage_memory`: the larger of its step phase, sum mem_peak, and its activation
    # phase, sum mem_fixed + (in_flight - 1) * sum mem_act + the most, over its layers u in order, of
    # (mem_act of u and the layers before it + mem_grad of the layers after it + mem_work of u). The
    # MILP and the heuristic place stages under a bound of it: all of mem_act, mem_grad and the largest
    # mem_work at once (`placed_memory`, what `feasible` reads).
    mem_peak: tuple[np.ndarray, ...] = ()
    # per layer [K_u]: bytes a layer holds only while its own forward or backward runs (gathered FSDP
    # weights and their full-size gradients, a backward's gradient temporaries). The layers of a
    # stage run one at a time, so the stage adds the largest, not the sum; () = none.
    mem_work: tuple[np.ndarray, ...] = ()
    # per layer [K_u]: gradient bytes that appear only when the layer's backward runs (one microbatch
    # per step: none exist before); during a layer's backward the stage holds those of its later
    # layers and the activations of itself and its earlier layers; () = none.
    mem_grad: tuple[np.ndarray, ...] = ()
    # the schedule's share of the fill-and-drain term (passes/solve/schedule_terms.py); 1 = 1F1B
    bubble_share: float = 1.0
    # per layer [K_u]: extra seconds per microbatch when the schedule splits backward into I and W; ()
    split: tuple[np.ndarray, ...] = ()
    # model chunks per rank (interleaved-1f1b, zbv): the arrays then describe pp = ranks * chunks
    # stages, `microbatches` counts chunk passes per stage and iteration (the iteration's microbatches
    # times chunks, what the bottleneck term multiplies) and `held` gives each stage's activations
    # in flight (schedule_terms.chunked_fields)
    chunks: int = 1
    held: tuple[int, ...] = ()

    @property
    def num_layers(self) -> int:
        return len(self.fwd)

    def layer_time(self, u: int) -> np.ndarray:
        """[K_u] one microbatch's passes through layer u (F + I + W, and the split's extra cost)."""
        t = np.asarray(self.fwd[u]) + self.bwd[u] + self.wgt[u]
        return t + self.split[u] if self.split else t

    def num_strategies(self, layer: int) -> int:
        return len(self.fwd[layer])

    def in_flight(self, stage: int) -> int:
        """Microbatches whose activations stage `stage` holds at its peak under the schedule."""
        if self.held:
            return self.held[stage]
        return in_flight(self.schedule, self.pp, self.microbatches, stage)

    @property
    def ranks(self) -> int:
        """Ranks along the pipeline (pp of the plan): stages / chunks."""
        return self.pp // self.chunks

    @property
    def candidate(self) -> Candidate:
        """The (pp, microbatches, schedule) of the plan this problem prices."""
        return (self.ranks, self.iteration_microbatches, self.schedule)

    @property
    def iteration_microbatches(self) -> int:
        """The plan's microbatches per iteration."""
        return self.microbatches // self.chunks

    def placed_fixed(self, u: int) -> np.ndarray:
        """[K_u] layer u's fixed bytes as the planners place them (`placed_memory`): its gradients held
        throughout, although with one microbatch they appear only in its backward."""
        fixed = np.asarray(self.mem_fixed[u], float)
        return fixed + self.mem_grad[u] if self.mem_grad else fixed


def segment_max(values: np.ndarray) -> np.ndarray:
    """[L+1, L+1]: [s, e] the largest of values[s:e] (0 where e <= s), for per-layer working sets of
    which a stage of layers s..e-1 holds one at a time."""
    L = len(values)
    most = np.zeros((L + 1, L + 1))
    for s in range(L):
        most[s, s + 1:] = np.maximum.accumulate(values[s:])
    return most


def in_flight(schedule: str, pp: int, microbatches: int, stage: int) -> int:
    """Microbatches of activations stage `stage` holds at its peak: counted on the schedule's own
    action lists (fxplan.schedules); zb-auto is planned under its default limit of 2p-1."""
    if schedule == "zb-auto":
        return min(microbatches, 2 * pp - 1)
    # the closed forms of the fixed schedules (what their lists hold, checked in the tests): building
    # the lists of a 64-stage pipeline for every candidate would dominate the search
    if schedule == "gpipe":
        return microbatches
    if schedule == "1f1b":
        return min(microbatches, pp - stage)
    # past 2p microbatches the warm-up, where the peak is reached, no longer changes: the lists
    # of 2p microbatches hold what those of any more do (checked in the tests)
    c = min(microbatches, 2 * pp)
    if pp > LIST_MAX_PP and schedule in HELD_CLOSED_FORM:
        return HELD_CLOSED_FORM[schedule](pp, c)  # what their lists hold, checked up to LIST_MAX_PP
    return _held(schedule, pp, c)[stage]


LIST_MAX_PP = 16
"""Deeper pipelines take the closed forms below: their lists cost seconds to build per candidate."""

HELD_CLOSED_FORM = {"zb-h1": lambda pp, c: min(c, pp), "zb-h2": lambda pp, c: min(c, 2 * pp - 1)}


@functools.lru_cache(maxsize=4096)
def _held(schedule: str, pp: int, microbatches: int) -> tuple[int, ...]:
    try:
        built = schedules.build(schedule, pp, microbatches)
    except FxplanError as exc:
        raise ValueError(f"no memory model for schedule {schedule!r}: {exc}") from None
    return tuple(math.ceil(h - 1e-9) for h in schedules.held_activations(built))


@dataclass(frozen=True)
class Evaluation:
    iteration_s: float
    stage_compute_s: tuple[float, ...]  # p_i: one microbatch's F+B+W on stage i incl. resharding
    boundary_s: tuple[float, ...]  # o_j: transfers across boundary j per microbatch
    stage_memory: tuple[float, ...]  # peak bytes per device of each stage
    feasible: bool  # every stage within memory_limit, as placed (`placed_memory`)


def evaluate(problem: Problem, stage_of, strategy_of) -> Evaluation:
    """Steady-state time of one iteration for a layer->stage map and a layer->strategy map.

    UniAP's formula, iterations chained, with the schedule's bubble share beta (1 for GPipe / 1F1B):
    beta (sum_i p_i + sum_j o_j) + (c - beta) max(p_i, o_j) + max_i sync_i.
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
        p[i] += problem.layer_time(u)[k]
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
    beta = problem.bubble_share
    total = beta * (p.sum() + o.sum()) + (c - beta) * bottleneck + sync.max(initial=0.0)
    backward = _backward_extra(problem, stage_of, strategy_of, mem_act)
    memory = [max(mem_fixed[i] + (problem.in_flight(i) - 1) * mem_act[i] + backward[i], mem_peak[i])
              for i in range(pp)]
    placed = placed_memory(problem, stage_of, strategy_of)
    return Evaluation(
        iteration_s=float(total),
        stage_compute_s=tuple(float(x) for x in p),
        boundary_s=tuple(float(x) for x in o),
        stage_memory=tuple(float(x) for x in memory),
        feasible=all(m <= problem.memory_limit * (1 + 1e-9) for m in placed),
    )


def placed_memory(problem: Problem, stage_of, strategy_of) -> list[float]:
    """Per stage, the bound of `stage_memory` every planner places under (the MILP holds it exactly,
    being linear): every gradient, every in-flight activation and the largest working set at once."""
    pp = problem.pp
    act, work, peak = np.zeros(pp), np.zeros(pp), np.zeros(pp)
    for u, (i, k) in enumerate(zip(stage_of, strategy_of)):
        act[i] += problem.placed_fixed(u)[k] + problem.in_flight(i) * problem.mem_act[u][k]
        work[i] = max(work[i], problem.mem_work[u][k] if problem.mem_work else 0.0)
        peak[i] += problem.mem_peak[u][k] if problem.mem_peak else 0.0
    return [max(act[i] + work[i], peak[i]) for i in range(pp)]


def _backward_extra(problem: Problem, stage_of, strategy_of, stage_act) -> np.ndarray:
    """Per stage, the most one microbatch's backward adds over its layers, in backward order: the
    activations of the layer running and of those before it, the gradients of those after it, and
    the running layer's working set (at least the stage's whole activations: the last layer)."""
    pp = problem.pp
    most = np.array(stage_act, dtype=float)  # before backward frees anything (no working set yet)
    act_after = np.zeros(pp)  # activations of the stage's later layers, freed by their backward
    grads_after = np.zeros(pp)
    for u in reversed(range(problem.num_layers)):
        i, k = stage_of[u], strategy_of[u]
        work = problem.mem_work[u][k] if problem.mem_work else 0.0
        most[i] = max(most[i], stage_act[i] - act_after[i] + grads_after[i] + work)
        act_after[i] += problem.mem_act[u][k]
        grads_after[i] += problem.mem_grad[u][k] if problem.mem_grad else 0.0
    most = np.maximum(most, grads_after)  # backward done: every gradient, no activation
    return most
