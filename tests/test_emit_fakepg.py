"""Rank modules at world size 8 on the fake process group: which collectives each graph has, the
local shapes, and that the forward (and backward) run with those shapes. No real communication."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

import codegen_fixtures as fx_
from fxplan.codegen import collectives, groups
from fxplan.codegen.emit import emit_rank

WORLD = 8


@pytest.fixture(scope="module")
def gpt():
    return fx_.setup(spec="gpt:layers=2,hidden=64,heads=8,seq=8,vocab=64", tp_degrees=(4, WORLD))


@pytest.fixture
def fake_pg():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def start(rank):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=WORLD)
    yield start
    groups.clear()
    if dist.is_initialized():
        dist.destroy_process_group()


def _code(prog) -> str:
    return prog.gm.code.replace("fxplan_codegen_collectives_", "")


def _block(code: str, i: int) -> str:
    start = code.index(f"blocks_{i}_ln1_weight = self")
    end = code.find(f"blocks_{i + 1}_ln1_weight = self")
    return code[start:end if end >= 0 else code.index("ln_f_weight = self")]


def test_tp8_megatron_block(gpt, fake_pg):
    model, inputs, traced, lg, space = gpt
    plan = fx_.make_plan(lg, WORLD, lambda layer: 0, fx_.uniform(1, WORLD, space))
    prog = emit_rank(traced, lg, space, plan, 3)
    code = _code(prog)
    for i in range(2):
        block = _block(code, i)
        assert len(re.findall(r"= fxplan_tp_all_reduce\(", block)) == 2, block  # g after attn and mlp
        assert len(re.findall(r"= fxplan_tp_f\(", block)) == 2, block  # f before qkv and fc
        assert "'tp:0,1,2,3,4,5,6,7'" in block
    qkv = next(a for a, s in prog.params.items() if s.name == "blocks.0.attn.qkv.weight")
    shard = prog.params[qkv]
    assert shard.tp_dim == 0 and shard.tp_index == 3
    assert getattr(prog.gm, qkv).numel() * WORLD == torch.Size(shard.global_shape).numel()
    heads = 8
    views = [n for n in prog.gm.graph.nodes if n.op == "call_method" and n.target == "view"]
    assert views and all(v.args[1][2] == heads // WORLD for v in views)  # local heads
    fake_pg(3)
    groups.create_groups(groups.required_group_keys(plan, lg, space))
    collectives.reset_counts()
    loss = prog.gm(*inputs)  # shapes must line up; values are garbage on the fake group
    assert loss.shape == ()
    loss.backward()
    counts = collectives.counts()
    fwd_g = sum(c.calls for (kind, _, phase), c in counts.items() if kind == "all_reduce" and phase == "fwd")
    bwd_ar = sum(c.calls for (kind, _, phase), c in counts.items() if kind == "all_reduce" and phase == "bwd")
    assert fwd_g == len(re.findall(r"= fxplan_tp_all_reduce\(", code))
    assert bwd_ar >= len(re.findall(r"= fxplan_tp_f\(", code)) - 1  # every f on a tensor needing grad


def test_fsdp_plan_gathers_parameters(gpt, fake_pg):
    _, inputs, traced, lg, space = gpt
    plan = fx_.make_plan(lg, WORLD, lambda layer: 0, fx_.uniform(WORLD, 1, fsdp=True))
    prog = emit_rank(traced, lg, space, plan, 5)
    code = _code(prog)
    fsdp = {a: s for a, s in prog.params.items() if s.fsdp}
    assert len(fsdp) == len(prog.params)
    assert len(re.findall(r"= fxplan_fsdp_gather\(", code)) == len(fsdp)
    for attr, s in fsdp.items():
        assert s.dp_index == 5 and s.dp_group == "dp:0,1,2,3,4,5,6,7"
        assert getattr(prog.gm, attr).shape == (-(-torch.Size(s.global_shape).numel() // WORLD),)
    fake_pg(5)
    groups.create_groups(groups.required_group_keys(plan, lg, space))
    collectives.reset_counts()
    prog.gm(*inputs).backward()
    kinds = {(k, phase) for (k, _, phase) in collectives.counts()}
    assert ("all_gather", "fwd") in kinds and ("reduce_scatter", "bwd") in kinds


def test_dp_plan_slices_rows_and_scales_loss(gpt):
    _, inputs, traced, lg, space = gpt
    plan = fx_.make_plan(lg, WORLD, lambda layer: 0, fx_.uniform(WORLD, 1), microbatches=1)
    prog = emit_rank(traced, lg, space, plan, 5)
    code = _code(prog)
    assert "fxplan_rows(tokens, 0, 5, 8, '')" in code and "fxplan_rows(targets, 0, 5, 8, '')" in code
    assert "* 0.125" in code and prog.loss_scale == 0.125
    assert all(lay.dp == 1 and lay.tp == WORLD for lay in prog.input_layouts)  # the full microbatch arrives
    # no collective: a pure dp plan communicates only in the runtime's gradient sum
    assert not re.search(r"fxplan_(tp_|all_|reduce|regroup|fsdp)", code)
    assert prog.gm(*inputs).shape == ()


def test_pipeline_stage_layouts(gpt):
    """pp=2 x (dp=4 | tp=4): stage 1 receives stage 0's layout at the same local position."""
    _, _, traced, lg, space = gpt
    n = len(lg.layers)

    def strategy(layer):
        if layer.index >= n // 2:
            return fx_.uniform(1, 4, space)(layer)
        return fx_.uniform(4, 1)(layer)
    plan = fx_.make_plan(lg, WORLD, lambda layer: int(layer.index >= n // 2), strategy)
    first, second = emit_rank(traced, lg, space, plan, 2), emit_rank(traced, lg, space, plan, 6)
    assert second.inputs == first.outputs and second.input_layouts == first.output_layouts
    # rows regrouped from dp=4 to dp=1 over the stage's ranks 4..7 (an all-gather of the rows)
    assert "fxplan_regroup_rows(" in _code(second) and "'rows:4,5,6,7'" in _code(second)
