"""UniAP's outer loop: every (pp, microbatches, schedule) candidate, best lower bound first (no torch).

Each candidate gets a cheap bound that is provably <= its optimum under problem.evaluate
(passes/solve/bounds.py); candidates whose bound cannot beat the incumbent by more than the target
gap are pruned, a candidate another one provably dominates (same times, no less memory, no smaller
bubble) is pruned by its dominator's bound. The rest are visited twice: first the heuristic and the
candidate's own bound only (candidate.solve(milp=False)), then, for those still open, a MILP with the
incumbent objective as its cutoff; they share the time limit, and what a cut MILP leaves unused at the
end goes back to it. The deadline is hard: what it leaves unvisited is "cut" and keeps
its bound. The reported gap is global: the incumbent against the smallest lower bound over every
candidate, solved, pruned or cut.

Assignments known from elsewhere (incumbents, e.g. the grid baseline's plans) replace the result when
they are faster; the search's floor stays, so the gap only shrinks.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

import numpy as np

from fxplan.passes.solve.bounds import lower_bound, min_memory
from fxplan.passes.solve.candidate import Solution, solve
from fxplan.passes.solve.exhaustive import exhaustive
from fxplan.passes.solve.problem import Candidate, Problem, evaluate


@dataclass(frozen=True)
class Assignment:
    """Where one candidate's layers go: per layer its stage and its strategy index."""

    candidate: Candidate
    stage_of: tuple[int, ...]
    strategy_of: tuple[int, ...]


OUTCOMES = ("solved", "pruned", "dominated", "cut", "infeasible", "skipped")


@dataclass(frozen=True)
class CandidateResult:
    candidate: Candidate
    bound: float  # the best proven lower bound on this candidate's optimum, seconds (inf: infeasible)
    outcome: str  # one of OUTCOMES; "cut": the time limit stopped it (or came first), its bound stays
    solution: Solution | None = None
    min_memory: float = float("inf")  # least max-stage memory any assignment needs, bytes


@dataclass(frozen=True)
class SearchResult:
    best: Solution | None  # None when every candidate is infeasible; its gap is the global one
    problem: Problem | None  # the best candidate's problem
    candidate: Candidate | None
    considered: int  # candidates with a problem
    pruned: int  # skipped because a bound (their own or a dominator's) could not beat the incumbent
    per_candidate: list[CandidateResult]
    min_memory_needed: float = float("inf")  # when best is None: least per-device bytes any candidate needs
    memory_limit: float = float("inf")
    floor: float = 0.0  # the global lower bound: min over every candidate of its bound, seconds

    def count(self, outcome: str) -> int:
        return sum(r.outcome == outcome for r in self.per_candidate)


Incumbents = Sequence[Assignment] | Callable[[Candidate], Assignment | None]


