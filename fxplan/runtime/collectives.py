"""Collectives as graph nodes: autograd Functions around plain torch.distributed ops.

Why our own Functions: the functional collectives' autograd gave tp-times-too-large weight
gradients in the Megatron pattern (DESIGN.md). Each public function takes the tensor, its static
arguments and a group KEY (groups.py), so `gm.code` reads e.g. `fxplan_tp_all_reduce(x, 'tp:0,1')`
and graphs stay picklable. Every collective executed (forward or backward) is counted by
(kind, key, phase) with its bytes, readable through `counts()` for tests.

Pairs (forward / backward), following the gradient convention of the shared semantics:
  f          identity     / all-reduce            (R tensor entering sharded compute)
  g          all-reduce   / identity              (P -> R)
  all-gather along dim    / local slice           (S(d) -> R; the R gradient is complete)
  local slice along dim   / all-gather            (R -> S(d))
  reduce-scatter          / all-gather            (P -> S(d))
  all-to-all S(a)->S(b)   / all-to-all S(b)->S(a)
  all-gather (fused f)    / reduce-scatter        (S(d) -> R feeding only sharded compute)
  R -> P: keep on pos 0   / all-reduce
  FSDP unit: all-gather   / reduce-scatter, async (one layer's parameters in one flat buffer each way)
The step kinds come from fxplan.passes.sharding.redistribute (the single source of truth); emit.py maps them.
All-gathers and reduce-scatters are single flat native ops where the backend has them (gloo from
torch 2.13), detected at run time with an emulation for older torch (`gather_flat`,
`reduce_scatter_flat`). The asynchronous FSDP reduce-scatters finish at the end of each backward
pass by themselves (`wait_pending`, an autograd-engine callback).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.fx

from fxplan.runtime import groups
from fxplan._torch import has_grad_hooks, queue_end_of_backward, will_engine_execute

# ---------------------------------------------------------------- run-time counter


@dataclass
class Count:
    calls: int = 0
    nbytes: int = 0


_COUNTS: dict[tuple[str, str, str], Count] = defaultdict(Count)


def counts() -> dict[tuple[str, str, str], Count]:
    """(kind, group key, phase "fwd"|"bwd") -> calls and bytes moved since `reset_counts()`."""
    return dict(_COUNTS)


def reset_counts() -> None:
    _COUNTS.clear()


def _count(kind: str, key: str, phase: str, t: torch.Tensor) -> None:
    c = _COUNTS[(kind, key, phase)]
    c.calls += 1
    c.nbytes += t.numel() * t.element_size()


# ---------------------------------------------------------------- raw ops (no autograd)


def _me(key: str) -> int:
    return groups.position_in(key, dist.get_rank())


def _backend(pg) -> str:
    try:
        return str(dist.get_backend(pg)).lower()
    except Exception:  # noqa: BLE001 - unknown backends behave like nccl (all ops supported)
        return ""


# ---------------------------------------------------------------- flat native collectives
# One flat buffer per collective: `all_gather_into_tensor` / `reduce_scatter_tensor` (spelled
# `*_single` from torch 2.13, where gloo implements both). Where a backend lacks one (gloo on older
# torch) the first call raises "... not support ..." before any communication, on every rank alike
# (same torch, same backend): we remember that and emulate (list all-gather; all-reduce + slice).


def _gather_into(*args, **kwargs):  # looked up per call, so profilers that wrap dist.* see it
    return (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(*args, **kwargs)


def _reduce_scatter_into(*args, **kwargs):
    return (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(*args, **kwargs)


_NATIVE: dict[tuple[str, str], bool] = {}  # (op, backend) -> the native op works
_UNSUPPORTED = object()


class Pending:
    """A launched collective; `wait()` blocks until its output buffer holds the result."""

    def __init__(self, work=None, finish=None, keep=()):
        self._work, self._finish, self._keep = work, finish, keep  # keep: buffers alive until done

    def wait(self) -> None:
        if self._work is not None:
            self._work.wait()
            self._work = None
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish()
        self._keep = ()


def _native(op: str, pg, call):
    backend = _backend(pg)
    if _NATIVE.get((op, backend)) is False:
        return _UNSUPPORTED
    try:
        work = call()
    except (RuntimeError, NotImplementedError) as exc:
        if _NATIVE.get((op, backend)) or "support" not in str(exc).lower():
            raise  # a real failure, not a missing op
        _NATIVE[(op, backend)] = False
        return _UNSUPPORTED
    _NATIVE[(op, backend)] = True
    return work


def native_support() -> dict[tuple[str, str], bool]:
    """(op, backend) -> whether the native flat op was usable (filled as ops run; for tests/reports)."""
    return dict(_NATIVE)


def gather_flat(out: torch.Tensor, x: torch.Tensor, key: str, async_op: bool = False) -> Pending:
    """out (flat, n * x.numel()) <- every member's x (flat), in key order. No autograd, no count."""
    pg = groups.get(key)
    x = x.contiguous()
    work = _native("all_gather", pg, lambda: _gather_into(out, x, group=pg, async_op=async_op))
    if work is _UNSUPPORTED:
        n = len(groups.ranks_of(key))
        work = dist.all_gather(list(out.view(n, -1).view((n,) + tuple(x.shape)).unbind(0)), x, group=pg,
                               async_op=async_op)
    return Pending(work if async_op else None, keep=(out, x))


