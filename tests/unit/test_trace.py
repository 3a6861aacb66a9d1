"""trace(): inlined fx graphs, meta shapes, batch dims, the export fallback and the errors."""


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxplan.errors import ModelError, TraceError
from fxplan.passes.trace import trace

import toy_models_trace as toy


def _by_op(traced, name):
    return [n for n in traced.gm.graph.nodes if getattr(n.target, "__name__", n.target) == name]


@pytest.mark.parametrize("make", [toy.GPT, toy.RawGPT])
def test_traced_graph_runs_like_the_model(make):
    torch.manual_seed(0)
    model = make()
    inputs = toy.gpt_batch()
    traced = trace(model, inputs)
    assert traced.method == "fx"
    torch.testing.assert_close(traced.gm(*inputs), model(*inputs))
    # Gradients flow to the same parameters as the model's.
    traced.gm(*inputs).backward()
    grads = {k: p.grad for k, p in traced.gm.named_parameters()}
    model(*inputs).backward()
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(grads[name], p.grad)


def test_mlp_runs_and_every_module_is_inlined():
    model = toy.MLP()
    x, y = torch.randn(4, 16), torch.randn(4, 16)
    traced = trace(model, (x, y))
    torch.testing.assert_close(traced.gm(x, y), model(x, y))
    assert not [n for n in traced.gm.graph.nodes if n.op == "call_module"]
    assert len(_by_op(traced, "linear")) == 3


def test_params_are_get_attr_nodes_named_by_state_dict_keys():
    model = toy.GPT()
    traced = trace(model, toy.gpt_batch())
    keys = set(model.state_dict())
    targets = [n.target for n in traced.gm.graph.nodes if n.op == "get_attr"]
    assert targets and set(targets) <= keys
    # Every parameter appears (the tied head weight once, under the embedding's name).
    assert {k for k, _ in model.named_parameters()} == set(targets)
    wte = next(n for n in traced.gm.graph.nodes if n.op == "get_attr" and n.target == "wte.weight")
    assert len(wte.users) == 2
    # get_attr nodes sit right before their first user; module paths are kept.
    order = {n: i for i, n in enumerate(traced.gm.graph.nodes)}
    ln = next(n for n in traced.gm.graph.nodes if n.op == "get_attr" and n.target == "blocks.2.ln1.weight")
    assert min(order[u] for u in ln.users) - order[ln] <= 2
    assert "blocks.2.ln1" in [v[0] for v in ln.meta["nn_module_stack"].values()]


def test_raw_f_linear_model_shapes_and_batch_dims():
    B, T = 3, 16
    traced = trace(toy.RawGPT(layers=2), toy.gpt_batch(batch=B, seq=T))
    tensors = traced.tensors
    assert traced.batch_size == B and traced.placeholders == ("idx", "targets")
    assert tensors["idx"].shape == (B, T) and tensors["idx"].batch_dim == 0
    assert tensors["emb"].batch_dim is None and tensors["emb"].shape == (64, 32)
    linears = _by_op(traced, "linear")
    assert len(linears) == 5
    assert [tensors[n.name].shape for n in linears[:2]] == [(B, T, 128), (B, T, 32)]
    assert all(tensors[n.name].batch_dim == 0 for n in linears)
    first_t = _by_op(traced, "transpose")[0]
    assert tensors[first_t.name].shape == (T, B, 32) and tensors[first_t.name].batch_dim == 1
    flat = _by_op(traced, "flatten")[0]  # (B*T, V): the batch is merged into dim 0
    assert tensors[flat.name].shape == (B * T, 64) and tensors[flat.name].batch_dim == 0
    loss = tensors[traced.loss_node]
    assert loss.shape == () and loss.batch_dim is None and loss.dtype == "torch.float32"
    node = next(n for n in traced.gm.graph.nodes if n.name == flat.name)
    assert node.meta["fxplan_batch_dim"] == 0 and node.meta["val"].device.type == "meta"


