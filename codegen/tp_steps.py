"""One tp-axis step of redistribute.py as graph calls: the collective (or local slice) of the step,
and, for a step on a blocked shard (Shard.blocks > 1), the views that make it act on each block."""

from __future__ import annotations

import torch.fx as fx

from fxplan.codegen.program import GraphOps
from fxplan.errors import UnsupportedOpError


def local_blocks(step, meta, rows: int) -> int:
    """The blocks of `step`'s dim on this rank. A dim that merged the batch with the sharded dim
    inside it ([B, T/tp] -> [B*T] S(0/B)) counts the batch among its (outer) blocks, and a rank holds
    only its rows: B / (microbatches * dp) of them. Cutting the local dim into the traced B blocks
    would pair the wrong rows (a gather interleaving pieces of different samples)."""
    blocks = step.blocks
    if blocks <= 1 or meta is None or meta.batch_dim != step.dim or rows <= 1:
        return blocks
    if blocks % rows:
        raise UnsupportedOpError(f"dim {step.dim} of a tensor of shape {tuple(meta.shape)} is {blocks} blocks cut over tp, "
                                 f"which do not divide into {rows} row blocks; choose a batch divisible by "
                                 f"microbatches * dp")
    return blocks // rows


def emit_tp_step(graph: fx.Graph, call, ops: GraphOps, step, x: fx.Node, tp_key: str, blocks: int | None = None) -> fx.Node:
    """`call(fn, *args)` adds one call_function node (and notes the group keys it names); `blocks`:
    the step's local block count (local_blocks), step.blocks when not given."""
    k = step.kind
    keyed = {"f": ops.tp_f, "g": ops.tp_all_reduce, "partial": ops.r_to_p}
    along_dim = {"gather": ops.all_gather, "gather_rs": ops.all_gather_rs, "slice": ops.slice,
                 "reduce_scatter": ops.reduce_scatter}
    if k in keyed:
        return call(keyed[k], x, tp_key)
    if k not in along_dim and k != "all_to_all":
        raise NotImplementedError(f"tp step {k!r}")
    blocks = step.blocks if blocks is None else blocks
    dim = step.dim
    if blocks > 1:  # [.., blocks * n, ..] -> [.., blocks, n, ..]: the step acts on n
        x = graph.call_method("unflatten", (x, dim, (blocks, -1)))
        dim += 1
    if k == "all_to_all":
        y = call(ops.all_to_all, x, dim, step.dim2, tp_key)
    else:
        y = call(along_dim[k], x, dim, tp_key)
    if blocks > 1:
        y = graph.call_method("flatten", (y, step.dim, step.dim + 1))
    return y
