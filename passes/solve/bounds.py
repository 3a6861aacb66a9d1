"""Lower bounds on one candidate's optimum under problem.evaluate (no torch).

Every bound here is provably <= the best iteration time any memory-feasible assignment of the
candidate reaches; the search prunes with them and its global gap is measured against them. The
per-layer arrays are padded into [layers, strategies] matrices once per call (inf time and memory
where a layer has fewer strategies), so each stage costs a few numpy calls, not one per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from fxplan.passes.solve.problem import Problem, segment_max


CHAIN_BOUND_LAYERS = 64
"""Chains up to this many layers get lower_bound(chain=True) before their MILP: a few tens of
milliseconds there, seconds for a 100-layer chain of 80 strategies (whose runs of identical layers
agree on layouts anyway)."""


@dataclass(frozen=True)
class _Padded:
    time: np.ndarray  # [L, K] F+I+W (+ split) of one microbatch; inf where no strategy
    fixed: np.ndarray  # [L, K] mem_fixed; inf where no strategy
    act: np.ndarray  # [L, K] mem_act; 0 where no strategy
    peak: np.ndarray | None  # [L, K] mem_peak, or None
    sync: np.ndarray  # [L, K] sync; 0 where no strategy
    work: np.ndarray  # [L, K] mem_work; 0 where no strategy (or none)


def _padded(problem: Problem) -> _Padded:
    L = problem.num_layers
    K = max(problem.num_strategies(u) for u in range(L))

    def pad(arrays, fill):
        out = np.full((L, K), fill, float)
        for u, a in enumerate(arrays):
            out[u, : len(a)] = a
        return out

    t = pad(problem.fwd, np.inf) + pad(problem.bwd, 0.0) + pad(problem.wgt, 0.0)
    if problem.split:
        t = t + pad(problem.split, 0.0)
    # memory as the planner places it (problem.evaluate's `feasible`): every gradient held at once
    fixed = pad(tuple(problem.placed_fixed(u) for u in range(problem.num_layers)), np.inf)
    return _Padded(t, fixed, pad(problem.mem_act, 0.0),
                   pad(problem.mem_peak, np.inf) if problem.mem_peak else None, pad(problem.sync, 0.0),
                   pad(problem.mem_work, 0.0) if problem.mem_work else np.zeros((L, K)))


def _alone(m: _Padded, flight: int) -> np.ndarray:
    """[L, K] a strategy's bytes alone on a stage holding `flight` microbatches (the larger phase)."""
    mem = m.fixed + flight * m.act + m.work
    return mem if m.peak is None else np.maximum(mem, m.peak)


def _usable(m: _Padded, flight: int, limit: float) -> np.ndarray:
    """[L, K] strategies a stage holding `flight` microbatches can run at all (each fits there alone)."""
    return np.isfinite(m.time) & (_alone(m, flight) <= limit)


def _least_sums(m: _Padded, flight: int) -> np.ndarray:
    """[L+1, L+1]: [s, e] a bound <= the bytes of a stage holding layers s..e-1. A stage's peak is the
    larger of its two phases' sums, each at least the sum of the layers' smallest terms."""
    def sums(a):
        c = np.concatenate([[0.0], np.cumsum(np.min(a, axis=1))])
        return c[None, :] - c[:, None]

    # + a stage's largest working set: some layer v holds its own, so the stage needs at least the
    # others' least bytes plus v's least bytes with its working set (maximised over v)
    held = m.fixed + flight * m.act
    extra = np.min(held + m.work, axis=1) - np.min(held, axis=1)
    extra = np.where(np.isfinite(extra), extra, 0.0)
    act_phase = sums(held) + segment_max(extra)
    return act_phase if m.peak is None else np.maximum(act_phase, sums(m.peak))


