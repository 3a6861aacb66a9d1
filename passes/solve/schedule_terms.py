"""What a pipeline schedule changes in THE iteration-time formula (no torch): its bubble share.

evaluate() prices an iteration as  beta * (sum_i p_i + sum_j o_j) + (c - beta) * max(p_i, o_j) + sync:
with beta = 1 that is UniAP's 1F1B/GPipe formula (the fill and drain cost one pass through every
stage), with beta = 0 the pipeline never idles. beta is read off the schedule's own action lists:
fxplan.schedules simulates them on p equal stages with the candidate's F : I : W proportions and
beta = (its steady-state time - c T) / (1F1B's - c T), T = F + I + W. A split backward's extra cost
is not in beta: it is a per-layer time of its own (Problem.split), added to each stage's p_i.
"""

from __future__ import annotations

import functools

from fxplan import schedules
from fxplan.constraints import chunks_of

SPLIT_BACKWARD = ("zb-h1", "zb-h2", "zb-auto", "zbv")
"""Schedules whose backward runs as separate I and W passes."""


def splits_backward(schedule: str) -> bool:
    return schedule in SPLIT_BACKWARD


def bubble_share(schedule: str, pp: int, microbatches: int, f: float, b: float, w: float) -> float:
    """beta of `schedule` for stage times in proportion f : b : w (1.0 for 1F1B and GPipe)."""
    if pp < 2 or schedule in ("1f1b", "gpipe"):
        return 1.0
    total = f + b + w
    if total <= 0:
        return 1.0
    # two significant digits of the proportions are plenty; they key the cache. Past 2p
    # microbatches the fill and drain no longer change shape (the steady phase only grows), so the
    # share is read at 4p: the planner's outer loop builds hundreds of candidates.
    key = tuple(round(x / total, 2) for x in (f, b, w))
    c = min(microbatches, 2 * pp)
    if pp > SHARE_MAX_PP:
        # the share is a ratio of fill-and-drain bubbles, whose shape depends on m / p and the
        # proportions, not on p itself (ZB-H1's (p-1)(F+B-W) over 1F1B's (p-1)(F+B+W) exactly; ZB-H2
        # within ~2 % of its bubble between integer ratios): read long pipelines on an 8-stage one
        # at the same m / p, since simulating 64 stages for every candidate dominates the search
        c = max(SHARE_MAX_PP, round(c * SHARE_MAX_PP / pp))
        pp = SHARE_MAX_PP
    return _share(schedule, pp, c, *key)


SHARE_MAX_PP = 8


@functools.lru_cache(maxsize=1024)
def _share(schedule: str, pp: int, c: int, f: float, b: float, w: float) -> float:
    ideal = c * (f + b + w)
    base = schedules.simulate("1f1b", pp, c, t_f=f, t_b=b, t_w=w).iteration_time - ideal
    if base <= 0:
        return 1.0
    mine = schedules.simulate(schedule, pp, c, t_f=f, t_b=b, t_w=w).iteration_time - ideal
    return min(1.0, max(0.0, mine / base))


def chunked_fields(schedule: str, pp: int, microbatches: int, f: float, b: float, w: float) -> dict:
    """What a schedule with several model chunks per rank changes in THE formula, for stage times in
    proportion f : b : w per rank: {bubble_share, held}.

    Its Problem has pp * chunks stages of 1/chunks of a rank's time t each, and `microbatches`
    chunk passes per stage (c * chunks), so evaluate prices beta * (pp chunks - 1) t / chunks + c t
    for equal stages; beta is read off the lists: chunks * (I - c) / (pp chunks - 1), I the
    simulated chained iteration of unit rank time. `held`: per stage, the most microbatches'
    activations it holds at once (each stage's own peak, counted on the lists)."""
    v = chunks_of(schedule)
    total = f + b + w
    f, b, w = (f / total, b / total, w / total) if total > 0 else (1 / 3, 1 / 3, 1 / 3)
    key = tuple(round(x, 2) for x in (f, b, w))
    share, held = _chunked(schedule, pp, microbatches, v, *key)
    return {"bubble_share": share, "held": held}


@functools.lru_cache(maxsize=256)
def _chunked(schedule: str, pp: int, c: int, v: int, f: float, b: float, w: float) -> tuple[float, tuple[int, ...]]:
    result = schedules.simulate(schedule, pp, c, t_f=f, t_b=b, t_w=w)
    share = v * (result.iteration_time / (f + b + w) - c) / (pp * v - 1)  # the key's rounding keeps T = 1
    return max(0.0, share), schedules.held_per_stage(result.schedule)
