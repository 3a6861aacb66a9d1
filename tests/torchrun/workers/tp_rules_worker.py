"""torchrun worker for tests/torchrun/test_tp_rules.py: the blocks of tests/support/tp_blocks.py
(einsum attention, ..., vocab-parallel LMs with the head untied and tied) under tp=2 (dp2 x tp2) and tp=4,
with or without sequence parallelism (sp2, sp4), ONE launch for all of them.

    torchrun --standalone --nproc-per-node 4 tests/torchrun/workers/tp_rules_worker.py --runs einsum:tp2,bmm:sp4

Plans come from the public API with tp pinned. For each: 3 SGD steps through Runner.train_step
beside the same steps on one device; rank 0 prints `RESULT {json}` with the losses, whether every
parameter matches, each rank's FLOPs per step (torch's FlopCounterMode around the real step) and
one device's FLOPs for the same step, the largest tensor each rank saved for backward (and one
device's: the logits' log-softmax for the vocab LMs), and the collectives the steps ran.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "support"))

import fxplan  # noqa: E402
from fxplan.demo import train_beside_one_device  # noqa: E402
from tp_blocks import batch_for, build_lm  # noqa: E402
from fxplan.runtime.launch import say

STEPS, LR, WORLD = 3, 0.05, 4
PLANS = {"tp2": dict(pp=1, dp=2, tp=2, fsdp=False, microbatches=1, sp=False),
         "tp4": dict(pp=1, dp=1, tp=4, fsdp=False, microbatches=1, sp=False),
         "sp2": dict(pp=1, dp=2, tp=2, fsdp=False, microbatches=1, sp=True),  # sequence parallelism
         "sp4": dict(pp=1, dp=1, tp=4, fsdp=False, microbatches=1, sp=True),
         # sequence parallelism beside FSDP (its saved-tensor hooks nest), recompute, a pipeline
         "sp2-fsdp": dict(pp=1, dp=2, tp=2, fsdp=True, microbatches=2, sp=True),
         "sp2-recompute": dict(pp=1, dp=2, tp=2, fsdp=False, recompute=True, microbatches=2, sp=True),
         "sp2-pp2": dict(pp=2, dp=1, tp=2, fsdp=False, microbatches=2, schedule="1f1b", sp=True)}


@contextlib.contextmanager
def saved_bytes(sizes: list):
    """Appends the bytes of every activation autograd saves for backward while open (parameters,
    saved by reference, are not activations)."""
    def pack(t):
        if not (t.is_leaf and t.requires_grad):
            sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def run(model_name: str, plan_name: str) -> dict:
    model = build_lm(model_name)
    reference = copy.deepcopy(model)
    data = [batch_for(model_name, seed=1 + i) for i in range(STEPS)]
    compiled = fxplan.compile(model, data[0], cluster=fxplan.Cluster.local(world_size=WORLD),
                              constraints=fxplan.Constraints(**PLANS[plan_name]), verbose=False)
    runner = compiled.distribute()
    mode, ref_saved = FlopCounterMode(display=False), []
    with mode, saved_bytes(ref_saved):
        copy.deepcopy(reference)(*data[0]).backward()
    ref_flops = int(mode.get_total_flops())
    flops: list[int] = []
    saved: list[int] = []

    @contextlib.contextmanager
    def counted():
        m = FlopCounterMode(display=False)
        with m, saved_bytes(saved):
            yield
        flops.append(int(m.get_total_flops()))

    with runner.count_collectives() as ran:
        losses, ref_losses = train_beside_one_device(runner, reference, data, lr=LR, around_step=counted)
    full, ref_state = runner.full_state_dict(), reference.state_dict()
    close = sorted(full) == sorted(ref_state) and all(
        torch.allclose(full[k].float(), v.float(), rtol=1e-4, atol=1e-5) for k, v in ref_state.items())
    counts = [[k[0], k[1], k[2], c.calls] for k, c in sorted(ran.snapshot().items())]
    mine = {"rank": dist.get_rank(), "flops": flops, "counts": counts, "largest_saved": max(saved),
            "saved_per_step": sum(saved) // len(data)}
    per_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, mine)
    plan = compiled.plan
    return {"model": model_name, "plan": plan_name, "losses": losses, "reference": ref_losses, "param_close": close,
            "max_param_diff": max(float((full[k].float() - v.float()).abs().max()) for k, v in ref_state.items()),
            "reference_flops": ref_flops, "reference_largest_saved": max(ref_saved),
            "reference_saved": sum(ref_saved), "per_rank": per_rank, "warnings": list(plan.warnings),
            "strategies": {n: [s.dp, s.tp, s.spec] for st in plan.stages for n, s in st.strategies.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default=",".join(f"{m}:{p}" for m in ("einsum", "bmm", "fused", "conv", "dwconv", "vocab", "tied")
                                                   for p in ("tp2", "tp4")),
                        help="model:plan pairs, e.g. bmm:tp4,bmm:sp4 (plans: " + ", ".join(PLANS) + ")")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from fxplan.runtime.process import init_default_group

    init_default_group()
    for model_name, plan_name in (run_name.split(":") for run_name in args.runs.split(",")):
        try:
            result = run(model_name, plan_name)
        except Exception as exc:  # report, then end the job: peers may be stuck in a collective
            traceback.print_exc()
            if dist.get_rank() == 0:
                say("RESULT " + json.dumps({"model": model_name, "plan": plan_name,
                                              "error": f"{type(exc).__name__}: {exc}"[:2000]}))
            sys.exit(1)
        if dist.get_rank() == 0:
            say("RESULT " + json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
