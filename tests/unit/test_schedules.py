"""fxplan.schedules: the simulator against the closed forms, and every list against an independent
timeline check (tests/support/schedule_check.py) on random unequal times with a latency."""

import random

import pytest
from schedule_check import check_timeline

from fxplan import schedules
from fxplan.errors import ConstraintError
from fxplan.schedules.simulator import run


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(2, 2), (2, 6), (4, 4), (4, 12), (3, 7)])
def test_gpipe_and_1f1b_bubble_closed_form(name, p, m):
    r = schedules.simulate(name, stages=p, microbatches=m)
    assert r.bubble_rate == pytest.approx((p - 1) / (m + p - 1))


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 12), (3, 5)])
@pytest.mark.parametrize("f,b,w", [(1, 1, 1), (1.0, 1.3, 0.6), (1.2, 1.1, 0.9), (1.0, 2.0, 0.3), (0.8, 0.9, 0.8)])
def test_zb_h1_within_its_bound_for_unequal_times(p, m, f, b, w):
    # The bound is the paper's, for W no longer than F (its measured T_W/T_B is 0.5-0.75 with T_F = T_B):
    # a W longer than F delays the next forward on the later stages.
    r = schedules.simulate("zb-h1", stages=p, microbatches=m, t_f=f, t_b=b, t_w=w)
    bound = (p - 1) * (f + b - w) / (m * (f + b + w) + (p - 1) * (f + b - w))
    assert r.bubble_rate <= bound + 1e-9
    one = schedules.simulate("1f1b", stages=p, microbatches=m, t_f=f, t_b=b, t_w=w)
    assert r.bubble_rate < one.bubble_rate


@pytest.mark.parametrize("p", [2, 3, 4, 6])
@pytest.mark.parametrize("factor", [2, 3])
def test_zb_h2_near_zero_bubble_at_m_2p(p, factor):
    r = schedules.simulate("zb-h2", stages=p, microbatches=factor * p)
    assert r.bubble_rate <= 0.01
    assert r.peak_activations[0] <= 2 * p - 1


@pytest.mark.parametrize("p,m", [(2, 6), (4, 8), (4, 12)])
def test_peak_activations_on_first_stage(p, m):
    assert schedules.simulate("gpipe", p, m).peak_activations[0] == m
    assert schedules.simulate("1f1b", p, m).peak_activations[0] == p
    assert schedules.simulate("zb-h1", p, m).peak_activations[0] == p
    assert schedules.simulate("zb-h2", p, m).peak_activations[0] <= 2 * p - 1


@pytest.mark.parametrize("f,b,w,comm", [(1, 1, 1, 0), (1.0, 1.4, 0.7, 0.1), (0.8, 1.0, 1.2, 0.05)])
def test_zb_auto_memory_limit_and_monotone_bubble(f, b, w, comm):
    p, m = 4, 12
    one = schedules.simulate("1f1b", p, m, t_f=f, t_b=b, t_w=w, t_comm=comm)
    previous = None
    for limit in range(p, 2 * p + 1):
        r = schedules.simulate("zb-auto", p, m, t_f=f, t_b=b, t_w=w, t_comm=comm, memory_limit=limit)
        assert max(r.peak_activations) <= limit
        assert r.bubble_rate < one.bubble_rate
        if previous is not None:
            assert r.bubble_rate <= previous + 1e-12
        previous = r.bubble_rate


def test_zb_auto_under_a_limit_below_1f1b():
    r = schedules.simulate("zb-auto", 4, 8, memory_limit=2)
    assert max(r.peak_activations) <= 2
    with pytest.raises(ConstraintError, match="memory_limit"):
        schedules.simulate("zb-auto", 4, 8, memory_limit=0.5)


def test_interleaved_and_zbv_beat_1f1b_with_chunks():
    one = schedules.simulate("1f1b", 4, 8)
    inter = schedules.simulate("interleaved-1f1b", 4, 8, chunks=2)
    zbv = schedules.simulate("zbv", 4, 8)
    assert inter.bubble_rate < one.bubble_rate and zbv.bubble_rate < one.bubble_rate
    assert zbv.schedule.placement.style == "v" and zbv.chunks == 2
    assert max(zbv.peak_activations) <= 4  # 1F1B's peak
    with pytest.raises(ConstraintError, match="divisible"):
        schedules.simulate("interleaved-1f1b", 4, 6, chunks=2)


