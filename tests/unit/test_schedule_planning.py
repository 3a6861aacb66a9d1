"""The planner chooses the pipeline schedule from the cost model: a zero-bubble one where its
estimate is better, 1F1B where the split backward costs more than it saves, one that fits under
tight memory; dominated candidates (GPipe beside 1F1B, zb-h2 beside zb-auto) are not solved."""

import dataclasses

import pytest

import fxplan
from fxplan import schedules
from fxplan.constraints import Constraints
from fxplan.models import build, example_batch
from fxplan.search_space import candidates

GiB = 2**30
GPT = "gpt:layers=8,hidden=1024,heads=16,seq=1024"


def _plan(cluster, batch=32, **pins):
    model = build(GPT, device="meta")
    return fxplan.compile(model, example_batch(model, batch, device="meta"), cluster=cluster,
                          constraints=fxplan.Constraints(**pins), verbose=False, time_limit_s=30).plan


def _a100(devices=4, **figures):
    return dataclasses.replace(fxplan.Cluster.preset("a100-80g", nodes=1, devices_per_node=devices), **figures)


def test_a_zero_bubble_schedule_where_its_estimate_is_better():
    free = _plan(_a100(), pp=4, dp=1, microbatches=8)
    one = _plan(_a100(), pp=4, dp=1, microbatches=8, schedule="1f1b")
    assert free.schedule.startswith("zb-")
    assert free.estimated_iteration_s < one.estimated_iteration_s
    assert "bubble" in free.summary() and free.schedule in free.summary()
    # the recorded bubble is the simulator's, on the plan's own per-stage pass times
    times = free.assumptions[schedules.TIMES_KEY]
    r = schedules.simulate(free.schedule, 4, 8, t_f=times["t_f"], t_b=times["t_b"], t_w=times["t_w"],
                           t_comm=times["t_comm"], memory_limit=times.get("memory_limit"))
    assert free.assumptions["schedule_bubble"] == pytest.approx(r.bubble_rate, abs=1e-6)
    assert r.bubble_rate < schedules.simulate("1f1b", 4, 8).bubble_rate


def test_1f1b_where_the_split_backward_costs_more_than_it_saves():
    # a tiny model on a cluster whose every pass dispatch costs 5 ms: the W passes a split adds
    # (one per layer and microbatch) outweigh the bubble it removes
    slow = _a100(intra_latency=5e-3, inter_latency=5e-3)
    free = _plan(slow, batch=32, pp=4, dp=1, microbatches=32)
    zb = _plan(slow, batch=32, pp=4, dp=1, microbatches=32, schedule="zb-h1")
    assert free.schedule == "1f1b"
    assert free.estimated_iteration_s < zb.estimated_iteration_s


def test_under_tight_memory_a_schedule_that_fits():
    roomy = _plan(_a100(), pp=4, dp=1, microbatches=8, schedule="zb-auto")
    low = _plan(_a100(), pp=4, dp=1, microbatches=8, schedule="zb-h1")
    need_auto = max(s.estimated_memory_bytes for s in roomy.stages)
    need_h1 = max(s.estimated_memory_bytes for s in low.stages)
    assert need_h1 < need_auto
    limit = (need_h1 + need_auto) / 2
    tight = _plan(_a100(memory_bytes=limit), pp=4, dp=1, microbatches=8, recompute=False, fsdp=False, tp=1)
    assert tight.schedule in ("zb-h1", "1f1b")
    assert max(s.estimated_memory_bytes for s in tight.stages) <= limit


def test_dominated_schedules_are_candidates_their_dominators_prune():
    from fxplan.search_space import dominated_by

    cluster = _a100()
    free = candidates(cluster, 32, 10, Constraints(pp=4))
    assert {s for _, _, s in free} == {"1f1b", "zb-h1", "zb-h2", "zb-auto", "gpipe"}
    dom = dominated_by(free)
    assert dom[(4, 8, "gpipe")] == (4, 8, "1f1b") and dom[(4, 8, "zb-h2")] == (4, 8, "zb-auto")
    assert (4, 2, "gpipe") in free and (4, 2, "gpipe") not in dom  # 1f1b needs 4 microbatches there
    pinned = candidates(cluster, 32, 10, Constraints(pp=4, schedule="gpipe"))
    assert {s for _, _, s in pinned} == {"gpipe"} and not dominated_by(pinned)


def test_in_flight_closed_forms_match_the_built_lists():
    import math

    from fxplan import schedules
    from fxplan.passes.solve.problem import in_flight

    for name in ("gpipe", "1f1b"):
        for p in range(1, 6):
            for m in range(p, 12):
                held = [math.ceil(h - 1e-9) for h in schedules.held_activations(schedules.build(name, p, m))]
                assert [in_flight(name, p, m, i) for i in range(p)] == held, (name, p, m)
