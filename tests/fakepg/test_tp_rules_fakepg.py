"""The collectives the sharding rules of tests/support/tp_blocks.py's blocks emit, on the fake
process group (4 ranks): which calls each rank's graph holds, their count per block, and that the
forward and backward run with the local shapes. No real communication."""

from __future__ import annotations

import re

import pytest
import torch

import fxplan
from tp_blocks import build_lm, lm_batch

WORLD = 4
SLOW = fxplan.Cluster(nodes=1, devices_per_node=WORLD, memory_bytes=16e9, peak_flops=1e11, intra_bw=1e9,
                      inter_bw=1e9, intra_latency=5e-4, inter_latency=5e-4)




def _compiled(name: str):
    return fxplan.compile(build_lm(name), lm_batch(), cluster=SLOW,
                          constraints=fxplan.Constraints(pp=1, dp=1, tp=WORLD, microbatches=1), verbose=False)


def _block(code: str, i: int) -> str:
    start = code.index(f"blocks_{i}_norm1_weight = self")
    end = code.find(f"blocks_{i + 1}_norm1_weight = self")
    return code[start:end if end >= 0 else code.index("norm_weight = self")]


def _calls(code: str, fn: str) -> int:
    return len(re.findall(rf"= fxplan_runtime_collectives_fxplan_{fn}\(", code))


def _run(compiled, rank, fake_pg):
    comm = fake_pg(rank, compiled.plan)
    gm = compiled.rank_module(rank)
    with comm.observe() as counter:
        loss = gm(*lm_batch())  # shapes must line up; values are garbage on the fake group
        assert loss.shape == ()
        loss.backward()
    return gm, counter.snapshot()


