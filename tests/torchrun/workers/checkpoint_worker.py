"""torchrun worker for tests/torchrun/test_reliability.py: checkpoints portable across plans.

    torchrun --standalone --nproc-per-node 4 checkpoint_worker.py FOLDER

For each case: 2 Adam steps under plan A, runner.save; a new compile(..., plan=B) loads it (model
and optimizer state) and trains 2 more steps; rank 0 also loads it into the plain model with
fxplan.load_checkpoint and trains the same 2 steps. Both must equal 4 uninterrupted single-device
Adam steps. Rank 0 prints `RESULT {json}` per case.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist

import fxplan
from fxplan.models import build
from fxplan.runtime.launch import say

BATCH, LR = 8, 1e-2
CLUSTER = fxplan.Cluster.preset("a100-80g", nodes=1, devices_per_node=4)
CASES = {
    "mlp pp2xtp2 -> dp4": ("mlp:layers=4,hidden=16,in=8,out=4", dict(pp=2, tp=2, dp=1), dict(pp=1, dp=4, tp=1)),
    "mlp pp4 -> tp2xdp2 fsdp": ("mlp:layers=4,hidden=16,in=8,out=4", dict(pp=4, tp=1, dp=1),
                                dict(pp=1, tp=2, dp=2, fsdp=True)),
    "tied gpt pp2xdp2 -> tp2xdp2": ("gpt:layers=2,hidden=32,heads=4,seq=8,vocab=64", dict(pp=2, dp=2, tp=1),
                                    dict(pp=1, tp=2, dp=2)),
}


def pins(**kw):
    kw.setdefault("recompute", False)
    kw.setdefault("fsdp", False)
    return fxplan.Constraints(**kw)


def steps(train, opt, batches):
    losses = []
    for batch in batches:
        losses.append(float(train(*batch)))
        opt.step()
        opt.zero_grad()
    return losses


def run_case(name, spec, before, after, folder):
    torch.manual_seed(0)
    model = build(spec)
    batches = [model.example_batch(BATCH, generator=torch.Generator().manual_seed(10 + i)) for i in range(4)]
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=LR)
    reference = steps(lambda *b: _backward(ref(*b)), ref_opt, batches)

    first = fxplan.compile(model, batches[0], cluster=CLUSTER, constraints=pins(**before), verbose=False)
    runner = first.distribute()
    opt = torch.optim.Adam(runner.parameters(), lr=LR)
    losses = steps(runner.train_step, opt, batches[:2])
    path = os.path.join(folder, name.replace(" ", "_").replace(">", ""))
    runner.save(path, optimizer=opt)

    plan_b = fxplan.compile(model, batches[0], cluster=CLUSTER, constraints=pins(**after), verbose=False).plan
    second = fxplan.compile(model, batches[0], cluster=CLUSTER, plan=plan_b, verbose=False)
    runner_b = second.distribute()
    opt_b = torch.optim.Adam(runner_b.parameters(), lr=LR)
    runner_b.load(path, optimizer=opt_b)
    resumed = steps(runner_b.train_step, opt_b, batches[2:])
    full = runner_b.full_state_dict()

    result = {"case": name, "reference": reference, "first": losses, "resumed": resumed,
              "plan_a": str(first.plan.stages[0].strategies[first.plan.stages[0].layers[0]]) + f" pp{first.plan.pp}",
              "plan_b": str(plan_b.stages[0].strategies[plan_b.stages[0].layers[0]]) + f" pp{plan_b.pp}"}
    if dist.get_rank() == 0:
        plain = copy.deepcopy(model)
        plain_opt = torch.optim.Adam(plain.parameters(), lr=LR)
        fxplan.load_checkpoint(path, plain, plain_opt)
        result["plain"] = steps(lambda *b: _backward(plain(*b)), plain_opt, batches[2:])
        result["param_diff"] = max(float((full[k] - ref.state_dict()[k]).abs().max()) for k in full)
        result["plain_param_diff"] = max(float((plain.state_dict()[k] - ref.state_dict()[k]).abs().max())
                                         for k in full)
        result["exp_avg_diff"] = max(float((plain_opt.state[p]["exp_avg"] - ref_opt.state[q]["exp_avg"]).abs().max())
                                     for p, q in zip(plain.parameters(), ref.parameters()))
        result["files"] = sorted(os.listdir(path))
        meta = torch.distributed.checkpoint.FileSystemReader(path).read_metadata().state_dict_metadata
        result["keys"] = sorted(meta)
        result["model_keys"] = sorted(model.state_dict())
        storage = torch.distributed.checkpoint.FileSystemReader(path).read_metadata().storage_data
        written: dict = {}
        for index, info in storage.items():  # one entry per (tensor, chunk) written, with its file
            written.setdefault(index.fqn, []).append(info.relative_path)
        result["writes_per_key"] = {k: len(v) for k, v in written.items()}
        # the same tensors written by ONE process: what "each tensor once" costs on disk
        everything = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items()}
        torch.distributed.checkpoint.load(everything, checkpoint_id=path, no_dist=True)
        torch.distributed.checkpoint.save(everything, checkpoint_id=path + "_single", no_dist=True)
        result["bytes"] = [sum(os.path.getsize(os.path.join(p, f)) for f in os.listdir(p) if f.endswith(".distcp"))
                           for p in (path, path + "_single")]
        result["writer_files"] = sorted({f for v in written.values() for f in v})
        say("RESULT " + json.dumps(result))
    dist.barrier()


def _backward(loss):
    loss.backward()
    return loss


def main():
    torch.set_num_threads(1)
    folder = sys.argv[1]
    for name, (spec, before, after) in CASES.items():
        run_case(name, spec, before, after, folder)
    # a missing folder and a model of another shape are refused with the fix
    dist.barrier()
    if dist.get_rank() == 0:
        for label, fn in (
            ("missing", lambda: fxplan.load_checkpoint(os.path.join(folder, "nothing"), build(CASES["mlp pp2xtp2 -> dp4"][0]))),
            ("other-model", lambda: fxplan.load_checkpoint(os.path.join(folder, "mlp_pp2xtp2_-_dp4"),
                                                           build("mlp:layers=4,hidden=32,in=8,out=4")))):
            try:
                fn()
                say(f"BAD {label} no-error")
            except fxplan.CheckpointError as exc:
                say(f"BAD {label} CheckpointError {exc}")


if __name__ == "__main__":
    main()
