"""UniAP's outer loop: every (pp, microbatches, schedule) candidate, best lower bound first (no torch).

Each candidate gets a cheap bound that is provably <= its optimum under problem.evaluate; candidates
whose bound cannot beat the incumbent are skipped, the rest share the time limit, and the incumbent
objective is handed to each MILP as a cutoff. Assignments known from elsewhere (incumbents, e.g. the
grid baseline's best plan) replace the result when they are faster; the search's proven floor stays,
so the gap only shrinks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

from fxplan.passes.solve.candidate import Solution, solve
from fxplan.passes.solve.exhaustive import exhaustive
from fxplan.passes.solve.problem import Candidate, Problem, evaluate, in_flight


@dataclass(frozen=True)
class Assignment:
    """Where one candidate's layers go: per layer its stage and its strategy index."""

    candidate: Candidate
    stage_of: tuple[int, ...]
    strategy_of: tuple[int, ...]


@dataclass(frozen=True)
class CandidateResult:
    candidate: Candidate
    bound: float  # lower bound on this candidate's optimum, seconds (inf: infeasible)
    outcome: str  # "solved" | "pruned" | "infeasible" | "skipped" (make_problem gave None)
    solution: Solution | None = None
    min_memory: float = float("inf")  # least max-stage memory any assignment needs, bytes


@dataclass(frozen=True)
class SearchResult:
    best: Solution | None  # None when every candidate is infeasible
    problem: Problem | None  # the best candidate's problem
    candidate: Candidate | None
    considered: int  # candidates with a problem
    pruned: int  # skipped because their bound could not beat the incumbent
    per_candidate: list[CandidateResult]
    min_memory_needed: float = float("inf")  # when best is None: least per-device bytes any candidate needs
    memory_limit: float = float("inf")


def lower_bound(problem: Problem) -> float:
    """A bound <= the optimum of `problem` under evaluate (inf when nothing fits memory).

    With T = sum_i p_i (>= the layers' own times; reshards and transfers are >= 0):
    objective >= T + (c-1) max_i p_i + max_i sync_i >= (1 + (c-1)/pp) T + (sum of syncs) / pp.
    Memory couples the layers: summed over stages, sum_u (mem_fixed + f_min mem_act) <= pp * limit,
    a knapsack whose Lagrangian dual (any mu >= 0) bounds the weighted time from below. Also
    max_i p_i >= the slowest layer's fastest time that fits on a device at all.
    """
    pp, c, L = problem.pp, problem.microbatches, problem.num_layers
    if L < pp or min_memory(problem) > problem.memory_limit * (1 + 1e-9):
        return float("inf")
    flights = [in_flight(problem.schedule, pp, c, i) for i in range(pp)]
    f_min = min(flights)
    t = [np.asarray(problem.fwd[u]) + problem.bwd[u] + problem.wgt[u] for u in range(L)]
    alone = [np.asarray(problem.mem_fixed[u]) + f_min * np.asarray(problem.mem_act[u]) for u in range(L)]
    fits = [a <= problem.memory_limit * (1 + 1e-9) for a in alone]
    w = [(1 + (c - 1) / pp) * t[u] + np.asarray(problem.sync[u]) / pp for u in range(L)]
    budget = pp * problem.memory_limit
    # pad to [L, K_max] so one numpy call prices every layer
    K = max(len(x) for x in w)
    W = np.full((L, K), np.inf)
    Mem = np.zeros((L, K))
    for u in range(L):
        W[u, : len(w[u])] = np.where(fits[u], w[u], np.inf)
        Mem[u, : len(w[u])] = np.where(fits[u], alone[u], 0.0)

    def dual(mu: float) -> float:
        return float(np.min(W + mu * Mem, axis=1).sum()) - mu * budget

    best = dual(0.0)
    if np.isfinite(budget) and budget > 0:
        # the dual is concave in mu: golden-section search on a log-scaled bracket
        hi = sum(float(np.max(x)) for x in w) / budget * 1e3
        lo = 0.0
        for _ in range(60):
            m1, m2 = lo + (hi - lo) * 0.382, lo + (hi - lo) * 0.618
            if dual(m1) < dual(m2):
                lo = m1
            else:
                hi = m2
        best = max(best, dual(lo), dual(hi))
    plain = sum(float(np.min(np.where(fits[u], t[u], np.inf))) for u in range(L))
    return max(best, plain + (c - 1) * min_bottleneck(problem))


