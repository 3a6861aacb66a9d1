"""Even out the stages of a solved assignment where the iteration time does not care.

With one microbatch the iteration-time formula is the SUM of the stage times: every contiguous
split of the layers costs the same compute, and the solver is free to pick one that piles most layers onto one stage (a cut where
the boundary activation is smallest saves microseconds of send). A user who pins pp wants the model
divided, its weights and work spread over the ranks. So after solving, the stages are re-cut,
strategies unchanged, for the fastest slowest stage that memory and `slack` on the iteration time
allow.
"""

from __future__ import annotations

from fxplan.passes.solve.problem import Problem, evaluate

SLACK = 1e-2  # a tie-break: up to 1 % of the iteration time buys even stages


def even_stages(problem: Problem, stage_of, strategy_of, slack: float = SLACK) -> tuple[int, ...]:
    """The contiguous stage map (same strategies) with the fastest slowest stage among those whose
    iteration time is within `slack` of the given map's and that fit memory; the given map when none
    beats it, or when several microbatches make the formula price the split itself.

    With one microbatch the iteration time is the layers' times (fixed by the strategies) plus each
    pipeline cut's sends: so for a bound B on the stage time, a DP over cut positions finds the
    cheapest cuts keeping every stage under B, and a binary search over the possible stage sums
    finds the smallest B whose cheapest cuts stay within the slack.
    """
    stage_of, strategy_of = tuple(int(s) for s in stage_of), [int(k) for k in strategy_of]
    pp, L = problem.pp, len(stage_of)
    if pp <= 1 or problem.microbatches > 1 or L <= pp:
        return stage_of  # several microbatches: the bottleneck term already prices an uneven split
    given = evaluate(problem, stage_of, strategy_of)
    if not given.feasible:
        return stage_of
    own = [float(problem.layer_time(u)[k]) for u, k in enumerate(strategy_of)]
    cut = [0.0] * (L + 1)  # cut[i]: sends of a pipeline boundary just before layer i
    for edge in problem.edges:
        own[edge.dst] += float(edge.reshard[strategy_of[edge.src], strategy_of[edge.dst]])
        for i in range(edge.src + 1, edge.dst + 1):
            cut[i] += float(edge.send[strategy_of[edge.src]])
    prefix = [0.0]
    for t in own:
        prefix.append(prefix[-1] + t)
    budget = sum(cut[i] for i in range(1, L) if stage_of[i] != stage_of[i - 1]) + slack * given.iteration_s
    bounds = sorted({prefix[j] - prefix[i] for i in range(L) for j in range(i + 1, L + 1)})
    best, lo, hi = None, 0, len(bounds) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        cuts = _cheapest_cuts(prefix, cut, pp, bounds[mid] * (1 + 1e-12))
        if cuts is not None and cuts[0] <= budget:
            best, hi = cuts[1], mid - 1
        else:
            lo = mid + 1
    if best is None:
        return stage_of
    trial = tuple(sum(1 for c in best if u >= c) for u in range(L))
    ev = evaluate(problem, trial, strategy_of)
    better = max(ev.stage_compute_s) < max(given.stage_compute_s)
    return trial if better and ev.feasible and ev.iteration_s <= given.iteration_s * (1 + slack) else stage_of


def _cheapest_cuts(prefix, cut, pp: int, bound: float):
    """(sends, cut positions) of the cheapest split into pp non-empty stages each at most `bound`."""
    L = len(prefix) - 1
    inf = float("inf")
    cost = [[inf] * (L + 1) for _ in range(pp + 1)]  # cost[j][i]: layers [0, i) in j stages
    back = [[-1] * (L + 1) for _ in range(pp + 1)]
    cost[0][0] = 0.0
    for j in range(1, pp + 1):
        for i in range(j, L - (pp - j) + 1):
            for k in range(j - 1, i):
                if cost[j - 1][k] == inf or prefix[i] - prefix[k] > bound:
                    continue
                c = cost[j - 1][k] + (cut[k] if k > 0 else 0.0)
                if c < cost[j][i]:
                    cost[j][i], back[j][i] = c, k
    if cost[pp][L] == inf:
        return None
    cuts, i = [], L
    for j in range(pp, 0, -1):
        i = back[j][i]
        if i > 0:
            cuts.append(i)
    return cost[pp][L], sorted(cuts)
