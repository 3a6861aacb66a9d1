"""The Pareto front of a layer's candidate shardings, and the few of it a strategy space keeps
(passes/sharding/shard_prop.py scores each candidate by (comm, param bytes, activation bytes, flops))."""

from __future__ import annotations


def select_front(front, k: int):
    """At most k of the (comm-sorted) Pareto front: the extremes of every criterion first (the
    cheapest in comm, and the smallest in params / activations / flops: the Megatron-like full
    sharding) and the fewest activations among the fewest params, then the rest by comm."""
    if len(front) <= k:
        return front
    chosen = [0]
    for c in range(1, len(front[0][0])):
        j = min(range(len(front)), key=lambda i: (front[i][0][c], front[i][0][0]))
        if j not in chosen:
            chosen.append(j)
    # the least activations among the (nearly) fully sharded weights: Megatron's sharding, with
    # sequence parallelism its SP form (the extremes alone may keep whole weights for fewer activations)
    fewest = min(d[0][1] for d in front)
    j = min((i for i in range(len(front)) if front[i][0][1] <= 1.1 * fewest), key=lambda i: (front[i][0][2], front[i][0][0]))
    if j not in chosen:
        chosen.insert(1, j)
    for i in range(len(front)):
        if len(chosen) >= k:
            break
        if i not in chosen:
            chosen.append(i)
    return [front[i] for i in sorted(chosen[:k])]


def pareto(items, key):
    """Items not dominated (<= in every coordinate, < in one) by another; stable order."""
    keys = [key(x) for x in items]
    out = []
    for i, ki in enumerate(keys):
        dominated = any(all(a <= b for a, b in zip(kj, ki)) and kj != ki for kj in keys)
        if not dominated:
            out.append(items[i])
    return out
