"""What FSDP keeps between a layer's collectives, per stage module (installed by the Runner).

ZeRO-3 (reshard after forward): a layer's gathered weights live only while its forward runs. Ops
that save a gathered weight for backward (a matmul keeps its weight to compute the input gradient)
are given a small `_Handle` instead, through `torch.autograd.graph.saved_tensors_hooks` active
during the stage's forward (what they do not take goes on to the enclosing hooks, outer_hooks.py);
in backward the first unpack of a layer re-gathers its unit once, every other unpack of that layer
reuses it, and the layer's reduce-scatter (fsdp.py) drops it. So at any
time a rank holds its shards plus one gathered layer (and the one being prefetched), not one full
copy per microbatch in flight.

Keep (reshard=False): the first forward of the step gathers the unit; every later microbatch reuses
it; `end_step` frees it. One gather per step.

Prefetch: the order in which a stage's forward gathers its units is the same on every rank of the
stage (one program), so it is learned once (`succ`): gathering unit u launches the next unit's
all-gather asynchronously before u's layer computes, and in backward re-gathering a layer launches
the re-gather of the layer gathered before it in that forward. Every rank of a group issues the
same collectives in the same order, which gloo requires. A gather outside the stage's forward (a
recompute region re-running forward in backward) runs plainly: no prefetch, no handles.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from fxplan.runtime.comm import Communicator
from fxplan.runtime.flat_ops import Pending, gather_flat
from fxplan.runtime.outer_hooks import SavedDuringForward, take_back


def launch_gather(comm: Communicator, key: str, shards, async_op: bool,
                  phase: str = "fwd") -> tuple[Pending, torch.Tensor]:
    """All-gather one unit's flat shards (member-major) -> (pending, flat buffer)."""
    flats = [s.detach().reshape(-1) for s in shards]
    mine = torch.cat(flats) if len(flats) > 1 else flats[0]
    out = mine.new_empty(comm.size(key) * mine.numel())
    pending = gather_flat(comm, out, mine, key, async_op=async_op)
    comm.record("all_gather", key, phase, out)
    if comm.observer is not None:
        pending = _Observed(pending, lambda: comm.waited("all_gather", key, phase, out))
    return pending, out


class _Observed:
    """A launched gather that tells the communicator's observer when it is waited for."""

    def __init__(self, pending: Pending, report):
        self.pending, self.report = pending, report

    def wait(self) -> None:
        self.pending.wait()
        if self.report is not None:
            report, self.report = self.report, None
            report()


def copy_out(out: torch.Tensor, n: int, shards, shapes) -> tuple[torch.Tensor, ...]:
    """Each parameter, in its tp-local shape, from the gathered member-major buffer."""
    blocks = [s.numel() for s in shards]
    grid = out.view(n, -1)
    fulls, offset = [], 0
    for block, shape in zip(blocks, shapes):
        flat = out if len(blocks) == 1 else grid[:, offset:offset + block].reshape(-1)  # the copy-out
        fulls.append(flat[:math.prod(shape)].view(shape))
        offset += block
    return tuple(fulls)


class _Unit:
    """One layer's FSDP parameters on one dp group (the same objects every step)."""

    def __init__(self, key: str, shapes, shards):
        self.key, self.shapes, self.shards = key, shapes, tuple(shards)

    def gather(self, comm: Communicator, async_op: bool = False, phase: str = "fwd"):
        pending, out = launch_gather(comm, self.key, self.shards, async_op, phase)
        return pending, lambda: copy_out(out, comm.size(self.key), self.shards, self.shapes)


class Gathered:
    """One forward's gather of a unit (ZeRO-3): what its backward re-gathers and when to drop it."""

    def __init__(self, state: "FsdpState", unit: _Unit, prev: "Gathered | None"):
        self.state, self.unit, self.prev = state, unit, prev
        self.packed = 0  # saved weights handed out as handles
        self.unpacked = 0  # of them, unpacked in backward: when all are, the re-gathered weights go
        self.fulls: tuple | None = None  # re-gathered in backward, until this layer's backward ends
        self.pending = None  # (Pending, copy-out) of a prefetched re-gather
        self.done = False

    def fulls_for_backward(self) -> tuple:
        """The re-gathered weights (again after the last unpack under retain_graph: a second pass)."""
        if self.fulls is None:
            pending, finish = self.pending or self.unit.gather(self.state.comm, phase="bwd")
            self.pending = None
            pending.wait()
            self.fulls = finish()
            prev = self.prev
            if prev is not None and prev.unpacked < prev.packed and not prev.done and prev.fulls is None \
                    and prev.pending is None:
                prev.pending = prev.unit.gather(self.state.comm, async_op=True, phase="bwd")
        return self.fulls

    def release(self) -> None:
        if self.pending is not None:  # prefetched but not needed after all: complete it, then drop
            self.pending[0].wait()
        self.fulls, self.pending, self.done = None, None, True


