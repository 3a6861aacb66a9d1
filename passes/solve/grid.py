"""The Megatron-style baseline on the SAME cost model: a uniform dp x tp x pp grid, equal stages.

For every candidate (pp, microbatches, schedule) and every uniform (dp, tp, fsdp, recompute), each
layer takes its cheapest tensor-parallel spec at that tp, layers are cut into pp contiguous stages
of equal counts, and `problem.evaluate` scores the result. The best memory-feasible one wins.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Protocol

from fxplan.passes.solve.problem import Candidate, Evaluation, Problem, evaluate
from fxplan.plan import Strategy


class CandidateTables(Protocol):
    """What the grid reads of a cost model (passes.cost.model.CostModel; this folder imports no torch)."""

    def candidate(self, pp: int, microbatches: int, schedule: str
                  ) -> tuple[Problem, tuple[tuple[Strategy, ...], ...]] | None: ...


@dataclass(frozen=True)
class GridResult:
    stage_of: tuple[int, ...]  # per layer, its stage
    strategy_of: tuple[int, ...]  # per layer, an index into problem's arrays / cost_model.strategies
    problem: Problem
    evaluation: Evaluation
    strategies: tuple[Strategy, ...]  # per layer, the chosen Strategy
    tried: int  # grid points scored (feasible or not)

    @property
    def candidate(self) -> Candidate:
        return self.problem.candidate


def equal_stages(num_layers: int, pp: int) -> tuple[int, ...]:
    """Stage of each layer: equal counts, the remainder going to the first and last stages in turn
    (they hold the embedding and the head in Megatron), layers contiguous."""
    if not 1 <= pp <= num_layers:
        raise ValueError(f"cannot cut {num_layers} layers into {pp} non-empty stages")
    counts = [num_layers // pp] * pp
    ends = [i for pair in zip(range(pp), range(pp - 1, -1, -1)) for i in pair]
    for i in range(num_layers % pp):
        counts[ends[i]] += 1  # 0, pp-1, 1, pp-2, ... (never twice: remainder < pp)
    return tuple(stage for stage, count in enumerate(counts) for _ in range(count))


def grid_search(cost_model: CandidateTables, candidates: Iterable[Candidate]) -> GridResult | None:
    """Best uniform grid plan over `candidates` ((pp, microbatches, schedule) triples, e.g. the
    planner's), or None when no grid point fits in memory."""
    best: GridResult | None = None
    tried = 0
    for pp, c, schedule in candidates:
        built = cost_model.candidate(pp, c, schedule)
        if built is None:
            continue
        problem, strategies = built
        stage_of = equal_stages(problem.num_layers, pp)
        for choice in _uniform_choices(problem, strategies):
            tried += 1
            ev = evaluate(problem, stage_of, choice)
            if ev.feasible and (best is None or ev.iteration_s < best.evaluation.iteration_s):
                best = GridResult(stage_of, choice, problem, ev,
                                  tuple(strategies[u][k] for u, k in enumerate(choice)), 0)
    return None if best is None else replace(best, tried=tried)


def _uniform_choices(problem: Problem, strategies):
    """Per uniform (dp, tp, fsdp, recompute) present in every layer: each layer's strategy index,
    with the cheapest spec (own fwd+bwd+wgt time) at that tp."""
    by_layer = []
    for u, per_layer in enumerate(strategies):
        table: dict[tuple, int] = {}
        cost = problem.layer_time(u)
        for k, s in enumerate(per_layer):
            key = (s.dp, s.tp, s.fsdp, s.recompute)
            if key not in table or cost[k] < cost[table[key]]:
                table[key] = k
        by_layer.append(table)
    keys = sorted(set().union(*by_layer), key=lambda x: (x[1], x[2], x[3]))
    for key in keys:
        choice = []
        for u, table in enumerate(by_layer):
            k = table.get(key)
            if k is None and key[2]:  # a layer without parameters has no fsdp twin: same thing
                k = table.get((key[0], key[1], False, key[3]))
            if k is None:
                break
            choice.append(k)
        else:
            yield tuple(choice)