def lower_bound(problem: Problem, quick: bool = False, chain: bool = False, enough: float = float("inf")) -> float:
    """A bound <= the optimum of `problem` under evaluate (inf when nothing fits memory).

    With T = sum_i p_i (>= the layers' own times; reshards and transfers are >= 0):
    objective >= beta T + (c-beta) max_i p_i + max_i sync_i >= (beta + (c-beta)/pp) T + (sum of syncs) / pp.
    Memory couples the layers: summed over stages, sum_u (mem_fixed + f_min mem_act) <= pp * limit,
    a knapsack whose Lagrangian dual (any mu >= 0) bounds the weighted time from below. Also
    max_i p_i >= min_bottleneck. `quick`: the knapsack dual alone (no DP over stage splits, no
    memory check): weaker, a few milliseconds. `enough`: return as soon as a part of the bound
    reaches it (a search pruning against an incumbent needs no more; still a valid bound).
    """
    pp, c, L = problem.pp, problem.microbatches, problem.num_layers
    if L < pp:
        return float("inf")
    m = _padded(problem)
    if not quick and min_memory(problem, m) > problem.memory_limit * (1 + 1e-9):
        return float("inf")
    f_min = min(problem.in_flight(i) for i in range(pp))
    beta = problem.bubble_share
    limit = problem.memory_limit * (1 + 1e-9)
    alone = m.fixed + f_min * m.act
    fits = alone <= limit
    W = np.where(fits, (beta + (c - beta) / pp) * m.time + m.sync / pp, np.inf)
    Mem = np.where(fits, alone, 0.0)
    budget = pp * problem.memory_limit

    best = float(np.min(W, axis=1).sum())  # mu = 0 (an infinite budget times 0 is not 0)
    if np.isfinite(budget) and budget > 0:
        # the dual is concave piecewise linear in mu, its kinks at the layers' hull slopes: its
        # maximum is at one of them, found by bisection on the sorted kinks (unimodal there)
        mus = _hull_slopes(W, Mem)

        def dual(mu: float) -> float:
            return float(np.min(W + mu * Mem, axis=1).sum()) - mu * budget

        lo, hi = 0, len(mus) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if dual(mus[mid]) < dual(mus[mid + 1]):
                lo = mid + 1
            else:
                hi = mid
        if len(mus):
            best = max(best, dual(mus[lo]))
    if quick or best >= enough:
        return best
    plain = float(np.min(np.where(fits, m.time, np.inf), axis=1).sum())
    # sum_i p_i is at least the layers' own fastest times, and at least the largest p_i
    bottleneck = min_bottleneck(problem, m, chain=chain)
    best = max(best, beta * max(plain, bottleneck) + (c - beta) * bottleneck)
    if best >= enough or not np.any(m.sync > 0):
        return best
    weighted = min_weighted_bottleneck(problem, m, chain=chain)
    return max(best, beta * max(plain, bottleneck) + weighted)


def _stage_dp(L: int, pp: int, segment_cost, cut: np.ndarray | None = None) -> float:
    """min over contiguous splits of layers into pp non-empty stages of max_i segment_cost(i)[s, e],
    and of cut[s] at every stage boundary s when given."""
    best = np.full(L + 1, np.inf)
    best[0] = 0.0
    tri = np.tril_indices(L + 1)
    for i in range(pp):
        start = np.maximum(best, cut) if (cut is not None and i > 0) else best
        cand = np.maximum(start[:, None], segment_cost(i))
        cand[tri] = np.inf  # stages are non-empty
        best = cand.min(axis=0)
    return float(best[L])


