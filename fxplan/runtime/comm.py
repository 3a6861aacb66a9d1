"""The Communicator: everything the graph collectives need at run time, in one object.

It owns this job's process groups (key -> ProcessGroup), the world group of the loss all-reduce,
which flat native ops the backend supports, the asynchronous FSDP reduce-scatters not yet in .grad,
and an optional observer that counts every collective (tests, benchmarks), or also logs when each
is issued and waited for (`Timeline`).

Why one installed handle: emitted fx graphs call free functions with plain arguments
(`fxplan_tp_all_reduce(x, 'tp:0,1')`), so `gm.code` stays readable and graphs stay picklable; a
ProcessGroup cannot be a graph constant. The functions therefore find the communicator through
`current()`, the one slot the Runner (or a test) fills with `install()`; everything below the graph
functions receives the communicator as an argument.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from fxplan.codegen.groups import position_in, ranks_of
from fxplan.runtime.groups import ProcessGroups
from fxplan.runtime.process import collective_timeout


@dataclass
class Count:
    calls: int = 0
    nbytes: int = 0


class CollectiveCounter:
    """(kind, group key, phase "fwd"|"bwd"|"grad") -> calls and bytes moved while observing."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str], Count] = defaultdict(Count)

    def record(self, kind: str, key: str, phase: str, tensor: torch.Tensor) -> None:
        count = self.counts[(kind, key, phase)]
        count.calls += 1
        count.nbytes += tensor.numel() * tensor.element_size()

    def waited(self, kind: str, key: str, phase: str, tensor: torch.Tensor) -> None:
        """The runtime waited for a launched collective that fills `tensor` (counting ignores it)."""

    def snapshot(self) -> dict[tuple[str, str, str], Count]:
        return dict(self.counts)


class Timeline(CollectiveCounter):
    """A counter that also logs, with time.perf_counter_ns(), when each collective is issued and
    when the runtime waits for it: events (what "issue"|"wait", t_ns, kind, key, phase, buffer),
    an issue and its wait naming the same buffer (the data pointer of the tensor it fills)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, int, str, str, str, int]] = []

    def record(self, kind: str, key: str, phase: str, tensor: torch.Tensor) -> None:
        super().record(kind, key, phase, tensor)
        self.events.append(("issue", time.perf_counter_ns(), kind, key, phase, tensor.data_ptr()))

    def waited(self, kind: str, key: str, phase: str, tensor: torch.Tensor) -> None:
        self.events.append(("wait", time.perf_counter_ns(), kind, key, phase, tensor.data_ptr()))


class Communicator:
    """Process groups and collective state of one job (one default process group)."""

    def __init__(self, groups: ProcessGroups | None = None) -> None:
        self.groups = groups if groups is not None else ProcessGroups()
        self.world = dist.group.WORLD if dist.is_initialized() else None  # the default group it serves
        self.native: dict[tuple[str, str], bool] = {}  # (op, backend) -> the flat native op works
        # finishers of launched async FSDP reduce-scatters, run in order at the end of backward
        self.deferred: list[Callable[[], None]] = []
        self.observer: CollectiveCounter | None = None
        self.fsdp = None  # the FSDP state (fsdp_state.py) of the stage whose forward is running
        self.sequence = None  # its sequence-parallel saved shards (sequence_saved.py), the same way
        self._loss_group: dist.ProcessGroup | None = None

    # ------------------------------------------------------------ groups
    def group(self, key: str) -> dist.ProcessGroup:
        return self.groups.get(key)

    @staticmethod
    def size(key: str) -> int:
        return len(ranks_of(key))

    @staticmethod
    def me(key: str) -> int:
        """This rank's position among the key's members."""
        return position_in(key, dist.get_rank())

    def loss_group(self) -> dist.ProcessGroup:
        # A world group of its own for the async loss all-reduce, so it never queues behind (or
        # ahead of) other traffic on the default group. Made once: new_group is collective.
        if self._loss_group is None:
            self._loss_group = dist.new_group(list(range(dist.get_world_size())), timeout=collective_timeout())
        return self._loss_group

    # ------------------------------------------------------------ counting (off unless observed)
    def record(self, kind: str, key: str, phase: str, tensor: torch.Tensor) -> None:
        if self.observer is not None:
            self.observer.record(kind, key, phase, tensor)

    def waited(self, kind: str, key: str, phase: str, tensor: torch.Tensor) -> None:
        if self.observer is not None:
            self.observer.waited(kind, key, phase, tensor)

    @contextlib.contextmanager
    def observe(self, counter: CollectiveCounter | None = None) -> Iterator[CollectiveCounter]:
        """Count every collective run inside the block: `with comm.observe() as c: ...; c.snapshot()`."""
        counter = counter if counter is not None else CollectiveCounter()
        previous, self.observer = self.observer, counter
        try:
            yield counter
        finally:
            self.observer = previous

    def native_support(self) -> dict[tuple[str, str], bool]:
        """(op, backend) -> whether the native flat op was usable (filled as ops run)."""
        return dict(self.native)

    # ------------------------------------------------------------ asynchronous FSDP gradients
    def finish_deferred(self) -> None:
        """Finish every launched async FSDP reduce-scatter (queued as the end-of-backward callback;
        calling it again is a cheap no-op)."""
        while self.deferred:
            self.deferred.pop(0)()

    # ------------------------------------------------------------ the graph functions' handle
    def install(self) -> "Communicator":
        global _installed
        _installed = self
        return self

    @contextlib.contextmanager
    def installed(self) -> Iterator["Communicator"]:
        """Install for the block, then put back whatever was installed before (tests)."""
        global _installed
        previous, _installed = _installed, self
        try:
            yield self
        finally:
            _installed = previous

    @classmethod
    def for_default_group(cls) -> "Communicator":
        """The installed communicator if it serves the current default group, else a new one, installed.

        Process groups live as long as the default group and creating one is collective over the
        world, so the Runners of one job share them (every rank builds its Runners in one order).
        """
        comm = _installed
        if comm is None or comm.world is None or comm.world is not dist.group.WORLD:
            comm = cls().install()
        return comm


_installed: Communicator | None = None  # the one handle; see the module docstring


def current() -> Communicator:
    """The communicator the graph collectives run on. With none installed (a rank module run in a
    single process, e.g. a pure dp plan whose forward communicates nothing), a fresh one without
    groups: any collective that does need a group then says which one is missing."""
    return _installed if _installed is not None else Communicator()