def reduce_scatter_flat(out: torch.Tensor, x: torch.Tensor, key: str, async_op: bool = False) -> Pending:
    """out (flat) <- block `me` of the SUM over members of x (flat, n blocks of out's size)."""
    pg = groups.get(key)
    x = x.contiguous()
    work = _native("reduce_scatter", pg, lambda: _reduce_scatter_into(out, x, group=pg, async_op=async_op))
    if work is not _UNSUPPORTED:
        return Pending(work if async_op else None, keep=(out, x))
    n = len(groups.ranks_of(key))
    total = x.clone()
    work = dist.all_reduce(total, group=pg, async_op=async_op)

    def finish():
        out.copy_(total.view((n,) + tuple(out.shape))[_me(key)])
    if not async_op:
        finish()
        return Pending()
    return Pending(work, finish, keep=(out, total))


def _all_reduce(x: torch.Tensor, key: str, phase: str) -> torch.Tensor:
    _count("all_reduce", key, phase, x)
    y = x.detach().contiguous().clone()
    dist.all_reduce(y, group=groups.get(key))
    return y


def _all_gather(x: torch.Tensor, dim: int, key: str, phase: str) -> torch.Tensor:
    n = len(groups.ranks_of(key))
    x = x.detach().contiguous()
    flat = x.new_empty(n * x.numel())  # member i's piece is the i-th block: one flat native gather
    gather_flat(flat, x.reshape(-1), key).wait()
    stacked = flat.view((n,) + tuple(x.shape))
    out = stacked.view((n * x.shape[0],) + tuple(x.shape[1:])) if dim == 0 and x.dim() else \
        torch.cat(stacked.unbind(0), dim=dim)
    _count("all_gather", key, phase, out)
    return out


def _local_slice(x: torch.Tensor, dim: int, index: int, parts: int) -> torch.Tensor:
    size = x.shape[dim] // parts
    return x.narrow(dim, index * size, size).contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, key: str, phase: str) -> torch.Tensor:
    n = len(groups.ranks_of(key))
    _count("reduce_scatter", key, phase, x)
    # member j's chunk along dim must be the j-th contiguous block of the flat input
    moved = x.detach().movedim(dim, 0).contiguous()
    out = moved.new_empty((moved.shape[0] // n,) + tuple(moved.shape[1:]))
    reduce_scatter_flat(out.view(-1), moved.view(-1), key).wait()
    return out.movedim(0, dim).contiguous()


def _all_to_all(x: torch.Tensor, src_dim: int, dst_dim: int, key: str, phase: str) -> torch.Tensor:
    """Local piece S(src_dim) -> S(dst_dim): send chunk j of dst_dim to member j, stack on src_dim."""
    n = len(groups.ranks_of(key))
    pg = groups.get(key)
    _count("all_to_all", key, phase, x)
    x = x.detach()
    if _backend(pg) == "gloo":  # gloo has no all_to_all: gather everything, keep what we need
        parts = [torch.empty_like(x.contiguous()) for _ in range(n)]
        dist.all_gather(parts, x.contiguous(), group=pg)
        full = torch.cat(parts, dim=src_dim)
        return _local_slice(full, dst_dim, _me(key), n)
    send = [c.contiguous() for c in x.chunk(n, dim=dst_dim)]
    recv = [torch.empty_like(send[0]) for _ in range(n)]
    dist.all_to_all(recv, send, group=pg)
    return torch.cat(recv, dim=src_dim)


# ---------------------------------------------------------------- autograd Functions


class _F(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, key):
        ctx.key = key
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.key, "bwd"), None


class _G(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, key):
        return _all_reduce(x, key, "fwd")

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, key):
        ctx.dim, ctx.key = dim, key
        return _all_gather(x, dim, key, "fwd")

    @staticmethod
    def backward(ctx, grad):
        n = len(groups.ranks_of(ctx.key))
        return _local_slice(grad, ctx.dim, _me(ctx.key), n), None, None


