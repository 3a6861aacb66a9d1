"""The UniAP MIQP, linearised exactly into a MILP, in CVXPY, solved by HiGHS (no torch).

The layer chain is cut into segments (passes.reduce.segments): singletons and runs of identical
layers. Stage placement is monotone, so per segment two cumulative binary vectors say where it
starts and ends: A[g, i] = [first stage of g >= i], B[g, i] = [last stage of g >= i]; occupancy of
stage i is B[g, i] - A[g, i+1]. No stage is empty.

* a singleton picks one strategy S[g, k]; continuous Z[g, i, k] >= 0 with row sums occ[g, i] and
  column sums S[g, k] is the product [on stage i][strategy k] (exact for binaries: one stage, one
  strategy), so its time / sync / memory on stage i are linear in Z, with the product's hull as LP
  relaxation (big-M rows w >= value(S) - M (1 - occ) relax to almost nothing and left HiGHS
  branching for seconds on a 22-layer chain).
* a run of n identical layers has integer counts x[g, i, k] (layers of the run on stage i using
  strategy k): stage time, sync and memory are linear in x, no big-M at all. Its chain edges are
  priced through strategy classes (strategies the edges treat alike): first/last class per stage,
  class-to-class transitions inside a stage (a flow from the first class to the last), and one
  transition across each boundary the run straddles.
* an edge u -> v between segments: e[k, l] >= 0 with row sums = u's (last) strategy and column
  sums = v's (first) strategy, exact for binaries, over the distinct layouts only (strategies that
  differ by fsdp / recompute price the edge alike: their rows and columns are summed first, which
  keeps K x K variables per edge down to a few dozen); its reshard is charged to v's first stage and
  its send to every boundary between them, both through big-M lower bounds (only lower bounds are
  needed: every such quantity is either minimised or capped from above).

Objective (problem.evaluate): beta (sum_i p_i + sum_j o_j) + (c-beta) max(p_i, o_j) + max_i sync_i, where
sum_i p_i does not depend on stages and is written directly (a much tighter relaxation).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import cvxpy as cp
import numpy as np

from fxplan.passes.solve.bounds import CHAIN_BOUND_LAYERS, min_bottleneck, min_weighted_bottleneck
from fxplan.passes.solve.problem import Problem
from fxplan.passes.solve.presolve import Segment, endpoint_classes, row_classes, segments


@dataclass(frozen=True)
class MilpResult:
    stage_of: tuple[int, ...] | None  # None when HiGHS found no assignment
    strategy_of: tuple[int, ...] | None
    objective: float  # HiGHS's objective, unscaled (seconds); inf when none
    bound: float  # proven lower bound, seconds
    status: str  # "optimal" | "time_limit" | "infeasible" | "cutoff"
    seconds: float


MIN_HIGHS_S = 0.02
"""HiGHS always gets this much: its presolve alone often proves a small candidate."""


def _onehot(cls: np.ndarray) -> np.ndarray:
    Q = np.zeros((len(cls), cls.max() + 1))
    Q[np.arange(len(cls)), cls] = 1.0
    return Q


def solve_milp(problem: Problem, *, time_limit_s: float, mip_gap: float = 1e-4,
               cutoff: float | None = None, verbose: bool = False) -> MilpResult:
    """Solve `problem` (ideally already reduced) exactly, up to `mip_gap` and the time limit.

    `cutoff`: an objective (seconds) a solution must beat, e.g. the heuristic's; HiGHS prunes with it.
    """
    t0 = time.perf_counter()
    pp, c, L = problem.pp, problem.microbatches, problem.num_layers
    if L < pp:
        return MilpResult(None, None, float("inf"), float("inf"), "infeasible", 0.0)
    segs = segments(problem)
    G = len(segs)
    seg_of_first = {s.first: g for g, s in enumerate(segs)}
    seg_of_last = {s.last: g for g, s in enumerate(segs)}
    time_of = [problem.layer_time(u) for u in range(L)]
    # scale: times so that a typical objective is ~1e3, memory so the limit is 1 (HiGHS tolerances
    # are absolute; seconds and bytes would be far off the 1e-6..1e6 sweet spot)
    tsum = sum(float(np.min(t)) for t in time_of) * (1 + (c - 1) / pp)
    ts = 1e3 / tsum if tsum > 0 else 1.0
    finite_mem = np.isfinite(problem.memory_limit) and problem.memory_limit > 0
    ms = 1.0 / problem.memory_limit if finite_mem else 0.0
    flight = np.array([problem.in_flight(i) for i in range(pp)], float)

    A = cp.Variable((G, pp + 1), boolean=True)
    Bv = cp.Variable((G, pp + 1), boolean=True)
    cons = [A[:, 0] == 1, Bv[:, 0] == 1, A[:, pp] == 0, Bv[:, pp] == 0, A <= Bv]
    if pp > 1:
        cons += [A[:, 1:] <= A[:, :-1], Bv[:, 1:] <= Bv[:, :-1], A[0, 1:] == 0, Bv[G - 1, pp - 1] == 1]
    if G > 1:
        cons.append(Bv[:-1, :] <= A[1:, :])
    occ = Bv[:, :pp] - A[:, 1:]
    cons.append(cp.sum(occ, axis=0) >= 1)
    # stage windows: the layers before/after a segment must fill the stages before/after it
    fix_one = np.zeros((G, pp + 1))
    fix_zero = np.zeros((G, pp + 1))
    for g, s in enumerate(segs):
        lo_f, hi_f = max(0, pp - L + s.first), min(pp - 1, s.first)
        lo_l, hi_l = max(0, pp - L + s.last), min(pp - 1, s.last)
        fix_one[g, : lo_f + 1] = 1
        fix_zero[g, hi_f + 1:] = 1
        cons += [Bv[g, : lo_l + 1] == 1]
        if hi_l + 1 <= pp:
            cons += [Bv[g, hi_l + 1:] == 0]
        if s.n == 1:
            cons.append(Bv[g, :] == A[g, :])
    cons += [cp.multiply(fix_one, A) == fix_one, cp.multiply(fix_zero, A) == 0]
    first_at = A[:, :pp] - A[:, 1:]  # [first stage of g == i]
    last_at = Bv[:, :pp] - Bv[:, 1:]

    stage_time = []  # (pp,) expressions, scaled
    stage_sync = []
    stage_mem: list[list] = [[], []]  # per memory form (activation phase, sync/step phase): (pp,) terms
    boundary = []  # (pp-1,) expressions
    total = []  # scalar expressions: sum_i p_i
    decode = []  # per segment: how to read the solution back
    ends: dict[int, tuple] = {}  # segment -> (first-endpoint vector, last-endpoint vector, reps)

    # the largest working set of a stage's layers (problem.mem_work): one variable per stage, above
    # each of its layers' (exact: only lower bounds, as memory is capped from above)
    has_work = finite_mem and bool(problem.mem_work) and any(np.max(w) > 0 for w in problem.mem_work)
    work = cp.Variable(pp, nonneg=True) if has_work else None
    if has_work:
        stage_mem[0].append(work)

    for g, s in enumerate(segs):
        u = s.first
        tt = time_of[u] * ts
        wk = np.asarray(problem.mem_work[u], float) * ms if has_work else None
        sy = np.asarray(problem.sync[u], float) * ts
        mem = (problem.placed_fixed(u)[:, None]
               + np.asarray(problem.mem_act[u], float)[:, None] * flight[None, :]) * ms  # (K, pp)
        forms = [mem] + ([np.repeat(np.asarray(problem.mem_peak[u], float)[:, None] * ms, pp, axis=1)]
                         if problem.mem_peak else [])
        K = len(tt)
        if s.n == 1:
            S = cp.Variable(K, boolean=True)
            cons.append(cp.sum(S) == 1)
            og = occ[g, :]
            total.append(tt @ S)
            # Z[i, k] = [on stage i] [strategy k]: the one stage and the one strategy, so the margins
            # are exact for binaries, and its LP relaxation is the product's hull (a big-M's is loose)
            Z = cp.Variable((pp, K), nonneg=True)
            cons += [cp.sum(Z, axis=0) == S, cp.sum(Z, axis=1) == og]
            for vals, bucket in ((tt, stage_time), (sy, stage_sync)):
                if np.max(vals) > 0:
                    bucket.append(Z @ vals)
            for form, bucket in zip(forms, stage_mem):
                if finite_mem and np.max(form) > 0:
                    bucket.append(cp.sum(cp.multiply(Z, form.T), axis=1))
            if has_work and np.max(wk) > 0:
                cons.append(work >= Z @ wk)
            ends[g] = (S, S, np.arange(K), np.arange(K))
            decode.append(("single", S))
            continue
        # ---- a run of n identical layers: counts per (stage, strategy)
        n = s.n
        nv = cp.Variable(pp, integer=True)
        x = cp.Variable((pp, K), integer=True)
        og = occ[g, :]
        cons += [x >= 0, nv >= og, nv <= n * og, cp.sum(nv) == n, cp.sum(x, axis=1) == nv]
        stage_time.append(x @ tt)
        stage_sync.append(x @ sy)
        if finite_mem:
            for form, bucket in zip(forms, stage_mem):
                bucket.append(cp.sum(cp.multiply(x, form.T), axis=1))
        if has_work and np.max(wk) > 0:
            used = cp.Variable((pp, K), boolean=True)  # [strategy k is used on stage i]
            cons += [x <= n * used, cp.reshape(work, (pp, 1), order="C") @ np.ones((1, K))
                     >= cp.multiply(used, np.tile(wk, (pp, 1)))]
        total.append(cp.sum(x @ tt))
        cls, reps = endpoint_classes(problem, s)
        C = len(reps)
        R = s.chain.reshard[np.ix_(reps, reps)] * ts
        snd = s.chain.send[reps] * ts
        if C == 1:
            # chain pairs whose dst is on stage i: all but the run's first layer there
            pairs_in = nv - first_at[g, :]
            stage_time.append(float(R[0, 0]) * pairs_in)
            total.append(float(R[0, 0]) * (n - 1))
            if pp > 1:
                boundary.append(float(snd[0]) * (og[:-1] - last_at[g, :-1]))
            one = np.ones(1)
            ends[g] = (one, one, reps, reps)
            decode.append(("run1", nv, x))
            continue
        Q = _onehot(cls)
        X = x @ Q  # (pp, C) class counts
        fs = cp.Variable((pp, C), boolean=True)
        ls = cp.Variable((pp, C), boolean=True)
        T = cp.Variable((pp, C * C), integer=True)  # transitions c -> d inside a stage, c != d
        diag = np.array([q * C + q for q in range(C)])
        Min = np.zeros((C * C, C))  # transitions into d
        Mout = np.zeros((C * C, C))
        for a in range(C):
            for b in range(C):
                if a != b:
                    Min[a * C + b, b] = 1
                    Mout[a * C + b, a] = 1
        blocks = T @ Min + fs
        cons += [T >= 0, T[:, diag] == 0, cp.sum(fs, axis=1) == og, cp.sum(ls, axis=1) == og,
                 T @ Min + fs == T @ Mout + ls, blocks <= X, X <= n * blocks]
        if C >= 3:
            # Flow balance alone admits a cycle of transitions detached from the stage's path (two
            # classes visiting each other), priced as if it were one chain but not arrangeable as
            # one. A single-commodity flow from the first class to every class used, along
            # transitions taken, makes them one connected walk (with the balance: an Euler path).
            used = cp.Variable((pp, C), boolean=True)
            supply = cp.Variable((pp, C), nonneg=True)
            carry = cp.Variable((pp, C * C), nonneg=True)
            cons += [X <= n * used, used <= X, supply <= C * fs, carry <= C * T,
                     carry @ Min - carry @ Mout + supply == used]
        Rflat = R.reshape(-1).copy()
        Rflat[diag] = 0.0
        intra = T @ Rflat + (X - blocks) @ np.diag(R)
        stage_time.append(intra)
        total.append(cp.sum(intra))
        if pp > 1:
            Erow = np.kron(np.eye(C), np.ones((1, C)))  # ls_c -> every (c, d)
            Ecol = np.kron(np.ones((1, C)), np.eye(C))  # fs_d -> every (c, d)
            eb = cp.Variable((pp - 1, C * C), nonneg=True)
            cons.append(eb >= ls[:-1, :] @ Erow + fs[1:, :] @ Ecol - 1)
            cross = eb @ R.reshape(-1)
            stage_time.append(cp.hstack([np.zeros(1), cross]) if pp > 1 else cross)
            total.append(cp.sum(cross))
            ys = cp.Variable((pp - 1, C), nonneg=True)
            cons.append(ys >= ls[:-1, :] + cp.reshape(og[1:], (pp - 1, 1), order="C") @ np.ones((1, C)) - 1)
            boundary.append(ys @ snd)
            GF = cp.Variable(C, nonneg=True)
            GL = cp.Variable(C, nonneg=True)
            occ_prev = cp.hstack([np.zeros(1), og[:-1]])
            occ_next = cp.hstack([og[1:], np.zeros(1)])
            ones = np.ones((1, C))
            cons += [cp.sum(GF) == 1, cp.sum(GL) == 1,
                     GF[None, :] >= fs - cp.reshape(occ_prev, (pp, 1), order="C") @ ones,
                     GL[None, :] >= ls - cp.reshape(occ_next, (pp, 1), order="C") @ ones]
        else:
            GF, GL = fs[0, :], ls[0, :]
        ends[g] = (GF, GL, reps, reps)
        decode.append(("run", nv, x, fs, ls, T, cls))

    # ---- edges between segments (chain edges inside runs are priced above)
    seg_index = [g for g, s in enumerate(segs) for _ in range(s.n)]
    for e in problem.edges:
        if seg_index[e.src] == seg_index[e.dst]:
            continue
        g, h = seg_of_last[e.src], seg_of_first[e.dst]
        EL, rows = ends[g][1], ends[g][3]
        EF, cols = ends[h][0], ends[h][2]
        R = e.reshard[np.ix_(rows, cols)] * ts
        snd = e.send[rows] * ts
        # strategies that leave the tensors in one layout (fsdp, recompute) price alike: one row or
        # column per distinct layout keeps the transport variables few (K x K per edge otherwise)
        row_of, row_reps = row_classes(np.concatenate([R, snd[:, None]], axis=1))
        col_of, col_reps = row_classes(R.T)
        if len(row_reps) < len(rows):
            EL = _onehot(row_of).T @ EL
            R, snd = R[row_reps], snd[row_reps]
        if len(col_reps) < len(cols):
            EF = _onehot(col_of).T @ EF
            R = R[:, col_reps]
        if np.max(R, initial=0) > 0:
            if R.shape[0] == 1:
                r = EF @ R[0] if R.shape[1] > 1 else R[0, 0]
            elif R.shape[1] == 1:
                r = EL @ R[:, 0]
            else:
                ev = cp.Variable(R.shape, nonneg=True)
                cons += [cp.sum(ev, axis=1) == EL, cp.sum(ev, axis=0) == EF]
                r = cp.sum(cp.multiply(R, ev))
            total.append(r)
            w = cp.Variable(pp, nonneg=True)
            cons.append(w >= r - float(np.max(R)) * (1 - first_at[h, :]))
            stage_time.append(w)
        if pp > 1 and np.max(snd, initial=0) > 0:
            sv = snd @ EL if len(snd) > 1 else snd[0]
            crossing = A[h, 1:pp] - Bv[g, 1:pp]  # boundary j lies between g's last and h's first stage
            w = cp.Variable(pp - 1, nonneg=True)
            cons.append(w >= sv - float(np.max(snd)) * (1 - crossing))
            boundary.append(w)

    bott = cp.Variable(nonneg=True)
    ymax = cp.Variable(nonneg=True)
    tot = cp.sum(cp.hstack([cp.reshape(t, (1,), order="C") if isinstance(t, cp.Expression) else np.array([t])
                            for t in total]))
    cons += [bott >= sum(stage_time), bott * pp >= tot]
    # the stage-split DP's bound on the bottleneck (indivisible layers, each stage's memory knapsack):
    # valid for every assignment, and far above what the LP relaxation finds alone
    layouts = problem.num_layers <= CHAIN_BOUND_LAYERS  # also walk each stage's chain of layouts
    floor = min_bottleneck(problem, chain=layouts)
    if np.isfinite(floor) and floor > 0:
        cons.append(bott >= floor * ts * (1 - 1e-9))
    weighted = min_weighted_bottleneck(problem, chain=layouts) if stage_sync else 0.0
    if np.isfinite(weighted) and weighted > 0:
        cons.append((c - problem.bubble_share) * bott + ymax >= weighted * ts * (1 - 1e-9))
    bsum = 0
    if pp > 1 and boundary:
        o = sum(boundary)
        cons.append(bott >= o)
        bsum = cp.sum(o)
    if stage_sync:
        cons.append(ymax >= sum(stage_sync))
    # a stage's peak is the larger of its two phases' bytes: each must fit
    cons += [sum(terms) <= 1.0 for terms in stage_mem if finite_mem and terms]
    beta = problem.bubble_share
    objective = beta * (tot + bsum) + (c - beta) * bott + ymax
    prob = cp.Problem(cp.Minimize(objective), cons)
    opts = {"mip_rel_gap": float(mip_gap), "threads": 1, "random_seed": 0}
    if cutoff is not None and np.isfinite(cutoff):
        opts["objective_bound"] = float(cutoff * ts) * (1 + 1e-9)
    try:
        # canonicalise first, then give HiGHS what is left of the time limit: CVXPY's compilation of a
        # big chain takes a good share of a second, and the limit is the caller's whole budget
        data, chain, inverse = prob.get_problem_data(solver="HIGHS", ignore_dpp=True, solver_opts=opts)
        opts["time_limit"] = float(max(time_limit_s - (time.perf_counter() - t0), MIN_HIGHS_S))
        raw = chain.solve_via_data(prob, data, False, verbose, opts)
        with warnings.catch_warnings():
            # "solution may be inaccurate": whatever comes back is re-scored and checked against memory
            # by problem.evaluate before anyone uses it
            warnings.simplefilter("ignore", UserWarning)
            prob.unpack_results(raw, chain, inverse)
    except cp.error.SolverError:
        return MilpResult(None, None, float("inf"), 0.0, "time_limit", time.perf_counter() - t0)
    info = prob.solver_stats.extra_stats
    seconds = time.perf_counter() - t0
    bound = getattr(info, "mip_dual_bound", float("nan")) / ts
    has_sol = prob.value is not None and np.isfinite(prob.value) and getattr(info, "primal_solution_status", 2) == 2
    if prob.status in ("infeasible", "infeasible_or_unbounded"):
        # with a cutoff, "infeasible" means nothing beats the cutoff
        return MilpResult(None, None, float("inf"), cutoff if cutoff is not None else float("inf"),
                          "cutoff" if cutoff is not None else "infeasible", seconds)
    if not has_sol:
        return MilpResult(None, None, float("inf"), bound if np.isfinite(bound) else 0.0,
                          "cutoff" if cutoff is not None and prob.status == "user_limit" and
                          getattr(info, "mip_gap", 1) <= mip_gap else "time_limit", seconds)
    stage_of, strategy_of = _decode(segs, A, decode, pp)
    status = "optimal" if prob.status == "optimal" else "time_limit"
    return MilpResult(stage_of, strategy_of, float(prob.value) / ts,
                      bound if np.isfinite(bound) else float(prob.value) / ts, status, seconds)


def _decode(segs: tuple[Segment, ...], A, decode, pp: int):
    stage_of: list[int] = []
    strategy_of: list[int] = []
    Av = np.rint(A.value).astype(int)
    for g, (s, d) in enumerate(zip(segs, decode)):
        if d[0] == "single":
            stage_of.append(int(Av[g, 1:pp].sum()))
            strategy_of.append(int(np.argmax(d[1].value)))
            continue
        nv = np.rint(d[1].value).astype(int)
        x = np.rint(d[2].value).astype(int)
        for i in range(pp):
            if nv[i] <= 0:
                continue
            if d[0] == "run1":
                order = [k for k in range(x.shape[1]) for _ in range(x[i, k])]
            else:
                fs, ls, T, cls = (np.rint(d[3].value).astype(int), np.rint(d[4].value).astype(int),
                                  np.rint(d[5].value).astype(int), d[6])
                order = _arrange(x[i], cls, int(np.argmax(fs[i])), int(np.argmax(ls[i])),
                                 T[i].reshape(len(fs[i]), -1))
            stage_of += [i] * len(order)
            strategy_of += order
    return tuple(stage_of), tuple(strategy_of)


def _arrange(counts: np.ndarray, cls: np.ndarray, first: int, last: int, trans: np.ndarray) -> list[int]:
    """Layer order of one stage's part of a run: class blocks along an Euler path of `trans`."""
    C = trans.shape[0]
    left = trans.copy()
    np.fill_diagonal(left, 0)
    path = _euler(left, first)
    if path[-1] != last or left.sum() or any(counts[cls == q].sum() and q not in path for q in range(C)):
        # the relaxation kept a detached cycle: fall back to any order; the caller re-evaluates
        used = [q for q in range(C) if counts[cls == q].sum() and q not in (first, last)]
        path = [first] + used + ([last] if last != first else [])
    blocks = {q: path.count(q) for q in set(path)}
    per_class: dict[int, list[int]] = {q: [k for k in range(len(cls)) if cls[k] == q
                                           for _ in range(counts[k])] for q in blocks}
    out: list[int] = []
    seen: dict[int, int] = {}
    for q in path:
        seen[q] = seen.get(q, 0) + 1
        items = per_class[q]
        # spread the class's layers over its blocks, at least one each
        remaining_blocks = blocks[q] - seen[q]
        take = max(1, len(items) - remaining_blocks) if remaining_blocks >= 0 else len(items)
        out += items[:take]
        per_class[q] = items[take:]
    return out


def _euler(adj: np.ndarray, start: int) -> list[int]:
    """Hierholzer on a multigraph given as a count matrix; consumes `adj`."""
    stack, path = [start], []
    while stack:
        v = stack[-1]
        nxt = np.nonzero(adj[v] > 0)[0]
        if len(nxt):
            adj[v, nxt[0]] -= 1
            stack.append(int(nxt[0]))
        else:
            path.append(stack.pop())
    return path[::-1]
