"""The process groups of one job: group key (codegen/groups.py) -> torch ProcessGroup.

Owned by a Communicator (comm.py). Every rank must create the same groups in the same order
(`dist.new_group` is collective over the whole world): call `create` with the same list everywhere.
"""

from __future__ import annotations

from typing import Sequence

import torch.distributed as dist

from fxplan.codegen.groups import canonical_ranks
from fxplan.errors import DistributedSetupError
from fxplan.runtime.process import collective_timeout


class ProcessGroups:
    """key -> ProcessGroup; keys naming the same rank set share one group."""

    def __init__(self) -> None:
        self._by_ranks: dict[tuple[int, ...], dist.ProcessGroup] = {}

    def register(self, key: str, pg: dist.ProcessGroup) -> None:
        self._by_ranks[canonical_ranks(key)] = pg

    def get(self, key: str) -> dist.ProcessGroup:
        """The ProcessGroup for `key`; the whole world falls back to the default group."""
        ranks = canonical_ranks(key)
        pg = self._by_ranks.get(ranks)
        if pg is not None:
            return pg
        if dist.is_available() and dist.is_initialized() and ranks == tuple(range(dist.get_world_size())):
            return dist.group.WORLD
        raise DistributedSetupError(
            f"no process group for {key!r}: create the plan's groups first "
            f"(communicator.groups.create(required_group_keys(plan))) on every rank")

    def create(self, keys: Sequence[str]) -> None:
        """dist.new_group for every key not yet registered; call with the same list on every rank."""
        world = tuple(range(dist.get_world_size()))
        for key in keys:
            ranks = canonical_ranks(key)
            if len(ranks) < 2 or ranks in self._by_ranks:
                continue
            self._by_ranks[ranks] = dist.group.WORLD if ranks == world else \
                dist.new_group(list(ranks), timeout=collective_timeout())
