"""`fxplan demo`: plan a small GPT for this host, then train it under torchrun next to one device.

What it does, in order: build a small GPT on the CPU, measure this host (Cluster.local), plan it with
the unified MIQP, print the plan and rank 0's graph, launch `torchrun --standalone --nproc-per-node N`
(gloo), train a few SGD steps on every rank and print each step's loss beside the loss of the same
model trained on one device.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile

DEMO_MODEL = "gpt:layers=4,hidden=64,heads=4,seq=32,vocab=256"
DEMO_BATCH = 16
SEED = 0


def demo_model_and_batch():
    import torch

    from fxplan.models import build, example_batch

    torch.manual_seed(SEED)
    model = build(DEMO_MODEL, device="cpu")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(SEED + 1)
    batches = [example_batch(model, DEMO_BATCH) for _ in range(8)]
    torch.random.set_rng_state(generator_state)
    return model, batches


def train_beside_one_device(runner, reference, batches, lr: float, around_step=contextlib.nullcontext):
    """One SGD step per batch on `runner` (fxplan) and on `reference` (the same model on one device).

    Returns (fxplan losses, single-device losses). `around_step()` is entered around each
    `train_step` (e.g. a counter of what the step does).
    """
    import torch

    opt = torch.optim.SGD(runner.parameters(), lr=lr)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=lr)
    losses, ref_losses = [], []
    for batch in batches:
        opt.zero_grad()
        with around_step():
            loss = runner.train_step(*batch)
        opt.step()
        losses.append(float(loss))
        ref_opt.zero_grad()
        ref_loss = reference(*batch)
        ref_loss.backward()
        ref_opt.step()
        ref_losses.append(float(ref_loss.detach()))
    return losses, ref_losses


def run_demo(nproc: int = 4, steps: int = 3) -> int:
    import fxplan

    model, batches = demo_model_and_batch()
    cluster = fxplan.Cluster.local(world_size=nproc)
    print(f"== fxplan demo: {DEMO_MODEL}, global batch {DEMO_BATCH}, {nproc} gloo processes on this host")
    print(f"cluster: {cluster.describe()}")
    compiled = fxplan.compile(model, batches[0], cluster=cluster, time_limit_s=30)
    print(compiled.plan.summary())
    gm = compiled.rank_module(0)
    code = gm.code.strip().splitlines()
    print(f"\n== rank 0's graph ({len(code)} lines; collectives are the fxplan_* calls), first 40 lines:")
    print("\n".join(code[:40]))
    with tempfile.TemporaryDirectory() as tmp:
        plan_path = os.path.join(tmp, "plan.json")
        out_path = os.path.join(tmp, "losses.json")
        with open(plan_path, "w") as fh:
            fh.write(compiled.plan.to_json())
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "fxplan.demo_worker", "--plan", plan_path, "--out", out_path, "--steps", str(steps)]
        print(f"\n== launching: torchrun --standalone --nproc-per-node {nproc} -m fxplan.demo_worker ...", flush=True)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        try:
            proc = subprocess.run(cmd, env=env, timeout=600)
        except subprocess.TimeoutExpired:
            print("fxplan demo: torchrun did not finish within 600 s", file=sys.stderr)
            return 1
        if proc.returncode != 0 or not os.path.exists(out_path):
            print(f"fxplan demo: torchrun failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        with open(out_path) as fh:
            result = json.load(fh)
    print(f"\n{'step':>4} {'fxplan loss':>14} {'1-device loss':>14} {'|diff|':>10}")
    worst = 0.0
    for step, (ours, ref) in enumerate(zip(result["losses"], result["reference"])):
        worst = max(worst, abs(ours - ref))
        print(f"{step:>4} {ours:>14.6f} {ref:>14.6f} {abs(ours - ref):>10.2e}")
    print(f"max parameter difference after {steps} steps: {result['max_param_diff']:.2e}")
    ok = worst <= 1e-4 * max(1.0, abs(result["reference"][0])) and result["max_param_diff"] <= 1e-4
    print("result: equal to single-device training" if ok else "result: MISMATCH against single-device training")
    if result.get("report"):
        print(f"\n== estimated vs measured step time (this host is shared: measured times vary)\n{result['report']}")
    return 0 if ok else 1
