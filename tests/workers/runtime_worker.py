"""torchrun worker for tests/test_runtime.py: many plans in ONE launch, each against one device.

    torchrun --standalone --nproc-per-node 4 tests/workers/runtime_worker.py --model mlp

For every plan: a fresh copy of the model, 3 SGD steps through Runner.train_step, the same 3 steps
on a single-device reference; rank 0 prints one line `RESULT {json}` per plan with the loss and
parameter differences, the losses every rank saw, and the rows each forward saw.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import runtime_standin as standin  # noqa: E402  (STAND-IN for codegen/emit; see that file)

from fxplan.codegen import materialize  # noqa: E402
from fxplan.codegen.runtime import Runner  # noqa: E402

BATCH, STEPS, LR = 16, 3, 0.05


class MLP(nn.Module):
    def __init__(self, width=8, depth=4):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 2)

    def forward(self, x, y):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return F.mse_loss(self.head(x), y)


class Block(nn.Module):
    def __init__(self, d, seq):
        super().__init__()
        self.d, self.seq = d, seq
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc = nn.Linear(d, 2 * d)
        self.out = nn.Linear(2 * d, d)

    def forward(self, x):
        q, k, v = self.qkv(self.ln(x)).chunk(3, dim=-1)
        att = (q @ k.transpose(1, 2)) / self.d ** 0.5
        mask = torch.ones(self.seq, self.seq, device=x.device).triu(1).bool()
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        x = x + self.proj(att @ v)
        return x + self.out(F.gelu(self.fc(x)))


class GPT(nn.Module):
    def __init__(self, vocab=16, d=8, seq=6, layers=3):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, seq) for _ in range(layers))
        self.head = nn.Linear(d, vocab)
        self.seq = seq

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(self.seq, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def build(name: str, device="cpu"):
    torch.manual_seed(0)
    with torch.device(device):
        model = MLP() if name == "mlp" else GPT()
    layers = [f"blocks.{i}" for i in range(len(model.blocks))] + ["head"]
    if name == "gpt":
        layers = ["tok", "pos"] + layers
    return model, layers


def batches(name: str):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        if name == "mlp":
            out.append((torch.randn(BATCH, 8, generator=g), torch.randn(BATCH, 2, generator=g)))
        else:
            out.append((torch.randint(0, 16, (BATCH, 6), generator=g), torch.randint(0, 16, (BATCH, 6), generator=g)))
    return out


PLANS = {  # name: (pp, microbatches, schedule, fsdp, meta)
    "dp4": (1, 2, "gpipe", False, False),
    "dp4-fsdp": (1, 1, "gpipe", True, False),
    "pp4-gpipe": (4, 4, "gpipe", False, False),
    "pp4-1f1b": (4, 4, "1f1b", False, False),
    "pp2xdp2-1f1b": (2, 2, "1f1b", False, False),
    "pp2xdp2-fsdp-gpipe": (2, 4, "gpipe", True, False),
    "pp2xdp2-meta": (2, 2, "1f1b", False, True),
}


def run_plan(model_name: str, plan_name: str) -> dict:
    pp, mb, schedule, fsdp, meta = PLANS[plan_name]
    world, rank = dist.get_world_size(), dist.get_rank()
    model, layers = build(model_name, "meta" if meta else "cpu")
    plan = standin.make_plan(layers, world, pp, mb, schedule, fsdp=fsdp, batch=BATCH)
    reference = materialize.full_model(model) if meta else copy.deepcopy(model)
    runner = Runner(standin.compiled(model, plan), _codegen=standin.codegen())
    start = runner.full_state_dict()
    init_diff = max(float((start[k] - v).abs().max()) for k, v in reference.state_dict().items())
    opt = torch.optim.SGD(runner.parameters(), lr=LR)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=LR)
    losses, ref_losses = [], []
    for batch in batches(model_name):
        opt.zero_grad()
        loss = runner.train_step(*batch)
        opt.step()
        losses.append(float(loss))
        ref_opt.zero_grad()
        ref_loss = reference(*batch)
        ref_loss.backward()
        ref_opt.step()
        ref_losses.append(float(ref_loss))
    full = runner.full_state_dict()
    ref_state = reference.state_dict()
    # gradient accumulation: two steps without zero_grad must equal two backward() calls
    opt.zero_grad()
    ref_opt.zero_grad()
    for batch in batches(model_name)[:2]:
        runner.train_step(*batch)
        reference(*batch).backward()
    grads = runner.grads_full()
    grad_diff = max(float((grads[k] - p.grad).abs().max()) for k, p in reference.named_parameters())
    all_losses: list = [None] * world
    dist.all_gather_object(all_losses, losses)
    return {
        "plan": plan_name, "model": model_name, "losses": losses, "reference": ref_losses,
        "losses_by_rank": all_losses, "keys_equal": sorted(full) == sorted(ref_state),
        "param_close": all(torch.allclose(full[k], ref_state[k], rtol=1e-4, atol=1e-5) for k in ref_state),
        "max_param_diff": max(float((full[k] - ref_state[k]).abs().max()) for k in ref_state),
        "init_diff": init_diff, "grad_diff": grad_diff,
        "rows_seen": runner.rows_seen[:4], "stage": runner.stage_index,
        "local_numel": sum(p.numel() for p in runner.parameters()),
        "full_numel": sum(p.numel() for p in reference.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--plans", default=",".join(PLANS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("FXPLAN_TIMEOUT_S", "60")
    from fxplan.codegen.runtime import init_default_group

    init_default_group()
    for plan_name in args.plans.split(","):
        try:
            result = run_plan(args.model, plan_name)
        except Exception as exc:  # report and go on: one failing plan must not hide the others
            traceback.print_exc()
            result = {"plan": plan_name, "model": args.model, "error": f"{type(exc).__name__}: {exc}"}
            print("RESULT " + json.dumps(result), flush=True)
            raise
        # rows/stage differ per rank: collect them all on rank 0
        per_rank: list = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, {"rows_seen": result["rows_seen"], "stage": result["stage"],
                                          "local_numel": result["local_numel"]})
        result["per_rank"] = per_rank
        if dist.get_rank() == 0:
            print("RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