class _Slice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, key):
        ctx.dim, ctx.key = dim, key
        return _local_slice(x, dim, _me(key), len(groups.ranks_of(key)))

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.key, "bwd"), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, key):
        ctx.dim, ctx.key = dim, key
        return _reduce_scatter(x, dim, key, "fwd")

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.key, "bwd"), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, src_dim, dst_dim, key):
        ctx.src_dim, ctx.dst_dim, ctx.key = src_dim, dst_dim, key
        return _all_to_all(x, src_dim, dst_dim, key, "fwd")

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.dst_dim, ctx.src_dim, ctx.key, "bwd"), None, None, None


class _RowSlice(torch.autograd.Function):
    """Keep row block `index` of `parts` along `dim`; backward all-gathers the rows over bwd_key.

    bwd_key '' means no rank holds the other rows' gradient (inputs that need none): zeros.
    """

    @staticmethod
    def forward(ctx, x, dim, index, parts, bwd_key):
        ctx.dim, ctx.index, ctx.parts, ctx.bwd_key, ctx.shape = dim, index, parts, bwd_key, x.shape
        return _local_slice(x, dim, index, parts)

    @staticmethod
    def backward(ctx, grad):
        if ctx.bwd_key:
            return _all_gather(grad, ctx.dim, ctx.bwd_key, "bwd"), None, None, None, None
        full = grad.new_zeros(ctx.shape)
        size = ctx.shape[ctx.dim] // ctx.parts
        full.narrow(ctx.dim, ctx.index * size, size).copy_(grad)
        return full, None, None, None, None


class _RowRegroup(torch.autograd.Function):
    """Change the batch split: all-gather rows over fwd_key, keep block `index` of `parts`.

    Backward: the kept block's gradient is complete here; when it holds more than our own rows we
    simply take ours (bwd_key ''), otherwise (a general regroup) the gradient rows are first
    all-gathered over bwd_key (members holding the `parts` different blocks, in block order).
    """

    @staticmethod
    def forward(ctx, x, dim, fwd_key, index, parts, bwd_key):
        ctx.dim, ctx.fwd_key, ctx.bwd_key = dim, fwd_key, bwd_key
        full = _all_gather(x, dim, fwd_key, "fwd")
        return _local_slice(full, dim, index, parts)

    @staticmethod
    def backward(ctx, grad):
        if ctx.bwd_key:
            grad = _all_gather(grad, ctx.dim, ctx.bwd_key, "bwd")
        n = len(groups.ranks_of(ctx.fwd_key))
        return _local_slice(grad, ctx.dim, _me(ctx.fwd_key), n), None, None, None, None, None


