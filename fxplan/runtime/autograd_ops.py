"""The autograd Functions behind the graph collectives (collectives.py): each pairs a forward
collective with the backward one the gradient convention needs (see collectives.py's table).

Why our own Functions: the functional collectives' autograd gave tp-times-too-large weight
gradients in the Megatron pattern (measured on torch 2.13, gloo). Every Function takes the Communicator as an argument
(it gets no gradient) and keeps it on ctx, so backward runs on the same groups as forward.
"""

from __future__ import annotations

from typing import Callable

import torch

from fxplan.runtime import flat_ops as ops
from fxplan.runtime.comm import Communicator

KeyOp = Callable[[Communicator, torch.Tensor, str, str], torch.Tensor]  # (comm, x, key, phase)
DimOp = Callable[[Communicator, torch.Tensor, int, str, str], torch.Tensor]  # (comm, x, dim, key, phase)


def _identity(comm: Communicator, x: torch.Tensor, key: str, phase: str) -> torch.Tensor:
    # forward must hand autograd a new tensor object (a view); backward passes the gradient on
    return x.view_as(x) if phase == "fwd" else x


def _key_pair(name: str, forward_op: KeyOp, backward_op: KeyOp, doc: str) -> type:
    """A Function (x, comm, key): forward_op forward, backward_op on the gradient."""

    def forward(ctx, x, comm, key):
        ctx.comm, ctx.key = comm, key
        return forward_op(comm, x, key, "fwd")

    def backward(ctx, grad):
        return backward_op(ctx.comm, grad, ctx.key, "bwd"), None, None
    return type(name, (torch.autograd.Function,),
                {"__doc__": doc, "forward": staticmethod(forward), "backward": staticmethod(backward)})


def _dim_pair(name: str, forward_op: DimOp, backward_op: DimOp, doc: str) -> type:
    """A Function (x, comm, dim, key): forward_op forward, backward_op on the gradient, both along dim."""

    def forward(ctx, x, comm, dim, key):
        ctx.comm, ctx.dim, ctx.key = comm, dim, key
        return forward_op(comm, x, dim, key, "fwd")

    def backward(ctx, grad):
        return backward_op(ctx.comm, grad, ctx.dim, ctx.key, "bwd"), None, None, None
    return type(name, (torch.autograd.Function,),
                {"__doc__": doc, "forward": staticmethod(forward), "backward": staticmethod(backward)})


TpF = _key_pair("TpF", _identity, ops.all_reduce, "Megatron f: identity / all-reduce.")
TpG = _key_pair("TpG", ops.all_reduce, _identity, "Megatron g (P -> R): all-reduce / identity.")
AllGather = _dim_pair("AllGather", ops.all_gather, ops.my_slice,
                      "S(d) -> R: all-gather / local slice (the R gradient is complete).")
Slice = _dim_pair("Slice", ops.my_slice, ops.all_gather, "R -> S(d): local slice / all-gather.")
ReduceScatter = _dim_pair("ReduceScatter", ops.reduce_scatter, ops.all_gather,
                          "P -> S(d): reduce-scatter / all-gather.")
AllGatherRS = _dim_pair("AllGatherRS", ops.all_gather, ops.reduce_scatter,
                        "S(d) -> R copy feeding only sharded compute (gather fused with f): "
                        "all-gather / reduce-scatter.")


class AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, src_dim, dst_dim, key):
        ctx.comm, ctx.src_dim, ctx.dst_dim, ctx.key = comm, src_dim, dst_dim, key
        return ops.all_to_all(comm, x, src_dim, dst_dim, key, "fwd")

    @staticmethod
    def backward(ctx, grad):
        return ops.all_to_all(ctx.comm, grad, ctx.dst_dim, ctx.src_dim, ctx.key, "bwd"), None, None, None, None


class RowSlice(torch.autograd.Function):
    """Keep row block `index` of `parts` along `dim`; backward all-gathers the rows over bwd_key.

    bwd_key '' means no rank holds the other rows' gradient (inputs that need none): zeros.
    """

    @staticmethod
    def forward(ctx, x, comm, dim, index, parts, bwd_key):
        ctx.comm, ctx.dim, ctx.index, ctx.parts, ctx.bwd_key, ctx.shape = comm, dim, index, parts, bwd_key, x.shape
        return ops.local_slice(x, dim, index, parts)

    @staticmethod
    def backward(ctx, grad):
        none = (None,) * 5
        if ctx.bwd_key:
            return (ops.all_gather(ctx.comm, grad, ctx.dim, ctx.bwd_key, "bwd"),) + none
        full = grad.new_zeros(ctx.shape)
        size = ctx.shape[ctx.dim] // ctx.parts
        full.narrow(ctx.dim, ctx.index * size, size).copy_(grad)
        return (full,) + none


class RowRegroup(torch.autograd.Function):
    """Change the batch split: all-gather rows over fwd_key, keep block `index` of `parts`.

    Backward: the kept block's gradient is complete here; when it holds more than our own rows we
    simply take ours (bwd_key ''), otherwise (a general regroup) the gradient rows are first
    all-gathered over bwd_key (members holding the `parts` different blocks, in block order).
    """

    @staticmethod
    def forward(ctx, x, comm, dim, fwd_key, index, parts, bwd_key):
        ctx.comm, ctx.dim, ctx.fwd_key, ctx.bwd_key = comm, dim, fwd_key, bwd_key
        full = ops.all_gather(comm, x, dim, fwd_key, "fwd")
        return ops.local_slice(full, dim, index, parts)

    @staticmethod
    def backward(ctx, grad):
        if ctx.bwd_key:
            grad = ops.all_gather(ctx.comm, grad, ctx.dim, ctx.bwd_key, "bwd")
        return (ops.my_slice(ctx.comm, grad, ctx.dim, ctx.fwd_key, "bwd"),) + (None,) * 6


class DpGradFix(torch.autograd.Function):
    """Identity forward; backward all-reduces over the consumer's dp group and scales.

    For batch-less tensors that need grad (a shared weight) used under another dp group than the
    one that owns them: the consumer's dp-partial gradient becomes the owner's convention.
    """

    @staticmethod
    def forward(ctx, x, comm, key, scale):
        ctx.comm, ctx.key, ctx.scale = comm, key, scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.key:
            grad = ops.all_reduce(ctx.comm, grad, ctx.key, "bwd")
        return grad * ctx.scale, None, None, None


class RToP(torch.autograd.Function):
    """R -> P on the tp axis: tp position 0 keeps the value, the others hold zeros.

    Backward: only position 0's addend carries the gradient; the all-reduce hands the complete
    gradient back to every member (the R convention).
    """

    @staticmethod
    def forward(ctx, x, comm, key):
        ctx.comm, ctx.key = comm, key
        ctx.first = comm.me(key) == 0
        return x.clone() if ctx.first else torch.zeros_like(x)

    @staticmethod
    def backward(ctx, grad):
        local = grad if ctx.first else torch.zeros_like(grad)
        return ops.all_reduce(ctx.comm, local, ctx.key, "bwd"), None, None
