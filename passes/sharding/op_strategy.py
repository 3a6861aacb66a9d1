"""What a sharding rule returns (`OpStrategy`) and the node helpers every rule family uses.

A strategy lists the placement each input of an fx node must have on the tp axis and the placement
its output then has; the rule families live in rules_shape.py (data movement) and rules_compute.py
(arithmetic), and op_rules.py dispatches a node to its family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.fx as fx

from fxplan.passes.ir import P, R, Partial, Placement, Replicate, Shard


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY = _Any()  # accept the input as it is (shape / dtype only use)


@dataclass(frozen=True, slots=True)
class OpStrategy:
    """Placements an op needs for node.all_input_nodes (None: not a tensor) and the one it gives.

    For tuple-valued ops (split, native_layer_norm, ...) `out` is the placement of every element.
    """

    args: tuple
    out: Placement
    tag: str = ""  # short text for labels: "col", "row", "batch", "heads", ...
    compute: bool = True  # False for shape-only ops (size, getattr shape): never "sharded compute"

    @property
    def sharded(self) -> bool:
        """Sharded compute: some input or the output is S or P (the f rule applies to R inputs)."""
        if not self.compute:
            return False
        return not isinstance(self.out, Replicate) or any(
            isinstance(a, (Shard, Partial)) for a in self.args)


# ---------------------------------------------------------------- helpers on nodes


def val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def is_tensor(n) -> bool:
    return isinstance(val(n), torch.Tensor)


def is_tensor_like(n) -> bool:
    v = val(n)
    return isinstance(v, torch.Tensor) or (isinstance(v, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in v))


def shape(n) -> tuple | None:
    v = val(n)
    return tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else None


def out_shape(node) -> tuple | None:
    v = val(node)
    if isinstance(v, torch.Tensor):
        return tuple(int(s) for s in v.shape)
    if isinstance(v, (tuple, list)) and v and isinstance(v[0], torch.Tensor):
        return tuple(int(s) for s in v[0].shape)
    return None


def norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def call_arg(node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def make(node, assign, out, tag="", compute=True) -> OpStrategy | None:
    """OpStrategy from (input node, placement) pairs; other tensor inputs R, non-tensors None.

    None when one input would need two different placements (x used twice, e.g. x * x).
    """
    want: dict = {}
    for n, p in assign:
        if not isinstance(n, fx.Node):
            continue
        if n in want and want[n] != p:
            return None
        want[n] = p
    args = []
    for n in node.all_input_nodes:
        if n in want:
            args.append(want[n])
        elif is_tensor_like(n):
            args.append(R)
        else:
            args.append(None)
    return OpStrategy(tuple(args), out, tag, compute)


def shardable(size: int, tp: int) -> bool:
    return size >= tp and size % tp == 0


def moves(node, x, dim_pairs: Iterable[tuple[int, int]], tag: str, partial: bool = True) -> list[OpStrategy]:
    """Strategies of an op that moves its one input's elements around: x S(a) -> out S(b) for every
    (a, b) in `dim_pairs`, then x P -> P when the op is linear in x (`partial`)."""
    res = [make(node, [(x, Shard(a))], Shard(b), tag) for a, b in dim_pairs]
    if partial:
        res.append(make(node, [(x, P)], P, tag))
    return res
