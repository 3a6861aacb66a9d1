"""torchrun worker for tests/test_runtime.py: setup errors, then rank 1 raising mid-step.

    torchrun --standalone --nproc-per-node 4 tests/torchrun/workers/runtime_fail_worker.py

Real plans through fxplan.compile. Prints `CHECK name rankR ok|no-error` lines per rank (a plan
for another world size; ranks holding different plans), then every rank runs one good pp=4 step
and rank 1 raises inside its stage's forward on the next: torchrun must end every rank, non-zero,
naming rank 1.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

import fxplan
from fxplan.runtime.process import init_default_group
from fxplan.errors import DistributedSetupError
from fxplan.models import build
from fxplan.runtime.launch import say

BATCH = 16


def check(name: str, fn) -> None:
    try:
        fn()
        say(f"CHECK {name} rank{dist.get_rank()} no-error")
    except DistributedSetupError as exc:
        say(f"CHECK {name} rank{dist.get_rank()} ok {exc}")


def main() -> None:
    torch.set_num_threads(1)
    init_default_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    # float regression targets: they cross every stage untouched, with no gradient sent back
    model = build("mlp:layers=4,hidden=16,in=8,out=2,loss=mse")
    batch = model.example_batch(BATCH, generator=torch.Generator().manual_seed(1))

    def compile_for(world_size, **pins):
        return fxplan.compile(model, batch, cluster=fxplan.Cluster.local(world_size=world_size),
                              constraints=fxplan.Constraints(**pins), verbose=False)

    check("world", lambda: compile_for(2, pp=2, microbatches=2).distribute())
    good = compile_for(world, pp=4, microbatches=4, schedule="1f1b")
    odd = good.plan if rank != 3 else dataclasses.replace(good.plan, microbatches=8)
    check("same-plan", lambda: fxplan.compile(model, batch, cluster=fxplan.Cluster.local(world_size=world),
                                              plan=odd, verbose=False).distribute())

    runner = good.distribute()
    loss = float(runner.train_step(*batch))  # one good step first
    say(f"GOOD rank{rank} {loss!r} {float(model(*batch))!r}")
    if rank == 1:
        def boom(module, args):
            raise RuntimeError("injected failure on purpose")
        runner.gm.register_forward_pre_hook(boom)
    say(f"STEP2 rank{rank}")
    float(runner.train_step(*batch))
    say(f"UNREACHED rank{rank}")


if __name__ == "__main__":
    main()
