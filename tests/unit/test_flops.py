"""node_flops / node_saved_bytes on both graph flavours (torch callables and aten OpOverloads)."""


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxplan.passes.cost.flops import ATTENTION, MATMUL, node_flops, node_saved_bytes
from fxplan.passes.ir import out_of_place_name as op_name
from fxplan.passes.trace import trace

import toy_models_trace as toy


class Attn(nn.Module):
    def __init__(self, causal, p=0.0):
        super().__init__()
        self.lin = nn.Linear(16, 48)
        self.causal, self.p = causal, p

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.lin(x).view(B, T, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        y = F.dropout(F.layer_norm(y, (8,)), p=self.p, training=True)
        return y.float().mean()


def _nodes(traced, name):
    return [n for n in traced.gm.graph.nodes if op_name(n) == name]


@pytest.mark.parametrize("method", ["fx", "export"])
def test_linear_attention_norm_flops(method):
    B, T = 3, 10
    x = torch.randn(B, T, 16)
    causal = trace(Attn(True), (x,), method=method)
    full = trace(Attn(False), (x,), method=method)
    (lin,) = _nodes(causal, "linear")
    assert node_flops(lin) == 2 * B * T * 16 * 48 + B * T * 48
    (att,) = _nodes(causal, "scaled_dot_product_attention")
    (att_full,) = _nodes(full, "scaled_dot_product_attention")
    assert node_flops(att_full) == 4 * B * 2 * T * T * 8
    assert node_flops(att) == node_flops(att_full) / 2
    (ln,) = _nodes(causal, "layer_norm")
    assert node_flops(ln) == 5 * B * 2 * T * 8
    for n in causal.gm.graph.nodes:
        if op_name(n) in ("view", "permute", "unbind", "getitem", "get_attr", "placeholder"):
            assert node_flops(n) == 0 and node_saved_bytes(n) == 0


@pytest.mark.parametrize("method", ["fx", "export"])
def test_saved_bytes(method):
    B, T = 3, 10
    x = torch.randn(B, T, 16)
    traced = trace(Attn(True, p=0.1), (x,), method=method)
    (lin,) = _nodes(traced, "linear")
    assert node_saved_bytes(lin) == B * T * 16 * 4  # its input, not the weight
    (att,) = _nodes(traced, "scaled_dot_product_attention")
    qkv_out = 4 * B * 2 * T * 8 * 4
    assert node_saved_bytes(att) == qkv_out + B * 2 * T * 4  # + log-sum-exp
    (drop,) = _nodes(traced, "dropout")
    assert node_saved_bytes(drop) == B * 2 * T * 8  # one byte of mask per element
    assert node_flops(drop) > 0
    off = trace(Attn(True, p=0.0), (x,), method=method)
    assert node_saved_bytes(_nodes(off, "dropout")[0]) == 0


def test_fx_and_export_agree_on_gpt_matmul_and_attention_flops():
    inputs = toy.gpt_batch()
    fx_traced = trace(toy.GPT(layers=2), inputs, method="fx")
    ex_traced = trace(toy.GPT(layers=2), inputs, method="export")

    def heavy(traced):
        return sum(node_flops(n) for n in traced.gm.graph.nodes if op_name(n) in MATMUL | ATTENTION)

    def total(traced):
        return sum(node_flops(n) for n in traced.gm.graph.nodes)

    assert heavy(fx_traced) == heavy(ex_traced) > 0
    assert total(fx_traced) == pytest.approx(total(ex_traced), rel=0.05)
    assert sum(node_saved_bytes(n) for n in fx_traced.gm.graph.nodes) == pytest.approx(
        sum(node_saved_bytes(n) for n in ex_traced.gm.graph.nodes), rel=0.05)


def test_matmul_bmm_and_einsum():
    class M(nn.Module):
        def forward(self, a, b):
            return (torch.matmul(a, b).sum() + torch.bmm(a, b).sum() + torch.einsum("bij,bjk->bik", a, b).sum())

    a, b = torch.randn(2, 5, 7), torch.randn(2, 7, 3)
    traced = trace(M(), (a, b))
    for name in ("matmul", "bmm", "einsum"):
        (n,) = _nodes(traced, name)
        assert node_flops(n) == 2 * 2 * 5 * 7 * 3, name
