"""Plans with several model chunks per rank (interleaved-1f1b, zbv): pp * chunks stages placed as
the schedule places them, priced by THE formula with the schedule's own bubble, each stage's
activations counted on the lists, and refused with a clear error where they cannot exist."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import fxplan
from fxplan import schedules
from fxplan.errors import ConstraintError, PlanFileError
from fxplan.models import build, example_batch
from fxplan.passes.solve.problem import Problem, evaluate
from fxplan.passes.solve.schedule_terms import chunked_fields
from fxplan.plan import Plan

GPT = "gpt:layers=8,hidden=1024,heads=16,seq=1024"


def _cluster(devices=4):
    return fxplan.Cluster.preset("a100-80g", nodes=1, devices_per_node=devices)


def _plan(batch=32, cluster=None, **pins):
    model = build(GPT, device="meta")
    return fxplan.compile(model, example_batch(model, batch, device="meta"), cluster=cluster or _cluster(),
                          constraints=fxplan.Constraints(**pins), verbose=False, time_limit_s=30).plan


def _equal_problem(schedule: str, pp: int, microbatches: int, chunks: int = 2) -> Problem:
    """pp * chunks stages of one layer each, every chunk pass 1/chunks of a rank's unit time."""
    S = pp * chunks
    t = np.array([1.0 / chunks / 3])
    zero, no = np.zeros(1), ()
    fields = chunked_fields(schedule, pp, microbatches, 1.0, 1.0, 1.0)
    return Problem(pp=S, microbatches=microbatches * chunks, schedule=schedule, fwd=(t,) * S, bwd=(t,) * S,
                   wgt=(t,) * S, sync=(zero,) * S, mem_fixed=(zero,) * S, mem_act=(zero,) * S, edges=no,
                   memory_limit=1.0, chunks=chunks, **fields)


@pytest.mark.parametrize("pp,m", [(2, 2), (2, 4), (2, 8), (4, 4), (4, 8), (4, 12)])
def test_interleaved_is_priced_at_its_closed_form(pp, m):
    """Interleaved 1F1B with v chunks: m + (p - 1) / v rank-times per iteration (Megatron's bubble)."""
    problem = _equal_problem("interleaved-1f1b", pp, m)
    S = pp * 2
    ev = evaluate(problem, list(range(S)), [0] * S)
    assert ev.iteration_s == pytest.approx(m + (pp - 1) / 2, rel=1e-9)
    assert problem.candidate == (pp, m, "interleaved-1f1b")


@pytest.mark.parametrize("pp,m", [(2, 3), (2, 6), (4, 4), (4, 9)])
def test_zbv_is_priced_at_what_its_lists_simulate(pp, m):
    problem = _equal_problem("zbv", pp, m)
    S = pp * 2
    ev = evaluate(problem, list(range(S)), [0] * S)
    simulated = schedules.simulate("zbv", pp, m, t_f=1 / 3, t_b=1 / 3, t_w=1 / 3).iteration_time
    assert ev.iteration_s == pytest.approx(simulated, rel=1e-9)
    assert ev.iteration_s < schedules.simulate("1f1b", pp, m, t_f=1 / 3, t_b=1 / 3, t_w=1 / 3).iteration_time


@pytest.mark.parametrize("schedule,pp,m", [("interleaved-1f1b", 2, 4), ("interleaved-1f1b", 4, 8),
                                           ("zbv", 2, 6), ("zbv", 4, 8)])
def test_each_stage_is_planned_for_at_least_its_share_of_the_rank_peak(schedule, pp, m):
    """Each stage is placed under 1/chunks of a device's memory holding its own peak count of
    activations; those counts together are never below the rank's real peak (counted on the lists)."""
    held = chunked_fields(schedule, pp, m, 1.0, 1.0, 1.0)["held"]
    built = schedules.build(schedule, pp, m)
    for rank, peak in enumerate(schedules.held_activations(built)):
        stages = built.placement.stages_of(rank)
        assert sum(held[s] for s in stages) / built.placement.chunks >= peak - 1e-9
        assert all(1 <= held[s] <= m for s in stages)


@pytest.mark.parametrize("schedule,places", [("zbv", [0, 1, 1, 0]), ("interleaved-1f1b", [0, 1, 0, 1])])
def test_a_chunked_plan_places_two_stages_per_rank(schedule, places):
    plan = _plan(pp=2, microbatches=8, schedule=schedule)
    assert (plan.pp, plan.chunks, len(plan.stages)) == (2, 2, 4)
    blocks = [(0, 1), (2, 3)]
    assert [s.devices for s in plan.stages] == [blocks[p] for p in places]
    assert [plan.stages_of_rank(r) for r in (0, 2)] == [tuple(i for i, p in enumerate(places) if p == q)
                                                       for q in (0, 1)]
    memory = _cluster().memory_bytes
    assert all(s.estimated_memory_bytes <= memory / 2 for s in plan.stages)
    assert Plan.from_json(plan.to_json()) == plan  # a plan file keeps the placement
    assert "bubble" in plan.summary() and schedule in plan.summary()
    times = plan.assumptions[schedules.TIMES_KEY]
    assert len(times["t_f"]) == 2  # per rank: the lists every rank rebuilds come from these
    again = _plan(pp=2, microbatches=8, schedule=schedule)
    assert schedules.for_plan(again).actions == schedules.for_plan(plan).actions


def test_a_plan_whose_rank_stages_disagree_is_refused():
    plan = _plan(pp=2, microbatches=8, schedule="zbv")
    stages = list(plan.stages)
    stages[3] = dataclasses.replace(stages[3], devices=(2, 3))  # stage 3 belongs with stage 0 in a V
    with pytest.raises(PlanFileError, match="same devices"):
        dataclasses.replace(plan, stages=tuple(stages)).check_shape()
    with pytest.raises(PlanFileError, match="chunks"):
        dataclasses.replace(plan, chunks=1).check_shape()


@pytest.mark.parametrize("pins,message", [
    (dict(pp=1, schedule="zbv"), "pp >= 2"),
    (dict(pp=2, microbatches=3, schedule="interleaved-1f1b"), "microbatch"),
    (dict(pp=8, schedule="zbv"), "16 stages but the model has"),
])
def test_chunked_schedules_that_cannot_exist_are_named(pins, message):
    model = build("gpt:layers=1,hidden=64,heads=4,seq=16,vocab=128", device="meta")
    with pytest.raises(ConstraintError, match=message):
        fxplan.compile(model, example_batch(model, 24, device="meta"), cluster=_cluster(8),
                       constraints=fxplan.Constraints(**pins), verbose=False)


def test_the_unpinned_search_keeps_to_the_one_chunk_schedules():
    plan = _plan(pp=2, microbatches=8)
    assert plan.chunks == 1 and plan.schedule in fxplan.constraints.RUNNABLE_SCHEDULES