def min_bottleneck(problem: Problem, padded: _Padded | None = None, sync_weight: float = 0.0,
                   chain: bool = False) -> float:
    """A bound <= max(max_i p_i, max_j o_j) of every memory-feasible assignment (exact DP over
    contiguous splits); with `sync_weight` w > 0, a bound <= that + w max_i sync_i instead.
    `chain`: each stage's layers also pay the resharding between neighbours along their cheapest
    strategy path (_chain_bound; L times the work, for candidates a MILP would otherwise prove).

    On stage i a layer costs at least its fastest strategy that fits there alone, and a stage's
    layers must fit together at their smallest footprints there. Layers are indivisible, so this
    sees the imbalance an averaged bound misses (98 layers on 32 stages: some stage holds 4).
    """
    pp, c, L = problem.pp, problem.microbatches, problem.num_layers
    if L < pp:
        return float("inf")
    m = padded or _padded(problem)
    if sync_weight > 0:
        m = replace(m, time=m.time + sync_weight * m.sync)
    limit = problem.memory_limit * (1 + 1e-9)
    costs: dict[int, np.ndarray] = {}  # stages holding equally many microbatches share their costs

    def segment(i: int) -> np.ndarray:
        f = problem.in_flight(i)
        if f not in costs:
            tm = np.min(np.where(_usable(m, f, limit), m.time, np.inf), axis=1)
            Tc = np.concatenate([[0.0], np.cumsum(np.where(np.isfinite(tm), tm, 0.0))])
            bad = np.concatenate([[0], np.cumsum(~np.isfinite(tm))])
            seg = Tc[None, :] - Tc[:, None]
            seg[(bad[None, :] - bad[:, None]) > 0] = np.inf  # a layer that fits nowhere on this stage
            seg[_least_sums(m, f) > limit] = np.inf
            costs[f] = np.maximum(seg, _knapsack_bound(m, f, limit))
            if chain:
                costs[f] = np.maximum(costs[f], _chain_bound(problem, m, f, limit))
        return costs[f]

    # max_i p_i shares its (c - beta) with the transfers o_j: a boundary in front of layer s carries at
    # least the cheapest send of every edge crossing it, which keeps cuts off wide activations
    cut = np.zeros(L + 1)
    for e in problem.edges:
        cut[e.src + 1: e.dst + 1] += float(np.min(e.send)) if len(e.send) else 0.0
    return _stage_dp(L, pp, segment, cut)


def _chain_bound(problem: Problem, m: _Padded, flight: int, limit: float, multipliers: int = 4) -> np.ndarray:
    """[L+1, L+1]: [s, e] a bound <= the time of layers s..e-1 on one stage, resharding between
    neighbours included: the cheapest path through their strategies (Viterbi, every start at once),
    each strategy also paying mu times its held bytes, less mu times the limit (a Lagrangian of the
    stage's memory, valid for every mu >= 0; 0 and a few hull slopes are tried). Where the layers'
    fastest strategies disagree on layout (a column-split output into a row-split input), the
    per-layer minima above miss what agreeing costs; this sees it. Other edges are left out (>= 0)."""
    L, K = m.time.shape
    usable = _usable(m, flight, limit)
    held = np.where(usable, m.fixed + flight * m.act, 0.0)
    mus = [0.0]
    if np.isfinite(limit):
        slopes = _hull_slopes(np.where(usable, m.time, np.inf), held)
        if len(slopes):
            mus += list(np.quantile(slopes, np.linspace(0, 1, multipliers)))
    reshard: list[np.ndarray | None] = [None] * L
    for e in problem.edges:
        if e.dst == e.src + 1:
            r = np.zeros((K, K))
            r[: e.reshard.shape[0], : e.reshard.shape[1]] = e.reshard
            reshard[e.dst] = r if reshard[e.dst] is None else reshard[e.dst] + r
    best = np.zeros((L + 1, L + 1))
    for mu in mus:
        cost = np.where(usable, m.time + mu * held, np.inf)
        acc = np.full((L, K), np.inf)  # [s, k]: cheapest path from layer s to the current one, ending in k
        for u in range(L):
            if u > 0:
                moved = (np.min(acc, axis=1, keepdims=True) if reshard[u] is None
                         else np.min(acc[:u, :, None] + reshard[u][None, :, :], axis=1))
                acc[:u] = moved[:u] + cost[u][None, :]
            acc[u] = cost[u]
            value = np.min(acc[: u + 1], axis=1) - (mu * limit if mu > 0 else 0.0)
            best[: u + 1, u + 1] = np.maximum(best[: u + 1, u + 1], np.where(np.isfinite(value), value, 0.0))
    return best


def min_weighted_bottleneck(problem: Problem, padded: _Padded | None = None, chain: bool = False) -> float:
    """A bound <= (c - beta) max_i p_i + max_i sync_i: both maxima are at least stage i's, for the
    stage where (c - beta) p_i + sync_i is largest. Bounding the two apart loses the trade a layer
    makes between them (a strategy without gradient sync is slow), which is most of an MLP's sync."""
    weight = problem.microbatches - problem.bubble_share
    if weight <= 0:
        return 0.0
    return weight * min_bottleneck(problem, padded, sync_weight=1.0 / weight, chain=chain)


MAX_MULTIPLIERS = 256
"""Multipliers tried per memory form. Every one gives a valid bound; with all the breakpoints of
the dual (the hull slopes of the layers) it is the knapsack's LP optimum, the tightest this gives."""


