"""A rank's stages as one module: what the parameter-level runtime (gradient sums, full state,
checkpoints, the optimizer's parameter list) sees of a rank holding several model chunks.

With one stage per rank the Runner uses that stage's GraphModule and its parameter map as they
are. Under interleaved-1f1b or zbv a rank holds `chunks` stages: `RankStages` registers each
stage's GraphModule as submodule `stage<index>`, so every parameter keeps one attribute path
(`stage<index>.<attr>`) and the code that walks `(module, {attr: ParamShard})` pairs works on the
whole rank unchanged. `stage_of` says which stage an attribute belongs to (a weight two stages
share, such as a tied embedding and head on one rank under zbv, is held once per stage and its
gradients are summed like any weight shared across stages, runtime/grad_sync.py)."""

from __future__ import annotations

from typing import Mapping, Sequence

from torch import nn

from fxplan.codegen.params import ParamShard
from fxplan.codegen.program import RankProgram

PREFIX = "stage"


class RankStages(nn.Module):
    """The rank's stage GraphModules as submodules `stage<index>`, in pipeline order."""

    def __init__(self, programs: Sequence[RankProgram]):
        super().__init__()
        for program in programs:
            self.add_module(f"{PREFIX}{program.stage}", program.gm)


def rank_module(programs: Sequence[RankProgram]) -> nn.Module:
    """The module holding every parameter of the rank: its only stage's, or all its stages'."""
    return programs[0].gm if len(programs) == 1 else RankStages(programs)


def rank_params(programs: Sequence[RankProgram]) -> dict[str, ParamShard]:
    """{attribute path under rank_module(programs): shard} over the rank's stages."""
    if len(programs) == 1:
        return dict(programs[0].params)
    return {f"{PREFIX}{p.stage}.{attr}": shard for p in programs for attr, shard in p.params.items()}


def stage_of(programs: Sequence[RankProgram]) -> Mapping[str, int]:
    """{attribute path: the stage that holds it} for rank_params(programs)."""
    if len(programs) == 1:
        return {attr: programs[0].stage for attr in programs[0].params}
    return {f"{PREFIX}{p.stage}.{attr}": p.stage for p in programs for attr in p.params}
