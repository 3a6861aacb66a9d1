"""Sharding propagation (passes/sharding/shard_prop.py, its op rules) and redistribution (redistribute.py)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxplan.passes.coarsen import coarsen
from fxplan.passes.ir import P, R, Shard, TensorMeta, op_name
from fxplan.passes.sharding.redistribute import Layout, consume_steps, layout_steps, steps_comms, tensor_steps, transition
from fxplan.passes.sharding.shard_prop import build_strategy_space
from fxplan.passes.trace import trace

import toy_blocks

C, H, T, B = 64, 8, 16, 4


# ---------------------------------------------------------------- models


def Block():
    return toy_blocks.Block(C, H)


def RawBlock():
    return toy_blocks.RawBlock(C, H)


Stack = toy_blocks.Stack


def _space(model, tps=(1, 2, 4), inputs=None):
    traced = trace(model, inputs if inputs is not None else (torch.randn(B, T, C),))
    graph = coarsen(traced)
    return traced, graph, build_strategy_space(traced, graph, tps)


def _block_layers(graph):
    return [l for l in graph.layers if l.name.startswith("blocks.")]


def _fwd(spec, kind):
    return [c for c in spec.comms if c.phase == "fwd" and c.kind == kind]


def _weights(traced, layer, spec):
    """Placements of the layer's 2-D parameters in graph order."""
    nodes = {n.name: n for n in traced.gm.graph.nodes}
    params = dict(traced.gm.named_parameters())
    return [spec.placements[x] for x in layer.nodes
            if nodes[x].op == "get_attr" and nodes[x].target in params and params[nodes[x].target].dim() == 2]


# ---------------------------------------------------------------- propagation


@pytest.mark.parametrize("tp", [2, 4])
def test_gpt_block_column_then_row_emerges(tp):
    traced, graph, space = _space(Stack(Block))
    layer = _block_layers(graph)[0]
    every = space.for_layer(layer.index, tp)
    assert len({s.label for s in every}) == len(every)
    specs = [s for s in every if not s.label.startswith("sp:")]  # (sequence-parallel twins: their own test)
    assert len(specs) <= 6
    full = [s for s in specs if all(isinstance(p, Shard) for p in _weights(traced, layer, s))]
    assert full, [s.label for s in specs]
    best = min(full, key=lambda s: sum(c.nbytes for c in s.comms))
    # Megatron: column (S(0) of [out, in]) then row (S(1)), for attention and for the MLP
    assert _weights(traced, layer, best) == [Shard(0), Shard(1), Shard(0), Shard(1)]
    assert best.label == "col>row>col>row"
    assert len(_fwd(best, "all_reduce")) == 2
    assert [c for c in best.comms if c.phase == "fwd"] == _fwd(best, "all_reduce")
    act = TensorMeta((B, T, C), "torch.float32", 4, 0).nbytes
    assert all(c.nbytes == act and c.per_sample for c in _fwd(best, "all_reduce"))
    # backward: the f of each column pair's input (plus the row biases' tiny fixed-size gradients)
    big_bwd = [c for c in best.comms if c.phase == "bwd" and c.per_sample]
    assert [c.kind for c in big_bwd] == ["all_reduce", "all_reduce"]
    # per device: parameters of the 4 matrices divided by tp; forward FLOPs shrink
    mats = sum(traced.tensors[x].numel for x in layer.nodes if x in traced.tensors and len(traced.tensors[x].shape) == 2
               and {n.name: n for n in traced.gm.graph.nodes}[x].op == "get_attr")
    assert best.param_numel < layer.param_numel - mats * (1 - 1 / tp) + 4 * C * 4
    assert best.flops < layer.flops / tp * 1.5
    # the replicated spec is there, free of comms
    rep = space.spec(layer.index, tp, "R")
    assert rep.comms == () and rep.param_numel == layer.param_numel


def _summary(specs):
    return sorted((s.label, tuple(sorted((c.kind, c.phase, c.nbytes, c.per_sample) for c in s.comms)), s.param_numel)
                  for s in specs)