def _knapsack_bound(m: _Padded, flight: int, limit: float) -> np.ndarray:
    """[L+1, L+1]: [s, e] a bound <= the least summed time of layers s..e-1 on one stage whose held
    bytes fit: per layer one strategy, sum of bytes <= limit, a multiple-choice knapsack. Its
    Lagrangian dual, sum_u min_k (t + mu bytes) - mu limit, bounds it for every mu >= 0, and is
    concave piecewise linear in mu with its kinks at the slopes of the layers' lower convex hulls of
    (bytes, time): taking the best over those slopes per range is the LP relaxation's value. Done per
    memory form (activation phase held bytes, sync phase peak). This is what makes fast strategies
    that cannot all fit at once cost their price: per-layer minima alone (above) let every layer of
    a stage take its fastest, memory-hungriest strategy together."""
    L = m.time.shape[0]
    best = np.zeros((L + 1, L + 1))
    if not np.isfinite(limit):
        return best  # no knapsack: the per-layer minima are the bound
    usable = _usable(m, flight, limit)
    t = np.where(usable, m.time, np.inf)
    forms = [m.fixed + flight * m.act] + ([m.peak] if m.peak is not None else [])
    for held in forms:
        held = np.where(usable, held, 0.0)
        mus = _hull_slopes(t, held)
        if len(mus) > MAX_MULTIPLIERS:
            mus = mus[np.linspace(0, len(mus) - 1, MAX_MULTIPLIERS).round().astype(int)]
        mus = np.concatenate([[0.0], mus])
        g = np.min(t[:, :, None] + mus[None, None, :] * held[:, :, None], axis=1)  # [L, M]
        g = np.where(np.isfinite(g), g, 0.0)  # a layer usable nowhere here is masked by the caller
        cum = np.concatenate([np.zeros((1, len(mus))), np.cumsum(g, axis=0)])
        dual = cum[None, :, :] - cum[:, None, :] - mus[None, None, :] * limit  # [s, e, mu]
        best = np.maximum(best, dual.max(axis=2))
    return best


def _hull_slopes(t: np.ndarray, held: np.ndarray) -> np.ndarray:
    """The distinct -dtime/dbytes between neighbours on each layer's lower convex hull of its usable
    strategies' (bytes, time) points: where min_k (t + mu bytes) changes its argmin."""
    slopes: set[float] = set()
    K = t.shape[1]
    rows = np.concatenate([t, held], axis=1)
    for row in {r.tobytes(): r for r in rows}.values():  # alike layers once (np.unique sorts: slower)
        keep = np.isfinite(row[:K])
        order = np.lexsort((row[:K][keep], row[K:][keep]))
        pts = list(zip(row[K:][keep][order].tolist(), row[:K][keep][order].tolist()))
        hull: list[tuple[float, float]] = []
        for mm, tt in pts:
            if hull and tt >= hull[-1][1]:
                continue  # more bytes and no faster: never the argmin for mu >= 0
            while len(hull) >= 2 and ((hull[-1][1] - hull[-2][1]) * (mm - hull[-2][0])
                                      >= (tt - hull[-2][1]) * (hull[-1][0] - hull[-2][0])):
                hull.pop()  # above the chord from hull[-2] to this point: not on the lower hull
            hull.append((mm, tt))
        slopes.update((a[1] - b[1]) / (b[0] - a[0]) for a, b in zip(hull, hull[1:]) if b[0] > a[0])
    return np.array(sorted(x for x in slopes if x > 0 and np.isfinite(x)))


def min_memory(problem: Problem, padded: _Padded | None = None) -> float:
    """A bound <= the largest stage memory of every assignment: min over contiguous splits of the
    largest stage's least bytes (exact when no sync phase outgrows the activation phase)."""
    pp, c, L = problem.pp, problem.microbatches, problem.num_layers
    if L < pp:
        return float("inf")
    m = padded or _padded(problem)
    costs: dict[int, np.ndarray] = {}

    def segment(i: int) -> np.ndarray:
        # per stage, each layer's smallest footprint there (strategies are free per layer)
        f = problem.in_flight(i)
        if f not in costs:
            costs[f] = _least_sums(m, f)
        return costs[f]

    return _stage_dp(L, pp, segment)