def search(make_problem: Callable[[int, int, str], Problem | None], candidates: list[Candidate], *,
           time_limit_s: float = 60, deadline: float | None = None, progress: Callable[[str], None] | None = None,
           method: str = "miqp", mip_gap: float = 1e-4, incumbents: Incumbents = (),
           dominated: Mapping[Candidate, Candidate] | None = None,
           bound_problem: Callable[[int, int, str], Problem | None] | None = None,
           costly: Callable[[Candidate], bool] | None = None) -> SearchResult:
    """Best plan over the candidates; see module doc. method: "miqp" | "exhaustive".

    `deadline`: a time.perf_counter() value the search returns by (default now + time_limit_s).
    `dominated`: candidate -> a candidate claimed never slower; the claim is checked on the arrays.
    `bound_problem`: a cheaper Problem per candidate whose lower bound is also one of make_problem's
    (e.g. a bubble share below the schedule's); make_problem then runs only for visited candidates.
    `costly(candidate)`: its make_problem takes long; past the deadline with no plan yet, the first
    candidate tried is a cheap one.
    `incumbents` (assignments, or a function giving one for a visited candidate) are scored after the
    candidates are solved and neither prune candidates nor cut off MILPs, so the candidates visited
    and their solutions are the same with or without them."""
    if method not in ("miqp", "exhaustive"):
        raise ValueError(f"unknown method {method!r}; use 'miqp' or 'exhaustive'")
    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    end = deadline if deadline is not None else t0 + time_limit_s
    dominated = dict(dominated or {})
    results: dict[Candidate, CandidateResult] = {}
    problems: dict[Candidate, Problem] = {}  # exact problems, built on first use

    def exact(cand: Candidate) -> Problem:
        if cand not in problems:
            problems[cand] = make_problem(*cand)
        return problems[cand]

    items = []
    limit = float("inf")

    def cheap_problem(cand: Candidate) -> Problem | None:
        nonlocal limit
        problem = (bound_problem or make_problem)(*cand)
        if problem is None:
            results[cand] = CandidateResult(cand, float("inf"), "skipped")
            return None
        if bound_problem is None:
            problems[cand] = problem
        limit = problem.memory_limit
        return problem

    for cand in candidates:
        # a quick bound orders the candidates; the full one is computed when a candidate's turn comes.
        # Past the deadline no bound is proven (0 bounds every iteration time) and no arrays are built
        # (hundreds of candidates' cost tables take seconds): a candidate popped then is built only
        # while there is no plan at all
        if time.perf_counter() >= end:
            items.append((0.0, cand in dominated, cand, None, False))
            continue
        problem = cheap_problem(cand)
        if problem is not None:
            items.append((lower_bound(problem, quick=True), cand in dominated, cand, problem, True))
    # unbounded candidates (the deadline came first) go last: a candidate known to be good is the one
    # tried for a plan at all
    # A costly candidate's cheap bound can sit far below its optimum (zb-auto's bubble share is
    # bounded by 0): it is visited in the order of the candidate it dominates, whose bound is close
    # to its own optimum. Only the order changes; pruning reads the valid bounds.
    quick = {it[2]: it[0] for it in items}
    order = {worse_: quick[worse_] for worse_, better in dominated.items() if worse_ in quick
             and better in quick and costly is not None and costly(better)}
    rank = {better: max(quick[better], order[worse_]) for worse_, better in dominated.items() if worse_ in order}
    late = time.perf_counter() >= end and costly is not None  # no time left: try a cheap candidate first

    # Two passes: every candidate first gets the heuristic and its own bound (a second or less), so
    # the incumbent the MILPs are cut off with, and the bounds are pruned against, is already the best
    # of the heuristics; only then do the candidates still open get a MILP, best bound first.
    screened: dict[Candidate, Solution | None] = {}
    waiting: dict[Candidate, float] = {}  # screened, open, queued for the MILP pass: its bound
    deferred: dict[Candidate, int] = {}  # times a dominated candidate waited for its dominator
    retry: set[Candidate] = set()  # cut by its share of the time, queued again for what is left at the end

    def key(bound: float, it) -> tuple:
        phase = 2 if it[2] in retry else int(it[2] in screened)
        return (phase, late and bool(costly(it[2])), not it[4], max(rank.get(it[2], bound), bound),
                it[1], it[2][0], it[2][1])

    # best bound first, lazily: a candidate's full bound (the stage-split DP) is computed when it
    # reaches the front, and it goes back into the queue when that bound puts it behind another
    queue = [(key(it[0], it), n, it) for n, it in enumerate(items)]
    heapq.heapify(queue)
    known = {it[2] for it in items}
    tightened: set[Candidate] = set()
    follows: dict[Candidate, Candidate] = {}  # pruned by its dominator: its outcome and bound follow that one's
    best: tuple[Solution, Problem, Candidate] | None = None
    visited: list[Candidate] = []
    while queue:
        _, n, it = heapq.heappop(queue)
        bound, _, cand, cheap, _ = it
        label = f"pp={cand[0]} mb={cand[1]} {cand[2]}"
        if cheap is None:  # listed past the deadline
            if best is not None:
                results[cand] = CandidateResult(cand, 0.0, "cut")
                continue
            if (cheap := cheap_problem(cand)) is None:
                continue
            it = it[:3] + (cheap,) + it[4:]
        if cand not in tightened and time.perf_counter() < end:
            tightened.add(cand)
            # a bound past the incumbent prunes (and cannot be the global floor): no need for more of it
            bound = max(bound, lower_bound(cheap, enough=best[0].objective if best is not None else np.inf))
            it = (bound,) + it[1:]
            if queue and key(bound, it) > queue[0][0]:
                heapq.heappush(queue, (key(bound, it), n, it))
                continue
        if not np.isfinite(bound):
            results[cand] = CandidateResult(cand, bound, "infeasible", None, min_memory(cheap))
            continue
        dom = dominated.get(cand)
        waiting.pop(cand, None)
        if dom in waiting and deferred.get(cand, 0) < 2:
            # its dominator waits for its MILP: decide this one after it (queued no earlier than it)
            screened.setdefault(cand, None)
            deferred[cand] = deferred.get(cand, 0) + 1
            later = (max(bound, waiting[dom]),) + it[1:]
            heapq.heappush(queue, (key(later[0], later), n, later))
            continue
        if (dom in results and dom in problems and results[dom].outcome != "infeasible"
                and _dominates(problems[dom], exact(cand))):
            # its outcome and bound are its dominator's final ones, read when the search ends
            results[cand] = CandidateResult(cand, bound, "dominated")
            follows[cand] = dom
            continue
        if best is not None and bound >= best[0].objective * (1 - mip_gap):
            own = best[2] == cand  # the incumbent's own candidate: its heuristic is proven within the gap
            results[cand] = CandidateResult(cand, bound, "solved" if own else "pruned",
                                            best[0] if own else None)
            continue
        if bound_problem is not None and best is not None and time.perf_counter() < end:
            # the exact problem may bound tighter than the cheap one (its bubble share is known now):
            # a MILP saved for the price of its arrays
            bound = max(bound, lower_bound(exact(cand), enough=best[0].objective))
            if bound >= best[0].objective * (1 - mip_gap):
                results[cand] = CandidateResult(cand, bound, "pruned")
                continue
        left = end - time.perf_counter()
        if left <= 0 and (best is not None or (costly is not None and costly(cand) and any(
                np.isfinite(e[2][0]) and not costly(e[2][2]) for e in queue))):
            results[cand] = CandidateResult(cand, bound, "cut")
            continue
        # with no plan at all yet the best-bound candidate is still tried: its heuristic takes a
        # fraction of a second and HiGHS gets its minimum, a small overrun rather than no plan
        problem = exact(cand)
        cutoff = best[0].objective if best is not None else None
        if method == "exhaustive":
            sol = exhaustive(problem)
            visited.append(cand)
        elif cand not in screened:
            screened[cand] = sol = solve(problem, mip_gap=mip_gap, milp=False)
            visited.append(cand)
            if sol.status == "time_limit":  # open: back into the queue for the MILP pass
                bound = max(bound, sol.bound)
                if sol.stage_of:
                    results[cand] = CandidateResult(cand, bound, "cut", sol)
                    if best is None or sol.objective < best[0].objective:
                        best = (sol, problem, cand)
                it = (bound,) + it[1:]
                waiting[cand] = bound
                heapq.heappush(queue, (key(bound, it), n, it))
                continue
        else:
            # share what is left among the candidates still to visit, but give this one most of it:
            # the best-bound candidate is usually the winner
            share = max(min(max(left / max(1, min(3, len(waiting) + 1)), 0.5), left), 0.0)
            sol = solve(problem, time_limit_s=share, mip_gap=mip_gap, cutoff=cutoff, start=screened[cand])
        if sol.status == "infeasible":
            results[cand] = CandidateResult(cand, float("inf"), "infeasible", sol, min_memory(problem))
            say(f"{label}: infeasible")
            continue
        floor = max(bound, sol.bound)
        proven = sol.status in ("optimal", "cutoff")
        results[cand] = CandidateResult(cand, floor, "solved" if proven else "cut", sol)
        if (method == "miqp" and not proven and cand not in retry
                and end - time.perf_counter() > max(1.0, sol.seconds)):
            # what the other candidates leave unused at the end goes to this one, from its best so far
            retry.add(cand)
            if sol.stage_of and (screened.get(cand) is None or sol.objective <= screened[cand].objective):
                screened[cand] = replace(sol, bound=floor)
            it = (floor,) + it[1:]
            heapq.heappush(queue, (key(floor, it), n, it))
        if not sol.stage_of:
            say(f"{label}: cannot beat {cutoff:.4g} s ({sol.seconds:.2f} s)" if proven else
                f"{label}: no plan within the time limit ({sol.seconds:.2f} s)")
            continue
        if sol.status == "cutoff":
            say(f"{label}: {sol.objective:.4g} s, proven not to beat {cutoff:.4g} s ({sol.seconds:.2f} s)")
        else:
            say(f"{label}: {sol.objective:.4g} s ({sol.status}, gap {sol.gap:.2%}, {sol.seconds:.2f} s)")
        # a later pass over the incumbent's own candidate replaces it at equal time (its status is newer)
        if best is None or sol.objective < best[0].objective or (
                best[2] == cand and sol.objective <= best[0].objective):
            best = (sol, problem, cand)
    for cand in follows:  # a dominator decided after its dominated candidate passes its outcome on
        results[cand] = _follow(cand, follows, results)
    ordered = [results[c] for c in candidates if c in results]
    considered = len(items)
    pruned = sum(r.outcome in ("pruned", "dominated") for r in ordered)
    if best is None:
        need = min((r.min_memory for r in ordered if r.outcome == "infeasible"), default=float("inf"))
        return SearchResult(None, None, None, considered, pruned, ordered, need, limit)
    sol, problem, cand = best
    floor = min(r.bound for r in ordered if r.outcome != "skipped")
    for incumbent in _incumbents(incumbents, visited):
        if incumbent.candidate not in known:
            raise ValueError(f"incumbent for {incumbent.candidate}, which is not a candidate of this search")
        inc_problem = exact(incumbent.candidate)
        ev = evaluate(inc_problem, incumbent.stage_of, incumbent.strategy_of)
        if ev.feasible and ev.iteration_s < sol.objective * (1 - 1e-12):
            sol = replace(sol, stage_of=tuple(incumbent.stage_of), strategy_of=tuple(incumbent.strategy_of),
                          objective=ev.iteration_s)
            problem, cand = inc_problem, incumbent.candidate
    gap = relative_gap(sol.objective, floor)
    sol = replace(sol, gap=gap, bound=floor, status="optimal" if gap <= mip_gap + 1e-9 else "time_limit",
                  seconds=time.perf_counter() - t0)
    return SearchResult(sol, problem, cand, considered, pruned, ordered, memory_limit=limit, floor=floor)


