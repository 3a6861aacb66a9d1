"""torchrun worker for tests/torchrun/test_distribute_memory.py: what distribute() of a META model allocates.

    torchrun --standalone --nproc-per-node 4 tests/torchrun/workers/distribute_memory_worker.py

A GPT built on meta is distributed under several plans; bench/memory_probe.py (peak live tensor
bytes from the profiler's allocation events) measures each distribute(). Rank 0 prints
`RESULT {json}` per plan with every rank's peak, the bytes of the shards it ends up holding, and
the largest module's own tensors (what materialising one module at a time needs beside them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(HERE))), "bench"))

import fxplan  # noqa: E402
from fxplan._torch import own_buffers, own_parameters  # noqa: E402
from fxplan.models import build  # noqa: E402
from fxplan.runtime.launch import say  # noqa: E402
from memory_probe import Probe  # noqa: E402
from runtime_matrix_worker import real_tp  # noqa: E402

SPEC = "gpt:layers=4,hidden=256,heads=4,seq=16,vocab=1024"
PLANS = {
    "dp4-fsdp": dict(pp=1, dp=4, tp=1, fsdp=True),
    "dp2xtp2": dict(pp=1, dp=2, tp=2, fsdp=False),
    "pp2xdp2-fsdp": dict(pp=2, dp=2, tp=1, fsdp=True, microbatches=2),
}


def largest_module_bytes(model) -> int:
    return max(sum(t.numel() * t.element_size() for t in list(own_parameters(m).values()) +
                   list(own_buffers(m).values()) if t is not None) for m in model.modules())


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = build(SPEC, device="meta")
    example = model.example_batch(8, device="meta")
    cluster = fxplan.Cluster.local(world_size=4)
    for name, constraints in PLANS.items():
        compiled = fxplan.compile(model, example, cluster=cluster, verbose=False,
                                  constraints=fxplan.Constraints(**constraints))
        if constraints["tp"] > 1:
            compiled = fxplan.compile(model, example, cluster=cluster, plan=real_tp(compiled), verbose=False)
        with Probe() as probe:
            with probe.measured():
                runner = compiled.distribute()
        held = sum(t.numel() * t.element_size() for t in list(runner.gm.parameters()) + list(runner.gm.buffers()))
        mine = {"rank": dist.get_rank(), "peak": probe.peak_bytes, "held": held}
        ranks: list = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
        if dist.get_rank() == 0:
            full = sum(p.numel() * p.element_size() for p in model.parameters())
            say("RESULT " + json.dumps({"plan": name, "ranks": ranks, "full_bytes": full,
                                        "largest_module_bytes": largest_module_bytes(model),
                                        "strategies": sorted({str(s) for st in compiled.plan.stages
                                                              for s in st.strategies.values()})}))
        del runner
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
