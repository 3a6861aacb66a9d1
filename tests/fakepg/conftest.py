"""The fake process group the fakepg tests join: `fake_pg(rank, plan)` inits the fake backend as that
rank of the test module's WORLD and installs a communicator holding the plan's groups."""

import contextlib

import pytest
import torch.distributed as dist

from fxplan.codegen.groups import required_group_keys
from fxplan.runtime.comm import Communicator


@pytest.fixture
def fake_pg(request):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world = request.module.WORLD
    with contextlib.ExitStack() as installed:
        def start(rank, plan):
            """Join the fake group as `rank`; a communicator with the plan's groups, installed."""
            dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
            comm = installed.enter_context(Communicator().installed())
            comm.groups.create(required_group_keys(plan))
            return comm
        yield start
    if dist.is_initialized():
        dist.destroy_process_group()
