"""What a pipeline schedule is: per-rank lists of actions over stages and microbatches.

An action is (stage, kind, microbatch) with kind one of
  "F"  forward of one microbatch through one stage,
  "I"  the input-gradient half of its backward (the pass the previous stage waits for),
  "W"  the weight-gradient half (no other stage waits for it, so it can fill bubbles),
  "B"  the fused backward (I and W in one pass).
Stages are numbered in pipeline order; with `chunks` model chunks per rank there are
ranks * chunks stages and `Placement` says which rank holds which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from fxplan.errors import ConstraintError
from fxplan.plan import Placement  # which rank runs each stage: a plan's fact, shared with the lists

KINDS = ("F", "I", "W", "B")


class Action(NamedTuple):
    stage: int
    kind: str
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"


RankActions = tuple[tuple[Action, ...], ...]  # index: rank


@dataclass(frozen=True)
class Schedule:
    """A named schedule's action lists, ready for the simulator and the runtime alike."""

    name: str
    microbatches: int
    placement: Placement
    actions: RankActions

    @property
    def ranks(self) -> int:
        return self.placement.ranks

    def split_backward(self) -> bool:
        return any(a.kind == "I" for rank in self.actions for a in rank)


def check_shape(name: str, ranks: int, microbatches: int, chunks: int) -> None:
    for field, value in (("stages", ranks), ("microbatches", microbatches), ("chunks", chunks)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConstraintError(f"schedule {name!r}: {field} must be a positive integer, got {value!r}")
