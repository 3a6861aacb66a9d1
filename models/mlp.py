"""A plain MLP: input Linear, `layers` blocks of Linear + GELU, output Linear, CE or MSE loss.

The smallest model that still has repeated blocks; handy for planner and runtime tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fxplan.models.base import Preset, check, check_positive, randint, randn
from fxplan.models.layers import Linear


@dataclass(frozen=True, slots=True)
class MLPConfig:
    layers: int = 2
    hidden: int = 64
    in_features: int = 32  # spec key "in"
    out_features: int = 10  # spec key "out": classes for "ce", regression targets for "mse"
    loss: str = "ce"  # "ce" | "mse"

    def validate(self) -> None:
        check_positive("mlp", layers=self.layers, hidden=self.hidden, **{"in": self.in_features,
                                                                         "out": self.out_features})
        check(self.loss in ("ce", "mse"), f"mlp: loss must be 'ce' or 'mse', got {self.loss!r}")


class Block(nn.Module):
    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.fc = Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc(x))


class MLP(Preset):
    """forward(x (b, in) float, targets (b,) int64 for "ce" / (b, out) float for "mse") -> mean loss."""

    preset = "mlp"

    def __init__(self, cfg: MLPConfig):
        super().__init__(cfg)
        self.inp = Linear(cfg.in_features, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.out = Linear(cfg.hidden, cfg.out_features)

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.inp(x))
        x = self.run_blocks(x)
        y = self.out(x)
        if self.config.loss == "mse":
            return F.mse_loss(y, targets)
        return F.cross_entropy(y, targets)

    def _example(self, batch, device, generator):
        cfg = self.config
        x = randn((batch, cfg.in_features), self._float_dtype(), device, generator)
        if cfg.loss == "mse":
            return x, randn((batch, cfg.out_features), self._float_dtype(), device, generator)
        return x, randint(cfg.out_features, (batch,), device, generator)
