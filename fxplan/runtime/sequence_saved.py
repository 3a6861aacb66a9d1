"""What sequence parallelism keeps for backward, per stage module (installed by the Runner).

Under Megatron-SP a column-parallel matmul reads the all-gather of a sequence shard
(`fxplan_all_gather_rs`) and, left alone, autograd saves that gathered input whole on every tp rank:
the activation memory sequence parallelism is meant to divide stays. Here the gathered tensor is
saved as the shard it came from: while the stage's forward runs, `torch.autograd.graph.
saved_tensors_hooks` hand autograd a small `_Saved` (the shard plus the view's geometry) for any
saved tensor that lives in a gather's output; in backward the first unpack re-gathers it once
(an all-gather over the same tp group: every tp rank runs the same backward, so the collectives
pair), every other op that saved it reuses that copy, and the last one drops it. The cost model
prices the same (passes/sharding/shard_prop.py: the saved bytes /tp, one backward all-gather).

Hooks active further out (an FSDP stage's, a user's) still see every tensor (outer_hooks.py): the
ones not ours are passed to them, and for ours they see the shard, which is what is kept.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from fxplan.runtime import flat_ops as ops
from fxplan.runtime.outer_hooks import SavedDuringForward, pass_on, take_back
from fxplan.runtime.comm import Communicator


class _Gather:
    """One forward's gather of a sequence shard: what backward re-gathers, and when to drop it."""

    __slots__ = ("comm", "shard", "dim", "key", "packed", "unpacked", "full")

    def __init__(self, comm: Communicator, shard: torch.Tensor, dim: int, key: str):
        self.comm, self.shard, self.dim, self.key = comm, shard, dim, key
        self.packed = self.unpacked = 0
        self.full: torch.Tensor | None = None

    def full_for_backward(self, shard: torch.Tensor) -> torch.Tensor:
        if self.full is None:  # again after the last unpack under retain_graph: a second backward
            self.full = ops.all_gather(self.comm, shard, self.dim, self.key, "bwd")
        return self.full


class _Saved:
    __slots__ = ("gather", "shard", "size", "stride", "offset")

    def __init__(self, gather: _Gather, shard, x: torch.Tensor, full: torch.Tensor):
        self.gather, self.shard = gather, shard
        self.size, self.stride, self.offset = x.size(), x.stride(), x.storage_offset() - full.storage_offset()


class SequenceSaved(SavedDuringForward):
    """Saves gathered sequence shards as shards for one stage module's forward."""

    def __init__(self, comm: Communicator, module: nn.Module):
        self.comm = comm
        self.live: dict[int, tuple] = {}  # storage pointer -> (weakref of the gathered tensor, _Gather)
        self._previous: list = []
        super().__init__(module, exit_first=True)  # installed after an FSDP state: nests inside it

    def forward_began(self) -> None:
        self._previous.append(self.comm.sequence)
        self.comm.sequence = self

    def forward_ended(self) -> None:
        self.comm.sequence = self._previous.pop()
        self.live.clear()  # what was saved holds its _Gather; nothing new is saved after the forward

    def gathered(self, full: torch.Tensor, shard: torch.Tensor, dim: int, key: str) -> None:
        """`full` is the all-gather of `shard` along `dim` over `key`'s group (collectives.py)."""
        if full.device.type == "meta":
            return
        ptr = full.untyped_storage().data_ptr()
        self.live[ptr] = (weakref.ref(full), _Gather(self.comm, shard.detach(), dim, key))

    # ------------------------------------------------------------ saved tensors
    def _save(self, x: torch.Tensor, full: torch.Tensor, entry: tuple):
        gather = entry[1]
        gather.packed += 1
        return _Saved(gather, pass_on(self.outer(), gather.shard), x, full)

    @staticmethod
    def _unpack(saved):
        if not isinstance(saved, _Saved):
            return take_back(saved)
        shard = take_back(saved.shard)
        gather = saved.gather
        full = gather.full_for_backward(shard)
        out = full.as_strided(saved.size, saved.stride, full.storage_offset() + saved.offset)
        gather.unpacked += 1
        if gather.unpacked >= gather.packed:  # the last op that saved it: free the copy after its backward
            gather.full = None
        return out
