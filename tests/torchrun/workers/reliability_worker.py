"""torchrun worker for tests/torchrun/test_reliability.py: ranks that disagree, ranks out of step,
a caught exception on one stage, a rank killed mid-step.

    torchrun --standalone --nproc-per-node 4 reliability_worker.py agree|caught TIMEOUT_S|kill

agree:  each check prints `CHECK name rankR DistributedSetupError <message>` (or `no-error`), the last
        one rank 1 passing another batch to train_step; then rank 2 skips one iteration of a 3-step
        loop and every rank prints `LOCKSTEP rankR <message>`.
caught: rank 2 (stage 1) raises inside forward on step 2, catches it and goes on: every rank must
        end (non-zero) soon after distribute(timeout_s=TIMEOUT_S), well before the default timeout.
kill:   rank 3 SIGKILLs itself inside forward on step 2 (run with two torchrun agents).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

import fxplan
from fxplan.models import build
from fxplan.runtime.process import init_default_group
from fxplan.runtime.launch import say

SPEC = "mlp:layers=4,hidden=16,in=8,out=4"
CLUSTER = fxplan.Cluster.preset("a100-80g", nodes=1, devices_per_node=4)
PINS = dict(pp=2, dp=2, tp=1, fsdp=False, recompute=False, microbatches=2, schedule="gpipe")


def seeded(spec=SPEC, seed=0, device=None):
    torch.manual_seed(seed)
    return build(spec, device=device) if device else build(spec)


def check(name, fn):
    rank = dist.get_rank()
    try:
        fn()
        say(f"CHECK {name} rank{rank} no-error")
    except fxplan.DistributedSetupError as exc:
        say(f"CHECK {name} rank{rank} DistributedSetupError {exc}")
    dist.barrier()


def distribute(model, batch, pins=PINS, **kwargs):
    return fxplan.compile(model, batch, cluster=CLUSTER, constraints=fxplan.Constraints(**pins),
                          verbose=False).distribute(**kwargs)


def agree(rank):
    model = seeded()
    batch = model.example_batch(8, generator=torch.Generator().manual_seed(1))
    check("pins", lambda: distribute(model, batch, {**PINS, "microbatches": 4} if rank == 1 else PINS))
    other = model.example_batch(16 if rank == 2 else 8, generator=torch.Generator().manual_seed(1))
    check("batch", lambda: distribute(model, other))
    check("weights", lambda: distribute(seeded(seed=100 + rank), batch))
    bigger = seeded("mlp:layers=4,hidden=32,in=8,out=4") if rank == 3 else model
    check("structure", lambda: distribute(bigger, batch))
    meta = seeded(seed=100 + rank, device="meta")  # a meta model's weights agree by construction
    check("meta-unseeded", lambda: distribute(meta, model.example_batch(8, device="meta")))
    runner = distribute(model, batch)
    mine = batch if rank != 1 else model.example_batch(8, generator=torch.Generator().manual_seed(7))
    check("train-batch", lambda: float(runner.train_step(*mine)))  # every rank refuses before any work
    start = time.monotonic()
    try:
        for i in range(3):
            if rank == 2 and i == 1:
                continue  # this rank skips an iteration
            float(runner.train_step(*batch))
        say(f"LOCKSTEP rank{rank} finished its loop")
        time.sleep(3)  # hold on: the others find this rank behind
    except fxplan.DistributedSetupError as exc:
        say(f"LOCKSTEP rank{rank} {time.monotonic() - start:.1f}s {exc}")


def caught(rank):
    model = seeded()
    batch = model.example_batch(8, generator=torch.Generator().manual_seed(1))
    runner = distribute(model, batch, timeout_s=float(sys.argv[2]))  # after compile() joined the group
    state = {"step": 0}

    def fail_on_step_two(module, args):
        if state["step"] == 2:
            raise RuntimeError("injected failure on purpose")

    if rank == 2:
        runner.gm.register_forward_pre_hook(fail_on_step_two)
    say(f"READY rank{rank} {time.time():.3f}")
    for step in range(1, 5):
        state["step"] = step
        try:
            float(runner.train_step(*batch))
        except RuntimeError as exc:
            if rank != 2 or not _injected(exc):
                raise
            say(f"CAUGHT rank{rank} step{step}: going on")


def _injected(exc) -> bool:
    while exc is not None:  # torch's pipelining re-raises a stage's error from its own
        if "injected" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def kill(rank):
    model = seeded()
    batch = model.example_batch(8, generator=torch.Generator().manual_seed(1))
    runner = distribute(model, batch)
    state = {"step": 0}
    if rank == 3:
        runner.gm.register_forward_pre_hook(
            lambda module, args: os.kill(os.getpid(), signal.SIGKILL) if state["step"] == 2 else None)
    say(f"READY rank{rank} {time.time():.3f}")
    for step in range(1, 5):
        state["step"] = step
        float(runner.train_step(*batch))


def main():
    torch.set_num_threads(1)
    init_default_group()
    {"agree": agree, "caught": caught, "kill": kill}[sys.argv[1]](dist.get_rank())


if __name__ == "__main__":
    main()
