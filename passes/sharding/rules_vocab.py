"""Vocab-parallel rules (Megatron): the embedding table cut along its rows and the cross-entropy
computed on logits cut along the classes, so neither the table nor the logits are ever whole.

- embedding(ids R, table S(0)) -> P: each rank looks up the ids its rows hold and gives zeros for
  the others (codegen/vocab.py masks them); the sum over the ranks is the lookup.
- cross_entropy(logits S(class dim), labels R) -> R: the row maxima are gathered (a few bytes per
  token), the sum of exponentials and the target logit all-reduced; the loss is then whole on every
  rank and the logits' gradient (softmax - one-hot) stays local. `VOCAB_TAG` marks the strategy;
  `inner_comms` prices the collectives the placements do not show.
- cross_entropy(logits S(0), labels S(0)): rows split (reduction 'none' -> S(0), 'sum' -> P).
Only plain losses get these (no class weights, no label smoothing, no legacy reduction flags);
a table with padding_idx / max_norm keeps the replicated and column forms.
"""

from __future__ import annotations

import torch.fx as fx

from fxplan.passes.ir import P, R, Comm, Shard, cross_entropy_args, op_name
from fxplan.passes.sharding.op_strategy import call_arg, make, shape, shardable

VOCAB_TAG = "vocab"


def cross_entropy_rule(node, tp):
    args = cross_entropy_args(node)
    if args is None:
        return []
    x, y = args["logits"], args["labels"]
    sx, sy = shape(x), shape(y)
    if sx is None or sy is None or len(sx) != 2 or len(sy) != 1:
        return []  # [N, C] logits with [N] class ids: what LM and classifier losses flatten to
    res = []
    if shardable(sx[1], tp):
        res.append(make(node, [(x, Shard(1)), (y, R)], R, VOCAB_TAG))
    if shardable(sx[0], tp) and args["reduction"] != "mean":
        res.append(make(node, [(x, Shard(0)), (y, Shard(0))], Shard(0) if args["reduction"] == "none" else P, "batch"))
    return res


def vocab_embedding(node, tp, ids, table, aten: bool):
    """The row-split table strategy of an embedding (None when its options need the whole table)."""
    if aten:
        padding = call_arg(node, 2, "padding_idx", -1)
        plain = padding in (None, -1) and not call_arg(node, 3, "scale_grad_by_freq", False)
    else:
        plain = all(call_arg(node, i, k, d) == d for i, k, d in ((2, "padding_idx", None), (3, "max_norm", None),
                                                                 (5, "scale_grad_by_freq", False), (6, "sparse", False)))
    st = shape(table)
    if not plain or st is None or len(st) != 2 or not shardable(st[0], tp):
        return None
    return make(node, [(ids, R), (table, Shard(0))], P, VOCAB_TAG)


def is_vocab_loss(node: fx.Node, arg_placements) -> bool:
    """A cross-entropy consuming its logits split along the classes."""
    if op_name(node) not in ("cross_entropy", "cross_entropy_loss") or not arg_placements:
        return False
    args = cross_entropy_args(node)
    if args is None or args["logits"] not in node.all_input_nodes:
        return False
    p = arg_placements[node.all_input_nodes.index(args["logits"])]
    return isinstance(p, Shard) and p.dim == 1


def inner_comms(node: fx.Node, arg_placements, tp: int, itemsize: int = 4) -> tuple[Comm, ...]:
    """The forward collectives of a vocab-parallel loss on [N] rows: the maxima gathered ([N, tp]),
    the exponential sums and the target logits all-reduced ([N] each). Backward needs none."""
    if tp <= 1 or not is_vocab_loss(node, arg_placements):
        return ()
    rows = shape(cross_entropy_args(node)["logits"])[0]
    why = f"vocab-parallel cross-entropy {node.name}"
    return (Comm("all_gather", "tp", rows * tp * itemsize, True, "fwd", why),
            Comm("all_reduce", "tp", rows * itemsize, True, "fwd", why),
            Comm("all_reduce", "tp", rows * itemsize, True, "fwd", why))
