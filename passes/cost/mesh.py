"""The device groups a plan's collectives run on, as the cost model places them.

Device placement: stage i owns ranks [i*n_s, (i+1)*n_s), tp innermost (rank = base + d*tp + t), so
a tp group of size <= devices_per_node stays inside one node and dp groups span nodes once
n_s > devices_per_node. A layer's arrays cannot depend on its stage, so every collective is priced
on the slowest group of its kind over all stages (identical when stages are alike).
"""

from __future__ import annotations

from fxplan.cluster import Cluster
from fxplan.passes.cost import collectives as cc
from fxplan.passes.cost.collectives import GroupSpan


class StageMesh:
    """The groups of every stage mesh of `cluster`, kept as the distinct `GroupSpan`s they have: a
    planner prices the same few placements thousands of times."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.world = cluster.world_size
        self._spans: dict[tuple[int, int, int], tuple[GroupSpan, ...]] = {}

    def strided_groups(self, size: int, stride: int, n_s: int) -> tuple[GroupSpan, ...]:
        """The distinct spans among all groups of `size` ranks `stride` apart inside every stage of
        n_s devices."""
        key = (n_s, size, stride)
        if key not in self._spans:
            spans: dict[GroupSpan, None] = {}
            width = size * stride
            for base in range(0, self.world, n_s):
                for block in range(base, base + n_s - width + 1, width):
                    for t in range(stride):
                        spans.setdefault(cc.group_span(self.cluster, range(block + t, block + t + width, stride)))
            self._spans[key] = tuple(spans)
        return self._spans[key]

    def groups(self, n_s: int, tp: int, axis: str) -> tuple[GroupSpan, ...]:
        """Groups of a (n_s / tp) x tp stage mesh: axis "tp" (adjacent ranks), "dp" (ranks tp apart)
        or anything else for the whole stage."""
        if axis == "tp":
            return self.strided_groups(tp, 1, n_s)
        if axis == "dp":
            return self.strided_groups(n_s // tp, tp, n_s)
        return self.strided_groups(n_s, 1, n_s)

    def comm_time(self, kind: str, n_s: int, tp: int, axis: str, nbytes: float) -> float:
        """Slowest group of `axis` doing `kind` on `nbytes` (full buffer)."""
        return self.slowest(kind, self.groups(n_s, tp, axis), nbytes)

    def slowest(self, kind: str, groups: tuple[GroupSpan, ...], nbytes: float) -> float:
        return max(cc.collective_time(self.cluster, kind, g, nbytes) for g in groups)

    def boundary_pair(self, n_s: int) -> tuple[int, int]:
        """The (sender, receiver) rank pair of the slowest pipeline boundary: inter-node if any is."""
        for rank in range(self.world - n_s):
            if self.cluster.node_of(rank) != self.cluster.node_of(rank + n_s):
                return rank, rank + n_s
        return 0, min(n_s, self.world - 1)
