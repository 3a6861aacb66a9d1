"""torchrun worker: the real compile -> emit -> Runner path against one device, several pins.

    torchrun --standalone --nproc-per-node 4 tests/workers/runtime_e2e_worker.py --pins "pp=2;tp=2"
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from runtime_worker import LR, batches, build  # noqa: E402

import fxplan  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt")
    parser.add_argument("--pins", default="pp=2;tp=2;pp=1,fsdp=true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for pins in args.pins.split(";"):
        model, _ = build(args.model)
        reference = copy.deepcopy(model)
        data = batches(args.model)
        compiled = fxplan.compile(model, data[0], cluster=fxplan.Cluster.local(world_size=dist.get_world_size()
                                  if dist.is_initialized() else int(os.environ["WORLD_SIZE"])),
                                  constraints=fxplan.Constraints.parse(pins), verbose=False)
        runner = compiled.distribute()
        opt = torch.optim.SGD(runner.parameters(), lr=LR)
        ref_opt = torch.optim.SGD(reference.parameters(), lr=LR)
        losses, ref_losses = [], []
        for batch in data:
            opt.zero_grad()
            losses.append(float(runner.train_step(*batch)))
            opt.step()
            ref_opt.zero_grad()
            loss = reference(*batch)
            loss.backward()
            ref_opt.step()
            ref_losses.append(float(loss))
        full, ref = runner.full_state_dict(), reference.state_dict()
        result = {"pins": pins, "plan": str(compiled.plan.summary()), "losses": losses, "reference": ref_losses,
                  "keys_equal": sorted(full) == sorted(ref),
                  "max_param_diff": max(float((full[k] - ref[k]).abs().max()) for k in ref)}
        if dist.get_rank() == 0:
            print("RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
