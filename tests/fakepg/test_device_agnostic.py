"""Rank modules name no device: every emitted graph (several models, traced by fx and by
torch.export, real and meta; several plans) is scanned for device constants, and every rank's
module runs forward and backward on meta tensors (the fake process group stands in for the
collectives). A device baked in by the trace (export's `arange(..., device=cpu)`) would make a
meta run mix devices and fail."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx

import fxplan
from fxplan.codegen.groups import required_group_keys
from fxplan.models import build
from fxplan.runtime.comm import Communicator
from toy_blocks import LossOf

WORLD, BATCH, SEQ, VOCAB = 4, 8, 8, 64
PLANS = {
    "dp4-fsdp": dict(pp=1, dp=4, tp=1, fsdp=True, microbatches=1),
    "tp4": dict(pp=1, dp=1, tp=4, microbatches=1),
    "pp2xdp2-recompute": dict(pp=2, dp=2, tp=1, microbatches=1, recompute=True),
}


def _hf(name: str):
    transformers = pytest.importorskip("transformers")
    if name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=4)
        return LossOf(transformers.GPT2LMHeadModel(cfg))
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16)
    return LossOf(transformers.LlamaForCausalLM(cfg))


MODELS = {  # name -> (builder, device the model is built on)
    "gpt": (lambda: build(f"gpt:layers=2,hidden=32,heads=4,seq={SEQ},vocab={VOCAB}"), "cpu"),
    "llama-meta": (lambda: build(f"llama:layers=2,hidden=32,heads=4,seq={SEQ},vocab={VOCAB}", device="meta"), "meta"),
    "hf-gpt2": (lambda: _hf("gpt2"), "cpu"),
    "hf-llama-meta": (lambda: _hf("llama"), "meta"),
}


def _device_values(value) -> list:
    """Every torch.device, or string torch accepts as a device, inside an argument value."""
    if isinstance(value, torch.device):
        return [value]
    if isinstance(value, str):
        try:
            return [torch.device(value)]
        except RuntimeError:
            return []
    if isinstance(value, (list, tuple)):
        return [d for v in value for d in _device_values(v)]
    if isinstance(value, dict):
        return [d for v in value.values() for d in _device_values(v)]
    return []


def _constants(gm: fx.GraphModule) -> list[str]:
    """Nodes holding a device constant, in the module and in every submodule graph (recompute regions)."""
    found = []
    for mod in gm.modules():
        if isinstance(mod, fx.GraphModule):
            for node in mod.graph.nodes:
                if _device_values(node.args) + _device_values(node.kwargs):
                    found.append(node.format_node())
    return found


@contextlib.contextmanager
def _fake_rank(rank: int, plan):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=WORLD)
    try:
        with Communicator().installed() as comm:
            comm.groups.create(required_group_keys(plan))
            yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=list(MODELS))
def model_case(request):
    builder, device = MODELS[request.param]
    with torch.device(device):
        model = builder()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    batch = (ids.to(device), ids.to(device))
    return request.param, model, batch


@pytest.mark.parametrize("plan_name", list(PLANS))
def test_rank_modules_name_no_device_and_run_on_meta(model_case, plan_name):
    name, model, batch = model_case
    compiled = fxplan.compile(model, batch, cluster=fxplan.Cluster.preset("a100-80g", nodes=1, devices_per_node=WORLD),
                              constraints=fxplan.Constraints(**PLANS[plan_name]), verbose=False)
    plan = compiled.plan
    if plan_name.startswith("pp2"):
        assert any(s.recompute for st in plan.stages for s in st.strategies.values())
    if name.startswith("hf-"):  # transformers models go through torch.export, which bakes devices in
        assert any(isinstance(n.target, torch._ops.OpOverload) for n in compiled.traced.gm.graph.nodes)
    meta_batch = tuple(torch.empty_like(x, device="meta") for x in batch)
    sent: dict[int, tuple] = {}  # stage-0 outputs by position in the stage: what the next stage's rank gets
    for rank in range(WORLD):
        program = compiled.rank_program(rank, meta=True)
        assert _constants(program.gm) == [], (name, plan_name, rank)
        stage = plan.stages[program.stage]
        position = stage.devices.index(rank)
        gm = program.gm.to("meta")
        inputs = meta_batch if program.stage == 0 else sent[position]
        with _fake_rank(rank, plan):
            out = gm(*inputs)
            if program.stage == len(plan.stages) - 1:
                assert out.shape == () and out.device.type == "meta"
                out.backward()
                trained = [p for p in gm.parameters() if p.requires_grad]
                assert trained and all(p.grad is not None and p.grad.device.type == "meta" for p in trained)
            else:
                assert all(t.device.type == "meta" for t in out)
                sent[position] = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in out)


# ---------------------------------------------------------------- one device per LOCAL_RANK


def test_rank_device_is_one_gpu_per_local_rank():
    from fxplan.errors import DistributedSetupError
    from fxplan.runtime.process import rank_device

    assert rank_device("gloo", 3, 8) == torch.device("cpu")
    assert rank_device("nccl", 3, 8) == torch.device("cuda", 3)
    assert rank_device("cpu:gloo,cuda:nccl", 5, 8) == torch.device("cuda", 5)  # init_process_group()'s default
    assert rank_device("nccl", 3, 1) == torch.device("cuda", 0)  # CUDA_VISIBLE_DEVICES gave it one GPU
    with pytest.raises(DistributedSetupError, match="LOCAL_RANK 4"):
        rank_device("nccl", 4, 2)


def test_group_created_by_the_caller_still_binds_the_rank_device(monkeypatch):
    """The caller ran init_process_group itself (without set_device): joining it must still make
    LOCAL_RANK's GPU current, before any NCCL collective. No GPU here: torch.cuda's device count
    and set_device, and the backend name, are stood in for; fxplan's own code runs as is."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from fxplan.runtime import process

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    dist.init_process_group("fake", store=FakeStore(), rank=3, world_size=4)
    try:
        process.init_default_group()
        assert chosen == []  # a gloo-like group: computing stays on the CPU
        assert process.device() == torch.device("cpu")
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
        process.init_default_group()
        assert chosen == [torch.device("cuda", 3)]
        assert process.device() == torch.device("cuda", 3)
    finally:
        dist.destroy_process_group()