class _DpGradFix(torch.autograd.Function):
    """Identity forward; backward all-reduces over the consumer's dp group and scales.

    For batch-less tensors that need grad (a shared weight) used under another dp group than the
    one that owns them: the consumer's dp-partial gradient becomes the owner's convention.
    """

    @staticmethod
    def forward(ctx, x, key, scale):
        ctx.key, ctx.scale = key, scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.key:
            grad = _all_reduce(grad, ctx.key, "bwd")
        return grad * ctx.scale, None, None


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class _FsdpGatherLayer(torch.autograd.Function):
    """One FSDP unit (a layer's FSDP parameters on one dp group): ONE all-gather, ONE reduce-scatter.

    Each shard is its parameter's flat 1/dp block (codegen/params.py). Forward concatenates this
    rank's blocks, all-gathers the concatenation (member-major: [member][param block]) and copies
    each parameter's blocks out into its tp-local shape. Backward writes each gradient into the same
    member-major layout (padding stays zero) and reduce-scatters (SUM) it: this rank's slice holds
    exactly its blocks' summed gradients.

    Overlap: when the autograd engine is about to accumulate every shard's gradient into its .grad
    (a plain .backward(), not autograd.grad), the reduce-scatter is launched asynchronously and the
    backward returns no gradient for the shards; `wait_pending()`, queued as the engine's
    end-of-backward callback, waits for it and accumulates into the shards' .grad. Meanwhile the
    engine computes the earlier layers' backward. Otherwise the reduce-scatter runs synchronously
    and the gradients are returned as usual.
    """

    @staticmethod
    def forward(ctx, key, shapes, *shards):
        n = len(groups.ranks_of(key))
        blocks = [s.numel() for s in shards]
        ctx.key, ctx.shapes, ctx.blocks, ctx.dtype = key, shapes, blocks, shards[0].dtype
        mine = torch.cat([s.detach().reshape(-1) for s in shards]) if len(shards) > 1 else shards[0].detach().reshape(-1)
        out = mine.new_empty(n * mine.numel())
        gather_flat(out, mine, key).wait()
        _count("all_gather", key, "fwd", out)
        grid = out.view(n, -1)
        fulls, offset = [], 0
        for block, shape in zip(blocks, shapes):
            flat = out if len(blocks) == 1 else grid[:, offset:offset + block].reshape(-1)  # the copy-out
            fulls.append(flat[:_numel(shape)].view(shape))
            offset += block
        return tuple(fulls)

    @staticmethod
    def backward(ctx, *grads):
        n, blocks = len(groups.ranks_of(ctx.key)), ctx.blocks
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
        _count("reduce_scatter", ctx.key, "bwd", send)
        leaves = _leaves_accumulated(ctx, len(blocks))
        if leaves is not None and _defer_to_end_of_backward():
            _PENDING.append((reduce_scatter_flat(out, send.view(-1), ctx.key, async_op=True), out, blocks, leaves))
            return (None, None) + (None,) * len(blocks)
        reduce_scatter_flat(out, send.view(-1), ctx.key).wait()
        return (None, None) + tuple(out.split(blocks))


# Launched reduce-scatters whose gradients are not in .grad yet: (pending, out, blocks, leaf shards).
_PENDING: list[tuple] = []


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


def _defer_to_end_of_backward() -> bool:
    try:
        queue_end_of_backward(wait_pending)
        return True
    except (AttributeError, RuntimeError):
        return False


def wait_pending() -> None:
    """Finish every asynchronous FSDP reduce-scatter and accumulate its gradients into .grad.

    Runs by itself at the end of each backward pass (engine callback); calling it again is a cheap
    no-op. The runtime may call it after its backward passes as a safety net.
    """
    while _PENDING:
        pending, out, blocks, leaves = _PENDING.pop(0)
        pending.wait()
        with torch.no_grad():
            for leaf, grad in zip(leaves, out.split(blocks)):
                grad = grad.view_as(leaf)
                if leaf.grad is None:
                    leaf.grad = grad
                else:
                    leaf.grad.add_(grad)


class _AllGatherRS(torch.autograd.Function):
    """S(d) -> R copy feeding only sharded compute (gather fused with f): backward reduce-scatters."""

    @staticmethod
    def forward(ctx, x, dim, key):
        ctx.dim, ctx.key = dim, key
        return _all_gather(x, dim, key, "fwd")

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.dim, ctx.key, "bwd"), None, None


class _RToP(torch.autograd.Function):
    """R -> P on the tp axis: tp position 0 keeps the value, the others hold zeros.

    Backward: only position 0's addend carries the gradient; the all-reduce hands the complete
    gradient back to every member (the R convention).
    """

    @staticmethod
    def forward(ctx, x, key):
        ctx.key = key
        ctx.first = _me(key) == 0
        return x.clone() if ctx.first else torch.zeros_like(x)

    @staticmethod
    def backward(ctx, grad):
        local = grad if ctx.first else torch.zeros_like(grad)
        return _all_reduce(local, ctx.key, "bwd"), None


