"""The two vocab-parallel ops as local graph code (passes/sharding/rules_vocab.py decides them):

- an embedding whose table is cut along its rows looks up the ids this rank's rows hold (shifted to
  local row numbers) and zeroes the other ids' vectors: the lookup is the sum over the tp ranks (P);
- a cross-entropy whose logits are cut along the classes (Megatron's parallel cross-entropy): the
  row maxima are all-gathered and their maximum subtracted (a constant: no gradient), the sum of
  exponentials and the target logit (taken on the rank holding its class, zero elsewhere) are
  all-reduced, loss = log(sum) - target on every row not carrying `ignore_index`, then reduced as
  the original ('none', 'sum' or a mean over the valid rows). The all-reduces are g steps (identity
  backward): every rank's loss is the same, so the softmax - one-hot gradient of its own classes is
  what reaches its logits. No rank ever holds more than its 1/tp of the logits.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxplan._torch import OpOverload
from fxplan.passes.ir import Shard, cross_entropy_args, op_name


def vocab_rewrite(graph: fx.Graph, call, ops, node: fx.Node, new: fx.Node, wanted, tp: int, tp_index: int,
                  tp_key: str) -> fx.Node | None:
    """The local code replacing `new` (the copy of `node`) when `node` is a vocab-parallel op, else None."""
    if tp <= 1:
        return None
    name = op_name(node)
    inputs = dict(zip(node.all_input_nodes, new.all_input_nodes))
    placed = dict(zip(node.all_input_nodes, wanted))
    if name == "embedding":
        aten = isinstance(node.target, OpOverload)  # aten.embedding(table, ids), F.embedding(ids, table)
        table, ids = (node.args[0], node.args[1]) if aten else (node.args[1], node.args[0])
        if not _rows_cut(placed.get(table), 0):
            return None
        rows = int(table.meta["val"].shape[0]) // tp
        return _embedding(graph, new, inputs[ids], rows * tp_index, rows)
    if name in ("cross_entropy", "cross_entropy_loss"):
        args = cross_entropy_args(node)
        if args is None or not _rows_cut(placed.get(args["logits"]), 1):
            return None
        classes = int(args["logits"].meta["val"].shape[1]) // tp
        out = _cross_entropy(graph, call, ops, inputs[args["logits"]], inputs[args["labels"]], args, classes * tp_index,
                             classes, tp_key)
        graph.erase_node(new)
        return out
    return None


def _rows_cut(p, dim: int) -> bool:
    return isinstance(p, Shard) and p.dim == dim and p.blocks == 1


def _outside(graph: fx.Graph, ids: fx.Node, start: int, count: int) -> fx.Node:
    low = graph.call_function(torch.lt, (ids, start))
    high = graph.call_function(torch.ge, (ids, start + count))
    return graph.call_function(torch.logical_or, (low, high))


def _local_ids(graph: fx.Graph, ids: fx.Node, outside: fx.Node, start: int) -> fx.Node:
    shifted = graph.call_function(operator.sub, (ids, start))
    return graph.call_method("masked_fill", (shifted, outside, 0))


def _embedding(graph: fx.Graph, new: fx.Node, ids: fx.Node, start: int, rows: int) -> fx.Node:
    with graph.inserting_before(new):
        outside = _outside(graph, ids, start, rows)
        local = _local_ids(graph, ids, outside, start)
    new.replace_input_with(ids, local)
    with graph.inserting_after(new):
        mask = graph.call_method("unsqueeze", (outside, -1))
    with graph.inserting_after(mask):
        return graph.call_method("masked_fill", (new, mask, 0.0))


def _cross_entropy(graph, call, ops, logits, labels, args, start: int, classes: int, tp_key: str) -> fx.Node:
    g, m = graph.call_function, graph.call_method
    local_max = m("amax", (m("detach", (logits,)), 1), {"keepdim": True})
    row_max = m("amax", (call(ops.all_gather, local_max, 1, tp_key), 1), {"keepdim": True})
    z = g(operator.sub, (logits, row_max))
    sum_exp = call(ops.tp_all_reduce, m("sum", (m("exp", (z,)), 1)), tp_key)
    outside = _outside(graph, labels, start, classes)
    picked = m("squeeze", (m("gather", (z, 1, m("unsqueeze", (_local_ids(graph, labels, outside, start), 1)))), 1))
    target = call(ops.tp_all_reduce, m("masked_fill", (picked, outside, 0.0)), tp_key)
    ignored = g(operator.eq, (labels, args["ignore_index"]))
    per_row = m("masked_fill", (g(operator.sub, (m("log", (sum_exp,)), target)), ignored, 0.0))
    if args["reduction"] == "none":
        return per_row
    total = m("sum", (per_row,))
    if args["reduction"] == "sum":
        return total
    valid = m("sum", (g(torch.logical_not, (ignored,)),))
    return g(operator.truediv, (total, m("type_as", (valid, total))))
