"""torchrun worker: a META-device GPT distributes under dp=2 x tp=2 and trains.

    torchrun --standalone --nproc-per-node 4 tests/torchrun/workers/runtime_meta_worker.py

The model (about 110 M parameters, 440 MB in fp32) is built on the meta device; distribute() must
allocate only this rank's shards (tp halves every matrix), one module at a time. We measure the
rank's peak RSS during distribute() (peak counter reset through /proc/self/clear_refs) and print
`RESULT {json}` per rank with the peak growth, the local numel and the losses of two SGD steps.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fxplan  # noqa: E402
from fxplan.models import build  # noqa: E402
from runtime_matrix_worker import real_tp  # noqa: E402
from fxplan.runtime.launch import say

SPEC = "gpt:layers=8,hidden=1024,heads=8,seq=16,vocab=8192"


def _status(field: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS: now, VmHWM: peak since the last reset)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def main() -> None:
    torch.set_num_threads(1)
    model = build(SPEC, device="meta")
    full_numel = sum(p.numel() for p in model.parameters())
    example = model.example_batch(8, device="meta")
    cluster = fxplan.Cluster.local(world_size=4)
    base = fxplan.compile(model, example, cluster=cluster, verbose=False,
                          constraints=fxplan.Constraints(pp=1, dp=2, tp=2, fsdp=False, microbatches=1))
    compiled = fxplan.compile(model, example, cluster=cluster, plan=real_tp(base), verbose=False)
    import gc

    gc.collect()
    reset = _reset_peak()
    before = _status("VmRSS")
    runner = compiled.distribute()
    peak = _status("VmHWM") if reset else _status("VmRSS")
    local = [p for p in runner.parameters()]
    assert all(not p.is_meta for p in local)
    opt = torch.optim.SGD(local, lr=0.5)
    batch = model.example_batch(8, device="cpu", generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(2):
        opt.zero_grad()
        losses.append(float(runner.train_step(*batch)))
        opt.step()
    result = {"rank": dist.get_rank(), "full_numel": full_numel, "full_bytes": full_numel * 4,
              "local_numel": sum(p.numel() for p in local), "peak_growth": peak - before, "peak_reset": reset,
              "losses": losses, "strategies": {n: str(s) for st in compiled.plan.stages
                                               for n, s in st.strategies.items()}}
    say("RESULT " + json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
