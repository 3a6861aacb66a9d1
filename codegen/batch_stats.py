"""Training batch norms of a dp-split layer rewritten to synchronised batch norm over its dp group.

A batch norm in training mode normalises with its batch's statistics; under dp each rank holds
1/dp of the batch, so the rank program calls `GraphOps.sync_batch_norm` instead, whose forward
all-reduces the per-channel statistics and whose backward all-reduces their gradient terms
(the runtime's sync_batch_norm.py): every rank then computes what one device computes on the whole
batch, running statistics included. Microbatches are not synchronised (the planner keeps such
layers at one microbatch), so this is the only rewrite a batch-statistic op needs.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxplan.errors import UnsupportedOpError
from fxplan.passes.ir import batch_coupling_op

# argument order of each batch norm form the traces produce: aten's (export) and F.batch_norm (fx)
_ATEN = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
_FUNCTIONAL = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_ORDERS = {torch.ops.aten.batch_norm.default: _ATEN, torch.batch_norm: _ATEN, F.batch_norm: _FUNCTIONAL}
_DEFAULTS = {"weight": None, "bias": None, "running_mean": None, "running_var": None, "momentum": 0.1,
             "eps": 1e-5}


def needs_sync(node: fx.Node, dp: int) -> bool:
    """Whether `node` is a training batch norm in a layer whose batch dp splits."""
    return dp > 1 and bool(batch_coupling_op(node))


def sync_batch_norm(new: fx.Node, original: fx.Node, sync_fn, dp_key: str) -> None:
    """Point `new` (the emitted copy of `original`) at `sync_fn` with the statistics' dp group."""
    order = _ORDERS.get(original.target)
    if order is None or sync_fn is None:
        raise UnsupportedOpError(
            f"{original.name} ({batch_coupling_op(original)}) normalises with batch statistics and the plan splits "
            f"its batch over dp, but only aten.batch_norm / F.batch_norm can be synchronised across ranks; "
            f"pin dp=1, or use nn.BatchNorm (or a per-sample norm such as GroupNorm / LayerNorm)")
    named = dict(_DEFAULTS)
    named.update(zip(order, new.args))
    named.update({k: v for k, v in new.kwargs.items() if k in order})
    if named["momentum"] is None:
        raise UnsupportedOpError(f"{original.name}: batch norm with momentum=None (a cumulative average) cannot be "
                                 f"synchronised across ranks; give the BatchNorm a momentum or pin dp=1")
    new.target = sync_fn
    new.args = (named["input"], named["weight"], named["bias"], named["running_mean"], named["running_var"],
                float(named["momentum"]), float(named["eps"]), dp_key)
    new.kwargs = {}