def min_bottleneck(problem: Problem) -> float:
    """A bound <= max_i p_i of every memory-feasible assignment (exact DP over contiguous splits).

    On stage i a layer costs at least its fastest strategy that fits there alone, and a stage's
    layers must fit together at their smallest footprints there. Layers are indivisible, so this
    sees the imbalance an averaged bound misses (98 layers on 32 stages: some stage holds 4).
    """
    pp, c, L = problem.pp, problem.microbatches, problem.num_layers
    if L < pp:
        return float("inf")
    limit = problem.memory_limit * (1 + 1e-9)
    t = [np.asarray(problem.fwd[u]) + problem.bwd[u] + problem.wgt[u] for u in range(L)]
    best = np.full(L + 1, np.inf)
    best[0] = 0.0
    tri = np.tril_indices(L + 1)
    for i in range(pp):
        f = in_flight(problem.schedule, pp, c, i)
        mem = [np.asarray(problem.mem_fixed[u]) + f * np.asarray(problem.mem_act[u]) for u in range(L)]
        tm = np.array([float(np.min(np.where(mem[u] <= limit, t[u], np.inf))) for u in range(L)])
        mm = np.array([float(np.min(mem[u])) for u in range(L)])
        Tc = np.concatenate([[0.0], np.cumsum(np.where(np.isfinite(tm), tm, 0.0))])
        bad = np.concatenate([[0], np.cumsum(~np.isfinite(tm))])
        Mc = np.concatenate([[0.0], np.cumsum(mm)])
        seg = Tc[None, :] - Tc[:, None]
        seg[(bad[None, :] - bad[:, None]) > 0] = np.inf  # a layer that fits nowhere on this stage
        seg[(Mc[None, :] - Mc[:, None]) > limit] = np.inf
        cand = np.maximum(best[:, None], seg)
        cand[tri] = np.inf  # stages are non-empty
        best = cand.min(axis=0)
    return float(best[L])


def min_memory(problem: Problem) -> float:
    """min over contiguous splits and strategies of the largest stage memory (exact DP)."""
    pp, c, L = problem.pp, problem.microbatches, problem.num_layers
    if L < pp:
        return float("inf")
    # per stage, each layer's smallest footprint there (strategies are free per layer)
    best = np.full(L + 1, np.inf)
    best[0] = 0.0
    for i in range(pp):
        f = in_flight(problem.schedule, pp, c, i)
        m = np.array([float(np.min(np.asarray(problem.mem_fixed[u]) + f * np.asarray(problem.mem_act[u])))
                      for u in range(L)])
        Mc = np.concatenate([[0], np.cumsum(m)])
        seg = Mc[None, :] - Mc[:, None]
        cand = np.maximum(best[:, None], seg)
        cand[np.tril_indices(L + 1)] = np.inf  # stages are non-empty
        best = cand.min(axis=0)
    return float(best[L])


