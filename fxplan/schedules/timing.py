"""Pass times of a schedule: per rank F, I (B's input half), W, and the point-to-point latency.

On the first stage an I pass takes no time and its W the whole backward (see `PassTimes.duration`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from fxplan.errors import ConstraintError
from fxplan.schedules.actions import Action, Placement


def _per_rank(name: str, value, ranks: int) -> tuple[float, ...]:
    values = tuple(_seconds(name, v) for v in value) if isinstance(value, Sequence) and not isinstance(value, str) \
        else (_seconds(name, value),) * ranks
    if len(values) != ranks:
        raise ConstraintError(f"{name} has {len(values)} entries for {ranks} stages: give one per stage or one number")
    if any(v < 0 for v in values):
        raise ConstraintError(f"{name} must not be negative, got {values}")
    return values


def _seconds(name: str, value) -> float:
    try:
        seconds = float(value) if not isinstance(value, (bool, str, bytes)) else math.nan
    except (TypeError, ValueError):
        seconds = math.nan
    if not math.isfinite(seconds):
        raise ConstraintError(f"{name} must be a finite number of seconds (one, or one per stage), got {value!r:.60}")
    return seconds


@dataclass(frozen=True)
class PassTimes:
    """Seconds of one microbatch's passes through all of a rank's chunks (each chunk takes 1/chunks)."""

    t_f: tuple[float, ...]
    t_b: tuple[float, ...]
    t_w: tuple[float, ...]
    t_comm: float

    @classmethod
    def of(cls, ranks: int, t_f=1.0, t_b=1.0, t_w=1.0, t_comm=0.0) -> "PassTimes":
        times = cls(_per_rank("t_f", t_f, ranks), _per_rank("t_b", t_b, ranks), _per_rank("t_w", t_w, ranks),
                    _seconds("t_comm", t_comm))
        if times.t_comm < 0:
            raise ConstraintError(f"t_comm must not be negative, got {t_comm}")
        if sum(times.t_f) + sum(times.t_b) + sum(times.t_w) <= 0:
            raise ConstraintError("pass times are all zero: give some stage a positive t_f + t_b + t_w")
        return times

    def duration(self, action: Action, placement: Placement) -> float:
        r = placement.rank_of(action.stage)
        f, b, w = self.t_f[r], self.t_b[r], self.t_w[r]
        if action.stage == 0:
            # The first stage has no input gradient to send back, and torch's pipelining runtime
            # (PipelineStage.backward_one_chunk) skips its I pass and runs its whole backward in W.
            # Schedules must plan for that: its backward is all deferrable, none of it urgent.
            b, w = 0.0, b + w
        full = {"F": f, "I": b, "W": w, "B": b + w}[action.kind]
        return full / placement.chunks

    def transfer(self, src_stage: int, dst_stage: int, placement: Placement) -> float:
        """Latency between two adjacent stages: none when one rank holds both."""
        return 0.0 if placement.rank_of(src_stage) == placement.rank_of(dst_stage) else self.t_comm