class _Handle:
    __slots__ = ("gathered", "index", "size", "stride", "offset")

    def __init__(self, gathered: Gathered, index: int, x: torch.Tensor, full: torch.Tensor):
        self.gathered, self.index = gathered, index
        self.size, self.stride, self.offset = x.size(), x.stride(), x.storage_offset() - full.storage_offset()


class FsdpState(SavedDuringForward):
    """FSDP's state for one stage module: its forward hooks, kept units, prefetches, handles."""

    def __init__(self, comm: Communicator, module: nn.Module):
        self.comm = comm
        self.units: dict[int, _Unit] = {}  # id(first shard) -> unit
        self.succ: dict[int, _Unit] = {}  # unit -> the unit the forward gathers after it
        self.pending: dict[int, tuple] = {}  # unit -> (Pending, copy-out) of a forward prefetch
        self.kept: dict[int, tuple] = {}  # unit -> gathered tensors, for the step (reshard=False)
        self.live: dict[int, tuple] = {}  # storage pointer -> (weakref of a gathered tensor, Gathered, index)
        self.last: tuple[int, Gathered | None] | None = None  # the forward's previous gather
        self._previous = None
        super().__init__(module)

    # ------------------------------------------------------------ the stage's forward
    def forward_began(self) -> None:
        self.last = None
        self._previous, self.comm.fsdp = self.comm.fsdp, self

    def forward_ended(self) -> None:
        self.comm.fsdp, self._previous = self._previous, None
        self.last = None
        self._drain()

    def _drain(self) -> None:
        for pending, _ in self.pending.values():  # complete every launched collective before dropping it
            pending.wait()
        self.pending.clear()

    def end_step(self) -> None:
        """The step is over (the optimizer may change the shards next): drop what was kept."""
        self._drain()
        self.kept.clear()
        self.live.clear()

    # ------------------------------------------------------------ one forward gather
    def gather(self, key: str, shapes, shards, keep: bool) -> tuple[tuple, Gathered | None]:
        uid = id(shards[0])
        unit = self.units.get(uid)
        if unit is None or unit.shards[0] is not shards[0]:
            unit = self.units[uid] = _Unit(key, shapes, shards)
        if self.last is not None:
            self.succ[self.last[0]] = unit
        if keep and uid in self.kept:
            fulls = self.kept[uid]
        else:
            pending, finish = self.pending.pop(uid, None) or unit.gather(self.comm)
            pending.wait()
            fulls = finish()
        nxt = self.succ.get(uid)
        if nxt is not None and id(nxt.shards[0]) not in self.pending and id(nxt.shards[0]) not in self.kept:
            self.pending[id(nxt.shards[0])] = nxt.gather(self.comm, async_op=True)
        if keep:
            self.kept[uid] = fulls
            self.last = (uid, None)
            return tuple(f.detach() for f in fulls), None
        gathered = Gathered(self, unit, self.last[1] if self.last is not None else None)
        self.last = (uid, gathered)
        for i, full in enumerate(fulls):
            if full.device.type != "meta":
                ptr = full.untyped_storage().data_ptr()
                self.live[ptr] = (weakref.ref(full, lambda _, ptr=ptr: self.live.pop(ptr, None)), gathered, i)
        return fulls, gathered

    # ------------------------------------------------------------ saved tensors
    def _save(self, x: torch.Tensor, full: torch.Tensor, entry: tuple):
        _, gathered, index = entry
        gathered.packed += 1
        return _Handle(gathered, index, x, full)

    @staticmethod
    def _unpack(saved):
        if not isinstance(saved, _Handle):
            return take_back(saved)
        gathered = saved.gathered
        full = gathered.fulls_for_backward()[saved.index]
        out = full.as_strided(saved.size, saved.stride, full.storage_offset() + saved.offset)
        gathered.unpacked += 1
        if gathered.unpacked == gathered.packed:  # the layer's last saved weight (a tied weight's
            gathered.fulls = None  # later user may come first): free it after this op's backward
        return out
