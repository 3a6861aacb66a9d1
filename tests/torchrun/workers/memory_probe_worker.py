"""torchrun worker: bench/memory_probe.py's peak on a training run whose bytes are known by hand.

Each of 2 ranks trains the same bias-free MLP (3 x Linear(512, 512), fp32) on 2 rows with Adam,
summing gradients over the ranks in place (no buffers). Printed per rank as `RESULT {json}`:
the probe's live bytes when the measured stretch starts (the weights only: grads are None and
Adam's state does not exist yet), its peak over 2 steps, and a second probe whose measured
stretch allocates exactly one 4 MB tensor above the weights and frees a 2 MB tensor the probe
never saw allocated (ignored, not subtracted).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from memory_probe import Probe, train_steps  # noqa: E402
from fxplan.runtime.launch import say

WIDTH, DEPTH, ROWS = 512, 3, 2


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    x = torch.randn(ROWS, WIDTH)
    with Probe() as probe:
        model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(DEPTH)))

        def step():
            model(x).square().mean().backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)

        with probe.measured():
            train_steps(step, list(model.parameters()), steps=2)
    earlier = torch.empty(500_000)  # allocated before the probe, freed inside it: must not count
    with Probe() as second:
        kept = nn.Linear(WIDTH, WIDTH, bias=False)
        with second.measured():
            del earlier
            block = torch.empty(1_000_000)
            del block
    del kept
    say("RESULT " + json.dumps(dict(rank=dist.get_rank(), start=probe.start_bytes, peak=probe.peak_bytes,
                                      second_start=second.start_bytes, second_peak=second.peak_bytes)))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
