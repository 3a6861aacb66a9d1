"""solve(problem) -> Solution: one candidate's exact MILP, started from the DP heuristic (no torch).

Pipeline: merge parallel edges, drop dominated strategies (exact), heuristic incumbent
(heuristic.py), MILP on the reduced problem with the incumbent as cutoff (milp.py); the
better of the two is re-scored with problem.evaluate, whose value is what Solution.objective holds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from fxplan.passes.solve.problem import Problem, evaluate


@dataclass(frozen=True)
class Solution:
    stage_of: tuple[int, ...]  # per layer, its pipeline stage (non-decreasing, every stage used)
    strategy_of: tuple[int, ...]  # per layer, index into the problem's strategy arrays
    objective: float  # evaluate(problem, stage_of, strategy_of).iteration_s, seconds
    status: str  # "optimal" | "time_limit" | "infeasible" | "cutoff" (proven: nothing beats the cutoff)
    gap: float  # (objective - bound) / objective; 0 when optimal; inf when no assignment
    seconds: float
    bound: float = 0.0  # proven lower bound on this candidate's optimum, seconds (inf: infeasible)


def infeasible(seconds: float = 0.0) -> Solution:
    """No assignment fits memory."""
    return Solution((), (), float("inf"), "infeasible", float("inf"), seconds, float("inf"))


def score(problem: Problem, stage_of, strategy_of) -> float | None:
    """The iteration time of an assignment, None when it does not fit memory."""
    ev = evaluate(problem, stage_of, strategy_of)
    return ev.iteration_s if ev.feasible else None


ROUNDING = 1e-8
"""Relative gaps below this are the solver's and the bounds' arithmetic, not a gap."""


def solve(problem: Problem, *, time_limit_s: float = 60, mip_gap: float = 1e-4,
          cutoff: float | None = None, milp: bool = True, start: Solution | None = None) -> Solution:
    """Best (stage, strategy) assignment of one candidate under problem.evaluate.

    status "time_limit" comes with the proven relative gap.
    `cutoff`: an objective another candidate already reaches; the MILP stops proving once it knows
    it cannot beat it (the returned gap is then relative to that proof).
    `milp=False`: the heuristic and the bound only ("optimal" when they meet within the gap, else
    "time_limit"); `start`: such an earlier result, whose heuristic is not run again.
    """
    from fxplan.passes.solve.bounds import CHAIN_BOUND_LAYERS, lower_bound
    from fxplan.passes.solve.heuristic import heuristic
    from fxplan.passes.solve.presolve import drop_dominated, merge_parallel_edges

    t0 = time.perf_counter()
    if problem.num_layers < problem.pp or problem.pp < 1:
        return infeasible()
    reduced = drop_dominated(merge_parallel_edges(problem))
    small = reduced.problem
    best: tuple[float, tuple, tuple] | None = None
    if start is not None:
        best = (start.objective, start.stage_of, start.strategy_of) if start.stage_of else None
        floor = start.bound
    else:
        h = heuristic(small)
        if h is not None:
            val = score(problem, h[0], reduced.to_original(h[1]))
            if val is not None:
                best = (val, tuple(h[0]), reduced.to_original(h[1]))
        floor = lower_bound(problem)
    def within_gap() -> bool:
        return best is not None and best[0] > 0 and np.isfinite(floor) and (best[0] - floor) / best[0] <= mip_gap

    if not within_gap() and milp and problem.num_layers <= CHAIN_BOUND_LAYERS and best is not None:
        # before a MILP: the bound that also walks each stage's chain of layouts (L times the work)
        floor = max(floor, lower_bound(problem, chain=True))
    if within_gap():  # the incumbent is within the gap of a proven bound: no MILP to run
        return Solution(best[1], best[2], best[0], "optimal", max((best[0] - floor) / best[0], 0.0),
                        time.perf_counter() - t0, floor)
    if not milp:
        if best is None:
            return Solution((), (), float("inf"), "time_limit", float("inf"), time.perf_counter() - t0, floor)
        return Solution(best[1], best[2], best[0], "time_limit", (best[0] - floor) / best[0],
                        time.perf_counter() - t0, floor)
    left = time_limit_s - (time.perf_counter() - t0)
    cuts = [v for v in (best[0] if best is not None else None, cutoff) if v is not None]
    cut = min(cuts) if cuts else None
    from fxplan.passes.solve.milp import solve_milp  # CVXPY's import (0.6 s) only when a MILP runs

    res = solve_milp(small, time_limit_s=max(left, 0.05), mip_gap=mip_gap, cutoff=cut)
    if res.stage_of is not None:
        strategies = reduced.to_original(res.strategy_of)
        val = score(problem, res.stage_of, strategies)
        if val is not None and (best is None or val < best[0] * (1 - 1e-12)):
            best = (val, res.stage_of, strategies)
    seconds = time.perf_counter() - t0
    bound = max(res.bound if np.isfinite(res.bound) else 0.0, floor)
    if res.status == "cutoff":  # proven: nothing (up to the MIP gap) beats the cutoff
        bound = max(bound, min(best[0] if best is not None else cut, cut) / (1 + mip_gap))
    if best is None:
        if res.status == "infeasible":
            return infeasible(seconds)
        if res.status == "cutoff":
            return Solution((), (), float("inf"), "cutoff", float("inf"), seconds, bound)
        return Solution((), (), float("inf"), "time_limit", float("inf"), seconds, bound)
    value = best[0]
    gap = (value - bound) / value if value > 0 else 0.0
    # "cutoff": proven that nothing here beats the cutoff, though this candidate's own gap stays open
    # rounding noise: HiGHS stops at an absolute gap of 1e-6 on an objective scaled to ~1e3, a cutoff
    # is raised by 1e-9, and the floors are lowered by 1e-9: a few 1e-9 of relative gap are not a gap
    status = "optimal" if gap <= mip_gap + ROUNDING else ("cutoff" if res.status == "cutoff" else "time_limit")
    if abs(gap) < ROUNDING:
        gap = 0.0
    return Solution(best[1], best[2], value, status, gap, seconds, bound)
