"""The event simulator: runs the very per-rank action lists the runtime runs, on pass times.

Each rank runs its list in order; an action starts when its rank is free and its data has
arrived: F(s, k) after F(s-1, k) (+ latency across ranks), I/B(s, k) after F(s, k) and after
I/B(s+1, k), W(s, k) after I(s, k). A list whose order cannot be met deadlocks and raises.
Iterations chain as the API's time semantics say: a rank starts its next iteration's list as soon
as its own list is done, with no barrier; the steady-state time is the spacing of iteration ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from fxplan.errors import ConstraintError
from fxplan.schedules.actions import Action, Schedule
from fxplan.schedules.timing import PassTimes

ITERATIONS = 4  # chained iterations simulated; the steady state is read from the last two


@dataclass(frozen=True)
class Event:
    rank: int
    iteration: int
    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class SimResult:
    name: str
    stages: int  # pipeline ranks
    microbatches: int
    chunks: int
    iteration_time: float  # steady state, iterations chained
    bubble_rate: float  # 1 - busy / (stages * iteration_time)
    peak_activations: tuple[float, ...]  # per stage (rank): most microbatches' activations held at once
    busy: tuple[float, ...]  # per rank, compute seconds of one iteration
    events: tuple[Event, ...]  # the first iteration's timeline (pictures, tests)
    schedule: Schedule

    def summary(self) -> str:
        return (f"{self.name}: stages={self.stages} microbatches={self.microbatches} chunks={self.chunks} "
                f"bubble_rate={self.bubble_rate:.4f} iteration_time={self.iteration_time:.4g} "
                f"peak_activations={[round(a, 3) for a in self.peak_activations]}")


def _dependencies(action: Action, num_stages: int, backward_kind: dict) -> list[tuple[str, int, int]]:
    """(what, stage, microbatch) keys this action waits for; 'f' forward done, 'g' input gradient done."""
    s, k = action.stage, action.microbatch
    if action.kind == "F":
        return [("f", s - 1, k)] if s > 0 else []
    if action.kind in ("I", "B"):
        deps = [("f", s, k)]
        if s < num_stages - 1:
            deps.append(("g", s + 1, k))
        return deps
    if backward_kind.get((s, k)) != "I":
        raise ConstraintError(f"action {action} has no I pass before it on its stage")
    return [("i", s, k)]


_HELD = {"F": 1, "W": -1, "B": -1}
"""What an action does to the microbatch activations its stage holds: F keeps them, W or a fused B
frees them (an I pass keeps them for its W)."""


def held_per_stage(schedule: Schedule) -> tuple[int, ...]:
    """Per stage, the most microbatches' activations it holds at once; order alone decides it."""
    peaks = [0] * schedule.placement.num_stages
    for ops in schedule.actions:
        held = [0] * len(peaks)
        for a in ops:
            held[a.stage] += _HELD.get(a.kind, 0)
            peaks[a.stage] = max(peaks[a.stage], held[a.stage])
    return tuple(peaks)


def held_activations(schedule: Schedule) -> tuple[float, ...]:
    """Per rank, the peak of microbatch activations held (a chunk's activations count 1/chunks);
    order alone decides it, not times."""
    peaks = []
    for ops in schedule.actions:
        held = peak = 0
        for a in ops:
            held += _HELD.get(a.kind, 0)
            peak = max(peak, held)
        peaks.append(peak / schedule.placement.chunks)
    return tuple(peaks)


def run(schedule: Schedule, times: PassTimes, iterations: int = ITERATIONS) -> list[Event]:
    """Every action of `iterations` chained iterations with its start and end time."""
    events: list[Event] = []
    _timeline(schedule, times, iterations, lambda r, it, a, start, end: events.append(Event(r, it, a, start, end)))
    return events


_PRODUCES = {"F": ("f",), "I": ("g", "i"), "B": ("g",), "W": ()}


def _timeline(schedule: Schedule, times: PassTimes, iterations: int, record) -> None:
    """Calls record(rank, iteration, action, start, end) for every action, in the order they are
    decided. Each action's waits, duration and what it completes are worked out once and reused by
    every iteration (a 64-stage, 512-microbatch list is 65k actions per iteration)."""
    place = schedule.placement
    n = place.num_stages
    backward_kind = {(a.stage, a.microbatch): a.kind for ops in schedule.actions for a in ops if a.kind in ("I", "B")}
    rows = []
    for ops in schedule.actions:
        row = []
        for a in ops:
            waits = tuple(((what, s, k), times.transfer(s, a.stage, place) if what in ("f", "g") else 0.0)
                          for what, s, k in _dependencies(a, n, backward_kind))
            made = tuple((what, a.stage, a.microbatch) for what in _PRODUCES[a.kind])
            row.append((a, waits, times.duration(a, place), made))
        rows.append(row)
    done: list[dict[tuple, float]] = [{} for _ in range(iterations)]  # per iteration: (what, stage, mb) -> end
    pos = [0] * len(rows)
    free = [0.0] * len(rows)
    totals = [len(row) * iterations for row in rows]
    remaining = sum(totals)
    while remaining:
        progressed = False
        for r, row in enumerate(rows):
            while pos[r] < totals[r]:
                it, idx = divmod(pos[r], len(row))
                a, waits, duration, made = row[idx]
                finished = done[it]
                ready = free[r]
                blocked = False
                for key, delay in waits:
                    arrival = finished.get(key)
                    if arrival is None:
                        blocked = True
                        break
                    if arrival + delay > ready:
                        ready = arrival + delay
                if blocked:
                    break
                end = ready + duration
                record(r, it, a, ready, end)
                free[r] = end
                for key in made:
                    finished[key] = end
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: str(rows[r][pos[r] % len(rows[r])][0]) for r in range(len(rows)) if pos[r] < totals[r]}
            raise ConstraintError(f"schedule {schedule.name!r} deadlocks: each rank's next action waits on "
                                  f"another's ({stuck}); its action order is impossible")


def simulate_schedule(schedule: Schedule, times: PassTimes) -> SimResult:
    ends = [0.0] * ITERATIONS
    busy = [0.0] * schedule.ranks
    events: list[Event] = []

    def record(r, it, a, start, end):
        if end > ends[it]:
            ends[it] = end
        if it == 0:
            busy[r] += end - start
            events.append(Event(r, it, a, start, end))

    _timeline(schedule, times, ITERATIONS, record)
    steady = (ends[-1] - ends[1]) / (ITERATIONS - 2)
    bubble = 1.0 - sum(busy) / (schedule.ranks * steady) if steady > 0 else 0.0
    return SimResult(name=schedule.name, stages=schedule.ranks, microbatches=schedule.microbatches,
                     chunks=schedule.placement.chunks, iteration_time=steady, bubble_rate=bubble,
                     peak_activations=held_activations(schedule), busy=tuple(busy),
                     events=tuple(events), schedule=schedule)
