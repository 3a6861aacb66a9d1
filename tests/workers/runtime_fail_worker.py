"""torchrun worker for tests/test_runtime.py: setup errors, then rank 1 raising mid-step.

    torchrun --standalone --nproc-per-node 4 tests/workers/runtime_fail_worker.py

Prints `CHECK name ok|message` lines per rank, then every rank starts a pp=4 step and rank 1
raises inside its stage's forward: torchrun must end every rank, non-zero, naming rank 1.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import runtime_standin as standin  # noqa: E402  (STAND-IN for codegen/emit)
from runtime_worker import BATCH, batches, build  # noqa: E402

from fxplan.codegen.runtime import Runner, init_default_group  # noqa: E402
from fxplan.errors import DistributedSetupError  # noqa: E402


def check(name: str, fn) -> None:
    try:
        fn()
        print(f"CHECK {name} rank{dist.get_rank()} no-error", flush=True)
    except DistributedSetupError as exc:
        print(f"CHECK {name} rank{dist.get_rank()} ok {exc}", flush=True)


def main() -> None:
    torch.set_num_threads(1)
    init_default_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    model, layers = build("mlp")
    small = standin.make_plan(layers, 2, 2, 2, "gpipe", batch=BATCH)
    check("world", lambda: Runner(standin.compiled(model, small), _codegen=standin.codegen()))
    odd = standin.make_plan(layers, world, 4, 4 if rank != 3 else 2, "gpipe", batch=BATCH)
    check("same-plan", lambda: Runner(standin.compiled(model, odd), _codegen=standin.codegen()))

    plan = standin.make_plan(layers, world, 4, 4, "1f1b", batch=BATCH)
    runner = Runner(standin.compiled(model, plan), _codegen=standin.codegen())
    batch = batches("mlp")[0]
    loss = float(runner.train_step(*batch))  # one good step first (float targets cross every stage)
    print(f"GOOD rank{rank} {loss!r} {float(model(*batch))!r}", flush=True)
    if rank == 1:
        def boom(module, args):
            raise RuntimeError("injected failure on purpose")
        runner.gm.register_forward_pre_hook(boom)
    print(f"STEP2 rank{rank}", flush=True)
    float(runner.train_step(*batch))
    print(f"UNREACHED rank{rank}", flush=True)


if __name__ == "__main__":
    main()
