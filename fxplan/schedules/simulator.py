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


def held_activations(schedule: Schedule) -> tuple[float, ...]:
    """Per rank, the peak of microbatch activations held: +1 at F, -1 at its W or fused B (a chunk's
    activations count 1/chunks); order alone decides it, not times."""
    peaks = []
    for ops in schedule.actions:
        held = peak = 0
        for a in ops:
            held += 1 if a.kind == "F" else -1 if a.kind in ("W", "B") else 0
            peak = max(peak, held)
        peaks.append(peak / schedule.placement.chunks)
    return tuple(peaks)


def run(schedule: Schedule, times: PassTimes, iterations: int = ITERATIONS) -> list[Event]:
    """Every action of `iterations` chained iterations with its start and end time."""
    place = schedule.placement
    n = place.num_stages
    backward_kind = {(a.stage, a.microbatch): a.kind for ops in schedule.actions for a in ops if a.kind in ("I", "B")}
    queues = [[(it, a) for it in range(iterations) for a in ops] for ops in schedule.actions]
    pos = [0] * len(queues)
    free = [0.0] * len(queues)
    done: dict[tuple, float] = {}
    events: list[Event] = []
    remaining = sum(len(q) for q in queues)
    while remaining:
        progressed = False
        for r, queue in enumerate(queues):
            while pos[r] < len(queue):
                it, a = queue[pos[r]]
                deps = _dependencies(a, n, backward_kind)
                if any((it,) + d not in done for d in deps):
                    break
                ready = free[r]
                for what, s, k in deps:
                    arrival = done[(it, what, s, k)]
                    if what in ("f", "g"):
                        arrival += times.transfer(s, a.stage, place)
                    ready = max(ready, arrival)
                end = ready + times.duration(a, place)
                events.append(Event(r, it, a, ready, end))
                free[r] = end
                if a.kind == "F":
                    done[(it, "f", a.stage, a.microbatch)] = end
                elif a.kind == "I":
                    done[(it, "g", a.stage, a.microbatch)] = end
                    done[(it, "i", a.stage, a.microbatch)] = end
                elif a.kind == "B":
                    done[(it, "g", a.stage, a.microbatch)] = end
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: str(queues[r][pos[r]][1]) for r in range(len(queues)) if pos[r] < len(queues[r])}
            raise ConstraintError(f"schedule {schedule.name!r} deadlocks: each rank's next action waits on "
                                  f"another's ({stuck}); its action order is impossible")
    return events


def simulate_schedule(schedule: Schedule, times: PassTimes) -> SimResult:
    events = run(schedule, times)
    ends = [max(e.end for e in events if e.iteration == it) for it in range(ITERATIONS)]
    steady = (ends[-1] - ends[1]) / (ITERATIONS - 2)
    busy = [0.0] * schedule.ranks
    for e in events:
        if e.iteration == 0:
            busy[e.rank] += e.end - e.start
    bubble = 1.0 - sum(busy) / (schedule.ranks * steady) if steady > 0 else 0.0
    return SimResult(name=schedule.name, stages=schedule.ranks, microbatches=schedule.microbatches,
                     chunks=schedule.placement.chunks, iteration_time=steady, bubble_rate=bubble,
                     peak_activations=held_activations(schedule), busy=tuple(busy),
                     events=tuple(e for e in events if e.iteration == 0), schedule=schedule)
