"""Per-rank program of bench/schedule_bubble.py: one pipeline (pp = world, m = 3p) of equal MLP
blocks under every schedule. The schedules take turns in rounds (a round: each schedule for several
chained steps), so a burst of load on the shared host hits every schedule alike; rank 0 prints
`RESULT {json}` per schedule with, per round, the steady-state step time and each rank's busy
seconds, pass times per kind and time inside the schedule's own window."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxplan  # noqa: E402
from fxplan.runtime.launch import say  # noqa: E402


class Blocks(nn.Module):
    def __init__(self, n: int, width: int):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(n))

    def forward(self, x, y):
        for block in self.blocks:
            x = block(x)
        return F.mse_loss(x, y)


def runner_for(schedule: str, p: int, width: int, rows: int, depth: int):
    m = 3 * p
    torch.manual_seed(0)
    model = Blocks(depth * p, width)
    batch = (torch.randn(m * rows, width), torch.randn(m * rows, width))
    compiled = fxplan.compile(model, batch, cluster=fxplan.Cluster.local(world_size=p), verbose=False,
                              constraints=fxplan.Constraints(pp=p, dp=1, tp=1, fsdp=False, recompute=False,
                                                             microbatches=m, schedule=schedule))
    return compiled.distribute(), batch


def one_round(runner, batch, steps: int) -> dict:
    """`steps` chained train_steps (no wait on the loss in between); this rank's figures."""
    busy: dict[str, float] = {}
    counts: dict[str, int] = {}
    inside = 0.0
    dist.barrier()
    start = time.perf_counter()
    loss = None
    for _ in range(steps):
        loss = runner.train_step(*batch)
        pipe = runner._pipe
        inside += pipe.window[1] - pipe.window[0]
        for kind, s in pipe.busy.items():
            busy[kind] = busy.get(kind, 0.0) + s
            counts[kind] = counts.get(kind, 0) + pipe.counts[kind]
    float(loss)
    elapsed = time.perf_counter() - start
    return {"rank": dist.get_rank(), "elapsed": elapsed, "busy": sum(busy.values()) / steps,
            "inside": inside / steps, "mean": {k: busy[k] / counts[k] for k in busy},
            "events": runner._pipe.events}  # the last step's timeline (one clock for all ranks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schedules", default="gpipe,1f1b,interleaved-1f1b,zb-h1,zb-h2,zb-auto,zbv")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2, help="blocks per stage")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from fxplan.runtime.process import init_default_group

    init_default_group()
    p = dist.get_world_size()
    names = args.schedules.split(",")
    runners = {name: runner_for(name, p, args.width, args.rows, args.depth) for name in names}
    for runner, batch in runners.values():
        for _ in range(args.warmup):
            float(runner.train_step(*batch))
    rounds: dict[str, list] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name, (runner, batch) in runners.items():
            every: list = [None] * p
            dist.all_gather_object(every, one_round(runner, batch, args.steps))
            rounds[name].append({"step_s": max(r["elapsed"] for r in every) / args.steps, "ranks": every})
    if dist.get_rank() == 0:
        for name in names:
            say("RESULT " + json.dumps({"schedule": name, "pp": p, "microbatches": 3 * p, "steps": args.steps,
                                        "rounds": rounds[name]}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
