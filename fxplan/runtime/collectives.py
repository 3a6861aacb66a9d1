"""What emitted graphs call: one free function per graph collective, and GRAPH_OPS for codegen.

Each function takes the tensor, its static arguments and a group KEY (codegen/groups.py), so
`gm.code` reads e.g. `fxplan_tp_all_reduce(x, 'tp:0,1')` and graphs stay picklable. It runs on the
installed Communicator (comm.py explains why there is one handle) through an autograd Function
(autograd_ops.py, fsdp.py).

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
The step kinds come from fxplan.passes.sharding.redistribute (the single source of truth); codegen/emit.py
maps them onto GRAPH_OPS' fields.
"""

from __future__ import annotations

import torch
import torch.fx

from fxplan.codegen.emit import GraphOps
from fxplan.runtime import autograd_ops as F
from fxplan.runtime.comm import current
from fxplan.runtime.fsdp import FsdpGatherLayer
from fxplan.runtime.sync_batch_norm import SyncBatchNorm


def fxplan_tp_f(x: torch.Tensor, key: str) -> torch.Tensor:
    """Megatron f: identity forward, all-reduce of the gradient over the tp group."""
    return F.TpF.apply(x, current(), key)


def fxplan_tp_all_reduce(x: torch.Tensor, key: str) -> torch.Tensor:
    """Megatron g (P -> R): all-reduce forward, identity backward."""
    return F.TpG.apply(x, current(), key)


def fxplan_all_gather(x: torch.Tensor, dim: int, key: str) -> torch.Tensor:
    """S(dim) -> R: all-gather along dim; backward keeps the local slice."""
    return F.AllGather.apply(x, current(), dim, key)


def fxplan_slice(x: torch.Tensor, dim: int, key: str) -> torch.Tensor:
    """R -> S(dim): keep our slice; backward all-gathers the gradient."""
    return F.Slice.apply(x, current(), dim, key)


def fxplan_reduce_scatter(x: torch.Tensor, dim: int, key: str) -> torch.Tensor:
    """P -> S(dim): reduce-scatter; backward all-gathers the gradient."""
    return F.ReduceScatter.apply(x, current(), dim, key)


def fxplan_all_to_all(x: torch.Tensor, src_dim: int, dst_dim: int, key: str) -> torch.Tensor:
    """S(src_dim) -> S(dst_dim) over the tp group."""
    return F.AllToAll.apply(x, current(), src_dim, dst_dim, key)


def fxplan_all_gather_rs(x: torch.Tensor, dim: int, key: str) -> torch.Tensor:
    """S(dim) -> R for sharded consumers only: all-gather forward, reduce-scatter backward. Ops that
    save the result for backward keep the shard instead (sequence_saved.py)."""
    comm = current()
    full = F.AllGatherRS.apply(x, comm, dim, key)
    if comm.sequence is not None:
        comm.sequence.gathered(full, x, dim, key)
    return full


def fxplan_r_to_p(x: torch.Tensor, key: str) -> torch.Tensor:
    """R -> P (e.g. a bias added to a row-parallel partial sum): position 0 keeps the value."""
    return F.RToP.apply(x, current(), key)


def fxplan_rows(x: torch.Tensor, dim: int, index: int, parts: int, bwd_key: str) -> torch.Tensor:
    """dp split refined locally: keep row block index/parts; backward all-gathers over bwd_key."""
    return F.RowSlice.apply(x, current(), dim, index, parts, bwd_key)


def fxplan_regroup_rows(x: torch.Tensor, dim: int, fwd_key: str, index: int, parts: int,
                        bwd_key: str) -> torch.Tensor:
    """dp split changed: all-gather rows over fwd_key, keep block index/parts; backward see RowRegroup."""
    return F.RowRegroup.apply(x, current(), dim, fwd_key, index, parts, bwd_key)


def fxplan_dp_grad_fix(x: torch.Tensor, key: str, scale: float) -> torch.Tensor:
    """Identity forward; backward: all-reduce over `key` (consumer dp group), times `scale`."""
    return F.DpGradFix.apply(x, current(), key, scale)


def fxplan_fsdp_gather_layer(shards: list, key: str, shapes: tuple, keep: bool = False) -> tuple:
    """FSDP, one layer's parameters at once: the flat shards -> each parameter in its tp-local shape.

    All-gather in forward (keep: once per step, fsdp_state.py), one reduce-scatter (async, see
    fsdp.py) backward."""
    return FsdpGatherLayer.apply(current(), key, tuple(tuple(s) for s in shapes), bool(keep), *shards)


def fxplan_sync_batch_norm(x, weight, bias, running_mean, running_var, momentum: float, eps: float,
                           key: str) -> torch.Tensor:
    """Training batch norm over the whole dp group `key`: statistics all-reduced forward, their
    gradient terms all-reduced backward (sync_batch_norm.py)."""
    return SyncBatchNorm.apply(x, weight, bias, running_mean, running_var, momentum, eps, current(), key)


GRAPH_OPS = GraphOps(
    tp_f=fxplan_tp_f, tp_all_reduce=fxplan_tp_all_reduce, all_gather=fxplan_all_gather, slice=fxplan_slice,
    reduce_scatter=fxplan_reduce_scatter, all_to_all=fxplan_all_to_all, all_gather_rs=fxplan_all_gather_rs,
    r_to_p=fxplan_r_to_p, rows=fxplan_rows, regroup_rows=fxplan_regroup_rows, dp_grad_fix=fxplan_dp_grad_fix,
    fsdp_gather_layer=fxplan_fsdp_gather_layer, sync_batch_norm=fxplan_sync_batch_norm)

# fx leaves if a module calling them is ever traced again.
for _fn in (fxplan_tp_f, fxplan_tp_all_reduce, fxplan_all_gather, fxplan_slice, fxplan_reduce_scatter,
            fxplan_all_to_all, fxplan_all_gather_rs, fxplan_r_to_p, fxplan_rows, fxplan_regroup_rows,
            fxplan_dp_grad_fix, fxplan_fsdp_gather_layer, fxplan_sync_batch_norm):
    torch.fx.wrap(_fn.__name__)
