"""torchrun worker: unseen models under several plans vs one device; one JSON line per case on rank 0."""

import copy
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "support"))

import fxplan  # noqa: E402
from fxplan.demo import train_beside_one_device  # noqa: E402
from unseen_models import BUILDERS  # noqa: E402
from fxplan.runtime.launch import say

CASES = [("mha", dict(dp=4, pp=1)), ("mha", dict(pp=2, microbatches=2, schedule="1f1b")),
         ("lstm", dict(dp=4, pp=1)), ("einsum", dict(pp=2, microbatches=4, schedule="gpipe")),
         ("regress", dict(dp=2, pp=2, microbatches=2, schedule="1f1b")), ("cnn", None), ("cnn", dict(pp=2))]


def main():
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cluster = fxplan.Cluster.local(world_size=dist.get_world_size())
    for name, pins in CASES:
        torch.manual_seed(0)
        model, batch = BUILDERS[name]()
        reference = copy.deepcopy(model)
        compiled = fxplan.compile(model, batch, cluster=cluster, verbose=False,
                                  constraints=fxplan.Constraints(**pins) if pins else None)
        runner = compiled.distribute()
        losses, ref_losses = train_beside_one_device(runner, reference, [batch, batch], lr=0.1)
        full = runner.full_state_dict()
        state = reference.state_dict()
        params = dict(reference.named_parameters())
        diff = max(float((full[k] - params[k].detach()).abs().max()) for k in params)
        # buffers too (BatchNorm running statistics, counters): training must update them as on one device
        buffer_diff = max([float((full[k].double() - state[k].double()).abs().max())
                           for k in state if k not in params] or [0.0])
        if dist.get_rank() == 0:
            say("RESULT " + json.dumps(dict(
                model=name, pins=pins, losses=losses, reference=ref_losses, param_diff=diff, buffer_diff=buffer_diff,
                keys_equal=sorted(full) == sorted(state), method=compiled.traced.method,
                dp=[s.dp for st in compiled.plan.stages for s in st.strategies.values()],
                microbatches=compiled.plan.microbatches, pp=compiled.plan.pp)))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
