"""GPT-2 / GPT-3 style decoder: learned positions, pre-LN blocks, causal attention, tied LM head.

    model = fxplan.models.build("gpt:layers=4,hidden=128,heads=4")
    loss = model(*fxplan.models.example_batch(model, batch=8))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fxplan.models.base import Preset, check, check_heads, check_positive, randint
from fxplan.models.layers import FusedSelfAttention, Embedding, LayerNorm, Linear, dropout, residual_std


@dataclass(frozen=True, slots=True)
class GPTConfig:
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    seq: int = 32  # context length (learned position table size); example batches use all of it
    vocab: int = 256
    ffn: int = 0  # MLP width; 0 means 4 * hidden
    tied: bool = True  # LM head shares the token embedding (GPT-2 / GPT-3)
    dropout: float = 0.0
    eps: float = 1e-5

    @property
    def ffn_dim(self) -> int:
        return self.ffn or 4 * self.hidden

    def validate(self) -> None:
        check_positive("gpt", layers=self.layers, hidden=self.hidden, heads=self.heads, seq=self.seq,
                       vocab=self.vocab, ffn=self.ffn_dim)
        check_heads(self.hidden, self.heads, "gpt")
        check(0.0 <= self.dropout < 1.0, f"gpt: dropout must be in [0, 1), got {self.dropout}")


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.dropout = cfg.dropout
        self.fc = Linear(cfg.hidden, cfg.ffn_dim)
        self.proj = Linear(cfg.ffn_dim, cfg.hidden, std=residual_std(cfg.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(self.proj(F.gelu(self.fc(x))), self.dropout, self.training)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = LayerNorm(cfg.hidden, eps=cfg.eps)
        self.attn = FusedSelfAttention(cfg.hidden, cfg.heads, cfg.dropout, causal=True,
                                       proj_std=residual_std(cfg.layers))
        self.ln2 = LayerNorm(cfg.hidden, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(Preset):
    """forward(tokens (b, s) int64, targets (b, s) int64) -> mean next-token cross-entropy."""

    preset = "gpt"

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg)
        self.wte = Embedding(cfg.vocab, cfg.hidden)
        self.wpe = Embedding(cfg.seq, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = LayerNorm(cfg.hidden, eps=cfg.eps)
        # Tied: the head reuses wte.weight in forward, so state_dict() holds the matrix once.
        self.lm_head = None if cfg.tied else Linear(cfg.hidden, cfg.vocab, bias=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Positions 0..s-1 are a slice of the table: no arange / gather node needed.
        x = dropout(self.wte(tokens) + self.wpe.weight[: tokens.size(1)], self.config.dropout, self.training)
        x = self.run_blocks(x)
        x = self.ln_f(x)
        logits = F.linear(x, self.wte.weight) if self.lm_head is None else self.lm_head(x)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))

    def _example(self, batch, device, generator):
        shape = (batch, self.config.seq)
        return randint(self.config.vocab, shape, device, generator), randint(self.config.vocab, shape, device, generator)