def test_unequal_per_stage_times_change_the_steady_state():
    even = schedules.simulate("1f1b", 4, 8, t_f=1.0, t_b=1.0, t_w=1.0)
    slow = schedules.simulate("1f1b", 4, 8, t_f=[1, 1, 2, 1], t_b=1.0, t_w=1.0)
    # the slow stage sets the pace: at least m of its passes per iteration
    assert slow.iteration_time >= 8 * 4 - 1e-9 > even.iteration_time - 8


@pytest.mark.parametrize("seed", range(12))
def test_random_times_pass_the_independent_check(seed):
    rng = random.Random(seed)
    name = rng.choice(schedules.NAMES)
    p = rng.choice([2, 3, 4])
    chunks = 2 if name in ("interleaved-1f1b", "zbv") else 1
    m = p * rng.choice([1, 2, 3]) if name == "interleaved-1f1b" else rng.randint(1, 3 * p)
    tf = [rng.uniform(0.5, 2.0) for _ in range(p)]
    tb = [rng.uniform(0.5, 2.0) for _ in range(p)]
    tw = [rng.uniform(0.2, 1.5) for _ in range(p)]
    comm = rng.uniform(0.0, 0.5)
    limit = rng.choice([None, p, 2 * p]) if name == "zb-auto" else None
    schedule = schedules.build(name, p, m, tf, tb, tw, comm, chunks, limit)
    events = [e for e in run(schedule, schedules.PassTimes.of(p, tf, tb, tw, comm), 1)]
    assert check_timeline(schedule, events, tf, tb, tw, comm, memory_limit=limit)
    r = schedules.simulate(name, p, m, tf, tb, tw, comm, chunks, limit)
    assert 0.0 <= r.bubble_rate < 1.0


def test_the_checker_catches_a_broken_list():
    schedule = schedules.build("1f1b", 2, 2)
    swapped = list(schedule.actions[1])
    # rank 1 running a backward before the forward it needs cannot happen: the simulator refuses it
    swapped[0], swapped[1] = swapped[1], swapped[0]
    broken = schedules.Schedule("broken", 2, schedule.placement, (schedule.actions[0], tuple(swapped)))
    with pytest.raises(ConstraintError, match="deadlocks"):
        run(broken, schedules.PassTimes.of(2), 1)
    # and events that ignore a dependency fail the independent check
    events = run(schedule, schedules.PassTimes.of(2), 1)
    shifted = [e if e.rank == 0 else type(e)(e.rank, e.iteration, e.action, e.start - 0.5, e.end - 0.5) for e in events]
    with pytest.raises(AssertionError):
        check_timeline(schedule, shifted, 1.0, 1.0, 1.0, 0.0)


def test_unknown_name_and_bad_shapes():
    with pytest.raises(ConstraintError, match="unknown schedule"):
        schedules.simulate("zb-h3", 2, 2)
    with pytest.raises(ConstraintError, match="one chunk"):
        schedules.simulate("1f1b", 2, 2, chunks=2)


def test_first_stage_backward_runs_whole_in_w():
    # torch's pipelining skips the first stage's I pass (no input gradient to send) and runs its whole
    # backward in W: the simulator times it so, and zb-h2's lists built for it leave no bubble
    r = schedules.simulate("zb-h1", stages=2, microbatches=4, t_f=1.0, t_b=1.5, t_w=0.5)
    first = [e for e in r.events if e.rank == 0]
    assert all(e.end == e.start for e in first if e.action.kind == "I")
    assert all(e.end - e.start == pytest.approx(2.0) for e in first if e.action.kind == "W")
    later = [e for e in r.events if e.rank == 1 and e.action.kind == "I"]
    assert all(e.end - e.start == pytest.approx(1.5) for e in later)
    assert schedules.simulate("zb-h2", stages=2, microbatches=6).bubble_rate <= 1e-9
