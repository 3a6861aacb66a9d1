"""Vision Transformer: Linear patch embedding, cls token, learned positions, pre-LN blocks, linear head.

The patch embedding is a Linear over flattened patches (reshape/permute in forward) rather than a
strided Conv2d: the same function, and it traces to plain view/permute/linear ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fxplan.models.base import Preset, check, check_heads, check_positive, randint, randn
from fxplan.models.layers import FusedSelfAttention, INIT_STD, LayerNorm, Linear, dropout


@dataclass(frozen=True, slots=True)
class ViTConfig:
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    image: int = 32  # square images, image x image pixels
    patch: int = 8
    channels: int = 3
    classes: int = 10
    ffn: int = 0  # 0 means 4 * hidden
    dropout: float = 0.0
    eps: float = 1e-6

    @property
    def ffn_dim(self) -> int:
        return self.ffn or 4 * self.hidden

    @property
    def grid(self) -> int:
        return self.image // self.patch

    @property
    def seq(self) -> int:
        """Tokens per image: the patches plus the cls token."""
        return self.grid * self.grid + 1

    def validate(self) -> None:
        check_positive("vit", layers=self.layers, hidden=self.hidden, heads=self.heads, image=self.image,
                       patch=self.patch, channels=self.channels, classes=self.classes, ffn=self.ffn_dim)
        check_heads(self.hidden, self.heads, "vit")
        check(self.image % self.patch == 0,
              f"vit: image={self.image} is not divisible by patch={self.patch}; pick a patch size dividing it")
        check(0.0 <= self.dropout < 1.0, f"vit: dropout must be in [0, 1), got {self.dropout}")


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.dropout = cfg.dropout
        self.ln1 = LayerNorm(cfg.hidden, eps=cfg.eps)
        self.attn = FusedSelfAttention(cfg.hidden, cfg.heads, cfg.dropout)
        self.ln2 = LayerNorm(cfg.hidden, eps=cfg.eps)
        self.fc = Linear(cfg.hidden, cfg.ffn_dim)
        self.proj = Linear(cfg.ffn_dim, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + dropout(self.proj(F.gelu(self.fc(self.ln2(x)))), self.dropout, self.training)


class ViT(Preset):
    """forward(images (b, c, h, w) float, labels (b,) int64) -> mean classification cross-entropy."""

    preset = "vit"

    def __init__(self, cfg: ViTConfig):
        super().__init__(cfg)
        self.patch_embed = Linear(cfg.channels * cfg.patch * cfg.patch, cfg.hidden)
        self.cls = nn.Parameter(torch.empty(1, 1, cfg.hidden))
        self.pos = nn.Parameter(torch.empty(1, cfg.seq, cfg.hidden))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = LayerNorm(cfg.hidden, eps=cfg.eps)
        self.head = Linear(cfg.hidden, cfg.classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Only this module's own parameters; the children reset themselves.
        nn.init.normal_(self.cls, std=INIT_STD)
        nn.init.normal_(self.pos, std=INIT_STD)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        b = images.size(0)
        # (b, c, g*p, g*p) -> (b, g*g, c*p*p): one row per patch, channels-then-pixels inside a patch.
        x = images.reshape(b, cfg.channels, cfg.grid, cfg.patch, cfg.grid, cfg.patch)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(b, cfg.grid * cfg.grid, -1)
        x = self.patch_embed(x)
        x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1) + self.pos
        x = dropout(x, cfg.dropout, self.training)
        x = self.run_blocks(x)
        logits = self.head(self.ln_f(x)[:, 0])
        return F.cross_entropy(logits, labels)

    def _example(self, batch, device, generator):
        cfg = self.config
        images = randn((batch, cfg.channels, cfg.image, cfg.image), self._float_dtype(), device, generator)
        return images, randint(cfg.classes, (batch,), device, generator)
