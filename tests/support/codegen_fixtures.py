"""Shared by tests/unit/test_codegen.py, tests/fakepg/test_emit_fakepg.py and tests/torchrun/workers/codegen_worker.py:
a small GPT traced, coarsened, its strategy space, and plans built by hand (no solver)."""

from __future__ import annotations

import torch

from fxplan.models import build, example_batch
from fxplan.passes.coarsen import coarsen
from fxplan.passes.sharding.shard_prop import build_strategy_space
from fxplan.passes.trace import trace
from fxplan.plan import Plan, Stage, Strategy

GPT = "gpt:layers=2,hidden=32,heads=8,seq=8,vocab=64"


def setup(spec=GPT, batch=8, tp_degrees=(1,), seed=0):
    torch.manual_seed(seed)
    model = build(spec)
    gen = torch.Generator().manual_seed(seed + 1)
    inputs = tuple(torch.randint(0, model.config.vocab, (batch, model.config.seq), generator=gen) for _ in range(2))
    traced = trace(model, inputs)
    lg = coarsen(traced)
    space = build_strategy_space(traced, lg, sorted(set((1,) + tuple(tp_degrees))))
    return model, inputs, traced, lg, space


def megatron_label(space, layer, tp):
    """A block's Megatron spec (qkv / fc column-parallel S(0), the projections row-parallel S(1)),
    found by placements (labels are shard_prop's business); elsewhere the first sharded spec."""
    from fxplan.passes.ir import Shard

    specs = space.for_layer(layer.index, tp)
    wanted = {n: Shard(1 if "proj" in n else 0) for n in layer.nodes
              if n.endswith("_weight") and ("qkv" in n or "fc" in n or "proj" in n)}
    if wanted:
        for s in specs:
            if all(s.placements.get(n) == p for n, p in wanted.items()):
                return s.label
        raise AssertionError(f"{layer.name}: no Megatron sharding among {[s.label for s in specs]}")
    sharded = [s for s in specs if not s.label.startswith("R")]
    return (sharded or specs)[0].label


def make_plan(lg, world, stage_of, strategy_of, microbatches=1, batch=8):
    """stage_of(layer) -> stage index; strategy_of(layer) -> Strategy. Stages get world/pp ranks each."""
    pp = max(stage_of(layer) for layer in lg.layers) + 1
    n = world // pp
    stages = []
    for s in range(pp):
        layers = [layer for layer in lg.layers if stage_of(layer) == s]
        stages.append(Stage(s, tuple(layer.name for layer in layers), tuple(range(s * n, (s + 1) * n)),
                            {layer.name: strategy_of(layer) for layer in layers}))
    return Plan(pp=pp, microbatches=microbatches, schedule="gpipe", stages=tuple(stages), estimated_iteration_s=0.0,
                batch_size=batch, world_size=world)


def uniform(dp, tp, space=None, fsdp=False):
    def strategy(layer):
        label = megatron_label(space, layer, tp) if tp > 1 else "R"
        return Strategy(dp=dp, tp=tp, fsdp=fsdp and dp > 1 and layer.param_numel > 0, spec=label)
    return strategy
