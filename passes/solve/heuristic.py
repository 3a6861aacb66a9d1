"""A fast incumbent for the MILP: alternate an exact stage-split DP and per-stage strategy choice.

* place_stages(strategies): with strategies fixed, a layer's time (own F+B+W plus the reshard of its
  incoming edges) and a cut's transfer time no longer depend on where the stages are cut. For a
  bottleneck cap B the DP over (stage, cut position) minimising the summed transfers subject to every
  stage time, transfer and memory fitting is exact; caps are visited in ascending order until (c-1)*B
  alone loses.
* choose_strategies(stage_of): per stage, a Viterbi pass over its layers (chain edges priced) minimising
  time + mu * memory, with mu bisected until the stage fits its memory (Lagrangian relaxation).
No torch; returns (stage_of, strategy_of) or None when nothing feasible was found.
"""

from __future__ import annotations

import numpy as np

from fxplan.passes.solve.problem import Problem, evaluate, in_flight, segment_max


def _times(problem: Problem) -> list[np.ndarray]:
    return [problem.layer_time(u) for u in range(problem.num_layers)]


def place_stages(problem: Problem, strategy_of, best: float = np.inf):
    """Exact best contiguous split for fixed strategies (up to the max-sync term), or None."""
    pp, c, L = problem.pp, problem.microbatches, problem.num_layers
    k = list(strategy_of)
    t = np.array([_times(problem)[u][k[u]] for u in range(L)], float)
    cut = np.zeros(L + 1)  # cut[s]: transfers crossing the boundary in front of layer s
    for e in problem.edges:
        t[e.dst] += e.reshard[k[e.src], k[e.dst]]
        cut[e.src + 1: e.dst + 1] += e.send[k[e.src]]
    # the bound of evaluate's activation phase the MILP places under: every gradient, the largest work
    mf = np.array([problem.placed_fixed(u)[k[u]] for u in range(L)])
    ma = np.array([problem.mem_act[u][k[u]] for u in range(L)])
    P = np.concatenate([[0], np.cumsum(t)])
    seg_t = P[None, :] - P[:, None]  # [s, e] time of layers s..e-1
    MF = np.concatenate([[0], np.cumsum(mf)])
    MA = np.concatenate([[0], np.cumsum(ma)])
    seg_mf, seg_ma = MF[None, :] - MF[:, None], MA[None, :] - MA[:, None]
    valid = np.triu(np.ones((L + 1, L + 1), bool), 1)
    mp = np.array([problem.mem_peak[u][k[u]] for u in range(L)]) if problem.mem_peak else np.zeros(L)
    MP = np.concatenate([[0], np.cumsum(mp)])
    # [s, e] the largest working set of layers s..e-1 (a stage holds one layer's at a time)
    seg_mw = segment_max(np.array([problem.mem_work[u][k[u]] for u in range(L)]) if problem.mem_work else np.zeros(L))
    limit = problem.memory_limit * (1 + 1e-9)
    mem_ok = [valid & (seg_mf + in_flight(problem.schedule, pp, c, i) * seg_ma + seg_mw <= limit)
              & (MP[None, :] - MP[:, None] <= limit) for i in range(pp)]
    const = P[-1]
    caps = np.unique(np.concatenate([seg_t[valid], cut[1:L]]))
    caps = caps[caps >= max(t.max(), const / pp) - 1e-12]

    def run(B):
        ok_cut = cut <= B + 1e-12
        dp = np.full(L + 1, np.inf)
        dp[0] = 0.0
        back = np.zeros((pp, L + 1), int)
        for i in range(pp):
            start = dp + (cut if i > 0 else 0.0)
            if i > 0:
                start = np.where(ok_cut, start, np.inf)
            feas = mem_ok[i] & (seg_t <= B + 1e-12)
            cost = np.where(feas, start[:, None], np.inf)
            back[i] = np.argmin(cost, axis=0)
            dp = cost[back[i], np.arange(L + 1)]
        return dp, back

    # Feasibility is monotone in the cap (a larger cap only relaxes the DP), so bisect for the
    # smallest feasible one instead of trying thousands of infeasible caps one by one.
    lo, hi = 0, len(caps)
    while lo < hi:
        mid = (lo + hi) // 2
        if np.isfinite(run(caps[mid])[0][L]):
            hi = mid
        else:
            lo = mid + 1
    if lo == len(caps):
        return None
    # A larger cap can only lower the summed transfers, never below their value with no cap: stop
    # once (c-1)*B plus that floor already loses to the best split found.
    floor = run(caps[-1])[0][L]
    found = None
    for B in caps[lo:]:
        beta = problem.bubble_share
        if beta * (const + floor) + (c - beta) * B >= best:
            break
        dp, back = run(B)
        if not np.isfinite(dp[L]):
            continue
        stage_of = np.zeros(L, int)
        e = L
        for i in range(pp - 1, -1, -1):
            s = back[i, e]
            stage_of[s:e] = i
            e = s
        val = evaluate(problem, stage_of, k).iteration_s
        if val < best:
            best, found = val, tuple(int(x) for x in stage_of)
    return found