def test_einsum_attention_and_mlp_shard_heads_and_contract_into_partial_sums(fake_pg):
    compiled = _compiled("einsum")
    gm, counts = _run(compiled, 1, fake_pg)
    code = gm.code
    for i in range(2):
        block = _block(code, i)
        # Megatron's pattern found through einsum: f before the column-split q/k/v and w_in, one
        # all-reduce after the row-split o and after w_out's einsum contracts the sharded hidden index
        assert _calls(block, "tp_f") == 2 and _calls(block, "tp_all_reduce") == 2, block
        # (block 0 may gather its input: the embedding's output leaves that layer split on features)
        assert _calls(block, "all_gather") <= (i == 0) and _calls(block, "all_to_all") == 0, block
    einsums = [n for n in gm.graph.nodes if n.op == "call_function" and "einsum" in str(n.target)]
    assert len(einsums) == 8
    heads = 4
    assert einsums[0].args[0] == "bqhd,bkhd->bhqk"
    for a in einsums[0].args[1:]:  # q and k as [b, t, local heads, head dim]
        assert a.target == "view" and tuple(a.args[1]) == (8, 16, heads // WORLD, 16), a.args
    fwd = sum(c.calls for (kind, _, phase), c in counts.items() if kind == "all_reduce" and phase == "fwd")
    assert fwd == _calls(code, "tp_all_reduce")
    w_in = next(p for p in gm.parameters() if p.shape == (64, 256 // WORLD))  # hidden 256 cut in 4
    assert w_in.grad is not None


def test_bmm_attention_keeps_heads_sharded_through_the_merged_batch(fake_pg):
    """[B, H/tp, T, hd] -> [B*H/tp, T, hd]: the head shard survives the merge as a blocked shard, so
    both bmms run on the local heads with no collective between the q/k/v and the bmms."""
    compiled = _compiled("bmm")
    gm, counts = _run(compiled, 2, fake_pg)
    code = gm.code
    for i in range(2):
        block = _block(code, i)
        attention = block[block.index("_attn_q_weight = self"):block.index("_attn_o_weight = self")]
        assert _calls(attention, "all_gather") == 0 and _calls(attention, "all_to_all") == 0, attention
        assert attention.count("torch.bmm(") == 2
    bmms = [n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "bmm"]
    assert len(bmms) == 4
    merged = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "reshape" and len(n.args[1]) == 3
              and n.args[1][1:] == (16, 16)]
    assert merged and all(n.args[1][0] == 8 * 4 // WORLD for n in merged)  # B*H / tp rows per rank
    assert sum(c.calls for (kind, _, phase), c in counts.items() if phase == "bwd") > 0


def test_fused_qkv_and_gate_up_weights_are_sharded_per_chunk(fake_pg):
    """A fused weight cut by chunk is stored as Megatron stores it (the rank's slice of every
    chunk), so chunk hands each rank its own q, k, v (gate, up) heads: no gather, no all-to-all."""
    compiled = _compiled("fused")
    rank = 3
    gm, counts = _run(compiled, rank, fake_pg)
    code = gm.code
    for i in range(2):
        block = _block(code, i)
        assert _calls(block, "tp_f") == 2 and _calls(block, "tp_all_reduce") == 2, block
        assert _calls(block, "all_gather") <= (i == 0) and _calls(block, "all_to_all") == 0, block
    model = compiled.model
    for name, chunks in (("qkv", 3), ("gate_up", 2)):
        full = getattr(model.blocks[0], name).weight.detach()
        mine = full.unflatten(0, (chunks, -1)).chunk(WORLD, dim=1)[rank].flatten(0, 1)
        assert torch.equal(getattr(gm, f"blocks_0_{name}_weight"), mine)


def test_convolutions_shard_their_channels(fake_pg):
    from fxplan.passes.ir import Shard
    from fxplan.passes.sharding.op_rules import strategies
    from tp_blocks import batch_for

    compiled = fxplan.compile(build_lm("conv"), batch_for("conv"), cluster=SLOW,
                              constraints=fxplan.Constraints(pp=1, dp=1, tp=WORLD, microbatches=1), verbose=False)
    convs = [n for n in compiled.source.traced.gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    assert len(convs) == 4
    for n in convs:  # output channels ("col") and input channels into a partial sum ("row")
        got = {(s.args[:2], str(s.out)) for s in strategies(n, WORLD)}
        assert any(args[1] == Shard(0) and out == "S(1)" for args, out in got)
        if n is not convs[0]:  # 3 input channels do not divide by 4
            assert ((Shard(1), Shard(1)), "P") in got
    comm = fake_pg(0, compiled.plan)
    gm = compiled.rank_module(0)
    with comm.observe() as counter:
        loss = gm(*batch_for("conv"))
        loss.backward()
    weights = {name: p for name, p in gm.named_parameters() if name.startswith("conv") and name.endswith("weight")}
    assert len(weights) == 4 and all(p.shape[0] * p.shape[1] * WORLD in (32 * 3, 32 * 32) for p in weights.values())
    kinds = {kind for kind, _, _ in counter.snapshot()}
    assert kinds <= {"all_reduce", "all_gather", "reduce_scatter"} and kinds  # (the loss may take its rows split)


def test_depthwise_convolutions_run_channel_split(fake_pg):
    """ConvNeXt's depthwise conv (groups == channels) under tp: each rank whole groups, its channel
    slice of the weight and `groups` / tp in its call, the conv's output channel-split."""
    from fxplan.passes.ir import Shard
    from fxplan.passes.sharding.op_rules import strategies
    from tp_blocks import batch_for

    compiled = fxplan.compile(build_lm("dwconv"), batch_for("dwconv"), cluster=SLOW,
                              constraints=fxplan.Constraints(pp=1, dp=1, tp=WORLD, microbatches=1), verbose=False)
    convs = [n for n in compiled.source.traced.gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    depthwise = [n for n in convs if n.args[1].meta["val"].shape[1] == 1]
    assert len(depthwise) == 2
    for n in depthwise:
        chan = [s for s in strategies(n, WORLD) if s.tag == "chan"]
        assert [(s.args[:2], s.out) for s in chan] == [((Shard(1), Shard(0)), Shard(1))]
        assert all(s.tag != "chan" for s in strategies(n, 3))  # 32 groups do not divide by 3
    assert all("chan" in s.spec for st in compiled.plan.stages for name, s in st.strategies.items()
               if name.startswith("blocks")), compiled.plan.stages
    comm = fake_pg(1, compiled.plan)
    gm = compiled.rank_module(1)
    with comm.observe():
        loss = gm(*batch_for("dwconv"))
        loss.backward()
    weights = {name: p for name, p in gm.named_parameters() if "dwconv" in name and name.endswith("weight")}
    assert len(weights) == 2 and all(tuple(p.shape) == (32 // WORLD, 1, 7, 7) and p.grad is not None
                                     for p in weights.values())
    full = compiled.model.blocks[0].dwconv.weight.detach()
    assert torch.equal(weights["blocks_0_dwconv_weight"], full.chunk(WORLD)[1])
    convs = [n for n in gm.graph.nodes if n.op == "call_function" and "conv2d" in str(n.target)]
    assert [n.args[6] for n in convs if len(n.args) > 6 and n.args[6] != 1] == [32 // WORLD] * 2, convs


def test_shape_only_arguments_leave_replicated_ops_replicated(fake_pg):
    """Gemma's RMSNorm ends in type_as(normed, residual) with the residual still a partial sum: the
    residual is read for its dtype only (ANY), so type_as stays replicated compute and its R input
    gets no f of its own; only the column-parallel linear after it does (two f's in a row would
    all-reduce the norm's gradient twice: 4x on 4 ranks)."""
    from fxplan.passes.sharding.op_strategy import ANY
    import hf_zoo

    model, batch = hf_zoo.build("gemma")
    compiled = fxplan.compile(model, batch, cluster=SLOW,
                              constraints=fxplan.Constraints(pp=1, dp=1, tp=WORLD, microbatches=1), verbose=False)
    casts = [n.name for n in compiled.source.traced.gm.graph.nodes if "type_as" in str(n.target)]
    assert len(casts) == 5
    placed = [spec.arg_placements[n] for (_, tp), specs in compiled.analysis.space.specs.items() if tp == WORLD
              for spec in specs for n in casts if n in spec.arg_placements]
    assert placed and all(p[1] is ANY for p in placed)
    comm = fake_pg(0, compiled.plan)
    gm = compiled.rank_module(0)
    with comm.observe():
        gm(*batch).backward()
    local = [n for n in gm.graph.nodes if "type_as" in str(n.target)]
    assert len(local) == 5
    for n in local:
        assert "tp_f" not in str(n.args[0].target), n.format_node()
        assert any("tp_f" in str(u.target) for u in n.users) or n is local[-1], n.format_node()
