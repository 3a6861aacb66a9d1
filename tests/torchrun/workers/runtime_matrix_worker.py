"""torchrun worker for tests/torchrun/test_runtime_matrix.py: one model, every plan family, ONE launch.

    torchrun --standalone --nproc-per-node 4 tests/torchrun/workers/runtime_matrix_worker.py --model gpt

Plans come from the public API only: `fxplan.compile(model, batch, cluster=Cluster.local(4),
constraints=Constraints(...))`, or a Plan built/edited by hand and given back through
`compile(..., plan=)` (tp plans get the real Megatron sharding: per layer the TPSpec with the fewest
parameters per device). For each plan: 3 SGD steps through Runner.train_step next to the same 3
steps on one device; rank 0 prints `RESULT {json}` with losses, the parameter difference, and per
rank the local parameter numel (per parameter), the rows every linear/embedding/conv of the forward
saw, and the collectives the three steps executed (runner.count_collectives(), counted at run time).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "support"))

import fxplan  # noqa: E402
from fxplan.demo import train_beside_one_device  # noqa: E402
from fxplan.plan import Plan, Strategy  # noqa: E402
from fxplan.passes.solve.schedule_terms import SPLIT_BACKWARD  # noqa: E402
from fxplan.runtime import materialize  # noqa: E402
from toy_blocks import LossOf  # noqa: E402
from fxplan.runtime.launch import say

BATCH, STEPS, LR = 16, 3, 0.05
WORLD = 4

# ---------------------------------------------------------------- models


class RMSNorm(nn.Module):
    """Written with pow/mean/rsqrt (no fused op) on purpose."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class CustomBlock(nn.Module):
    def __init__(self, dim: int, heads: int, seq: int):
        super().__init__()
        self.heads, self.seq = heads, seq
        self.norm1 = RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, 2 * dim)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        mask = torch.ones(s, s, device=x.device, dtype=torch.bool).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, s, d)
        x = x + self.proj(y)
        return x + self.mlp(self.norm2(x))


class CustomLM(nn.Module):
    """An ordinary user model: RMSNorm from pow/mean/rsqrt, SwiGLU, hand-written attention, untied head."""

    def __init__(self, vocab=64, dim=32, heads=4, seq=8, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(CustomBlock(dim, heads, seq) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, targets):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


PRESET_SPECS = {
    "gpt": "gpt:layers=2,hidden=32,heads=4,seq=8,vocab=64",
    "llama": "llama:layers=2,hidden=32,heads=4,seq=8,vocab=64",
    "bert": "bert:layers=2,hidden=32,heads=4,seq=8,vocab=64",
    "vit": "vit:layers=2,hidden=32,heads=4,image=16,patch=4,classes=8",
}


def build(name: str, device: str = "cpu") -> nn.Module:
    """The same weights on every rank and for the reference: a fixed seed per build."""
    torch.manual_seed(0)
    if name in PRESET_SPECS:
        from fxplan.models import build as build_preset

        return build_preset(PRESET_SPECS[name], device=device)
    if name == "custom":
        with torch.device(device):
            return CustomLM()
    if name.endswith("-meta"):  # built on meta: distribute() materialises each rank's shards
        with torch.device("meta"):
            return build(name[:-len("-meta")])
    import transformers

    if name == "hf-gpt2":
        cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return LossOf(transformers.GPT2LMHeadModel(cfg))
    if name == "hf-llama":
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16,
                                       attention_dropout=0.0)
        return LossOf(transformers.LlamaForCausalLM(cfg))
    raise SystemExit(f"unknown model {name}")


def batches(name: str, model: nn.Module) -> list[tuple]:
    g = torch.Generator().manual_seed(1)
    if hasattr(model, "example_batch"):
        return [tuple(model.example_batch(BATCH, generator=g)) for _ in range(STEPS)]
    vocab, seq = 64, 8
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, vocab, (BATCH, seq), generator=g)
        labels = ids if name.startswith("hf-") else torch.randint(0, vocab, (BATCH, seq), generator=g)
        out.append((ids, labels))
    return out