def search(make_problem: Callable[[int, int, str], Problem | None], candidates: list[Candidate], *,
           time_limit_s: float = 60, progress: Callable[[str], None] | None = None,
           method: str = "miqp", mip_gap: float = 1e-4, incumbents: Sequence[Assignment] = ()) -> SearchResult:
    """Best plan over the candidates; see module doc. method: "miqp" | "exhaustive".

    `incumbents` are scored after the candidates are solved and neither prune candidates nor cut off
    MILPs, so the candidates visited and their solutions are the same with or without them."""
    if method not in ("miqp", "exhaustive"):
        raise ValueError(f"unknown method {method!r}; use 'miqp' or 'exhaustive'")
    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    items = []
    results: list[CandidateResult] = []
    limit = float("inf")
    for cand in candidates:
        problem = make_problem(*cand)
        if problem is None:
            results.append(CandidateResult(cand, float("inf"), "skipped"))
            continue
        limit = problem.memory_limit
        items.append((lower_bound(problem), cand, problem))
    items.sort(key=lambda it: (it[0], it[1][0], it[1][1]))
    best: tuple[Solution, Problem, Candidate] | None = None
    open_bounds: list[float] = []  # bounds of candidates neither solved to optimality nor pruned
    pruned = 0
    for n_done, (bound, cand, problem) in enumerate(items):
        label = f"pp={cand[0]} mb={cand[1]} {cand[2]}"
        if not np.isfinite(bound):
            results.append(CandidateResult(cand, bound, "infeasible", None, min_memory(problem)))
            say(f"{label}: does not fit memory")
            continue
        if best is not None and bound >= best[0].objective * (1 - 1e-9):
            pruned += 1
            results.append(CandidateResult(cand, bound, "pruned"))
            continue
        left = time_limit_s - (time.perf_counter() - t0)
        if method == "exhaustive":
            sol = exhaustive(problem)
        else:
            # share what is left among the candidates still to visit, but give this one most of it:
            # the best-bound candidate is usually the winner
            share = max(left / max(1, min(3, len(items) - n_done)), 0.5)
            cutoff = best[0].objective if best is not None else None
            sol = solve(problem, time_limit_s=share, mip_gap=mip_gap, cutoff=cutoff)
        if sol.status == "infeasible" and not sol.stage_of:
            results.append(CandidateResult(cand, float("inf"), "infeasible", sol, min_memory(problem)))
            say(f"{label}: infeasible")
            continue
        results.append(CandidateResult(cand, bound, "solved", sol))
        if sol.gap > 0 and np.isfinite(sol.gap):
            open_bounds.append(sol.objective * (1 - sol.gap))
        if best is not None and sol.objective >= best[0].objective:
            say(f"{label}: cannot beat {best[0].objective:.4g} s ({sol.seconds:.2f} s)")
        else:
            say(f"{label}: {sol.objective:.4g} s ({sol.status}, gap {sol.gap:.2%}, {sol.seconds:.2f} s)")
        if sol.stage_of and (best is None or sol.objective < best[0].objective):
            best = (sol, problem, cand)
    if best is None:
        need = min((r.min_memory for r in results if r.outcome == "infeasible"), default=float("inf"))
        return SearchResult(None, None, None, len(items), pruned, results, need, limit)
    sol, problem, cand = best
    # the gap of the whole search: no unfinished candidate may hide a better plan than its bound
    floor = min([sol.objective * (1 - sol.gap)] + open_bounds)
    gap = _relative_gap(sol.objective, floor)
    problems = {c: p for _, c, p in items}
    for incumbent in incumbents:
        if incumbent.candidate not in problems:
            raise ValueError(f"incumbent for {incumbent.candidate}, which is not a candidate of this search")
        inc_problem = problems[incumbent.candidate]
        ev = evaluate(inc_problem, incumbent.stage_of, incumbent.strategy_of)
        if ev.feasible and ev.iteration_s < sol.objective * (1 - 1e-12):
            sol = replace(sol, stage_of=tuple(incumbent.stage_of), strategy_of=tuple(incumbent.strategy_of),
                          objective=ev.iteration_s)
            problem, cand = inc_problem, incumbent.candidate
            # iteration times are never negative: where some candidate proved no bound (floor -inf),
            # 0 still bounds the incumbent, whose gap is then 100 % rather than unbounded
            gap = _relative_gap(sol.objective, max(floor, 0.0))
    sol = replace(sol, gap=gap, status="optimal" if gap <= mip_gap + 1e-9 else "time_limit",
                  seconds=time.perf_counter() - t0)
    return SearchResult(sol, problem, cand, len(items), pruned, results, memory_limit=limit)


def _relative_gap(objective: float, floor: float) -> float:
    return max(0.0, (objective - floor) / objective) if objective > 0 else 0.0
