"""Building blocks shared by the presets, written so that every model traces cleanly.

Why subclasses of nn.Linear / nn.Embedding / nn.LayerNorm: modules defined outside `torch.nn` are
not fx leaf modules, so `torch.fx.symbolic_trace` flattens them into `get_attr` (parameter, named as
in `state_dict()`) + `F.linear` / `F.embedding` / `F.layer_norm` calls. Every preset therefore traces
to the same kind of graph under symbolic_trace and under torch.export. The subclasses also give
each module a `reset_parameters()` with the public models' initialisation (normal, std 0.02), which
the runtime calls to materialise a meta-device model shard by shard.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

INIT_STD = 0.02


class Linear(nn.Linear):
    """nn.Linear with normal(0, std) weights and zero bias (GPT-2 / BERT / Llama style)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, std: float = INIT_STD):
        # nn.Linear.__init__ calls reset_parameters(), which reads init_std: set it first.
        object.__setattr__(self, "init_std", std)
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        if self.weight.is_meta:  # nothing to fill; nn.init on meta also pulls in torch._dynamo (~1 s)
            return
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Embedding(nn.Embedding):
    """nn.Embedding with normal(0, 0.02) weights (nn.Embedding's default std is 1)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, std: float = INIT_STD):
        object.__setattr__(self, "init_std", std)
        super().__init__(num_embeddings, embedding_dim)

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (ones / zeros init); subclassed only so that fx traces through it."""


class RMSNorm(nn.Module):
    """Llama's RMSNorm, written with pow/mean/rsqrt (no nn.RMSNorm) so every op is a plain aten op.

    The statistics are taken in float32 and cast back, as in the reference implementation.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.type_as(x)


class Rotary(nn.Module):
    """Rotary position embedding with precomputed cos/sin tables.

    Each attention module owns its own tables: a block then reads nothing produced outside it
    except its input activation, so coarsening finds the blocks as a chain and a pipeline stage
    needs no tensor from another stage besides the activation. The tables are small
    (seq x head_dim). `reset_parameters()` recomputes them, so a meta-built model that is
    materialised with `to_empty()` + `reset_parameters()` gets correct tables too. They are
    persistent buffers (in `state_dict()`): every path that moves state by state_dict key
    (materialisation, full_state_dict, checkpoints) then carries them like any other tensor.
    """

    def __init__(self, head_dim: int, seq: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.seq = seq
        self.theta = theta
        self.register_buffer("cos", torch.empty(seq, head_dim))
        self.register_buffer("sin", torch.empty(seq, head_dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        device = self.cos.device
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim))
        freqs = torch.outer(torch.arange(self.seq, device=device).float(), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)  # (seq, head_dim): the "rotate half" layout
        self.cos.copy_(emb.cos())
        self.sin.copy_(emb.sin())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, heads, seq, head_dim) -> same shape, rotated by position."""
        seq = x.size(2)
        # narrow, not [:seq]: fx hands buffers to forward as real tensors, and a real tensor cannot be
        # sliced by a traced size, but narrow() dispatches on it and records one call.
        cos = self.cos.narrow(0, 0, seq).to(x.dtype)
        sin = self.sin.narrow(0, 0, seq).to(x.dtype)
        half = self.head_dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(batch, seq, heads * head_dim) -> (batch, heads, seq, head_dim).

    The head count is left as -1 so the same graph stays valid when tensor parallelism gives a
    rank only some of the heads (Megatron shards attention by heads).
    """
    return x.view(x.size(0), x.size(1), -1, head_dim).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, seq, head_dim) -> (batch, seq, heads * head_dim)."""
    x = x.transpose(1, 2)
    return x.reshape(x.size(0), x.size(1), -1)


def fused_qkv(qkv: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused qkv projection (batch, seq, heads * 3 * head_dim) into q, k, v (b, h, s, d).

    The fused output is laid out per head ([q_h, k_h, v_h] for each head h, as in Megatron-LM), not
    as [all q, all k, all v]: cutting the output features into tp contiguous pieces then gives each
    rank whole heads with their own q, k and v, so column-parallel qkv needs no re-layout.
    """
    x = qkv.view(qkv.size(0), qkv.size(1), -1, 3 * head_dim).transpose(1, 2)
    q, k, v = x.split(head_dim, dim=-1)
    return q, k, v


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout only where configured: p == 0 (the default) adds no node to the graph."""
    if p > 0.0:
        return F.dropout(x, p=p, training=training)
    return x


def residual_std(layers: int) -> float:
    """GPT-2's scaled init for projections that write into the residual stream."""
    return INIT_STD / math.sqrt(2 * layers)


class FusedSelfAttention(nn.Module):
    """Multi-head self-attention with one fused qkv Linear (per-head [q, k, v] layout) and SDPA.

    GPT uses it causal with the residual-scaled output init; BERT and ViT bidirectional.
    """

    def __init__(self, hidden: int, heads: int, dropout: float = 0.0, causal: bool = False,
                 proj_std: float = INIT_STD):
        super().__init__()
        self.head_dim = hidden // heads
        self.dropout = dropout
        self.causal = causal
        self.qkv = Linear(hidden, 3 * hidden)
        self.proj = Linear(hidden, hidden, std=proj_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = fused_qkv(self.qkv(x), self.head_dim)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal)
        return dropout(self.proj(merge_heads(y)), self.dropout, self.training)
