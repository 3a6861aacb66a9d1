"""A fast incumbent for the MILP: alternate an exact stage-split DP and per-stage strategy choice,
then a local search on the cuts.

* place_stages(strategies): with strategies fixed, a layer's time (own F+B+W plus the reshard of its
  incoming edges) and a cut's transfer time no longer depend on where the stages are cut. For a
  bottleneck cap B the DP over (stage, cut position) minimising the summed transfers subject to every
  stage time, transfer and memory fitting is exact; caps are visited in ascending order until (c-1)*B
  alone loses.
* choose_strategies(stage_of): per stage, a Viterbi pass over its layers (chain edges priced, edges to
  other stages at their current strategies) minimising c * time + sync + mu * memory, mu bisected
  until the stage fits (Lagrangian relaxation), then a greedy knapsack spending the memory left.
* rebalance: the slowest stage hands a layer towards another stage, the stages between choose anew;
  where no such move helps, coordinate descent over every layer on the whole objective (_retune).
No torch; returns (stage_of, strategy_of) or None when nothing feasible was found.
"""

from __future__ import annotations

import numpy as np

from fxplan.passes.solve.presolve import segments
from fxplan.passes.solve.problem import Problem, evaluate, segment_max


def _times(problem: Problem) -> list[np.ndarray]:
    return [problem.layer_time(u) for u in range(problem.num_layers)]


