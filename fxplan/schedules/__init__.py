"""Pipeline schedules: per-rank action lists, and `simulate` over exactly those lists.

    from fxplan import schedules
    r = schedules.simulate("zb-h1", stages=4, microbatches=12, t_f=1.0, t_b=1.0, t_w=1.0,
                           t_comm=0.0, chunks=1, memory_limit=None)
    r.bubble_rate, r.iteration_time, r.peak_activations

`build(...)` returns the `Schedule` (its `actions` per rank) that the runtime executes; `simulate`
runs that same value through the event simulator (fxplan/schedules/simulator.py).
"""

from __future__ import annotations

from fxplan.constraints import CHUNKED_SCHEDULES as CHUNKED, SCHEDULES as NAMES, chunks_of
from fxplan.errors import ConstraintError
from fxplan.plan import stage_placement
from fxplan.schedules import fixed, greedy
from fxplan.schedules.actions import Action, Placement, Schedule, check_shape
from fxplan.schedules.simulator import Event, SimResult, held_activations, held_per_stage, simulate_schedule
from fxplan.schedules.timing import PassTimes


def default_chunks(name: str) -> int:
    return chunks_of(name)


def build(name: str, stages: int, microbatches: int, t_f=1.0, t_b=1.0, t_w=1.0, t_comm=0.0,
          chunks: int | None = None, memory_limit: float | None = None) -> Schedule:
    """The per-rank action lists of schedule `name` on `stages` ranks. Times and memory_limit matter
    only to the automatic schedulers: zb-auto (default limit 2p-1 microbatches per rank) and zbv
    (default p, 1F1B's peak)."""
    if name not in NAMES:
        raise ConstraintError(f"unknown schedule {name!r}; known: {', '.join(NAMES)}")
    chunks = default_chunks(name) if chunks is None else chunks
    check_shape(name, stages, microbatches, chunks)
    if name not in CHUNKED and chunks != 1:
        raise ConstraintError(f"schedule {name!r} runs one chunk per rank, got chunks={chunks}; "
                              f"use interleaved-1f1b or zbv for more")
    if name == "zbv" and chunks != 2:
        raise ConstraintError(f"zbv places exactly two chunks per rank (a V), got chunks={chunks}")
    if name == "interleaved-1f1b" and chunks < 2:
        raise ConstraintError("interleaved-1f1b needs chunks >= 2 (with one chunk it is 1f1b)")
    p, m = stages, microbatches
    times = PassTimes.of(p, t_f, t_b, t_w, t_comm)
    placement = stage_placement(name, p, chunks)
    if name == "gpipe":
        lists = fixed.gpipe(p, m)
    elif name == "1f1b":
        lists = fixed.one_f_one_b(p, m)
    elif name == "zb-h1":
        lists = fixed.zb_h1(p, m)
    elif name == "zb-h2":
        # the Zero Bubble paper's ZB-2p: the automatic scheduler's list at 2p-1 microbatches per rank,
        # built on equal pass times so the order is fixed (zb-auto adapts it to the real times)
        lists = greedy.greedy(placement, m, PassTimes.of(p), 2 * p - 1, "eager")
    elif name == "interleaved-1f1b":
        lists = fixed.interleaved_1f1b(p, m, chunks)
    elif name == "zbv":
        # the V with 1F1B's memory: p microbatches (2p chunk activations) per rank
        limit = memory_limit if memory_limit is not None else p
        lists = greedy.zb_auto(placement, m, times, limit, simulate_schedule)
    else:
        limit = memory_limit if memory_limit is not None else 2 * p - 1
        lists = greedy.zb_auto(placement, m, times, limit, simulate_schedule,
                               fixed_candidates=(fixed.zb_h1(p, m), fixed.one_f_one_b(p, m),
                                                 greedy.greedy(placement, m, PassTimes.of(p), 2 * p - 1, "eager")))
    schedule = Schedule(name, m, placement, tuple(tuple(ops) for ops in lists))
    if memory_limit is not None and name in ("zb-auto", "zbv"):
        over = [i for i, a in enumerate(held_activations(schedule)) if a > memory_limit + 1e-9]
        assert not over, f"{name} broke its memory limit on ranks {over}"
    return schedule


TIMES_KEY = "schedule_times"
"""Plan.assumptions entry holding the pass times (per stage t_f, t_b, t_w; t_comm; memory_limit)
that the time-dependent schedules (zb-auto, zbv) were built from: every rank rebuilds the same lists."""


def for_plan(plan) -> Schedule:
    """The action lists a Plan runs: its schedule, pp, microbatches and chunks, and for zb-auto/zbv
    the pass times the planner recorded (unit times when it recorded none)."""
    times = dict(plan.assumptions.get(TIMES_KEY) or {})
    return build(plan.schedule, plan.pp, plan.microbatches, t_f=times.get("t_f", 1.0), t_b=times.get("t_b", 1.0),
                 t_w=times.get("t_w", 1.0), t_comm=times.get("t_comm", 0.0),
                 chunks=plan.chunks if plan.schedule in CHUNKED else 1, memory_limit=times.get("memory_limit"))


def simulate(name: str, stages: int, microbatches: int, t_f=1.0, t_b=1.0, t_w=1.0, t_comm=0.0,
             chunks: int | None = None, memory_limit: float | None = None) -> SimResult:
    """Run schedule `name`'s action lists on these pass times (per stage: a number or one per stage;
    t_b is the input-gradient half of backward, t_w the weight-gradient half, a fused backward takes
    t_b + t_w; each chunk takes 1/chunks of a rank's times). Iterations are chained."""
    schedule = build(name, stages, microbatches, t_f, t_b, t_w, t_comm, chunks, memory_limit)
    return simulate_schedule(schedule, PassTimes.of(stages, t_f, t_b, t_w, t_comm))


__all__ = ["NAMES", "TIMES_KEY", "for_plan", "Action", "Event", "Placement", "PassTimes", "Schedule", "SimResult", "build",
           "default_chunks", "simulate"]
