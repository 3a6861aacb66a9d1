"""Small random Problems for the solver tests: 3-6 layers, 2-4 strategies each, chain and skip edges
(or a run of identical middle layers), optionally a schedule's bubble share, a split backward's extra
time and a sync phase's memory. Arrays only (no torch)."""

from __future__ import annotations

import numpy as np

from fxplan.passes.solve.problem import Edge, Problem


def random_problem(seed, *, layers=None, pp=None, tight=False, skew=False, identical=False, inf_mem=False,
                   max_strategies=4, schedule_terms=False):
    rng = np.random.default_rng(seed)
    L = layers or int(rng.integers(3, 7))
    pp = pp or int(rng.integers(1, min(3, L) + 1))
    K = [int(rng.integers(2, max_strategies + 1)) for _ in range(L)]
    if identical:
        K[1:L - 1] = [K[1]] * (L - 2)
    scale = [20.0 if (skew and u == 0) else 1.0 for u in range(L)]  # one layer > 10x the others
    arrays = [[rng.uniform(lo, hi, k) * (s if timed else 1) for k, s in zip(K, scale)]
              for lo, hi, timed in ((.5, 2, 1), (.5, 2, 1), (0, 1, 1), (0, .5, 0), (1, 4, 0), (.2, 1, 0))]
    if identical:
        for arr in arrays:
            arr[2:L - 1] = [arr[1]] * (L - 3)

    def mat(a, b):
        return rng.uniform(0, .5, (a, b)) * (rng.random((a, b)) < .6)

    chain_r, chain_s = mat(K[1], K[1]), rng.uniform(0, .3, K[1])
    edges = []
    for u in range(L - 1):
        if identical and 1 <= u < L - 2:
            edges.append(Edge(u, u + 1, chain_r, chain_s))
        else:
            edges.append(Edge(u, u + 1, mat(K[u], K[u + 1]), rng.uniform(0, .3, K[u])))
    if not identical:  # skip edges, crossing several boundaries
        edges.append(Edge(0, L - 1, rng.uniform(0, .3, (K[0], K[L - 1])), rng.uniform(0, .2, K[0])))
        if L >= 4:
            edges.append(Edge(1, 3, rng.uniform(0, .3, (K[1], K[3])), rng.uniform(0, .2, K[1])))
    c = int(rng.integers(1, 6))
    schedule = ("gpipe", "1f1b")[int(rng.integers(0, 2))]
    need = (sum(m.mean() for m in arrays[4]) + c * sum(m.mean() for m in arrays[5])) / pp
    limit = np.inf if inf_mem else need * (1.1 if tight else 100)
    extra = {}
    if schedule_terms:
        # what a zero-bubble candidate adds: a bubble share below 1, a split backward's time per layer,
        # and a sync phase holding more than the fixed bytes
        extra = dict(bubble_share=float(rng.uniform(0.2, 0.9)),
                     split=tuple(np.full(k, float(rng.uniform(0, .2))) for k in K),
                     mem_peak=tuple(np.asarray(m) * rng.uniform(1.0, 2.0, len(m)) for m in arrays[4]))
        if identical:
            extra["split"] = tuple(np.full(k, 0.1) for k in K)
            mid = extra["mem_peak"][1]
            extra["mem_peak"] = tuple(mid if 1 <= u < L - 1 else m for u, m in enumerate(extra["mem_peak"]))
    return Problem(pp, c, schedule, *(tuple(a) for a in arrays), tuple(edges), limit, **extra)