# ---------------------------------------------------------------- plans


def _compile(model, batch, plan=None, **pins):
    return fxplan.compile(model, batch, cluster=fxplan.Cluster.local(world_size=WORLD),
                          constraints=fxplan.Constraints(**pins) if pins else None, plan=plan, verbose=False)


def _best_tp_spec(compiled, layer: str, tp: int) -> str:
    """The real tensor-parallel sharding, not the replicated "R" one the planner may prefer on tiny
    CPU models: the TPSpec with the fewest parameters per device (then the fewest collectives)."""
    index = next(u.index for u in compiled.layer_graph.layers if u.name == layer)
    specs = [s for s in compiled.space.for_layer(index, tp) if s.label != "R"] or compiled.space.for_layer(index, tp)
    return min(specs, key=lambda s: (s.param_numel, len(s.comms), s.label)).label


def _restrategize(compiled, choose) -> Plan:
    """The compiled plan with each layer's strategy replaced by choose(layer index, name, strategy)."""
    plan = compiled.plan
    order = {name: i for i, name in enumerate(plan.layers)}
    stages = [dataclasses.replace(st, strategies={name: choose(order[name], name, s)
                                                  for name, s in st.strategies.items()}) for st in plan.stages]
    return dataclasses.replace(plan, stages=tuple(stages))


def real_tp(compiled) -> Plan:
    return _restrategize(compiled, lambda i, name, s: dataclasses.replace(
        s, spec=_best_tp_spec(compiled, name, s.tp)) if s.tp > 1 else s)


def mixed(compiled) -> Plan:
    """One stage of 4 devices whose layers cycle through dp4, tp4 (Megatron) and dp2 x tp2."""
    cycle = [(4, 1), (1, 4), (2, 2)]

    def choose(i, name, s):
        dp, tp = cycle[i % len(cycle)]
        return Strategy(dp=dp, tp=tp, spec=_best_tp_spec(compiled, name, tp) if tp > 1 else "R")

    return _restrategize(compiled, choose)


def tied_layouts(compiled, fsdp: bool) -> Plan:
    """pp=2 with the stages laid out differently: dp2 (FSDP or not) on the first, Megatron tp2 on the
    second, so a weight tied across them (GPT's embedding/head) is stored in different pieces."""
    first = set(compiled.plan.stages[0].layers)

    def choose(i, name, s):
        if name in first:
            return Strategy(dp=2, tp=1, fsdp=fsdp)
        return Strategy(dp=1, tp=2, spec=_best_tp_spec(compiled, name, 2))

    return _restrategize(compiled, choose)


