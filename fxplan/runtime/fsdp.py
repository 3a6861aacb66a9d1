"""One FSDP unit (a layer's FSDP parameters on one dp group): one all-gather per forward (ZeRO-3:
plus one re-gather in backward; keep: one per step, see fsdp_state.py), ONE reduce-scatter.

Each shard is its parameter's flat 1/dp block (codegen/params.py). Forward concatenates this rank's
blocks, all-gathers the concatenation (member-major: [member][param block]) and copies each
parameter's blocks out into its tp-local shape. Backward writes each gradient into the same
member-major layout (padding stays zero) and reduce-scatters (SUM) it: this rank's slice holds
exactly its blocks' summed gradients.

Overlap: when the autograd engine is about to accumulate every shard's gradient into its .grad (a
plain .backward(), not autograd.grad), the reduce-scatter is launched asynchronously and the
backward returns no gradient for the shards; the communicator's `finish_deferred`, queued as the
engine's end-of-backward callback, waits for it and accumulates into the shards' .grad. Meanwhile
the engine computes the earlier layers' backward. Each holds its layer's full-size gradient
buffer, so the next layer's backward waits for the earlier ones before it fills its own: one is
in flight at a time, and only the shard-sized results wait for the end of backward.
Otherwise the reduce-scatter runs synchronously and the gradients are returned as usual.
"""

from __future__ import annotations

import torch

from fxplan._torch import has_grad_hooks, queue_end_of_backward, will_engine_execute
from fxplan.runtime.comm import Communicator
from fxplan.runtime.flat_ops import Pending, reduce_scatter_flat
from fxplan.runtime.fsdp_state import copy_out, launch_gather


class _Deferred:
    """A launched reduce-scatter and what adds its result into the shards' .grad at end of backward."""

    def __init__(self, pending: Pending, finish):
        self.pending, self._finish = pending, finish

    def __call__(self) -> None:
        self._finish()


class FsdpGatherLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm, key, shapes, keep, *shards):
        ctx.comm, ctx.key, ctx.blocks, ctx.dtype = comm, key, [s.numel() for s in shards], shards[0].dtype
        ctx.gathered = None
        state = comm.fsdp  # the stage forward in progress (fsdp_state.py); None: a plain gather
        if state is not None:
            fulls, ctx.gathered = state.gather(key, shapes, shards, keep)
            return fulls
        pending, out = launch_gather(comm, key, shards, async_op=False)
        pending.wait()
        return copy_out(out, comm.size(key), shards, shapes)

    @staticmethod
    def backward(ctx, *grads):
        comm, n, blocks = ctx.comm, ctx.comm.size(ctx.key), ctx.blocks
        if ctx.gathered is not None:  # every use of the re-gathered weights is done
            ctx.gathered.release()
        for earlier in comm.deferred:  # the earlier layers' reduce-scatters (they overlapped this
            if isinstance(earlier, _Deferred):  # layer's compute) free their full-size buffers first
                earlier.pending.wait()
        total = sum(blocks)
        send = torch.empty((n, total), dtype=ctx.dtype, device=grads[0].device)
        offset = 0
        for grad, block in zip(grads, blocks):
            flat = grad.reshape(-1).to(ctx.dtype)
            dst = send[:, offset:offset + block]
            if flat.numel() < n * block:  # padding of the last block: zero gradient
                flat = torch.cat([flat, flat.new_zeros(n * block - flat.numel())])
            dst.copy_(flat.view(n, block))
            offset += block
        out = send.new_empty(total)
        comm.record("reduce_scatter", ctx.key, "bwd", send)
        no_grads = (None, None, None, None)  # comm, key, shapes, keep
        leaves = _leaves_accumulated(ctx, len(blocks))
        if leaves is not None and _defer_to_end_of_backward(comm):
            pending = reduce_scatter_flat(comm, out, send.view(-1), ctx.key, async_op=True)
            comm.deferred.append(_Deferred(pending, lambda: _accumulate(pending, out, blocks, leaves)))
            return no_grads + (None,) * len(blocks)
        reduce_scatter_flat(comm, out, send.view(-1), ctx.key).wait()
        return no_grads + tuple(out.split(blocks))


def _leaves_accumulated(ctx, count: int):
    """The shard Parameters if the engine will accumulate all their gradients into .grad, else None."""
    try:
        nodes = [fn for fn, _ in ctx.next_functions]  # one per tensor input: the shards
        if len(nodes) != count:
            return None
        leaves = []
        for fn in nodes:
            var = getattr(fn, "variable", None)  # AccumulateGrad nodes know their leaf
            if var is None or not will_engine_execute(fn):
                return None
            if has_grad_hooks(var):
                return None  # hooks on the shard expect the engine to deliver its gradient
            leaves.append(var)
        return leaves
    except (AttributeError, RuntimeError):  # autograd.grad() capturing leaves, or an older torch
        return None


def _defer_to_end_of_backward(comm: Communicator) -> bool:
    try:
        queue_end_of_backward(comm.finish_deferred)
        return True
    except (AttributeError, RuntimeError):
        return False


def _accumulate(pending: Pending, out: torch.Tensor, blocks: list[int], leaves: list) -> None:
    """Wait for one unit's reduce-scatter and add its gradients into the shards' .grad."""
    pending.wait()
    with torch.no_grad():
        for leaf, grad in zip(leaves, out.split(blocks)):
            grad = grad.view_as(leaf)
            if leaf.grad is None:
                leaf.grad = grad
            else:
                leaf.grad.add_(grad)