def _incumbents(incumbents: Incumbents, visited: list[Candidate]):
    if callable(incumbents):
        return [a for a in (incumbents(c) for c in visited) if a is not None]
    return list(incumbents)


def _follow(cand: Candidate, follows: Mapping[Candidate, Candidate],
            results: dict[Candidate, CandidateResult]) -> CandidateResult:
    """A dominated candidate's result from its dominator's final one (along a chain of them)."""
    dom = follows[cand]
    last = _follow(dom, follows, results) if dom in follows else results[dom]
    own = results[cand]
    outcome = "cut" if last.outcome == "cut" else "dominated"
    return CandidateResult(cand, max(own.bound, last.bound), outcome, None, own.min_memory)


def _dominates(better: Problem | None, worse: Problem) -> bool:
    """`better` is never slower than `worse` for any assignment: the same arrays and edges, a bubble
    share no larger, and no stage holding more microbatches of activations (so no less memory fits)."""
    if better is None or better.pp != worse.pp or better.microbatches != worse.microbatches:
        return False
    same = all(_same(getattr(better, name), getattr(worse, name)) for name in
               ("fwd", "bwd", "wgt", "sync", "mem_fixed", "mem_act", "mem_peak", "mem_work", "mem_grad"))
    same = same and len(better.edges) == len(worse.edges) and all(
        (a.src, a.dst) == (b.src, b.dst) and _same((a.reshard, a.send), (b.reshard, b.send))
        for a, b in zip(better.edges, worse.edges))
    split_ok = (not better.split and not worse.split) or (
        bool(better.split) and bool(worse.split) and all(np.array_equal(a, b) for a, b in zip(better.split, worse.split)))
    return (same and split_ok and better.memory_limit == worse.memory_limit
            and better.bubble_share <= worse.bubble_share + 1e-12
            and all(better.in_flight(i) <= worse.in_flight(i) for i in range(worse.pp)))


def _same(xs, ys) -> bool:
    return len(xs) == len(ys) and all(x is y or np.array_equal(x, y) for x, y in zip(xs, ys))


def relative_gap(objective: float, floor: float) -> float:
    """(objective - floor) / objective, unclamped: a negative value would expose an invalid bound.
    Rounding noise of the bound's arithmetic (1e-9 relative) reads as 0."""
    if objective <= 0:
        return 0.0
    gap = (objective - floor) / objective
    return 0.0 if abs(gap) < 1e-9 else gap