def make_plan(name: str, model, batch):
    """-> (Compiled, expected per-layer (dp, tp) summary) for one named plan of the matrix."""
    if name == "dp4":
        return _compile(model, batch, pp=1, dp=4, tp=1, fsdp=False, microbatches=2)
    if name == "tp4-pinned":  # the planner's own choice under the pin: it must divide the work
        return _compile(model, batch, pp=1, dp=1, tp=4, fsdp=False, microbatches=2)
    if name == "tp4":
        base = _compile(model, batch, pp=1, dp=1, tp=4, fsdp=False, microbatches=2)
        return _compile(model, batch, plan=real_tp(base))
    if name == "dp4-fsdp":
        return _compile(model, batch, pp=1, dp=4, tp=1, fsdp=True, reshard=True, microbatches=1)
    if name == "dp4-fsdp-keep":  # gathered once per step, kept over both microbatches
        return _compile(model, batch, pp=1, dp=4, tp=1, fsdp=True, reshard=False, recompute=False, microbatches=2)
    if name in ("pp4-gpipe", "pp4-1f1b"):
        return _compile(model, batch, pp=4, microbatches=4, schedule=name.split("-")[1], fsdp=False)
    if name == "pp2xtp2":
        base = _compile(model, batch, pp=2, dp=1, tp=2, fsdp=False, microbatches=2, schedule="1f1b")
        return _compile(model, batch, plan=real_tp(base))
    if name == "pp2xdp2":
        return _compile(model, batch, pp=2, dp=2, tp=1, fsdp=False, microbatches=2, schedule="1f1b")
    if name == "pp2xdp2-fsdp":
        return _compile(model, batch, pp=2, dp=2, tp=1, fsdp=True, reshard=True, microbatches=2, schedule="gpipe")
    if name == "pp2xdp2-fsdp-keep":
        return _compile(model, batch, pp=2, dp=2, tp=1, fsdp=True, reshard=False, recompute=False, microbatches=2,
                        schedule="1f1b")
    if name == "mixed":
        base = _compile(model, batch, pp=1, microbatches=2)  # tp unpinned: specs for every degree
        return _compile(model, batch, plan=mixed(base))
    if name == "free":
        return _compile(model, batch, recompute=False)
    if name in ("pp2-tied-dp-tp", "pp2-tied-fsdp-tp"):
        return _compile(model, batch, plan=tied_layouts(_compile(model, batch, pp=2, microbatches=2,
                                                                  schedule="1f1b"), fsdp=name.endswith("fsdp-tp")))
    raise SystemExit(f"unknown plan {name}")


# ---------------------------------------------------------------- measurement


class RowCounter(TorchFunctionMode):
    """Rows (dim 0) of the activations every linear / embedding / conv call of a forward receives."""

    def __init__(self):
        super().__init__()
        self.rows: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        tensors = [a for a in args[:2] if isinstance(a, torch.Tensor)]
        if name.startswith("embedding"):  # F.embedding(indices, weight) / aten.embedding(weight, indices)
            # (1, seq) index tensors are position ids broadcast over the batch, not batch rows
            rows = [t.shape[0] for t in tensors if not t.is_floating_point() and t.dim() >= 2 and t.shape[0] > 1]
        elif name.startswith("linear"):  # (rows, seq, features); 2-D inputs may be flattened tokens
            rows = [tensors[0].shape[0]] if tensors and tensors[0].dim() >= 3 else []
        elif name.startswith("conv"):
            rows = [tensors[0].shape[0]] if tensors and tensors[0].dim() == 4 else []
        else:
            rows = []
        self.rows.update(int(r) for r in rows)
        return func(*args, **(kwargs or {}))


class StepFlops:
    """FLOPs of every step (torch's FlopCounterMode: aten ops as dispatched, backward included)."""

    def __init__(self):
        self.steps: list[int] = []

    @contextlib.contextmanager
    def __call__(self):
        mode = FlopCounterMode(display=False)
        with mode:
            yield
        self.steps.append(int(mode.get_total_flops()))


def one_device_flops(model: nn.Module, batch: tuple) -> int:
    """FLOPs of forward + backward of one global batch on one device (a copy of the model)."""
    mode = FlopCounterMode(display=False)
    with mode:
        copy.deepcopy(model)(*batch).backward()
    return int(mode.get_total_flops())