def test_raw_parameters_under_other_names_give_the_same_specs():
    torch.manual_seed(0)
    _, g1, s1 = _space(Stack(Block))
    _, g2, s2 = _space(Stack(RawBlock))
    for tp in (2, 4):
        a = s1.for_layer(_block_layers(g1)[0].index, tp)
        b = s2.for_layer(_block_layers(g2)[0].index, tp)
        assert _summary(a) == _summary(b)


@pytest.mark.parametrize("how,method", [("T", "fx"), ("t", "fx"), ("transpose", "fx"), ("T", "export")])
def test_weights_read_through_a_transpose_are_sharded_like_linear_weights(how, method):
    """`x @ w.T + b` offers the specs F.linear does: the weight's placement is chosen at the matmul
    (decided at the transpose, every placement but R lost to one greedy choice at the matmul)."""
    torch.manual_seed(0)
    _, g1, s1 = _space(Stack(Block))
    traced = trace(Stack(lambda: toy_blocks.TransposedBlock(C, H, how)), (torch.randn(B, T, C),), method=method)
    g2 = coarsen(traced)
    s2 = build_strategy_space(traced, g2, (1, 2, 4))
    for tp in (2, 4):
        a = s1.for_layer(_block_layers(g1)[0].index, tp)
        b = s2.for_layer(_block_layers(g2)[0].index, tp)
        best = min((s for s in b if s.label == "col>row>col>row"), key=lambda s: sum(c.nbytes for c in s.comms))
        assert _weights(traced, _block_layers(g2)[0], best) == [Shard(1), Shard(0), Shard(1), Shard(0)] or \
            _weights(traced, _block_layers(g2)[0], best) == [Shard(0), Shard(1), Shard(0), Shard(1)]
        assert len(_fwd(best, "all_reduce")) == 2 and [c for c in best.comms if c.phase == "fwd"] == _fwd(best, "all_reduce")
        assert {s.label for s in a} <= {s.label for s in b} | {"R"}, ([s.label for s in a], [s.label for s in b])
        assert min(s.param_numel for s in b) == min(s.param_numel for s in a)


def test_identical_blocks_share_results_under_their_own_names():
    _, graph, space = _space(Stack(Block, n=3))
    l0, l2 = _block_layers(graph)[0], _block_layers(graph)[2]
    assert l0.signature and l0.signature == l2.signature
    a, b = space.for_layer(l0.index, 2), space.for_layer(l2.index, 2)
    assert [s.label for s in a] == [s.label for s in b]
    for s in b:
        assert set(s.placements) == set(l2.nodes)
        assert set(s.output_placements) == set(l2.outputs)
        assert all(not isinstance(p, type(P)) for p in s.output_placements.values())


def test_llama_block_gets_column_and_row():
    from fxplan.models import registry

    model = registry.build("llama", layers=2, hidden=64, heads=4, kv_heads=2, seq=16, vocab=128, ffn=128)
    traced = trace(model, model.example_batch(2))
    graph = coarsen(traced)
    space = build_strategy_space(traced, graph, (2,))
    layer = _block_layers(graph)[0]
    specs = space.for_layer(layer.index, 2)
    full = [s for s in specs if all(isinstance(p, Shard) for p in _weights(traced, layer, s))]
    best = min(full, key=lambda s: sum(c.nbytes for c in s.comms))
    # q, k, v column; o row; gate, up column; down row (RMSNorm via pow/mean/rsqrt stays R)
    assert _weights(traced, layer, best) == [Shard(0)] * 3 + [Shard(1)] + [Shard(0)] * 2 + [Shard(1)]
    assert [c.kind for c in best.comms if c.phase == "fwd"] == ["all_reduce", "all_reduce"]
    assert [c.kind for c in best.comms if c.phase == "bwd"] == ["all_reduce", "all_reduce"]


class Elementwise(nn.Module):
    def forward(self, x):
        return (torch.tanh(x) * 2 + x.exp()).sum()


def test_elementwise_layer_gets_only_replicated():
    traced, graph, space = _space(Elementwise(), tps=(1, 2, 4))
    for layer in graph.layers:
        for tp in (2, 4):
            specs = space.for_layer(layer.index, tp)
            assert [s.label for s in specs] == ["R"]
            assert specs[0].comms == ()


@torch.fx.wrap
def mystery(x):
    return x.flip(-1) * 1.5


class WithUnknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(C, C)
        self.fc2 = nn.Linear(C, C)

    def forward(self, x):
        return self.fc2(mystery(self.fc(x))).pow(2).mean()


def test_unknown_op_runs_replicated():
    traced, graph, space = _space(WithUnknown(), tps=(2,))
    name = next(n.name for n in traced.gm.graph.nodes if n.target is mystery)
    layer = next(l for l in graph.layers if name in l.nodes)
    specs = space.for_layer(layer.index, 2)
    assert specs
    for s in specs:
        assert s.placements[name] == R
        assert all(p == R for p in s.arg_placements[name] if p is not None)


def test_gpt_block_tp8_is_fast():
    traced = trace(Stack(Block, n=2), (torch.randn(B, T, C),))
    graph = coarsen(traced)
    t0 = time.process_time()  # CPU seconds: a shared CI host's other jobs must not fail it
    space = build_strategy_space(traced, graph, (8,))
    took = time.process_time() - t0
    assert took < 1.0, f"{took:.2f} s of CPU"
    assert any(s.label == "col>row>col>row" for s in space.for_layer(_block_layers(graph)[0].index, 8))


# ---------------------------------------------------------------- redistribute

META = TensorMeta((8, 16, 32), "torch.float32", 4, 0)


def test_transitions():
    assert transition(R, R, 4) == ()
    (g,) = transition(P, R, 4)
    assert (g.kind, g.fwd, g.bwd) == ("g", "all_reduce", None)
    (ag,) = transition(Shard(2), R, 4)
    assert (ag.fwd, ag.bwd, ag.dim) == ("all_gather", None, 2)
    (sl,) = transition(R, Shard(1), 4)
    assert (sl.fwd, sl.bwd, sl.dim) == (None, "all_gather", 1)
    (rs,) = transition(P, Shard(0), 4)
    assert (rs.fwd, rs.bwd) == ("reduce_scatter", "all_gather")
    (a2a,) = transition(Shard(1), Shard(2), 4)
    assert (a2a.fwd, a2a.bwd, a2a.dim, a2a.dim2) == ("all_to_all", "all_to_all", 1, 2)
    (part,) = transition(R, P, 4)
    assert (part.fwd, part.bwd) == (None, "all_reduce")
    assert transition(Shard(0), R, 1) == ()


def test_f_rule_and_fusion():
    (f,) = consume_steps(R, R, 4, sharded_consumer=True)
    assert (f.kind, f.fwd, f.bwd) == ("f", None, "all_reduce")
    assert consume_steps(R, R, 4, sharded_consumer=False) == ()
    (fused,) = consume_steps(Shard(1), R, 4, sharded_consumer=True)
    assert (fused.fwd, fused.bwd) == ("all_gather", "reduce_scatter")
    # one gathered copy feeding a replicated and a sharded consumer: gather, then f on top
    chains = tensor_steps(Shard(1), [(R, False), (R, True)], 4)
    assert [s.kind for s in chains[(R, False)]] == ["gather"]
    assert [s.kind for s in chains[(R, True)]] == ["gather", "f"]


def test_layout_steps_dp_to_tp_gathers_rows():
    steps = layout_steps(Layout(4, 1, R), Layout(1, 4, R), META, requires_grad=True)
    assert [(s.kind, s.fwd, s.bwd, s.dim, s.group) for s in steps] == [("gather_rows", "all_gather", None, 0, 4)]
    (c,) = steps_comms(steps, META)
    assert (c.kind, c.phase, c.nbytes, c.per_sample) == ("all_gather", "fwd", META.nbytes, True)


def test_layout_steps_tp_gather_and_row_slice():
    steps = layout_steps(Layout(2, 2, Shard(2)), Layout(2, 2, R), META, requires_grad=True)
    assert [(s.kind, s.axis, s.fwd, s.bwd, s.dim, s.group) for s in steps] == [("gather", "tp", "all_gather", None, 2, 2)]
    (c,) = steps_comms(steps, META)
    assert c.nbytes == META.nbytes / 2  # one tp group gathers its dp block of rows
    # dp 1 -> 4: a local row slice; the gradient rows are all-gathered back
    steps = layout_steps(Layout(1, 4, R), Layout(4, 1, R), META, requires_grad=True)
    assert [(s.kind, s.fwd, s.bwd, s.bwd_group) for s in steps] == [("slice_rows", None, "all_gather", 4)]
    assert [c.phase for c in steps_comms(steps, META)] == ["bwd"]
    assert steps_comms(steps, META, requires_grad=False) == ()
    assert layout_steps(Layout(2, 2, Shard(1)), Layout(2, 2, Shard(1)), META, True) == ()


