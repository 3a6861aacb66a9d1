"""An independent check of a simulated pipeline timeline (shares no code with fxplan/schedules'
generators or simulator): every action once, on its rank, in list order, no overlap, the right
duration, every data dependency met with the transfer latency, and the memory limit kept."""

from __future__ import annotations


def check_timeline(schedule, events, t_f, t_b, t_w, t_comm, memory_limit=None, tol=1e-9):
    p, chunks = schedule.placement.ranks, schedule.placement.chunks
    n = p * chunks
    m = schedule.microbatches

    def owner(stage):
        if schedule.placement.style == "v":
            return stage if stage < p else 2 * p - 1 - stage
        return stage % p

    per = lambda v: list(v) if isinstance(v, (list, tuple)) else [v] * p
    tf, tb, tw = per(t_f), per(t_b), per(t_w)
    at = {}
    for e in events:
        key = (e.action.stage, e.action.kind, e.action.microbatch)
        assert key not in at, f"{key} runs twice"
        at[key] = e
    for s in range(n):
        for k in range(m):
            assert (s, "F", k) in at, f"F of stage {s} microbatch {k} missing"
            fused = (s, "B", k) in at
            split = (s, "I", k) in at and (s, "W", k) in at
            assert fused != split, f"stage {s} microbatch {k} needs exactly one of B or I+W"
    for (s, kind, k), e in at.items():
        r = owner(s)
        assert e.rank == r, f"{s}{kind}{k} ran on rank {e.rank}, stage {s} lives on rank {r}"
        # torch runs the first stage's whole backward in its W pass (it has no input gradient to send)
        i_time, w_time = (0.0, tb[r] + tw[r]) if s == 0 else (tb[r], tw[r])
        want = {"F": tf[r], "I": i_time, "W": w_time, "B": tb[r] + tw[r]}[kind] / chunks
        assert abs((e.end - e.start) - want) <= tol, f"{s}{kind}{k} took {e.end - e.start}, expected {want}"
        hop = lambda other: 0.0 if owner(other) == r else t_comm
        if kind == "F" and s > 0:
            prev = at[(s - 1, "F", k)]
            assert e.start >= prev.end + hop(s - 1) - tol, f"{s}F{k} starts before its input arrives"
        if kind in ("I", "B"):
            assert e.start >= at[(s, "F", k)].end - tol, f"{s}{kind}{k} starts before its own forward ends"
            if s < n - 1:
                nxt = at.get((s + 1, "I", k)) or at[(s + 1, "B", k)]
                assert e.start >= nxt.end + hop(s + 1) - tol, f"{s}{kind}{k} starts before its gradient arrives"
        if kind == "W":
            assert e.start >= at[(s, "I", k)].end - tol, f"{s}W{k} starts before {s}I{k} ends"
    for r in range(p):
        mine = sorted((e for e in events if e.rank == r), key=lambda e: e.start)
        assert [e.action for e in mine] == list(schedule.actions[r]), f"rank {r} ran out of list order"
        for a, b in zip(mine, mine[1:]):
            assert b.start >= a.end - tol, f"rank {r}: {a.action} and {b.action} overlap"
        held = peak = 0.0
        for e in mine:
            held += {"F": 1.0, "W": -1.0, "B": -1.0}.get(e.action.kind, 0.0) / chunks
            peak = max(peak, held)
        if memory_limit is not None:
            assert peak <= memory_limit + tol, f"rank {r} holds {peak} microbatches, limit {memory_limit}"
    return True
