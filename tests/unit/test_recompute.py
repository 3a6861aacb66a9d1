"""Recompute (activation checkpointing) in codegen: exact results, fewer saved activations, gloo tp.

The recompute layers of a rank's program run under torch.utils.checkpoint (non-reentrant); their
forward, in-layer collectives included, re-runs in backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import codegen_fixtures as fx_
from fxplan.codegen.emit import emit_rank
from fxplan.codegen.recompute import LAYER_META, recompute_pass
from fxplan.plan import Strategy
from fxplan.runtime.collectives import GRAPH_OPS

GPT_DROPOUT = fx_.GPT + ",dropout=0.1"  # random ops inside the recomputed layers must replay


@pytest.fixture(scope="module")
def gpt():
    return fx_.setup(spec=GPT_DROPOUT, tp_degrees=(2,))


def _plan(lg, recompute: set[str]):
    return fx_.make_plan(lg, 1, lambda layer: 0, lambda layer: Strategy(1, 1, recompute=layer.name in recompute))


def _run(fn, seed):
    torch.manual_seed(seed)
    loss = fn()
    loss.backward()
    return loss.detach()


def test_world_of_one_recompute_equals_model(gpt):
    model, inputs, traced, lg, space = gpt
    blocks = {layer.name for layer in lg.layers if layer.name.startswith("blocks")}
    assert blocks
    prog = emit_rank(traced, lg, space, _plan(lg, blocks | {"embed"}), 0, ops=GRAPH_OPS)
    code = prog.gm.code
    assert code.count("checkpoint(") == len(blocks) + 1
    regions = {name for name, _ in prog.gm.named_children()}
    assert regions == {"rc_embed"} | {"rc_" + b.replace(".", "_") for b in blocks}
    assert all("checkpoint" not in getattr(prog.gm, r).code for r in regions)  # no nesting
    other = _run(lambda: model(*inputs), seed=4)
    model.zero_grad()
    ref = _run(lambda: model(*inputs), seed=3)
    assert float(other) != float(ref)  # dropout does change the loss: the RNG matters
    loss = _run(lambda: prog.gm(*inputs), seed=3)
    torch.testing.assert_close(loss, ref)  # same masks in forward (same RNG order as the model) ...
    named = dict(model.named_parameters())
    for attr, shard in prog.params.items():  # ... and in the recomputation, else the grads differ
        torch.testing.assert_close(prog.gm.get_parameter(attr).grad, named[shard.name].grad, msg=shard.name)


def test_no_recompute_no_checkpoint(gpt):
    _, _, traced, lg, space = gpt
    prog = emit_rank(traced, lg, space, _plan(lg, set()), 0, ops=GRAPH_OPS)
    assert "checkpoint" not in prog.gm.code and not list(prog.gm.named_children())


def test_in_layer_collectives_move_into_regions(gpt):
    """tp=2: every collective emitted without recompute is still there exactly once; those of the
    recompute blocks sit inside their regions (so they re-run with the recomputation)."""
    _, _, traced, lg, space = gpt
    blocks = {layer.name for layer in lg.layers if layer.name.startswith("blocks")}

    def program(recompute):
        def strategy(layer):
            return Strategy(1, 2, recompute=layer.name in recompute, spec=fx_.megatron_label(space, layer, 2))
        return emit_rank(traced, lg, space, fx_.make_plan(lg, 2, lambda layer: 0, strategy), 1, ops=GRAPH_OPS).gm

    def collectives(gm):
        calls = [n.target.__name__ for n in gm.graph.nodes
                 if n.op == "call_function" and n.target.__name__.startswith("fxplan_") and n.target.__name__ !=
                 "fxplan_checkpoint"]
        return sorted(calls)

    plain, rc = program(set()), program(blocks)
    regions = [m for name, m in rc.named_children()]
    assert len(regions) == len(blocks)
    for region in regions:  # Megatron block: f and g for attention and for the MLP
        assert collectives(region).count("fxplan_tp_f") == 2 and collectives(region).count("fxplan_tp_all_reduce") == 2
    assert sorted(collectives(rc) + sum((collectives(r) for r in regions), [])) == collectives(plain)
    # embed / head keep theirs outside: every block all-reduce is inside a region, none outside
    outside = collectives(rc)
    assert outside and outside.count("fxplan_tp_all_reduce") == collectives(plain).count("fxplan_tp_all_reduce") - 2 * len(blocks)


def _saved_activations(gm, inputs) -> tuple[int, int]:
    """(tensors, bytes) autograd saves for backward outside checkpoint regions, parameters excluded;
    storages counted once (views of one buffer share it)."""
    params = {p.untyped_storage().data_ptr() for p in gm.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = gm(*inputs)
    loss.backward()
    return len(storages), sum(storages.values())


def test_recompute_saves_fewer_activations(gpt):
    _, inputs, traced, lg, space = gpt
    blocks = [layer.name for layer in lg.layers if layer.name.startswith("blocks")]
    measured = []
    for k in range(len(blocks) + 1):  # recompute on the first k blocks
        gm = emit_rank(traced, lg, space, _plan(lg, set(blocks[:k])), 0, ops=GRAPH_OPS).gm
        measured.append(_saved_activations(gm, inputs))
    for (n_less, b_less), (n_more, b_more) in zip(measured[1:], measured):
        assert n_less < n_more and b_less < b_more, measured
    # identical blocks: each one checkpointed drops about the same number of bytes
    drops = [more[1] - less[1] for more, less in zip(measured, measured[1:])]
    assert max(drops) <= 1.5 * min(drops), drops


def test_split_backward_input_then_weight_with_recompute(gpt):
    """Zero-bubble schedules run backward as I (input grads) then W (weight grads), two autograd
    calls: a checkpointed region recomputes for each, with the forward's RNG, and stays exact."""
    backward = pytest.importorskip("torch.distributed.pipelining._backward")
    _, inputs, traced, lg, space = gpt
    results = []
    for rc in (False, True):
        plan = fx_.make_plan(lg, 2, lambda layer: int(layer.index >= 1),
                             lambda layer: Strategy(1, 1, recompute=rc and layer.name.startswith("blocks")))
        first, second = (emit_rank(traced, lg, space, plan, r, ops=GRAPH_OPS) for r in (0, 1))
        assert ("checkpoint(" in second.gm.code) == rc
        torch.manual_seed(0)
        sent = [t.detach().requires_grad_(t.is_floating_point()) for t in first.gm(*inputs)]
        loss = second.gm(*sent)
        params = list(second.gm.parameters())
        dinputs, groups = backward.stage_backward_input([loss], None, [t for t in sent if t.requires_grad], params)
        backward.stage_backward_weight(params, groups)
        grads = {a: second.gm.get_parameter(a).grad for a in second.params}
        results.append((dinputs, grads))
    (d0, g0), (d1, g1) = results
    torch.testing.assert_close(d1, d0)
    assert g0.keys() == g1.keys() and all(g is not None for g in g0.values())
    for attr in g0:
        torch.testing.assert_close(g1[attr], g0[attr], msg=attr)


def test_recompute_pass_splits_non_contiguous_layer():
    """Layer a's nodes around a node of layer b: two regions, each checkpointed, still exact."""

    def f(x, w):
        a1 = torch.tanh(x @ w)
        b1 = torch.sin(a1)
        a2 = torch.relu(a1 * b1)
        return (a2 * x).sum()

    gm = fx.symbolic_trace(f)
    layer_of = {"matmul": "a", "tanh": "a", "sin": "b", "mul": "a", "relu": "a", "mul_1": "tail", "sum_1": "tail"}
    for node in gm.graph.nodes:
        node.meta[LAYER_META] = layer_of.get(node.name)
    out = recompute_pass(gm, {"a"})
    assert out.code.count("checkpoint(") == 2
    assert {name for name, _ in out.named_children()} == {"rc_a", "rc_a_1"}
    assert "checkpoint" not in gm.code  # the input module is left as it was
    x, w = torch.randn(4, 3, requires_grad=True), torch.randn(3, 3, requires_grad=True)
    ref = gm(x, w)
    gx, gw = torch.autograd.grad(ref, (x, w))
    got = out(x, w)
    hx, hw = torch.autograd.grad(got, (x, w))
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(hx, gx)
    torch.testing.assert_close(hw, gw)
