"""Brute force over one candidate: every contiguous split times every strategy choice (no torch).

The reference the MILP is tested against, and the "exhaustive" planner; tiny problems only.
"""

from __future__ import annotations

import itertools
import math
import time

from fxplan.passes.solve.candidate import Solution, infeasible, score
from fxplan.passes.solve.problem import Problem


EXHAUSTIVE_LIMIT = 2_000_000  # assignments per candidate: about a minute of scoring


def count_assignments(problem: Problem) -> int:
    L, pp = problem.num_layers, problem.pp
    if L < pp:
        return 0
    splits = math.comb(L - 1, pp - 1)
    return splits * math.prod(problem.num_strategies(u) for u in range(L))


def exhaustive(problem: Problem, *, limit: int = EXHAUSTIVE_LIMIT) -> Solution:
    """Every contiguous split into pp non-empty stages times every strategy choice (tiny problems)."""
    t0 = time.perf_counter()
    L, pp = problem.num_layers, problem.pp
    n = count_assignments(problem)
    if n > limit:
        raise ValueError(f"exhaustive search over {n:,} assignments exceeds {limit:,}; use candidate.solve()")
    best = None
    for cuts in itertools.combinations(range(1, L), pp - 1):
        bounds = (0, *cuts, L)
        stage_of = tuple(i for i in range(pp) for _ in range(bounds[i], bounds[i + 1]))
        for strategy_of in itertools.product(*(range(problem.num_strategies(u)) for u in range(L))):
            val = score(problem, stage_of, strategy_of)
            if val is not None and (best is None or val < best[0]):
                best = (val, stage_of, strategy_of)
    seconds = time.perf_counter() - t0
    if best is None:
        return infeasible(seconds)
    return Solution(best[1], best[2], best[0], "optimal", 0.0, seconds, best[0])