def run_plan(model_name: str, plan_name: str) -> dict:
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])
    model = build(model_name)
    meta = materialize.is_meta_model(model)
    # a meta model's single-device twin holds exactly the values distribute() gives the ranks
    init_fn = _init_fn(model_name, model)
    reference = materialize.full_model(model, init_fn) if meta else copy.deepcopy(model)
    data = batches(model_name, model)
    compiled = make_plan(plan_name, model, tuple(x.to("meta") for x in data[0]) if meta else data[0])
    plan = compiled.plan
    runner = compiled.distribute(init_fn=init_fn)
    initial = _digest(runner.full_state_dict())
    counter, flops = RowCounter(), StepFlops()
    ref_flops = one_device_flops(reference, data[0])

    # FlopCounterMode's module tracker puts multi-grad hooks on module outputs, which torch's
    # input-only backward (autograd.grad over a split I pass) refuses: count FLOPs where backward is fused
    count_flops = plan.schedule not in SPLIT_BACKWARD

    @contextlib.contextmanager
    def around_step():
        with counter, (flops() if count_flops else contextlib.nullcontext()):
            yield

    with runner.count_collectives() as ran:
        losses, ref_losses = train_beside_one_device(runner, reference, data, lr=LR, around_step=around_step)
    counts = [[k[0], k[1], k[2], c.calls, c.nbytes] for k, c in sorted(ran.snapshot().items())]
    full, ref_state = runner.full_state_dict(), reference.state_dict()
    diffs = {k: float((full[k].float() - ref_state[k].float()).abs().max()) for k in ref_state if k in full}
    close = all(k in full and torch.allclose(full[k].float(), v.float(), rtol=1e-4, atol=1e-5)
                for k, v in ref_state.items())
    # what this rank really stores: state_dict key -> [full numel, local tensor numel]
    shards = {name: [_numel(ref_state[name].shape) if name in ref_state else -1, int(p.numel())]
              for name, p in runner.named_parameters()}
    mine = {"rank": rank, "stage": runner.stage_index, "stages": list(runner.stage_indices), "local_numel": sum(p.numel() for p in runner.parameters()),
            "shards": shards, "rows": sorted(counter.rows), "counts": counts, "losses": losses,
            "flops": flops.steps}
    per_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, mine)
    strategies = {name: [s.dp, s.tp, s.fsdp, s.spec, s.reshard, s.recompute] for st in plan.stages for name, s in st.strategies.items()}
    return {"plan": plan_name, "model": model_name, "pp": plan.pp, "microbatches": plan.microbatches,
            "schedule": plan.schedule, "strategies": strategies, "stage_layers": [list(st.layers) for st in plan.stages],
            "losses": losses, "reference": ref_losses, "reference_flops": ref_flops, "param_close": close,
            "max_param_diff": max(diffs.values()), "keys_equal": sorted(full) == sorted(ref_state),
            "full_numel": sum(p.numel() for p in reference.parameters()), "per_rank": per_rank,
            "initial_digest": initial, "initial_equal_reference": initial == _digest(build_reference_state(model_name))}


def build_reference_state(model_name: str) -> dict:
    """The initial full weights one device starts from (a meta model: materialised in one piece)."""
    model = build(model_name)
    meta = materialize.is_meta_model(model)
    return (materialize.full_model(model, _init_fn(model_name, model)) if meta else model).state_dict()


def _init_fn(model_name: str, model: nn.Module):
    """Hugging Face modules (RMSNorm & co.) have no reset_parameters(): their model's own initialiser."""
    if model_name.startswith("hf-") and materialize.is_meta_model(model):
        return model.model._init_weights
    return None


def _digest(state: dict) -> str:
    """One hash of every tensor's key, dtype, shape and bytes: equal hashes, identical weights."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt")
    parser.add_argument("--plans", default="dp4,tp4,tp4-pinned,dp4-fsdp,dp4-fsdp-keep,pp4-gpipe,pp4-1f1b,pp2xtp2,pp2xdp2,"
                                           "pp2xdp2-fsdp,pp2xdp2-fsdp-keep,mixed,free")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from fxplan.runtime.process import init_default_group

    init_default_group()
    failed = False
    for plan_name in args.plans.split(","):
        start = time.perf_counter()
        try:
            result = run_plan(args.model, plan_name)
            result["seconds"] = round(time.perf_counter() - start, 2)
        except Exception as exc:  # report and go on: one failing plan must not hide the others
            traceback.print_exc()
            result = {"plan": plan_name, "model": args.model, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            failed = True
            if dist.get_rank() == 0:
                say("RESULT " + json.dumps(result))
            # the other ranks may be stuck in a collective of this plan: end the job (torchrun
            # then stops them) rather than run later plans against mismatched peers
            break
        if dist.get_rank() == 0:
            say("RESULT " + json.dumps(result))
    if failed:
        sys.exit(1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