def _memory_parts(problem: Problem, u: int, flight: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layer u's [K] bytes as a stage holding `flight` microbatches places them (`placed_memory`):
    held (fixed + in-flight activations, summed over the stage), working set (the stage's largest
    counts) and sync-phase peak (summed)."""
    zero = np.zeros(problem.num_strategies(u))
    held = problem.placed_fixed(u) + flight * np.asarray(problem.mem_act[u], float)
    return (held, np.asarray(problem.mem_work[u], float) if problem.mem_work else zero,
            np.asarray(problem.mem_peak[u], float) if problem.mem_peak else zero)


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
    mem_ok = [valid & (seg_mf + problem.in_flight(i) * seg_ma + seg_mw <= limit)
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


def choose_strategies(problem: Problem, stage_of, chooser: "StageChooser | None" = None,
                      around=None) -> tuple[int, ...] | None:
    """Per stage, strategies minimising time + mu * memory, mu the smallest that fits; `around`, the
    current strategies, prices the edges that leave or enter a stage."""
    chooser = chooser or StageChooser(problem)
    out: list[int] = []
    for i in range(problem.pp):
        ks = chooser(i, [u for u in range(problem.num_layers) if stage_of[u] == i], around)
        if ks is None:
            return None
        out += ks
    return tuple(out)


class StageChooser:
    """One stage's strategies for its layers, cached by what decides them: the activations it holds
    in flight and its layers up to identity (the layers of a run of identical ones are alike)."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self.times = _times(problem)
        self.chain = {e.dst: e for e in problem.edges if e.src == e.dst - 1}
        self.alike = {u: s.first for s in segments(problem) for u in range(s.first, s.last + 1)}
        self.cache: dict[tuple, list[int] | None] = {}

    def __call__(self, stage: int, layers: list[int], around=None) -> list[int] | None:
        """`around`: strategies of the other layers; the resharding of an edge between a layer here
        and one elsewhere is priced at the other end's strategy (None: not priced)."""
        problem = self.problem
        f = problem.in_flight(stage)
        inside = set(layers)
        outer = () if around is None else tuple(
            (n, int(around[e.src]) if e.dst in inside else -1 - int(around[e.dst]))
            for n, e in enumerate(problem.edges) if (e.src in inside) != (e.dst in inside))
        key = (f, tuple(self.alike[u] for u in layers), outer)
        if key not in self.cache:
            self.cache[key] = self._choose(f, layers, outer)
        return self.cache[key]

    def _choose(self, f: int, layers: list[int], outer) -> list[int] | None:
        problem, c, chain = self.problem, self.problem.microbatches, self.chain
        parts = [_memory_parts(problem, u, f) for u in layers]
        # a working set counted per layer (not the stage's largest): the safe side for the Lagrangian
        mem = [np.maximum(held + work, peak) for held, work, peak in parts]
        # a layer's time and its resharding are paid per microbatch, its gradient sync once per iteration
        cost = [c * self.times[u] + problem.sync[u] for u in layers]
        where = {u: j for j, u in enumerate(layers)}
        for n, k in outer:
            e = problem.edges[n]
            if k >= 0:
                cost[where[e.dst]] = cost[where[e.dst]] + c * e.reshard[k, :]
            else:
                cost[where[e.src]] = cost[where[e.src]] + c * e.reshard[:, -1 - k]
        trans = [c * chain[u].reshard if u in chain and u - 1 in where else None for u in layers]

        def viterbi(mu: float):
            acc = cost[0] + mu * mem[0]
            backs = []
            for j in range(1, len(layers)):
                tot = acc[:, None] + (trans[j] if trans[j] is not None else 0.0)
                b = np.argmin(tot, axis=0)
                backs.append(b)
                acc = tot[b, np.arange(tot.shape[1])] + cost[j] + mu * mem[j]
            ks = [int(np.argmin(acc))]
            for b in reversed(backs):
                ks.append(int(b[ks[-1]]))
            ks.reverse()
            return ks, sum(mem[j][ks[j]] for j in range(len(layers)))

        ks, m = viterbi(0.0)
        if m <= problem.memory_limit:
            return ks
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
        return _fill(ks, cost, parts, trans, problem.memory_limit)


def _fill(ks: list[int], cost, parts, trans, limit: float) -> list[int]:
    """Spend the memory the Lagrangian choice leaves free: it picks one strategy for all alike layers
    (identical cost vectors share an argmin), where the best stage mixes a fast, memory-hungry strategy
    on some layers with a lean one on the rest. Greedy knapsack: switch the one layer whose change
    saves the most time per byte added (or saves time and bytes), while the stage fits as placed:
    max(sum act + largest work, sum peak), `parts` giving per layer those three [K] arrays."""
    ks = list(ks)
    n = len(ks)
    act, work, peak = ([p[q] for p in parts] for q in range(3))
    sum_a = sum(act[j][ks[j]] for j in range(n))
    sum_p = sum(peak[j][ks[j]] for j in range(n))
    for _ in range(4 * n * max(len(c) for c in cost)):
        w_now = np.array([work[j][ks[j]] for j in range(n)])
        order = np.argsort(w_now)[::-1]
        best = None
        used = max(sum_a + w_now.max(initial=0.0), sum_p)
        for j in range(n):
            dt = cost[j] - cost[j][ks[j]]
            if j > 0 and trans[j] is not None:
                dt = dt + trans[j][ks[j - 1], :] - trans[j][ks[j - 1], ks[j]]
            if j + 1 < n and trans[j + 1] is not None:
                dt = dt + trans[j + 1][:, ks[j + 1]] - trans[j + 1][ks[j], ks[j + 1]]
            others = w_now[order[0]] if order[0] != j else (w_now[order[1]] if n > 1 else 0.0)
            new = np.maximum(sum_a - act[j][ks[j]] + act[j] + np.maximum(work[j], others),
                             sum_p - peak[j][ks[j]] + peak[j])
            dm = new - used
            ok = (dt < -1e-15 * max(1.0, float(np.max(np.abs(cost[j]))))) & (new <= limit)
            if not ok.any():
                continue
            ratio = np.where(ok, np.where(dm > 0, -dt / np.maximum(dm, 1e-300), np.inf), -np.inf)
            k = int(np.argmax(ratio))
            key = (ratio[k], -dt[k])
            if best is None or key > best[0]:
                best = (key, j, k)
        if best is None:
            break
        _, j, k = best
        sum_a += act[j][k] - act[j][ks[j]]
        sum_p += peak[j][k] - peak[j][ks[j]]
        ks[j] = k
    return ks


def heuristic(problem: Problem, rounds: int = 4):
    """(stage_of, strategy_of) of a good feasible assignment, or None."""
    L, pp = problem.num_layers, problem.pp
    if L < pp:
        return None
    chooser = StageChooser(problem)
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
            new = choose_strategies(problem, stage_of, chooser, around=strategies)
            if new is None:
                break
            ev = evaluate(problem, stage_of, new)
            if ev.feasible and ev.iteration_s < best_val - 1e-12:
                best_val, best = ev.iteration_s, (tuple(stage_of), new)
            if new == strategies:
                break
            strategies = new
    return best if best is None else rebalance(problem, chooser, *best, value=best_val)


def rebalance(problem: Problem, chooser: StageChooser, stage_of, strategy_of, value: float,
              moves: int | None = None):
    """Local search on the cuts: the slowest stage hands one layer towards another stage b (every cut
    between them shifts by one), the stages in between choose their strategies anew. The split DP
    alone cannot do this: it moves layers with their strategies, so a stage that must use a lean,
    slow strategy to fit keeps it after the cut moves. Returns the best assignment found."""
    pp, L = problem.pp, problem.num_layers
    stage_of, strategy_of = list(stage_of), list(strategy_of)
    for _ in range(moves if moves is not None else 4 * pp):
        p = evaluate(problem, stage_of, strategy_of).stage_compute_s
        a = int(np.argmax(p))
        starts = [stage_of.index(i) for i in range(pp)] + [L]
        found = None
        for b in range(pp):
            if b == a:
                continue
            new = list(starts)
            for j in (range(a + 1, b + 1) if b > a else range(b + 1, a + 1)):
                new[j] += -1 if b > a else 1
            if any(new[j] >= new[j + 1] for j in range(pp)):
                continue
            stages = [i for i in range(pp) for _ in range(new[i + 1] - new[i])]
            strategies = list(strategy_of)
            for i in range(min(a, b), max(a, b) + 1):
                ks = chooser(i, list(range(new[i], new[i + 1])), strategies)
                if ks is None:
                    break
                strategies[new[i]:new[i + 1]] = ks
            else:
                ev = evaluate(problem, stages, strategies)
                if ev.feasible and ev.iteration_s < (found[0] if found else value) * (1 - 1e-12):
                    found = (ev.iteration_s, stages, strategies)
        if found is None:
            found = _retune(problem, stage_of, strategy_of, value)
        if found is None:
            break
        value, stage_of, strategy_of = found
    return tuple(stage_of), tuple(strategy_of)


def _retune(problem: Problem, stage_of, strategy_of, value: float, sweeps: int = 3):
    """Coordinate descent on the whole objective: each layer in turn takes its best strategy with all
    else fixed, every strategy of it priced at once from the stage sums (its stage's time, sync and
    memory, the stages its out-edges reach, the boundaries their sends cross). A stage's choice sees
    only its own layers and prices an edge to another stage at that end's current strategy, so a
    strategy whose worth shows only in the max terms or at a far stage is missed there.
    Returns (value, stage_of, strategy_of) when it improved on `value`, else None."""
    pp, c, L = problem.pp, problem.microbatches, problem.num_layers
    beta, limit = problem.bubble_share, problem.memory_limit * (1 + 1e-9)
    stage_of, ks = list(stage_of), list(strategy_of)
    ins = {u: [e for e in problem.edges if e.dst == u] for u in range(L)}
    outs = {u: [e for e in problem.edges if e.src == u] for u in range(L)}
    times = _times(problem)
    held, work, peak = zip(*(_memory_parts(problem, u, problem.in_flight(stage_of[u])) for u in range(L)))

    def sums():
        """Per stage (and boundary) what the objective and memory read, for the current strategies."""
        ev = evaluate(problem, stage_of, ks)
        sync, act, peaks = np.zeros(pp), np.zeros(pp), np.zeros(pp)
        for v in range(L):
            sync[stage_of[v]] += problem.sync[v][ks[v]]
            act[stage_of[v]] += held[v][ks[v]]
            peaks[stage_of[v]] += peak[v][ks[v]]
        return np.array(ev.stage_compute_s), np.array(ev.boundary_s), sync, act, peaks

    improved = None
    for _ in range(sweeps):
        changed = False
        p, o, sync, act, peaks = sums()
        for u in range(L):
            i, cur = stage_of[u], ks[u]
            K = problem.num_strategies(u)
            P = np.tile(p, (K, 1))
            O = np.tile(o, (K, 1)) if pp > 1 else np.zeros((K, 0))
            S = np.tile(sync, (K, 1))
            P[:, i] += times[u] - times[u][cur]
            S[:, i] += problem.sync[u] - problem.sync[u][cur]
            for e in ins[u]:
                P[:, i] += e.reshard[ks[e.src], :] - e.reshard[ks[e.src], cur]
            for e in outs[u]:
                P[:, stage_of[e.dst]] += e.reshard[:, ks[e.dst]] - e.reshard[cur, ks[e.dst]]
                O[:, i:stage_of[e.dst]] += (e.send - e.send[cur])[:, None]
            others = max((work[v][ks[v]] for v in range(L) if stage_of[v] == i and v != u), default=0.0)
            mem = np.maximum(act[i] - held[u][cur] + held[u] + np.maximum(others, work[u]),
                             peaks[i] - peak[u][cur] + peak[u])
            total = (beta * (P.sum(axis=1) + O.sum(axis=1))
                     + (c - beta) * np.maximum(P.max(axis=1), O.max(axis=1, initial=0.0)) + S.max(axis=1))
            total = np.where(mem <= limit, total, np.inf)
            k = int(np.argmin(total))
            if k == cur or total[k] >= value * (1 - 1e-12):
                continue
            trial = list(ks)
            trial[u] = k
            ev = evaluate(problem, stage_of, trial)
            if ev.feasible and ev.iteration_s < value * (1 - 1e-12):
                value, ks, changed = ev.iteration_s, trial, True
                improved = (value, list(stage_of), list(ks))
                p, o, sync, act, peaks = sums()
        if not changed:
            break
    return improved
