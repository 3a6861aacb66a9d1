"""What a Plan records about its pipeline schedule: the pass times its lists are built from, and the
bubble the simulator finds for them (fxplan.schedules), so every rank rebuilds the same lists and
`plan.summary()` can name the bubble."""

from __future__ import annotations

from fxplan import schedules
from fxplan.passes.solve.problem import Problem
from fxplan.plan import stage_placement


def schedule_assumptions(problem: Problem, stage_of, strategy_of) -> dict:
    """{schedule_times: per rank along the pipeline t_f, t_b, t_w (of all its stages) and t_comm of
    one microbatch, schedule_bubble}."""
    pp = problem.ranks
    place = stage_placement(problem.schedule, pp, problem.chunks)
    f, b, w = [0.0] * pp, [0.0] * pp, [0.0] * pp
    for u, (i, k) in enumerate(zip(stage_of, strategy_of)):
        extra = float(problem.split[u][k]) if problem.split else 0.0
        r = place.rank_of(i)
        f[r] += float(problem.fwd[u][k])
        b[r] += float(problem.bwd[u][k])
        w[r] += float(problem.wgt[u][k]) + extra
    sends = [0.0] * max(problem.pp - 1, 0)
    for e in problem.edges:
        for j in range(stage_of[e.src], stage_of[e.dst]):
            sends[j] += float(e.send[strategy_of[e.src]])
    # a boundary's send prices both directions (activations forward, gradients back)
    t_comm = max(sends, default=0.0) / 2
    times = {"t_f": f, "t_b": b, "t_w": w, "t_comm": t_comm}
    if problem.schedule == "zb-auto":
        times["memory_limit"] = 2 * pp - 1  # what in_flight plans it under
    if pp < 2 or sum(f) + sum(b) + sum(w) <= 0:
        return {schedules.TIMES_KEY: times, "schedule_bubble": 0.0}
    r = schedules.simulate(problem.schedule, pp, problem.iteration_microbatches, t_f=f, t_b=b, t_w=w, t_comm=t_comm,
                           memory_limit=times.get("memory_limit"))
    return {schedules.TIMES_KEY: times, "schedule_bubble": round(r.bubble_rate, 6)}
