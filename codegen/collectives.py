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
The step kinds come from fxplan.passes.redistribute (the single source of truth); emit.py maps them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.fx

from fxplan.codegen import groups

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


def _all_reduce(x: torch.Tensor, key: str, phase: str) -> torch.Tensor:
    _count("all_reduce", key, phase, x)
    y = x.detach().contiguous().clone()
    dist.all_reduce(y, group=groups.get(key))
    return y


def _all_gather(x: torch.Tensor, dim: int, key: str, phase: str) -> torch.Tensor:
    n = len(groups.ranks_of(key))
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=groups.get(key))
    out = torch.cat(parts, dim=dim)
    _count("all_gather", key, phase, out)
    return out


def _local_slice(x: torch.Tensor, dim: int, index: int, parts: int) -> torch.Tensor:
    size = x.shape[dim] // parts
    return x.narrow(dim, index * size, size).contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, key: str, phase: str) -> torch.Tensor:
    n = len(groups.ranks_of(key))
    pg = groups.get(key)
    _count("reduce_scatter", key, phase, x)
    if _backend(pg) == "gloo":  # gloo has no reduce_scatter: all-reduce, keep our piece
        y = x.detach().contiguous().clone()
        dist.all_reduce(y, group=pg)
        return _local_slice(y, dim, _me(key), n)
    chunks = [c.contiguous() for c in x.detach().chunk(n, dim=dim)]
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks, group=pg)
    return out


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


class _FsdpGather(torch.autograd.Function):
    """Flat 1/dp shard -> whole tp-local parameter; backward reduce-scatters (SUM) into the shard."""

    @staticmethod
    def forward(ctx, shard, key, shape):
        ctx.key = key
        flat = _all_gather(shard, 0, key, "fwd")
        numel = 1
        for s in shape:
            numel *= s
        ctx.padded = flat.numel()
        return flat[:numel].view(shape)

    @staticmethod
    def backward(ctx, grad):
        flat = grad.reshape(-1)
        if flat.numel() < ctx.padded:
            flat = torch.cat([flat, flat.new_zeros(ctx.padded - flat.numel())])
        return _reduce_scatter(flat, 0, ctx.key, "bwd"), None, None


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
    """FSDP: all-gather the flat shard over the dp group and view it as the tp-local `shape`."""
    return _FsdpGather.apply(shard, key, tuple(shape))


COLLECTIVES = (fxplan_tp_f, fxplan_tp_all_reduce, fxplan_all_gather, fxplan_slice, fxplan_reduce_scatter,
               fxplan_all_to_all, fxplan_all_gather_rs, fxplan_r_to_p, fxplan_rows, fxplan_regroup_rows, fxplan_dp_grad_fix,
               fxplan_fsdp_gather)

# fx leaves if a module calling them is ever traced again.
for _fn in COLLECTIVES:
    torch.fx.wrap(_fn.__name__)
