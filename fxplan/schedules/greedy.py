"""The Zero Bubble paper's automatic scheduler: a greedy list scheduler over F, I and W passes.

All ranks are scheduled together in time order on the given pass times. A free rank runs, in this
order of preference: an I whose inputs have arrived (I lies on the critical path), an F whose input
has arrived and whose activations fit under the memory cap (so the warm-up runs as many forwards
as memory allows before the first I comes back), and otherwise a deferred W to fill the wait (or,
under the "gap" policy, only when the wait is at least a W long or not yet known). Ws still
pending at the end run in the tail. `zb_auto` tries every cap up to the memory limit and both
policies and keeps the list with the shortest simulated iteration, so its bubble never grows as
the limit rises.
"""

from __future__ import annotations

from collections import deque

from fxplan.errors import ConstraintError
from fxplan.schedules.actions import Action, Placement, Schedule
from fxplan.schedules.timing import PassTimes

POLICIES = ("eager", "gap")


def greedy(placement: Placement, m: int, times: PassTimes, cap, policy: str = "eager") -> list[list[Action]]:
    """Action lists from one greedy pass; `cap` bounds held activations per rank in chunk units
    (one number, or one per rank)."""
    caps = tuple(cap) if isinstance(cap, (tuple, list)) else (cap,) * placement.ranks
    if min(caps) < 1:
        raise ConstraintError(f"a memory limit below one microbatch's activations (cap {cap}) cannot run any schedule")
    ranks, n = placement.ranks, placement.num_stages
    local = [placement.stages_of(r) for r in range(ranks)]
    # a rank keeps room for one microbatch per later stage it holds, or its earlier stages' forwards
    # could fill the cap and leave the later stage (which frees memory) unable to start
    later = [sum(1 for q in local[placement.rank_of(s)] if q > s) for s in range(n)]
    nf = [0] * n  # next forward microbatch per stage
    ni = [0] * n  # next I microbatch per stage
    f_end: dict[tuple[int, int], float] = {}
    g_end: dict[tuple[int, int], float] = {}
    pending = [deque() for _ in range(ranks)]
    held = [0] * ranks
    t = [0.0] * ranks
    out: list[list[Action]] = [[] for _ in range(ranks)]
    total = 3 * n * m
    durations = [times.duration(Action(s, k, 0), placement) for s in range(n) for k in ("F", "I", "W")]
    # how far a rank that waits on a pass nobody has scheduled yet sleeps past another rank's clock;
    # floored at 1 % of the longest pass, or a near-empty stage (a pass of 1e-16 s) makes the loop
    # crawl forward in femtoseconds (a wake-up can then be late by at most that 1 %)
    dmin = max(min(d for d in durations if d > 0), 0.01 * max(durations))

    def ready_f(s: int):
        k = nf[s]
        if k >= m:
            return None
        if s == 0:
            return 0.0
        if (s - 1, k) not in f_end:
            return float("inf")
        return f_end[(s - 1, k)] + times.transfer(s - 1, s, placement)

    def ready_i(s: int):
        k = ni[s]
        if k >= m or k >= nf[s]:
            return None if k >= m else float("inf")
        arrival = f_end[(s, k)]
        if s < n - 1:
            if (s + 1, k) not in g_end:
                return float("inf")
            arrival = max(arrival, g_end[(s + 1, k)] + times.transfer(s + 1, s, placement))
        return arrival

    def run(r: int, a: Action, start: float) -> None:
        end = start + times.duration(a, placement)
        out[r].append(a)
        t[r] = end
        if a.kind == "F":
            f_end[(a.stage, a.microbatch)] = end
            nf[a.stage] += 1
            held[r] += 1
        elif a.kind == "I":
            g_end[(a.stage, a.microbatch)] = end
            ni[a.stage] += 1
            pending[r].append((a.stage, a.microbatch))
        else:
            held[r] -= 1

    def _blocked(q: int) -> bool:
        if pending[q]:
            return False
        for s in local[q]:
            ri = ready_i(s)
            if ri is not None and ri != float("inf"):
                return False
            rf = ready_f(s)
            if rf is not None and rf != float("inf") and held[q] + 1 + later[s] <= caps[q]:
                return False
        return True

    scheduled = 0
    while scheduled < total:
        live = [r for r in range(ranks) if len(out[r]) < 3 * len(local[r]) * m]
        r = min(live, key=lambda q: (t[q], q))
        now = t[r]
        options = []  # (ready time, preference, action)
        for s in sorted(local[r], reverse=True):
            ri = ready_i(s)
            if ri is not None:
                options.append((ri, 0, -s, Action(s, "I", ni[s])))
            rf = ready_f(s)
            if rf is not None and held[r] + 1 + later[s] <= caps[r]:
                options.append((rf, 1, -s, Action(s, "F", nf[s])))
        now_ready = [o for o in options if o[0] <= now]
        if now_ready:
            _, _, _, a = min(now_ready, key=lambda o: (o[1], o[2]))
            run(r, a, now)
            scheduled += 1
            continue
        soonest = min((o[0] for o in options), default=float("inf"))
        if pending[r]:
            gap = soonest - now
            s, k = pending[r][0]
            w = Action(s, "W", k)
            if policy == "eager" or gap >= times.duration(w, placement) or not options or \
                    all(o[1] == 1 for o in options) and held[r] >= caps[r]:
                pending[r].popleft()
                run(r, w, now)
                scheduled += 1
                continue
        if soonest == float("inf") and not pending[r] and all(_blocked(q) for q in live):
            raise ConstraintError(f"the automatic scheduler is stuck under a memory cap of {cap} chunk "
                                  f"activations per rank (every rank waits on another): raise memory_limit")
        others = [t[q] + dmin for q in live if q != r]
        wake = min([soonest] + others)
        if wake == float("inf") or wake <= now:
            if wake == float("inf"):
                raise ConstraintError(f"the automatic scheduler is stuck on rank {r} under a memory cap of {cap} "
                                      f"chunk activations: raise memory_limit")
            wake = now + dmin
        t[r] = wake
    return out


