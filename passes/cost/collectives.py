"""Alpha-beta times of collectives and matmul compute on a `fxplan.Cluster`: from its calibration
(`Cluster.local()`: alpha-beta fitted per collective and group size on the real backend) where it
has one for the group, else from its figures.

Groups are lists of GLOBAL ranks (or their `GroupSpan`), so the device placement decides the link: a group inside one
node runs on the intra-node bandwidth; a group spanning nodes runs hierarchically (intra-node
phase on all the bytes, inter-node phase on 1/r of them over the r local members' own NICs, which
is how NCCL's multi-ring/tree algorithms use one NIC per GPU). Every function returns seconds.

Byte conventions (match `passes.ir.Comm.nbytes`): `nbytes` is the FULL buffer: the all-reduced
tensor, the all-gather's output, the reduce-scatter's input, the all-to-all's whole tensor (each
rank holds nbytes / n of it before and after).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

from fxplan.cluster import Cluster

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


@dataclass(frozen=True, slots=True)
class GroupSpan:
    """How a group's ranks sit on the nodes: `size` ranks on `nodes` nodes, at most `per_node` of
    them on one node (the slowest node). A collective's time depends on nothing else, so a planner
    that prices thousands of groups keeps one span per distinct placement (cost/mesh.py)."""

    size: int
    per_node: int
    nodes: int


Group = Union[Sequence[int], GroupSpan]  # global ranks, or where they sit


def group_span(cluster: Cluster, ranks: Group) -> GroupSpan:
    if isinstance(ranks, GroupSpan):
        return ranks
    per_node: dict[int, int] = {}
    for rank in ranks:
        node = cluster.node_of(rank)
        per_node[node] = per_node.get(node, 0) + 1
    return GroupSpan(size=len(ranks), per_node=max(per_node.values(), default=0), nodes=len(per_node))


def _ring_phase(n: int, nbytes: float, bw: float, alpha: float, steps_per_peer: int) -> float:
    """`steps_per_peer` ring passes (1: gather or scatter, 2: all-reduce) over n members."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return steps_per_peer * ((n - 1) / n * nbytes / bw + (n - 1) * alpha)


def _measured(cluster: Cluster, kind: str, span: GroupSpan, nbytes: float) -> float | None:
    """The calibrated alpha + beta * bytes of `kind` on a group of this size, where the cluster was
    measured (Cluster.local: one node, every group size of its world), else None."""
    cal = cluster.calibration
    if cal is None or span.nodes != 1:
        return None
    fit = cal.fit(kind, span.size)
    return None if fit is None else fit.time(nbytes)


def all_reduce_time(cluster: Cluster, ranks: Group, nbytes: float) -> float:
    """Ring all-reduce: 2(n-1)/n * bytes / bw + 2(n-1) alpha (hierarchical across nodes)."""
    return _hier(cluster, ranks, nbytes, 2, "all_reduce")


def all_gather_time(cluster: Cluster, ranks: Group, nbytes: float) -> float:
    """Ring all-gather of an `nbytes` output: (n-1)/n * bytes / bw + (n-1) alpha."""
    return _hier(cluster, ranks, nbytes, 1, "all_gather")


def reduce_scatter_time(cluster: Cluster, ranks: Group, nbytes: float) -> float:
    """Ring reduce-scatter of an `nbytes` input: same traffic as all-gather."""
    return _hier(cluster, ranks, nbytes, 1, "reduce_scatter")


def _hier(cluster: Cluster, ranks: Group, nbytes: float, passes: int, kind: str) -> float:
    span = group_span(cluster, ranks)
    n, r, nodes = span.size, span.per_node, span.nodes
    if n <= 1 or nbytes <= 0:
        return 0.0
    measured = _measured(cluster, kind, span, nbytes)
    if measured is not None:
        return measured
    if nodes == 1:
        return _ring_phase(n, nbytes, cluster.intra_bw, cluster.intra_latency, passes)
    # Intra phase on everything, then N-node rings on each local member's 1/r slice in parallel.
    return (_ring_phase(r, nbytes, cluster.intra_bw, cluster.intra_latency, passes)
            + _ring_phase(nodes, nbytes / r, cluster.inter_bw, cluster.inter_latency, passes))


def all_to_all_time(cluster: Cluster, ranks: Group, nbytes: float) -> float:
    """Each rank sends (n-1)/n of its nbytes/n slice: (n-1)/n * (nbytes/n) / bw + (n-1) alpha.

    Across nodes the off-node part goes over the NIC and the on-node part over the intra links,
    one after the other (conservative).
    """
    span = group_span(cluster, ranks)
    n, r, nodes = span.size, span.per_node, span.nodes
    if n <= 1 or nbytes <= 0:
        return 0.0
    measured = _measured(cluster, "all_to_all", span, nbytes)
    if measured is not None:
        return measured
    local = nbytes / n
    if nodes == 1:
        return (n - 1) / n * local / cluster.intra_bw + (n - 1) * cluster.intra_latency
    on_node, off_node = (r - 1) / n * local, (n - r) / n * local
    return (on_node / cluster.intra_bw + off_node / cluster.inter_bw
            + (r - 1) * cluster.intra_latency + (n - r) * cluster.inter_latency)


def p2p_time(cluster: Cluster, src: int, dst: int, nbytes: float) -> float:
    """One point-to-point message: bytes / bw + alpha."""
    if nbytes <= 0:
        return 0.0
    if cluster.node_of(src) == cluster.node_of(dst):
        measured = _measured(cluster, "send_recv", GroupSpan(size=2, per_node=2, nodes=1), nbytes)
        if measured is not None:
            return measured
        return nbytes / cluster.intra_bw + cluster.intra_latency
    return nbytes / cluster.inter_bw + cluster.inter_latency


_BY_KIND = {
    "all_reduce": all_reduce_time,
    "all_gather": all_gather_time,
    "reduce_scatter": reduce_scatter_time,
    "all_to_all": all_to_all_time,
}


def collective_time(cluster: Cluster, kind: str, ranks: Group, nbytes: float) -> float:
    """Time of one collective `kind` (see COLLECTIVES) of an `nbytes` full buffer on `ranks`."""
    try:
        fn = _BY_KIND[kind]
    except KeyError:
        raise ValueError(f"unknown collective {kind!r}; known: {', '.join(COLLECTIVES)}") from None
    return fn(cluster, ranks, nbytes)


# ---------------------------------------------------------------- compute


def efficiency(cluster: Cluster, size: float) -> float:
    """Fraction of peak a matmul of size `size` (geometric mean of m, n, k on one device) reaches.

    max_efficiency * size / (size + half_efficiency_dim): small per-device matrices (high TP
    degrees, tiny microbatches) run further from peak than large ones.
    """
    size = max(float(size), 1.0)
    return cluster.max_efficiency * size / (size + cluster.half_efficiency_dim)


def matmul_size(m: float, n: float, k: float) -> float:
    """Geometric mean of a matmul's dims, the `size` that `efficiency` takes."""
    return math.exp((math.log(max(m, 1.0)) + math.log(max(n, 1.0)) + math.log(max(k, 1.0))) / 3)


def linear_flops(m: int, n: int, k: int) -> float:
    """Forward FLOPs of an [m, k] x [k, n] matmul (multiply-adds count 2)."""
    return 2.0 * m * n * k
