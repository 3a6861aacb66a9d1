"""The per-rank program of `fxplan demo` (run by torchrun; see fxplan/demo.py)."""

from __future__ import annotations

import argparse
import copy
import json

import torch


def main() -> None:
    import fxplan
    from fxplan.demo import demo_model_and_batch, train_beside_one_device

    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, batches = demo_model_and_batch()
    reference = copy.deepcopy(model)
    with open(args.plan) as fh:
        plan = fxplan.Plan.from_json(fh.read())
    world = int(__import__("os").environ["WORLD_SIZE"])
    compiled = fxplan.compile(model, batches[0], cluster=fxplan.Cluster.local(world_size=world), plan=plan,
                              verbose=False)
    runner = compiled.distribute()
    steps = [batches[step % len(batches)] for step in range(args.steps)]
    losses, ref_losses = train_beside_one_device(runner, reference, steps, lr=0.1)
    full = runner.full_state_dict()
    ref_state = reference.state_dict()
    diff = max(float((full[k].float() - ref_state[k].float()).abs().max()) for k in ref_state)
    # Timed on their own: the steps above interleave single-device reference training on every rank,
    # which would count in their times. Back-to-back steps, gradients dropped, no optimizer step.
    runner.step_times.seconds.clear()
    torch.distributed.barrier()
    for _ in range(4):
        runner.train_step(*steps[0])
        for p in runner.parameters():
            p.grad = None
    report = runner.report()  # collective: every rank
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as fh:
            json.dump({"losses": losses, "reference": ref_losses, "max_param_diff": diff, "report": report}, fh)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
