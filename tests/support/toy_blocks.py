"""Transformer pieces several tests build models from: a Megatron-style block written with
nn.Linear, the same block on raw parameters under arbitrary names, a stack with a scalar loss, and
a Hugging Face causal LM wrapped to return its loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attn(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, _ = x.shape
        # per-head fused layout [q_h, k_h, v_h] (Megatron's): whole heads per column shard
        qkv = self.qkv(x).view(b, t, self.heads, 3 * (self.dim // self.heads)).transpose(1, 2)
        q, k, v = qkv.split(self.dim // self.heads, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, self.dim))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attn(dim, heads)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class RawBlock(nn.Module):
    """The same block with raw parameters under arbitrary names, F.linear / F.layer_norm calls."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.dim, self.heads = dim, heads
        mk = lambda *s: nn.Parameter(torch.randn(*s) * 0.02)  # noqa: E731
        self.zz, self.zb = mk(3 * dim, dim), mk(3 * dim)
        self.yy, self.yb = mk(dim, dim), mk(dim)
        self.aa, self.ab = mk(4 * dim, dim), mk(4 * dim)
        self.qq, self.qb = mk(dim, 4 * dim), mk(dim)
        self.n1w, self.n1b, self.n2w, self.n2b = mk(dim), mk(dim), mk(dim), mk(dim)

    def forward(self, x):
        b, t, _ = x.shape
        dim, heads = self.dim, self.heads
        h = F.layer_norm(x, (dim,), self.n1w, self.n1b)
        qkv = self._linear(h, self.zz, self.zb).view(b, t, heads, 3 * (dim // heads)).transpose(1, 2)
        q, k, v = qkv.split(dim // heads, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self._linear(y.transpose(1, 2).reshape(b, t, dim), self.yy, self.yb)
        h = F.layer_norm(x, (dim,), self.n2w, self.n2b)
        return x + self._linear(F.gelu(self._linear(h, self.aa, self.ab)), self.qq, self.qb)

    def _linear(self, x, w, b):
        return F.linear(x, w, b)


class TransposedBlock(RawBlock):
    """The same block with its matmuls written `x @ w.T + b` (as Falcon's linears are), the transpose
    taken as `how`: "T" (the attribute), "t" (the method) or "transpose"."""

    def __init__(self, dim: int, heads: int, how: str = "T"):
        super().__init__(dim, heads)
        self.how = how

    def _linear(self, x, w, b):
        wt = w.T if self.how == "T" else w.t() if self.how == "t" else w.transpose(0, 1)
        return x @ wt + b


class Stack(nn.Module):
    """`n` blocks made by `make_block()`, then a scalar loss (mean of squares)."""

    def __init__(self, make_block, n: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(make_block() for _ in range(n))

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x.pow(2).mean()


class LossOf(nn.Module):
    """A Hugging Face causal LM as fxplan wants it: forward(input_ids, labels) -> the scalar loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels):
        return self.model(input_ids=input_ids, labels=labels, use_cache=False).loss
