"""What a pipeline stage sends: its outputs made contiguous (p2p sends need contiguous memory) and
checked against the shapes and dtypes the lane agreed on before the first step, so a mismatch names
the stage and the tensor here instead of failing inside the send while the peers wait for a timeout."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fxplan.errors import ModelError


class BoundaryOutputs(nn.Module):
    """Wraps a stage module: same parameters and buffers (under `stage.`), contiguous checked outputs."""

    def __init__(self, stage: nn.Module, out_specs: Sequence, stage_index: int):
        super().__init__()
        self.stage = stage
        self.out_specs = tuple(out_specs)
        self.stage_index = stage_index

    def forward(self, *args):
        out = self.stage(*args)
        many = isinstance(out, (tuple, list))
        outs = tuple(out) if many else (out,)
        if len(outs) != len(self.out_specs):
            raise ModelError(f"pipeline stage {self.stage_index} returned {len(outs)} tensors where the "
                                        f"probe step agreed on {len(self.out_specs)}; please report this model")
        fixed = []
        for i, (t, spec) in enumerate(zip(outs, self.out_specs)):
            if isinstance(t, torch.Tensor):
                if tuple(t.shape) != tuple(spec.shape) or t.dtype != spec.dtype:
                    raise ModelError(
                        f"pipeline stage {self.stage_index} output {i} is {tuple(t.shape)} {t.dtype}, but the next "
                        f"stage expects {tuple(spec.shape)} {spec.dtype} (shapes are fixed per microbatch); every "
                        f"microbatch must have the example batch's shapes")
                t = t.contiguous()
            fixed.append(t)
        return tuple(fixed) if many else fixed[0]


def boundary_checked(stage: nn.Module, out_specs: Sequence, stage_index: int, is_last: bool) -> nn.Module:
    """`stage` ready for p2p: the last stage sends nothing, so it stays as it is."""
    return stage if is_last else BoundaryOutputs(stage, out_specs, stage_index)