def choose_strategies(problem: Problem, stage_of) -> tuple[int, ...] | None:
    """Per stage, strategies minimising time + mu * memory, mu the smallest that fits."""
    pp, c, L = problem.pp, problem.microbatches, problem.num_layers
    times = _times(problem)
    chain = {e.dst: e for e in problem.edges if e.src == e.dst - 1}
    out: list[int] = []
    for i in range(pp):
        layers = [u for u in range(L) if stage_of[u] == i]
        f = in_flight(problem.schedule, pp, c, i)
        # a working set counted per layer (not the stage's largest): the safe side for a heuristic
        mem = [np.maximum(problem.placed_fixed(u) + f * np.asarray(problem.mem_act[u])
                          + (problem.mem_work[u] if problem.mem_work else 0.0),
                          problem.mem_peak[u] if problem.mem_peak else 0.0) for u in layers]
        cost = [times[u] + problem.sync[u] for u in layers]

        def viterbi(mu: float):
            acc = cost[0] + mu * mem[0]
            backs = []
            for j in range(1, len(layers)):
                u = layers[j]
                trans = chain[u].reshard if u in chain else np.zeros((len(acc), len(cost[j])))
                tot = acc[:, None] + trans
                b = np.argmin(tot, axis=0)
                backs.append(b)
                acc = tot[b, np.arange(tot.shape[1])] + cost[j] + mu * mem[j]
            ks = [int(np.argmin(acc))]
            for b in reversed(backs):
                ks.append(int(b[ks[-1]]))
            ks.reverse()
            return ks, sum(mem[j][ks[j]] for j in range(len(layers)))

        ks, m = viterbi(0.0)
        if m > problem.memory_limit:
            scale = sum(float(np.max(x)) for x in cost) / max(problem.memory_limit, 1e-30)
            hi = scale
            while viterbi(hi)[1] > problem.memory_limit and hi < scale * 1e12:
                hi *= 10
            lo = 0.0
            for _ in range(40):
                mid = (lo + hi) / 2
                if viterbi(mid)[1] > problem.memory_limit:
                    lo = mid
                else:
                    hi = mid
            ks, m = viterbi(hi)
            if m > problem.memory_limit * (1 + 1e-9):
                return None
        out += ks
    return tuple(out)


def heuristic(problem: Problem, rounds: int = 4):
    """(stage_of, strategy_of) of a good feasible assignment, or None."""
    L, pp = problem.num_layers, problem.pp
    if L < pp:
        return None
    best_val, best = np.inf, None
    # starts: every layer at its fastest strategy, and at its smallest-memory one
    starts = [tuple(int(np.argmin(t)) for t in _times(problem)),
              tuple(int(np.argmin(np.asarray(problem.mem_fixed[u]) + problem.mem_act[u])) for u in range(L))]
    for strategies in starts:
        for _ in range(rounds):
            stage_of = place_stages(problem, strategies)
            if stage_of is not None:
                ev = evaluate(problem, stage_of, strategies)
                if ev.feasible and ev.iteration_s < best_val - 1e-12:
                    best_val, best = ev.iteration_s, (tuple(stage_of), tuple(strategies))
            else:
                # nothing fits with these strategies: balance layer counts and let choose_strategies() fix memory
                stage_of = tuple(min(pp - 1, u * pp // L) for u in range(L))
            new = choose_strategies(problem, stage_of)
            if new is None:
                break
            ev = evaluate(problem, stage_of, new)
            if ev.feasible and ev.iteration_s < best_val - 1e-12:
                best_val, best = ev.iteration_s, (tuple(stage_of), new)
            if new == strategies:
                break
            strategies = new
    return best
