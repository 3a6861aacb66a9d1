"""Llama / Llama-2 style decoder: RMSNorm, rotary positions, q/k/v/o without bias, SwiGLU, untied head.

    model = fxplan.models.build("llama:layers=4,hidden=128,heads=8,kv_heads=2")
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fxplan.models.base import Preset, check, check_heads, check_positive, randint
from fxplan.models.layers import Embedding, Linear, RMSNorm, Rotary, merge_heads, split_heads


@dataclass(frozen=True, slots=True)
class LlamaConfig:
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 0  # grouped-query attention; 0 means kv_heads = heads (plain multi-head)
    seq: int = 32
    vocab: int = 256
    ffn: int = 0  # SwiGLU width; 0 means Llama's rule: 2/3 * 4 * hidden rounded up to a multiple of 16
    eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def kv_heads_n(self) -> int:
        return self.kv_heads or self.heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn:
            return self.ffn
        width = int(2 * 4 * self.hidden / 3)
        return 16 * ((width + 15) // 16)

    def validate(self) -> None:
        check_positive("llama", layers=self.layers, hidden=self.hidden, heads=self.heads, seq=self.seq,
                       vocab=self.vocab, kv_heads=self.kv_heads_n, ffn=self.ffn_dim)
        check_heads(self.hidden, self.heads, "llama")
        check(self.heads % self.kv_heads_n == 0,
              f"llama: heads={self.heads} is not a multiple of kv_heads={self.kv_heads_n}; pick kv_heads dividing heads")
        check((self.hidden // self.heads) % 2 == 0,
              f"llama: head dim {self.hidden // self.heads} must be even for rotary embeddings")


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.head_dim = cfg.hidden // cfg.heads
        self.groups = cfg.heads // cfg.kv_heads_n  # query heads per kv head
        kv_dim = cfg.kv_heads_n * self.head_dim
        self.q = Linear(cfg.hidden, cfg.hidden, bias=False)
        self.k = Linear(cfg.hidden, kv_dim, bias=False)
        self.v = Linear(cfg.hidden, kv_dim, bias=False)
        self.o = Linear(cfg.hidden, cfg.hidden, bias=False)
        self.rotary = Rotary(self.head_dim, cfg.seq, cfg.rope_theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.rotary(split_heads(self.q(x), self.head_dim))
        k = self.rotary(split_heads(self.k(x), self.head_dim))
        v = split_heads(self.v(x), self.head_dim)
        if self.groups > 1:
            # GQA: each kv head serves `groups` consecutive query heads. repeat_interleave keeps that
            # pairing when tensor parallelism gives a rank a contiguous range of heads.
            k = k.repeat_interleave(self.groups, dim=1)
            v = v.repeat_interleave(self.groups, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(merge_heads(y))


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate = Linear(cfg.hidden, cfg.ffn_dim, bias=False)
        self.up = Linear(cfg.hidden, cfg.ffn_dim, bias=False)
        self.down = Linear(cfg.ffn_dim, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden, cfg.eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Llama(Preset):
    """forward(tokens (b, s) int64, targets (b, s) int64) -> mean next-token cross-entropy."""

    preset = "llama"

    def __init__(self, cfg: LlamaConfig):
        super().__init__(cfg)
        self.embed = Embedding(cfg.vocab, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.eps)
        self.lm_head = Linear(cfg.hidden, cfg.vocab, bias=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = self.run_blocks(x)
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))

    def _example(self, batch, device, generator):
        shape = (batch, self.config.seq)
        return randint(self.config.vocab, shape, device, generator), randint(self.config.vocab, shape, device, generator)
