"""Per-rank program of bench/accuracy.py: every plan of one model shape, timed on the real ranks.

    torchrun --standalone --nproc-per-node N bench/accuracy_worker.py --model SPEC --batch B \
        --plans DIR --out FILE [--rounds 5 --steps 3]
    (DIR holds index.json and one Plan JSON per name; bench/accuracy.py writes them)

Every plan gets a runner; after a warm-up, rounds go over the plans in turn (so load changes on a
shared host spread over all plans), and each round times `steps` train_steps run back to back
between two barriers (steady state, as `estimated_iteration_s` means it; no optimizer step: the
gradients are dropped between steps). A plan's time is the median over rounds of the slowest
rank's time per step. Rank 0 writes {name: {"measured_s": ..., "rounds": [...]}}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def model_and_batch(spec: str, batch: int, seed: int = 0):
    from fxplan.models import build, example_batch

    torch.manual_seed(seed)
    model = build(spec, device="cpu")
    generator = torch.Generator().manual_seed(seed + 1)
    return model, tuple(example_batch(model, batch, generator=generator))


def timed_steps(runner, batch, steps: int) -> float:
    """Seconds per step of `steps` back-to-back train_steps, the slowest rank's."""
    params = list(runner.parameters())
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        loss = runner.train_step(*batch)
        for p in params:
            p.grad = None
    float(loss)
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed) / steps


def main() -> None:
    import copy

    import fxplan

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--plans", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with open(os.path.join(args.plans, "index.json")) as fh:
        names = json.load(fh)
    model, batch = model_and_batch(args.model, args.batch)
    world = int(os.environ["WORLD_SIZE"])
    cluster = fxplan.Cluster.local(world_size=world)
    runners = {}
    for name in names:
        with open(os.path.join(args.plans, f"{name}.json")) as fh:
            plan = fxplan.Plan.from_json(fh.read())
        compiled = fxplan.compile(copy.deepcopy(model), batch, cluster=cluster, plan=plan, verbose=False)
        runners[name] = compiled.distribute()
        timed_steps(runners[name], batch, 2)  # warm-up: first steps build pipelines, buffers
    rounds: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            rounds[name].append(timed_steps(runners[name], batch, args.steps))
    if dist.get_rank() == 0:
        out = {name: {"measured_s": statistics.median(ts), "rounds": ts} for name, ts in rounds.items()}
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
