"""codegen: split stages, single-process rank modules, process-group keys, and a 2-rank gloo run."""

from __future__ import annotations

import pytest
import torch

import codegen_fixtures as fx_
from fxplan.codegen import groups
from fxplan.codegen.emit import emit_rank
from fxplan.codegen.params import ParamShard, shard_tensor, unshard_ranks
from fxplan.codegen.split import split_stages
from fxplan.plan import Strategy
from fxplan.runtime.collectives import GRAPH_OPS


@pytest.fixture(scope="module")
def gpt():
    return fx_.setup(tp_degrees=(2,))


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def test_split_stages_chain_equals_model(gpt):
    model, inputs, traced, lg, _ = gpt
    n = len(lg.layers)
    stage_of = [0] + [1] * (n - 2) + [2]  # embed | blocks | head: targets pass through stage 1
    stages = split_stages(traced, lg, stage_of)
    assert [s.index for s in stages] == [0, 1, 2]
    assert stages[0].inputs == traced.placeholders
    assert stages[1].inputs == stages[0].outputs and stages[2].inputs == stages[1].outputs
    assert "targets" in stages[1].inputs and "targets" in stages[1].outputs  # passed through unchanged
    assert stages[-1].outputs == (traced.loss_node,)
    out = inputs
    for s in stages:
        out = s.gm(*out)
        s.gm.graph.lint()
    torch.testing.assert_close(out, model(*inputs))


def test_split_rejects_out_of_order_assignment(gpt):
    _, _, traced, lg, _ = gpt
    from fxplan.errors import PlanFileError
    with pytest.raises(PlanFileError):
        split_stages(traced, lg, [1] + [0] * (len(lg.layers) - 1))


def test_world_of_one_equals_model(gpt):
    model, inputs, traced, lg, space = gpt
    plan = fx_.make_plan(lg, 1, lambda layer: 0, fx_.uniform(1, 1))
    prog = emit_rank(traced, lg, space, plan, 0, ops=GRAPH_OPS)
    assert not [n for n in prog.gm.graph.nodes if n.op == "call_function"  # nothing to communicate
                and getattr(n.target, "__name__", "").startswith("fxplan_")]
    model.zero_grad()
    ref = model(*inputs)
    ref.backward()
    loss = prog.gm(*inputs)
    loss.backward()
    torch.testing.assert_close(loss, ref)
    for attr, shard in prog.params.items():
        torch.testing.assert_close(prog.gm.get_parameter(attr).grad, dict(model.named_parameters())[shard.name].grad)


@pytest.mark.parametrize("pp,dp,microbatches", [(1, 4, 1), (2, 2, 2)])
def test_dp_ranks_sum_to_model(gpt, pp, dp, microbatches):
    """dp (and pp) only: rank modules need no communication in forward, so run every rank here.

    Rank q of stage s+1 receives what rank q of stage s sent; the local losses times 1/microbatches
    sum to the model loss and the gradients (dp-partial) sum to the model's.
    """
    model, inputs, traced, lg, space = gpt
    n = len(lg.layers)
    stage_of = (lambda layer: 0) if pp == 1 else (lambda layer: int(layer.index >= n // 2))
    plan = fx_.make_plan(lg, pp * dp, stage_of, fx_.uniform(dp, 1), microbatches=microbatches)
    progs = [emit_rank(traced, lg, space, plan, r, ops=GRAPH_OPS) for r in range(pp * dp)]
    assert f"fxplan_rows(tokens, 0, 1, {dp}, '')" in progs[1].gm.code.replace("fxplan_runtime_collectives_", "")
    total = 0.0
    per = inputs[0].shape[0] // microbatches
    for m in range(microbatches):
        batch = tuple(x[m * per:(m + 1) * per] for x in inputs)
        for q in range(dp):
            out = batch
            for s in range(pp):
                out = progs[s * dp + q].gm(*out)
            (out / microbatches).backward()
            total += float(out.detach()) / microbatches
    model.zero_grad()
    ref = model(*inputs)
    ref.backward()
    assert abs(total - float(ref.detach())) < 1e-5
    summed: dict[str, torch.Tensor] = {}
    for prog in progs:
        for attr, shard in prog.params.items():
            g = prog.gm.get_parameter(attr).grad
            summed[shard.name] = summed.get(shard.name, 0) + g  # a tied weight on two stages adds up too
    for name, g in _grads(model).items():
        torch.testing.assert_close(summed[name], g, rtol=1e-4, atol=1e-6)


def test_meta_params_and_given_state_dict(gpt):
    model, inputs, traced, lg, space = gpt
    plan = fx_.make_plan(lg, 2, lambda layer: 0, fx_.uniform(2, 1, fsdp=True))
    prog = emit_rank(traced, lg, space, plan, 1, params="meta", ops=GRAPH_OPS)
    for attr, shard in prog.params.items():
        t = getattr(prog.gm, attr)
        assert t.is_meta and tuple(t.shape) == shard.stored_shape
    state = {k: torch.full_like(v, 3.0) for k, v in model.state_dict().items()}
    prog = emit_rank(traced, lg, space, plan, 1, params=state, ops=GRAPH_OPS)
    shard = next(s for s in prog.params.values() if s.fsdp)
    assert shard.numel_local == -(-torch.Size(shard.global_shape).numel() // 2)
    assert torch.all(getattr(prog.gm, next(a for a, s in prog.params.items() if s.fsdp)) == 3.0)


def test_shard_tensor_roundtrip():
    full = torch.arange(7 * 6, dtype=torch.float32).view(7, 6)
    shards = {}
    for r in range(6):  # (dp=3, tp=2) mesh, tp innermost, FSDP over dp with padding (numel 21 -> 3 x 7)
        shards[r] = ParamShard("w", (7, 6), 1, 2, r % 2, True, 3, r // 2, "dp", 7, True, (7, 3), (7,))
    pieces = {r: shard_tensor(full, s) for r, s in shards.items()}
    assert all(p.shape == (7,) for p in pieces.values())
    torch.testing.assert_close(unshard_ranks(pieces, shards), full)


def test_required_group_keys_deterministic(gpt):
    _, _, traced, lg, space = gpt

    def strategy(layer):
        return Strategy(2, 2, spec=fx_.megatron_label(space, layer, 2)) if layer.index % 2 else Strategy(4, 1)
    plan = fx_.make_plan(lg, 8, lambda layer: int(layer.index >= 2), strategy)
    keys = groups.required_group_keys(plan)
    assert keys == groups.required_group_keys(plan)
    sets = {groups.ranks_of(k) for k in keys}
    assert (0, 1) in sets and (4, 5) in sets  # tp groups (tp innermost) of both stages
    assert (0, 2) in sets and (1, 3) in sets  # dp groups of the (2, 2) mesh
    assert (0, 1, 2, 3) in sets and (0, 4) in sets and (3, 7) in sets  # stage-wide, pipeline lanes
    assert all(len(s) > 1 for s in sets)
    for r in range(8):  # everything a rank's graph uses is created
        used = {groups.ranks_of(k) for k in emit_rank(traced, lg, space, plan, r, ops=GRAPH_OPS).group_keys}
        assert used, "the mixed (4,1) -> (2,2) layouts must convert"
        assert {tuple(sorted(u)) for u in used} <= sets