def zb_auto(placement: Placement, m: int, times: PassTimes, limit: float, simulate,
            fixed_candidates=()) -> list[list[Action]]:
    """The best list (by simulated steady-state iteration time, then lower peak memory) among the
    greedy ones for every cap from one microbatch up to `limit` (microbatches per rank) and both W
    policies, and `fixed_candidates` (hand-structured lists, e.g. ZB-H1's, that fit the limit)."""
    top = int(limit * placement.chunks + 1e-9)
    if top < 1:
        raise ConstraintError(f"zb-auto: memory_limit {limit} holds less than one microbatch's activations; "
                              f"give at least 1 (the schedule then runs one microbatch at a time)")
    best = None
    top = min(top, placement.chunks * m)
    # every cap on small pipelines; on long ones the few that matter (the limit itself, just under
    # it, zb-h2's 2p-1 and 1F1B's p per chunk), each a greedy run over all p * m passes
    caps = range(1, top + 1) if top <= 16 else sorted({c for c in (top, top - 1, top - 2,
        (2 * placement.ranks - 1) * placement.chunks, placement.ranks * placement.chunks) if 1 <= c <= top})
    for cap in caps:
        for policy in POLICIES:
            try:
                lists = greedy(placement, m, times, cap, policy)
            except ConstraintError:
                continue
            result = simulate(Schedule("zb-auto", m, placement, tuple(tuple(x) for x in lists)), times)
            key = (round(result.iteration_time, 12), max(result.peak_activations))
            if best is None or key < best[0]:
                best = (key, lists)
    for lists in fixed_candidates:
        schedule = Schedule("zb-auto", m, placement, tuple(tuple(x) for x in lists))
        result = simulate(schedule, times)
        key = (round(result.iteration_time, 12), max(result.peak_activations))
        if max(result.peak_activations) <= limit + 1e-9 and (best is None or key < best[0]):
            best = (key, lists)
    if best is None:
        raise ConstraintError(f"zb-auto found no schedule under memory_limit {limit}: raise it")
    return best[1]
