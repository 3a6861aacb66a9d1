"""torchrun worker: each rank's peak memory during a train step + Adam step, dp=4 vs dp=4+FSDP.

    MALLOC_MMAP_THRESHOLD_=65536 torchrun --standalone --nproc-per-node 4 tests/torchrun/workers/fsdp_memory_worker.py

Measured as peak resident memory (VmHWM, reset through /proc/self/clear_refs) above the RSS right
before distribute() (after planning). With glibc's mmap threshold pinned low (the environment above) every
tensor above 64 KiB is its own mapping, returned to the system when freed, so RSS follows the live
tensor bytes, including what autograd keeps inside C++ (saved tensors, gradient buffers, gloo's
staging) that a Python-side tensor census would miss. One step first allocates Adam's state; the
second step is the one measured. Prints `RESULT {json}` per rank and plan.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fxplan  # noqa: E402
from fxplan.models import build  # noqa: E402
from fxplan.runtime.process import init_default_group  # noqa: E402
from runtime_meta_worker import _reset_peak, _status  # noqa: E402
from fxplan.runtime.launch import say  # noqa: E402

# 12 blocks of hidden 384 (22 M parameters): weights, gradients and Adam state dominate as in a
# 210 M GPT (FXPLAN_MEMORY_SPEC="gpt:layers=16,hidden=1024,heads=16,seq=64,vocab=8192"), whose dp
# peak is 4 ranks x 3.3 GB: beside other jobs on a small CI host that one runs out of memory.
SPEC = os.environ.get("FXPLAN_MEMORY_SPEC", "gpt:layers=12,hidden=384,heads=6,seq=32,vocab=2048")
BATCH = 8
PLANS = {"dp4": dict(fsdp=False), "dp4-fsdp": dict(fsdp=True, reshard=True),
         "dp4-fsdp-keep": dict(fsdp=True, reshard=False)}


def measure(name: str) -> dict:
    start = time.perf_counter()
    model = build(SPEC, device="meta")
    example = model.example_batch(BATCH, device="meta")
    # Every field is pinned and memory is what this test measures: the planner's memory limit must
    # not refuse dp4 on a host whose 4 ranks share less RAM than the plan's estimate asks for.
    pins = fxplan.Constraints(pp=1, dp=4, tp=1, recompute=False, microbatches=2, **PLANS[name])
    roomy = dataclasses.replace(fxplan.Cluster.local(world_size=4), memory_bytes=64 * 2**30)
    compiled = fxplan.compile(model, example, cluster=roomy, constraints=pins,
                              verbose=False)
    planned = time.perf_counter()
    gc.collect()
    base = _status("VmRSS")  # what planning left behind (imports, solver) is no tensor of the step
    runner = compiled.distribute()
    distributed = time.perf_counter()
    opt = torch.optim.Adam(runner.parameters(), lr=1e-4)
    batch = model.example_batch(BATCH, device="cpu", generator=torch.Generator().manual_seed(3))
    losses = []
    for step in range(2):
        if step == 1:
            gc.collect()
            reset = _reset_peak()
            before = _status("VmRSS")
        opt.zero_grad(set_to_none=True)
        losses.append(float(runner.train_step(*batch)))
        opt.step()
    peak = _status("VmHWM") if reset else _status("VmRSS")
    seconds = {"plan": planned - start, "distribute": distributed - planned,
               "steps": time.perf_counter() - distributed}
    result = {"plan": name, "rank": dist.get_rank(), "peak": peak - base, "before": before - base,
              "reset": reset, "losses": losses, "local_numel": sum(p.numel() for p in runner.parameters()),
              "seconds": seconds, "estimate": compiled.plan.stages[0].estimated_memory_bytes,
              "strategies": sorted({str(s) for s in compiled.plan.stages[0].strategies.values()})}
    del runner, opt, compiled, model
    gc.collect()
    return result


def main() -> None:
    torch.set_num_threads(1)
    init_default_group()
    for name in (sys.argv[1] if len(sys.argv) > 1 else ",".join(PLANS)).split(","):
        rows: list = [None] * dist.get_world_size()
        dist.all_gather_object(rows, measure(name))  # one printer: lines of 4 ranks never interleave
        if dist.get_rank() == 0:
            for row in rows:
                say("RESULT " + json.dumps(row))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
