"""BERT style encoder: token + position + segment embeddings, post-LN blocks, MLM head.

The loss is cross-entropy over all positions (every token is a prediction target), which keeps the
per-sample work fixed; segments are all zeros (a single sentence).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fxplan.models.base import Preset, check, check_heads, check_positive, randint
from fxplan.models.layers import FusedSelfAttention, Embedding, LayerNorm, Linear, dropout


@dataclass(frozen=True, slots=True)
class BertConfig:
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    seq: int = 32
    vocab: int = 256
    ffn: int = 0  # 0 means 4 * hidden
    segments: int = 2  # segment (token type) vocabulary
    tied: bool = True  # MLM decoder shares the word embedding, as in BERT
    dropout: float = 0.0
    eps: float = 1e-12

    @property
    def ffn_dim(self) -> int:
        return self.ffn or 4 * self.hidden

    def validate(self) -> None:
        check_positive("bert", layers=self.layers, hidden=self.hidden, heads=self.heads, seq=self.seq,
                       vocab=self.vocab, ffn=self.ffn_dim, segments=self.segments)
        check_heads(self.hidden, self.heads, "bert")
        check(0.0 <= self.dropout < 1.0, f"bert: dropout must be in [0, 1), got {self.dropout}")


class Block(nn.Module):
    """Post-LN block: ln(x + attn(x)), then ln(x + mlp(x))."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dropout = cfg.dropout
        self.attn = FusedSelfAttention(cfg.hidden, cfg.heads, cfg.dropout)
        self.ln1 = LayerNorm(cfg.hidden, eps=cfg.eps)
        self.fc = Linear(cfg.hidden, cfg.ffn_dim)
        self.proj = Linear(cfg.ffn_dim, cfg.hidden)
        self.ln2 = LayerNorm(cfg.hidden, eps=cfg.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x))
        h = dropout(self.proj(F.gelu(self.fc(x))), self.dropout, self.training)
        return self.ln2(x + h)


class Bert(Preset):
    """forward(tokens (b, s) int64, targets (b, s) int64) -> mean masked-LM cross-entropy."""

    preset = "bert"

    def __init__(self, cfg: BertConfig):
        super().__init__(cfg)
        self.word = Embedding(cfg.vocab, cfg.hidden)
        self.position = Embedding(cfg.seq, cfg.hidden)
        self.segment = Embedding(cfg.segments, cfg.hidden)
        self.ln_embed = LayerNorm(cfg.hidden, eps=cfg.eps)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        # MLM head: dense + GELU + LayerNorm, then the decoder to the vocabulary (with a bias).
        self.head_dense = Linear(cfg.hidden, cfg.hidden)
        self.head_ln = LayerNorm(cfg.hidden, eps=cfg.eps)
        self.decoder = None if cfg.tied else Linear(cfg.hidden, cfg.vocab, bias=False)
        self.decoder_bias = nn.Parameter(torch.zeros(cfg.vocab))

    def reset_parameters(self) -> None:
        # Only this module's own parameter; the children reset themselves.
        nn.init.zeros_(self.decoder_bias)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seq = tokens.size(1)
        # Segment 0 everywhere: row 0 of the segment table, broadcast (no zeros tensor / gather needed).
        x = self.word(tokens) + self.position.weight[:seq] + self.segment.weight[0]
        x = dropout(self.ln_embed(x), self.config.dropout, self.training)
        x = self.run_blocks(x)
        h = self.head_ln(F.gelu(self.head_dense(x)))
        weight = self.word.weight if self.decoder is None else self.decoder.weight
        logits = F.linear(h, weight, self.decoder_bias)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))

    def _example(self, batch, device, generator):
        shape = (batch, self.config.seq)
        return randint(self.config.vocab, shape, device, generator), randint(self.config.vocab, shape, device, generator)
