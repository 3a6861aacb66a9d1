"""Plain collectives on tensors (no autograd): flat native all-gather / reduce-scatter with an
emulation, and the tensor-level ops the autograd Functions (autograd_ops.py) are made of.

One flat buffer per collective: `all_gather_into_tensor` / `reduce_scatter_tensor` (spelled
`*_single` from torch 2.13, where gloo implements both). Where a backend lacks one (gloo on older
torch) the first call raises "... not support ..." before any communication, on every rank alike
(same torch, same backend): the communicator remembers that and we emulate (list all-gather;
all-reduce + slice). Every op taking a `phase` reports itself to the communicator's observer.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from fxplan.runtime.comm import Communicator


def _gather_into(*args, **kwargs):  # looked up per call, so profilers that wrap dist.* see it
    return (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(*args, **kwargs)


def _reduce_scatter_into(*args, **kwargs):
    return (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(*args, **kwargs)


def _backend(pg: dist.ProcessGroup) -> str:
    try:
        return str(dist.get_backend(pg)).lower()
    except Exception:  # noqa: BLE001 - unknown backends behave like nccl (all ops supported)
        return ""


class Pending:
    """A launched collective; `wait()` blocks until its output buffer holds the result."""

    def __init__(self, work=None, finish: Callable[[], None] | None = None, keep: tuple = ()):
        self._work, self._finish, self._keep = work, finish, keep  # keep: buffers alive until done

    def wait(self) -> None:
        if self._work is not None:
            self._work.wait()
            self._work = None
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish()
        self._keep = ()


_UNSUPPORTED = object()


def _native(comm: Communicator, op: str, pg: dist.ProcessGroup, call: Callable):
    backend = _backend(pg)
    if comm.native.get((op, backend)) is False:
        return _UNSUPPORTED
    try:
        work = call()
    except (RuntimeError, NotImplementedError) as exc:
        if comm.native.get((op, backend)) or "support" not in str(exc).lower():
            raise  # a real failure, not a missing op
        comm.native[(op, backend)] = False
        return _UNSUPPORTED
    comm.native[(op, backend)] = True
    return work


def gather_flat(comm: Communicator, out: torch.Tensor, x: torch.Tensor, key: str,
                async_op: bool = False) -> Pending:
    """out (flat, n * x.numel()) <- every member's x (flat), in key order. No autograd, no count."""
    pg = comm.group(key)
    x = x.contiguous()
    work = _native(comm, "all_gather", pg, lambda: _gather_into(out, x, group=pg, async_op=async_op))
    if work is _UNSUPPORTED:
        n = comm.size(key)
        work = dist.all_gather(list(out.view(n, -1).view((n,) + tuple(x.shape)).unbind(0)), x, group=pg,
                               async_op=async_op)
    return Pending(work if async_op else None, keep=(out, x))


def reduce_scatter_flat(comm: Communicator, out: torch.Tensor, x: torch.Tensor, key: str,
                        async_op: bool = False) -> Pending:
    """out (flat) <- block `me` of the SUM over members of x (flat, n blocks of out's size)."""
    pg = comm.group(key)
    x = x.contiguous()
    work = _native(comm, "reduce_scatter", pg, lambda: _reduce_scatter_into(out, x, group=pg, async_op=async_op))
    if work is not _UNSUPPORTED:
        return Pending(work if async_op else None, keep=(out, x))
    n = comm.size(key)
    total = x.clone()
    work = dist.all_reduce(total, group=pg, async_op=async_op)

    def finish():
        out.copy_(total.view((n,) + tuple(out.shape))[comm.me(key)])
    if not async_op:
        finish()
        return Pending()
    return Pending(work, finish, keep=(out, total))


# ---------------------------------------------------------------- tensor ops (what autograd wraps)


def all_reduce(comm: Communicator, x: torch.Tensor, key: str, phase: str) -> torch.Tensor:
    comm.record("all_reduce", key, phase, x)
    y = x.detach().contiguous().clone()
    dist.all_reduce(y, group=comm.group(key))
    return y


def all_gather(comm: Communicator, x: torch.Tensor, dim: int, key: str, phase: str) -> torch.Tensor:
    n = comm.size(key)
    x = x.detach().contiguous()
    flat = x.new_empty(n * x.numel())  # member i's piece is the i-th block: one flat native gather
    gather_flat(comm, flat, x.reshape(-1), key).wait()
    stacked = flat.view((n,) + tuple(x.shape))
    out = stacked.view((n * x.shape[0],) + tuple(x.shape[1:])) if dim == 0 and x.dim() else \
        torch.cat(stacked.unbind(0), dim=dim)
    comm.record("all_gather", key, phase, out)
    return out


def local_slice(x: torch.Tensor, dim: int, index: int, parts: int) -> torch.Tensor:
    size = x.shape[dim] // parts
    return x.narrow(dim, index * size, size).contiguous()


def my_slice(comm: Communicator, x: torch.Tensor, dim: int, key: str, phase: str) -> torch.Tensor:
    """This rank's block along dim of a tensor every member of `key` holds whole (no communication)."""
    return local_slice(x, dim, comm.me(key), comm.size(key))


def reduce_scatter(comm: Communicator, x: torch.Tensor, dim: int, key: str, phase: str) -> torch.Tensor:
    n = comm.size(key)
    comm.record("reduce_scatter", key, phase, x)
    # member j's chunk along dim must be the j-th contiguous block of the flat input
    moved = x.detach().movedim(dim, 0).contiguous()
    out = moved.new_empty((moved.shape[0] // n,) + tuple(moved.shape[1:]))
    reduce_scatter_flat(comm, out.view(-1), moved.view(-1), key).wait()
    return out.movedim(0, dim).contiguous()


def all_to_all(comm: Communicator, x: torch.Tensor, src_dim: int, dst_dim: int, key: str,
               phase: str) -> torch.Tensor:
    """Local piece S(src_dim) -> S(dst_dim): send chunk j of dst_dim to member j, stack on src_dim."""
    n = comm.size(key)
    pg = comm.group(key)
    comm.record("all_to_all", key, phase, x)
    x = x.detach()
    if _backend(pg) == "gloo":  # gloo has no all_to_all: gather everything, keep what we need
        parts = [torch.empty_like(x.contiguous()) for _ in range(n)]
        dist.all_gather(parts, x.contiguous(), group=pg)
        full = torch.cat(parts, dim=src_dim)
        return local_slice(full, dst_dim, comm.me(key), n)
    send = [c.contiguous() for c in x.chunk(n, dim=dst_dim)]
    recv = [torch.empty_like(send[0]) for _ in range(n)]
    dist.all_to_all(recv, send, group=pg)
    return torch.cat(recv, dim=src_dim)