def test_layout_steps_shared_weight_gradient_convention():
    w = TensorMeta((100, 32), "torch.float32", 4, None)
    steps = layout_steps(Layout(4, 1, R), Layout(2, 2, Shard(0)), w, requires_grad=True)
    kinds = [s.kind for s in steps]
    assert kinds == ["slice", "dp_grad"]
    dp_grad = steps[-1]
    assert (dp_grad.bwd, dp_grad.group, dp_grad.scale) == ("all_reduce", 2, 0.25)
    comms = steps_comms(steps, w)
    assert all(not c.per_sample for c in comms)


# ---------------------------------------------------------------- rules that must not cut a dim they reorder


class _GluAndCausal(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (y.view(b, t, H, c // H).transpose(1, 2) for y in self.qkv(x).chunk(3, dim=-1))
        causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        full = F.scaled_dot_product_attention(q, k, v)
        return F.glu(causal.transpose(1, 2).reshape(b, t, c), dim=-1).sum() + full.sum()


def _strategies_of(fn_name: str, tp: int = 4):
    from fxplan.passes.sharding.op_rules import strategies

    traced = trace(_GluAndCausal(), (torch.randn(B, T, C),))
    nodes = [n for n in traced.gm.graph.nodes if n.op == "call_function" and op_name(n) == fn_name]
    return [strategies(n, tp) for n in nodes], nodes


def test_glu_is_never_cut_along_the_dim_it_halves():
    # glu(x, -1) pairs element i with element i + n/2: a shard of x along -1 holds neither pair whole
    (res,), (node,) = _strategies_of("glu")
    last = len(node.meta["val"].shape) - 1
    assert not any(s.out == Shard(last) or Shard(last) in s.args for s in res)
    assert any(s.out == Shard(1) for s in res)  # the sequence (any other dim) still shards


def test_causal_attention_never_shards_the_query_sequence_alone():
    # a causal mask counts query positions from 0: on a query shard of the sequence it would mask
    # against the shard's own positions, not the whole sequence's
    (causal, full), _ = _strategies_of("scaled_dot_product_attention")
    seq = lambda res: [s for s in res if s.out == Shard(2)]  # noqa: E731
    assert seq(full) and not seq(causal)
    assert any(s.out == Shard(1) for s in causal)  # heads still shard


class _MovesAlongTheSequence(nn.Module):
    """Ops that slice, shift, pad, reorder or pick along dim 1 (HF's shifted logits among them)."""

    def forward(self, x):
        b, t, c = x.shape
        idx = torch.arange(t - 1, device=x.device)
        ys = [x[:, :-1], x[..., 1:, :], x.narrow(1, 1, t - 1), torch.roll(x, 1, 1), x.flip(1),
              F.pad(x, (0, 0, 0, 1)), torch.cat([x, x[:, :1]], 1), x.index_select(1, idx),
              torch.gather(x, 1, idx.view(1, -1, 1).expand(b, -1, c)), x[:, -1]]
        return sum(y.sum() for y in ys)


def test_no_rule_keeps_a_shard_of_the_dim_it_slices_shifts_or_reorders():
    # a shard's slice / roll / pad is not the shard of the whole's: rank i's x[:, :-1] drops its own
    # last position, not the sequence's. The dim must be gathered first (only the replicated form).
    from fxplan.passes.sharding.op_rules import strategies

    traced = trace(_MovesAlongTheSequence(), (torch.randn(B, T, C),))
    x = next(n for n in traced.gm.graph.nodes if n.op == "placeholder")
    moved = [u for u in x.users if op_name(u) not in ("sym_size", "size")]
    assert len(moved) >= 9, [op_name(u) for u in moved]
    for node in moved:
        for s in strategies(node, 4):
            assert s.args[node.all_input_nodes.index(x)] != Shard(1), (node.format_node(), s)
