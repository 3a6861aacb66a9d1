"""Rank modules at world size 8 on the fake process group: which collectives each graph has, the
local shapes, and that the forward (and backward) run with those shapes. No real communication."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

import codegen_fixtures as fx_
from fxplan.codegen.emit import emit_rank
from fxplan.runtime.collectives import GRAPH_OPS

WORLD = 8


@pytest.fixture(scope="module")
def gpt():
    return fx_.setup(spec="gpt:layers=2,hidden=64,heads=8,seq=8,vocab=64", tp_degrees=(4, WORLD))




def _code(prog) -> str:
    return prog.gm.code.replace("fxplan_runtime_collectives_", "")


def _block(code: str, i: int) -> str:
    start = code.index(f"blocks_{i}_ln1_weight = self")
    end = code.find(f"blocks_{i + 1}_ln1_weight = self")
    return code[start:end if end >= 0 else code.index("ln_f_weight = self")]


def test_tp8_megatron_block(gpt, fake_pg):
    model, inputs, traced, lg, space = gpt
    plan = fx_.make_plan(lg, WORLD, lambda layer: 0, fx_.uniform(1, WORLD, space))
    prog = emit_rank(traced, lg, space, plan, 3, ops=GRAPH_OPS)
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
    comm = fake_pg(3, plan)
    with comm.observe() as counter:
        loss = prog.gm(*inputs)  # shapes must line up; values are garbage on the fake group
        assert loss.shape == ()
        loss.backward()
    counts = counter.snapshot()
    fwd_g = sum(c.calls for (kind, _, phase), c in counts.items() if kind == "all_reduce" and phase == "fwd")
    bwd_ar = sum(c.calls for (kind, _, phase), c in counts.items() if kind == "all_reduce" and phase == "bwd")
    assert fwd_g == len(re.findall(r"= fxplan_tp_all_reduce\(", code))
    assert bwd_ar >= len(re.findall(r"= fxplan_tp_f\(", code)) - 1  # every f on a tensor needing grad


def test_fsdp_plan_gathers_parameters(gpt, fake_pg):
    """dp=8 FSDP everywhere: one flat all-gather per layer (a unit of all its parameters) forward,
    one reduce-scatter per layer backward, each parameter still stored as its own 1/dp block."""
    _, inputs, traced, lg, space = gpt
    plan = fx_.make_plan(lg, WORLD, lambda layer: 0, fx_.uniform(WORLD, 1, fsdp=True))
    prog = emit_rank(traced, lg, space, plan, 5, ops=GRAPH_OPS)
    code = _code(prog)
    fsdp = {a: s for a, s in prog.params.items() if s.fsdp}
    assert len(fsdp) == len(prog.params)
    units = {s.fsdp_unit for s in fsdp.values()}
    assert units == {f"{layer.name}/torch.float32" for layer in lg.layers if layer.param_numel}
    calls = re.findall(r"= fxplan_fsdp_gather_layer\(\[([^\]]*)\], '([^']*)'", code)
    assert len(calls) == len(units)
    for attrs, key in calls:  # each call gathers exactly one unit's parameters
        members = [a.strip() for a in attrs.split(",")]
        assert len({fsdp[a].fsdp_unit for a in members}) == 1 and key == "dp:0,1,2,3,4,5,6,7"
    assert sorted(a.strip() for attrs, _ in calls for a in attrs.split(",")) == sorted(fsdp)
    for attr, s in fsdp.items():
        assert s.dp_index == 5 and s.dp_group == "dp:0,1,2,3,4,5,6,7"
        assert getattr(prog.gm, attr).shape == (-(-torch.Size(s.global_shape).numel() // WORLD),)
    comm = fake_pg(5, plan)
    with comm.observe() as counter:
        prog.gm(*inputs).backward()
    counts = counter.snapshot()
    kinds = {(k, phase): c.calls for (k, _, phase), c in counts.items()}
    assert kinds == {("all_gather", "fwd"): len(units), ("reduce_scatter", "bwd"): len(units)}
    # every FSDP shard got a gradient of its stored shape (async reduce-scatters were waited for)
    for attr in fsdp:
        p = prog.gm.get_parameter(attr)
        assert p.grad is not None and p.grad.shape == p.shape, attr


def test_dp_plan_slices_rows_and_scales_loss(gpt):
    _, inputs, traced, lg, space = gpt
    plan = fx_.make_plan(lg, WORLD, lambda layer: 0, fx_.uniform(WORLD, 1), microbatches=1)
    prog = emit_rank(traced, lg, space, plan, 5, ops=GRAPH_OPS)
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
    first, second = (emit_rank(traced, lg, space, plan, r, ops=GRAPH_OPS) for r in (2, 6))
    assert second.inputs == first.outputs and second.input_layouts == first.output_layouts
    # rows regrouped from dp=4 to dp=1 over the stage's ranks 4..7 (an all-gather of the rows)
    assert "fxplan_regroup_rows(" in _code(second) and "'rows:4,5,6,7'" in _code(second)


def test_tied_weight_copy_on_later_tp_stage(gpt, fake_pg):
    """pp=2 x tp=4 on a tied GPT: stage 1's copy of the embedding (read by the head) is stored and
    consumed with the head's input placement; both stages run forward and backward with it."""
    _, inputs, traced, lg, space = gpt
    n = len(lg.layers)
    plan = fx_.make_plan(lg, WORLD, lambda layer: int(layer.index >= n // 2), fx_.uniform(1, 4, space))
    first, second = (emit_rank(traced, lg, space, plan, r, ops=GRAPH_OPS) for r in (0, 4))
    shared = {s.name for s in first.params.values()} & {s.name for s in second.params.values()}
    assert shared, "the fixture's GPT ties its embedding and head"
    fake_pg(0, plan)
    sent = [t.detach().requires_grad_(t.is_floating_point()) for t in first.gm(*inputs)]
    dist.destroy_process_group()
    comm = fake_pg(4, plan)
    loss = second.gm(*sent)
    loss.backward()
    for attr, s in second.params.items():
        p = getattr(second.gm, attr)
        assert tuple(p.shape) == s.stored_shape
        if s.name in shared:
            assert p.grad is not None and p.grad.shape == p.shape


def test_fsdp_split_backward_input_then_weight(gpt, fake_pg):
    """Zero-bubble style backward (I then W, autograd.grad underneath) on an FSDP stage: the unit's
    reduce-scatter runs synchronously there (no async deferral), once per unit, and every shard
    gets its gradient."""
    backward = pytest.importorskip("torch.distributed.pipelining._backward")
    _, inputs, traced, lg, space = gpt
    n = len(lg.layers)
    plan = fx_.make_plan(lg, WORLD, lambda layer: int(layer.index >= n // 2), fx_.uniform(4, 1, fsdp=True))
    first, second = (emit_rank(traced, lg, space, plan, r, ops=GRAPH_OPS) for r in (0, 4))
    fake_pg(0, plan)
    sent = [t.detach().requires_grad_(t.is_floating_point()) for t in first.gm(*inputs)]
    dist.destroy_process_group()
    comm = fake_pg(4, plan)
    with comm.observe() as counter:
        loss = second.gm(*sent)
        params = list(second.gm.parameters())
        _, param_groups = backward.stage_backward_input([loss], None, [t for t in sent if t.requires_grad], params)
        backward.stage_backward_weight(params, param_groups)
    assert not comm.deferred
    units = {s.fsdp_unit for s in second.params.values() if s.fsdp}
    assert len(units) == n - n // 2
    rs = sum(c.calls for (k, _, phase), c in counter.snapshot().items() if k == "reduce_scatter" and phase == "bwd")
    assert rs == len(units)
    for attr, s in second.params.items():
        if s.fsdp:
            p = getattr(second.gm, attr)
            assert p.grad is not None and p.grad.shape == p.shape == s.stored_shape, attr
