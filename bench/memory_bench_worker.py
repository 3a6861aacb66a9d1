"""Per-rank program of bench/memory_bench.py: each plan's measured peak beside its estimate.

    torchrun --standalone --nproc-per-node 4 bench/memory_bench_worker.py \
        --model gpt:layers=4,hidden=128,heads=4,seq=64,vocab=1024 --batch 16 --plans DIR

DIR holds FAMILY.json (Plan.to_json) per plan family. One torchrun per model runs every family and
then torch's DDP and FSDP2 (`fully_shard` per block + root) as checks of the measuring method.
Each contender is built inside a `memory_probe.Probe` (fxplan: the model on meta, `distribute()`
materialising this rank's shards; torch's: the seeded CPU model, then wrapped) and measured over
`--steps` training steps: forward + backward + gradient sync + Adam step + zero_grad. Rank 0 prints
one `RESULT {json}` line per contender with every rank's peak.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from memory_probe import Probe, train_steps  # noqa: E402
from runtime_bench_worker import ddp_contender, fsdp2_contender, model_and_batch  # noqa: E402
from fxplan.runtime.launch import say


def fxplan_contender(spec: str, batch, plan):
    import fxplan
    from fxplan.models import build

    model = build(spec, device="meta")
    compiled = fxplan.compile(model, batch, cluster=fxplan.Cluster.local(world_size=plan.world_size),
                              plan=plan, verbose=False)
    runner = compiled.distribute()
    return lambda: runner.train_step(*batch), list(runner.parameters()), runner


def measure(make, steps: int, breakdown: bool = False) -> list[int]:
    """Every rank's peak live tensor bytes over `steps` training steps of the contender make() builds
    (and, with `breakdown`, the live bytes at the peak by the ops that allocated them)."""
    gc.collect()
    dist.barrier()
    with Probe(breakdown) as probe:
        step, params, owner = make()
        with probe.measured():
            train_steps(step, params, steps)
        del step, params, owner
    out = [None] * dist.get_world_size()
    top = sorted(probe.breakdown.items(), key=lambda kv: -kv[1])[:12]
    dist.all_gather_object(out, dict(peak=probe.peak_bytes, start=probe.start_bytes, breakdown=top))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--plans", required=True)
    parser.add_argument("--families", required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--breakdown", action="store_true")
    args = parser.parse_args()
    import fxplan

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    model, batch = model_and_batch(args.model, args.batch)
    for family in args.families.split(","):
        with open(os.path.join(args.plans, f"{family}.json")) as fh:
            plan = fxplan.Plan.from_json(fh.read())
        peaks = measure(lambda: fxplan_contender(args.model, batch, plan), args.steps, args.breakdown)
        if dist.get_rank() == 0:
            say("RESULT " + json.dumps(dict(name=family, peaks=peaks)))
    for name, make in (("torch DDP", ddp_contender), ("torch FSDP2", fsdp2_contender)):
        peaks = measure(lambda: make(copy.deepcopy(model), batch)[:3], args.steps)
        if dist.get_rank() == 0:
            say("RESULT " + json.dumps(dict(name=name, peaks=peaks)))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