def test_view_merging_batch_and_sdpa_shapes():
    B, T = 2, 16
    traced = trace(toy.GPT(), toy.gpt_batch(batch=B, seq=T))
    t = traced.tensors
    sdpa = _by_op(traced, "scaled_dot_product_attention")
    assert len(sdpa) == 4 and t[sdpa[0].name].shape == (B, 4, T, 8) and t[sdpa[0].name].batch_dim == 0
    views = [n for n in _by_op(traced, "view") if n.name in t and t[n.name].shape == (B * T, 64)]
    assert views and t[views[0].name].batch_dim == 0
    pos = next(n for n in traced.gm.graph.nodes if n.name in t and t[n.name].shape == (T, 32))
    assert t[pos.name].batch_dim is None  # the position embedding does not scale with the batch
    # B and T are recomputed from the inputs right where the head uses them (no Python value
    # travels from the embedding to the head).
    view = views[0]
    size_args = [a for a in view.all_input_nodes if a is not view.args[0]]
    assert size_args and all(abs(_pos(traced, view) - _pos(traced, a)) < 6 for a in size_args)


def _pos(traced, node):
    return list(traced.gm.graph.nodes).index(node)


def test_meta_model_traces_like_the_real_one():
    real = trace(toy.GPT(), toy.gpt_batch())
    with torch.device("meta"):
        model = toy.GPT()
    meta = trace(model, toy.gpt_batch(device="meta"))
    assert dict(meta.tensors) == dict(real.tensors)
    assert all(p.device.type == "meta" for p in meta.gm.parameters())


def test_batch_one_and_batch_four_agree_on_batch_dims():
    one = trace(toy.GPT(), toy.gpt_batch(batch=1))
    four = trace(toy.GPT(), toy.gpt_batch(batch=4))
    assert {k: v.batch_dim for k, v in one.tensors.items()} == {k: v.batch_dim for k, v in four.tensors.items()}


# ---------------------------------------------------------------- errors and the export fallback


class ShapeBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        if x.shape[1] > 4:  # fx cannot branch on a traced size; export can
            x = self.lin(x)
        return x.pow(2).mean()


class DataBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: neither fx nor export can trace it
            x = self.lin(x)
        return x.mean()


def test_control_flow_on_sizes_falls_back_to_export():
    model = ShapeBranch()
    x = torch.randn(4, 8)
    traced = trace(model, (x,))
    assert traced.method == "export"
    torch.testing.assert_close(traced.gm(x), model(x))
    assert traced.tensors[traced.placeholders[0]].batch_dim == 0
    assert [n.target for n in traced.gm.graph.nodes if n.op == "get_attr"] == ["lin.weight", "lin.bias"]
    linear = next(n for n in traced.gm.graph.nodes if n.target is torch.ops.aten.linear.default)
    assert traced.tensors[linear.name].shape == (4, 8) and traced.tensors[linear.name].batch_dim == 0


def test_data_dependent_control_flow_names_the_line():
    with pytest.raises(TraceError) as info:
        trace(DataBranch(), (torch.randn(4, 8),))
    assert "test_trace.py" in str(info.value) and "x.sum() > 0" in str(info.value)


def test_fx_only_raises_trace_error():
    with pytest.raises(TraceError, match="x.shape"):
        trace(ShapeBranch(), (torch.randn(4, 8),), method="fx")


class NotScalar(nn.Module):
    def forward(self, x):
        return x * 2


def test_non_scalar_output_raises_model_error():
    with pytest.raises(ModelError, match="scalar training loss"):
        trace(NotScalar(), (torch.randn(4, 8),))


def test_bad_example_inputs_raise_model_error():
    model = toy.GPT()
    idx, tgt = toy.gpt_batch()
    with pytest.raises(ModelError, match="batch size"):
        trace(model, (idx, tgt[:1]))
    with pytest.raises(ModelError, match="tensor"):
        trace(model, (idx, 3))
    with pytest.raises(ModelError, match="targets"):
        trace(model, (idx,))
    with pytest.raises(ModelError):
        trace(model, (idx, tgt, tgt))


class IntLoss(nn.Module):
    def forward(self, x):
        return (x > 0).sum()


def test_integer_output_is_not_a_loss():
    with pytest.raises(ModelError, match="scalar"):
        trace(IntLoss(), (torch.randn(4, 8),))


def test_hard_coded_batch_size_is_reported():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(x).view(4 * 8).mean()

    with pytest.raises(TraceError, match="batch"):
        trace(Fixed(), (torch.randn(4, 8),), method="fx")
