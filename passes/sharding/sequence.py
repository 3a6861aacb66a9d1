"""Sequence parallelism (Megatron-SP) as a family of TPSpecs: a layer's activations enter and leave
it cut along the sequence dim (S(seq)) instead of whole on every tp rank.

Propagation (shard_prop.LayerProp with a `boundary`) then finds the rest by itself: the norms,
dropouts and residual adds between the tensor-parallel matmuls run on the sequence shard; before a
column-parallel linear the input is all-gathered (its backward a reduce-scatter), and the partial
sum after a row-parallel linear is reduce-scattered onto the sequence shard where the all-reduce
was. The bytes moved are the all-reduce's (RS + AG = AR) plus, in backward, one all-gather per
gathered input a matmul saved: it is saved as its shard and gathered again (Megatron-SP does the
same), so every saved activation is 1/tp per rank. Such specs are labelled `sp:<label>`; the planner
chooses them where memory is tight, and `Constraints(sp=True / False)` pins them.

The sequence dim of an activation is the dim after its batch dim, on tensors of rank >= 3 whose
last (feature) dim it is not: [batch, seq, hidden] -> 1.
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from fxplan.passes.cost.flops import node_saved
from fxplan.passes.ir import Comm, Replicate, Shard, TPSpec

SP_PREFIX = "sp:"
SP_SPECS = 4  # sequence-parallel specs kept per layer and tp (beside the plain ones)


def sequence_dim(meta, tp: int) -> int | None:
    """The dim of a [batch, seq, ...] float activation that sequence parallelism cuts, or None."""
    shape, b = meta.shape, meta.batch_dim
    if b is None or "float" not in meta.dtype or len(shape) < 3:
        return None
    d = b + 1
    if d >= len(shape) - 1 or shape[d] < tp or shape[d] % tp:
        return None
    return d


def sequence_boundary(ctx, layer, tp: int):
    """boundary(node) -> S(seq) for the layer's activation inputs and outputs that have a sequence dim
    (None for the others); None when it has none at all (sequence parallelism changes nothing) or
    no weights (no tensor-parallel matmuls to pair the sequence shard with)."""
    if not layer.param_numel:
        return None  # nothing to shard but the sequence itself: its neighbours' layouts decide
    names = set(layer.inputs) | set(layer.outputs)
    dims = {n: d for n in names if (d := sequence_dim(ctx.meta(ctx.nodes[n]), tp)) is not None} if tp > 1 else {}
    if not dims:
        return None

    def boundary(node: fx.Node):
        d = dims.get(node.name)
        return Shard(d) if d is not None else None

    return boundary


def sequence_specs(specs) -> tuple[TPSpec, ...]:
    return tuple(dataclasses.replace(s, label=SP_PREFIX + s.label) for s in specs)


def is_sequence_parallel(label: str) -> bool:
    return label.startswith(SP_PREFIX)


def saved_as_shard(ctx, t: fx.Node, consumers, args: dict) -> tuple[Comm, int]:
    """A sequence shard `t` all-gathered for sharded compute ("gather_rs"): the ops that save the
    gathered copy keep the shard instead and backward gathers it again, once (runtime/
    sequence_saved.py). -> (that backward all-gather, how many of t's `consumers` save the gathered
    copy); `args`: node -> its arg placements."""
    savers = 0
    for u in consumers:
        placed = args.get(u)
        if placed is None or t not in node_saved(u)[0]:
            continue
        savers += any(a is t and isinstance(need, Replicate) for a, need in zip(u.all_input_nodes, placed))
    meta = ctx.meta(t)
    return Comm("all_gather", "tp", meta.nbytes, meta.batch_dim is not None, "bwd", f"regather {t.name}"), savers
