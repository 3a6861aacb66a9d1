"""Exact reductions of a Problem before the MILP sees it (no torch).

1. parallel edges between the same two layers are summed (evaluate adds them anyway);
2. strategies dominated in EVERY array (time components, sync, every memory array, and the rows/columns
   of every edge that touches the layer) are dropped: swapping a dominated strategy for its
   dominator never raises a stage time, a transfer, a memory or the objective;
3. runs of identical layers (same arrays, joined by identical chain edges and by no other edge in
   their interior) are found, so the MILP can count layers per (run, stage, strategy) instead of
   placing each one: the transformer-block symmetry disappears from the search.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from fxplan.passes.solve.problem import Edge, Problem

_ARRAYS = ("fwd", "bwd", "wgt", "sync", "mem_fixed", "mem_act", "mem_peak", "mem_work", "mem_grad", "split")


def _arrays(problem: Problem) -> tuple[str, ...]:
    """The per-layer arrays this problem has (mem_peak, mem_work and split are optional)."""
    return tuple(name for name in _ARRAYS if getattr(problem, name))


@dataclass(frozen=True)
class Reduced:
    """A smaller Problem plus how to map its assignments back to the original one."""

    problem: Problem
    kept: tuple[np.ndarray, ...]  # per layer: original strategy index of each kept strategy

    def to_original(self, strategy_of) -> tuple[int, ...]:
        return tuple(int(self.kept[u][k]) for u, k in enumerate(strategy_of))


def merge_parallel_edges(problem: Problem) -> Problem:
    merged: dict[tuple[int, int], Edge] = {}
    for e in problem.edges:
        key = (e.src, e.dst)
        if key in merged:
            old = merged[key]
            merged[key] = Edge(e.src, e.dst, old.reshard + e.reshard, old.send + e.send)
        else:
            merged[key] = Edge(e.src, e.dst, np.asarray(e.reshard, float), np.asarray(e.send, float))
    edges = tuple(merged[k] for k in sorted(merged))
    return replace(problem, edges=edges)


def _dominated(problem: Problem, u: int, alive: list[np.ndarray], touching: list,
               seen: dict[bytes, np.ndarray] | None = None) -> np.ndarray:
    """Positions (in alive[u]) of strategies of layer u that another alive strategy dominates.
    `seen`: answers by table (identical layers between identical neighbours compare alike)."""
    # one column per compared quantity, rows = alive strategies; "smaller is better" everywhere
    cols = [np.asarray(getattr(problem, name)[u], float)[alive[u]][:, None] for name in _arrays(problem)]
    for e in touching[u]:
        if e.src == u:  # u's row of reshard against the dst's alive strategies, and its send
            cols.append(e.reshard[np.ix_(alive[u], alive[e.dst])])
            cols.append(e.send[alive[u]][:, None])
        if e.dst == u:
            cols.append(e.reshard[np.ix_(alive[e.src], alive[u])].T)
    table = np.concatenate(cols, axis=1)
    key = table.tobytes() + bytes(str(table.shape), "ascii")
    if seen is not None and key in seen:
        return seen[key]
    n = len(table)
    le = np.all(table[:, None, :] <= table[None, :, :], axis=2)  # le[j, k]: j no worse than k
    lt = np.any(table[:, None, :] < table[None, :, :], axis=2)
    earlier = np.arange(n)[:, None] < np.arange(n)[None, :]
    # ties: the later index goes, so exactly one of two identical strategies survives
    beats = le & (lt | earlier)
    np.fill_diagonal(beats, False)
    dead = np.zeros(n, bool)
    for k in range(n):  # only a surviving strategy may knock another out
        if not dead[k] and np.any(beats[:, k] & ~dead):
            dead[k] = True
    positions = np.nonzero(dead)[0]
    if seen is not None:
        seen[key] = positions
    return positions


def drop_dominated(problem: Problem) -> Reduced:
    alive = [np.arange(problem.num_strategies(u)) for u in range(problem.num_layers)]
    touching = [[e for e in problem.edges if u in (e.src, e.dst)] for u in range(problem.num_layers)]
    changed = True
    seen: dict[bytes, np.ndarray] = {}
    while changed:  # dropping a strategy can make a neighbour's columns dominate: to a fixpoint
        changed = False
        for u in range(problem.num_layers):
            if len(alive[u]) > 1:
                dead = _dominated(problem, u, alive, touching, seen)
                if len(dead):
                    alive[u] = np.delete(alive[u], dead)
                    changed = True
    fields = {name: tuple(np.asarray(getattr(problem, name)[u], float)[alive[u]]
                          for u in range(problem.num_layers)) for name in _arrays(problem)}
    edges = tuple(Edge(e.src, e.dst, e.reshard[np.ix_(alive[e.src], alive[e.dst])], e.send[alive[e.src]])
                  for e in problem.edges)
    labels = ()
    if problem.labels:
        labels = tuple(tuple(problem.labels[u][k] for k in alive[u]) for u in range(problem.num_layers))
    reduced = replace(problem, edges=edges, labels=labels, **fields)
    return Reduced(reduced, tuple(alive))


# ---------------------------------------------------------------- runs of identical layers


@dataclass(frozen=True)
class Segment:
    """Layers first..last (inclusive). A run (n > 1) has identical layers joined by `chain` edges."""

    first: int
    last: int
    chain: Edge | None = None  # the edge (u, u+1) shared by every consecutive pair of the run

    @property
    def n(self) -> int:
        return self.last - self.first + 1


def _same_layer(problem: Problem, u: int, v: int) -> bool:
    return all(np.array_equal(getattr(problem, name)[u], getattr(problem, name)[v]) for name in _arrays(problem))


def segments(problem: Problem) -> tuple[Segment, ...]:
    """Split the layer chain into maximal runs of identical layers (singletons elsewhere)."""
    L = problem.num_layers
    outs = {u: [e for e in problem.edges if e.src == u] for u in range(L)}
    ins = {u: [e for e in problem.edges if e.dst == u] for u in range(L)}

    def link(u: int) -> Edge | None:
        """The chain edge u -> u+1 if u and u+1 may sit in one run, else None."""
        if not _same_layer(problem, u, u + 1):
            return None
        if len(outs[u]) != 1 or len(ins[u + 1]) != 1 or outs[u][0].dst != u + 1:
            return None
        return outs[u][0]

    segs: list[Segment] = []
    u = 0
    while u < L:
        first, chain = u, None
        while u + 1 < L:
            e = link(u)
            if e is None:
                break
            if chain is not None and not (np.array_equal(e.reshard, chain.reshard)
                                          and np.array_equal(e.send, chain.send)):
                break
            chain = e
            u += 1
        segs.append(Segment(first, u, chain if u > first else None))
        u += 1
    return tuple(segs)


def endpoint_classes(problem: Problem, seg: Segment) -> tuple[np.ndarray, np.ndarray]:
    """(class id per strategy of a run, first strategy of each class): strategies that every edge
    treats alike share a class.

    Inside a stage, layers of one class may be reordered freely, so the MILP only needs class
    counts and class-to-class transitions to price the run's edges exactly.
    """
    parts = [seg.chain.reshard, seg.chain.reshard.T, seg.chain.send[:, None]]
    for e in problem.edges:
        if e.dst == seg.first and e is not seg.chain:
            parts.append(e.reshard.T)
        if e.src == seg.last and e is not seg.chain:
            parts.append(e.reshard)
            parts.append(e.send[:, None])
    # rows and columns equal => R[k, l] equals R[r, l] and R[l, k] equals R[l, r] for all l
    return row_classes(np.concatenate(parts, axis=1))


def row_classes(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class of each row, first row of each class): rows equal in every entry share a class,
    numbered in order of first appearance."""
    first: dict[bytes, int] = {}
    reps: list[int] = []
    cls = np.empty(len(M), dtype=int)
    for k, row in enumerate(np.ascontiguousarray(M, dtype=float) + 0.0):  # + 0.0: -0.0 equals 0.0
        c = first.setdefault(row.tobytes(), len(first))
        if c == len(reps):
            reps.append(k)
        cls[k] = c
    return cls, np.array(reps, dtype=int)
