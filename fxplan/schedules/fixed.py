"""The hand-structured schedules: gpipe, 1f1b, zb-h1 (one chunk per rank) and interleaved-1f1b.

Their action order does not depend on pass times; the simulator decides when each action runs.
"""

from __future__ import annotations

from fxplan.errors import ConstraintError
from fxplan.schedules.actions import Action, Placement


def gpipe(p: int, m: int) -> list[list[Action]]:
    """All forwards, then all fused backwards in the same order: every stage holds m microbatches."""
    return [[Action(r, "F", k) for k in range(m)] + [Action(r, "B", k) for k in range(m)] for r in range(p)]


def one_f_one_b(p: int, m: int) -> list[list[Action]]:
    """Stage r runs p-1-r warm-up forwards, then alternates F and fused B, then drains the Bs."""
    out = []
    for r in range(p):
        warm = min(p - 1 - r, m)
        ops = [Action(r, "F", k) for k in range(warm)]
        for k in range(m - warm):
            ops += [Action(r, "F", warm + k), Action(r, "B", k)]
        ops += [Action(r, "B", k) for k in range(m - warm, m)]
        out.append(ops)
    return out


def zb_h1(p: int, m: int) -> list[list[Action]]:
    """1F1B with the backward split: stage r lets its W passes lag r microbatches behind its I
    passes, so each stage holds at most p microbatches (1F1B's peak on stage 0) while the lagging
    Ws fill the cool-down bubbles."""
    out = []
    for r in range(p):
        warm = min(p - 1 - r, m)
        ops = [Action(r, "F", k) for k in range(warm)]
        next_w = 0
        for k in range(m):
            if warm + k < m:
                ops.append(Action(r, "F", warm + k))
            ops.append(Action(r, "I", k))
            if k >= r:
                ops.append(Action(r, "W", next_w))
                next_w += 1
        ops += [Action(r, "W", k) for k in range(next_w, m)]
        out.append(ops)
    return out


def interleaved_1f1b(p: int, m: int, v: int) -> list[list[Action]]:
    """Megatron's interleaved 1F1B: v chunks per rank (stage c*p + r on rank r), microbatches in
    rounds of p per chunk; the warm-up covers the other chunks' rounds plus the usual 1F1B skew."""
    if m % p:
        raise ConstraintError(f"interleaved-1f1b needs microbatches divisible by the pipeline degree "
                              f"({m} by {p}): choose microbatches a multiple of {p}")
    placement = Placement(p, v, "loop")
    total = v * m
    out = []
    for r in range(p):
        warm = min((v - 1) * p + 2 * (p - 1 - r), total)

        def fwd(step: int) -> int:  # stage of this rank's step-th forward
            return (step // p) % v * p + r

        def bwd(step: int) -> int:  # stage of its step-th backward: chunks in reverse
            return (v - 1 - (step // p) % v) * p + r

        seen_f: dict[int, int] = {}
        seen_b: dict[int, int] = {}

        def take(table: dict[int, int], stage: int) -> int:
            table[stage] = table.get(stage, -1) + 1
            return table[stage]

        ops = []
        for step in range(warm):
            s = fwd(step)
            ops.append(Action(s, "F", take(seen_f, s)))
        for step in range(total - warm):
            s = fwd(warm + step)
            ops.append(Action(s, "F", take(seen_f, s)))
            s = bwd(step)
            ops.append(Action(s, "B", take(seen_b, s)))
        for step in range(total - warm, total):
            s = bwd(step)
            ops.append(Action(s, "B", take(seen_b, s)))
        assert all(placement.rank_of(a.stage) == r for a in ops)
        out.append(ops)
    return out