# ---------------------------------------------------------------- what graphs call


def fxplan_tp_f(x: torch.Tensor, key: str) -> torch.Tensor:
    """Megatron f: identity forward, all-reduce of the gradient over the tp group."""
    return _F.apply(x, key)


def fxplan_tp_all_reduce(x: torch.Tensor, key: str) -> torch.Tensor:
    """Megatron g (P -> R): all-reduce forward, identity backward."""
    return _G.apply(x, key)


def fxplan_all_gather(x: torch.Tensor, dim: int, key: str) -> torch.Tensor:
    """S(dim) -> R: all-gather along dim; backward keeps the local slice."""
    return _AllGather.apply(x, dim, key)


def fxplan_slice(x: torch.Tensor, dim: int, key: str) -> torch.Tensor:
    """R -> S(dim): keep our slice; backward all-gathers the gradient."""
    return _Slice.apply(x, dim, key)


def fxplan_reduce_scatter(x: torch.Tensor, dim: int, key: str) -> torch.Tensor:
    """P -> S(dim): reduce-scatter; backward all-gathers the gradient."""
    return _ReduceScatter.apply(x, dim, key)


def fxplan_all_to_all(x: torch.Tensor, src_dim: int, dst_dim: int, key: str) -> torch.Tensor:
    """S(src_dim) -> S(dst_dim) over the tp group."""
    return _AllToAll.apply(x, src_dim, dst_dim, key)


def fxplan_all_gather_rs(x: torch.Tensor, dim: int, key: str) -> torch.Tensor:
    """S(dim) -> R for sharded consumers only: all-gather forward, reduce-scatter backward."""
    return _AllGatherRS.apply(x, dim, key)


def fxplan_r_to_p(x: torch.Tensor, key: str) -> torch.Tensor:
    """R -> P (e.g. a bias added to a row-parallel partial sum): position 0 keeps the value."""
    return _RToP.apply(x, key)


def fxplan_rows(x: torch.Tensor, dim: int, index: int, parts: int, bwd_key: str) -> torch.Tensor:
    """dp split refined locally: keep row block index/parts; backward all-gathers over bwd_key."""
    return _RowSlice.apply(x, dim, index, parts, bwd_key)


def fxplan_regroup_rows(x: torch.Tensor, dim: int, fwd_key: str, index: int, parts: int,
                        bwd_key: str) -> torch.Tensor:
    """dp split changed: all-gather rows over fwd_key, keep block index/parts; backward see _RowRegroup."""
    return _RowRegroup.apply(x, dim, fwd_key, index, parts, bwd_key)


def fxplan_dp_grad_fix(x: torch.Tensor, key: str, scale: float) -> torch.Tensor:
    """Identity forward; backward: all-reduce over `key` (consumer dp group), times `scale`."""
    return _DpGradFix.apply(x, key, scale)


def fxplan_fsdp_gather(shard: torch.Tensor, key: str, shape: tuple) -> torch.Tensor:
    """FSDP, one parameter: all-gather the flat shard over the dp group, view it as the tp-local `shape`."""
    return _FsdpGatherLayer.apply(key, (tuple(shape),), shard)[0]


def fxplan_fsdp_gather_layer(shards: list, key: str, shapes: tuple) -> tuple:
    """FSDP, one layer's parameters at once: the flat shards -> each parameter in its tp-local shape.

    One all-gather forward, one reduce-scatter (async, see _FsdpGatherLayer) backward."""
    return _FsdpGatherLayer.apply(key, tuple(tuple(s) for s in shapes), *shards)


COLLECTIVES = (fxplan_tp_f, fxplan_tp_all_reduce, fxplan_all_gather, fxplan_slice, fxplan_reduce_scatter,
               fxplan_all_to_all, fxplan_all_gather_rs, fxplan_r_to_p, fxplan_rows, fxplan_regroup_rows, fxplan_dp_grad_fix,
               fxplan_fsdp_gather, fxplan_fsdp_gather_layer)

# fx leaves if a module calling them is ever traced again.
for _fn in COLLECTIVES:
    torch.fx.wrap(_fn.__name__)
