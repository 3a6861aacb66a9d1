"""The MILP by itself (no heuristic incumbent, no grid plan, no cutoff) against brute force and against
the Megatron-style grid, so a weakness of the formulation cannot hide behind the planner's fallbacks."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from fxplan.passes.solve.exhaustive import exhaustive
from fxplan.passes.solve.milp import solve_milp
from fxplan.passes.solve.presolve import segments
from fxplan.passes.solve.problem import Edge, Problem, evaluate
from solver_problems import random_problem

CASES = [dict(seed=s, layers=(3, 4, 5)[s % 3], max_strategies=3 if s % 3 == 2 else 4,
              tight=s % 2 == 0, skew=s % 5 == 0, identical=s % 4 == 1, schedule_terms=s % 3 == 1,
              pp=(None, 2, 3)[s % 3] if s % 4 != 1 else None)
         for s in range(200, 224)]


@functools.lru_cache(maxsize=None)
def brute(index: int):
    return exhaustive(random_problem(**CASES[index]))


@pytest.mark.parametrize("index", range(len(CASES)))
def test_milp_alone_equals_brute_force(index):
    problem = random_problem(**CASES[index])
    want = brute(index)
    assert want.status == "optimal", "every case is built to be feasible"
    got = solve_milp(problem, time_limit_s=30, mip_gap=0.0)
    assert got.status == "optimal" and got.stage_of is not None
    ev = evaluate(problem, got.stage_of, got.strategy_of)
    assert ev.feasible
    assert ev.iteration_s == pytest.approx(want.objective, rel=1e-6)
    # the linearisation is exact: the MILP's own objective is the formula's value of what it returns
    assert got.objective == pytest.approx(ev.iteration_s, rel=1e-6)
    assert got.bound <= want.objective * (1 + 1e-6)


def test_the_cases_exercise_memory_runs_and_schedule_terms():
    binding = runs = zero_bubble = deep = 0
    for index, case in enumerate(CASES):
        p = random_problem(**case)
        if case["tight"]:
            free = exhaustive(Problem(**{**p.__dict__, "memory_limit": np.inf, "mem_peak": ()}))
            binding += free.objective < brute(index).objective - 1e-9
        runs += any(s.n > 1 for s in segments(p))
        zero_bubble += p.bubble_share < 1 and bool(p.split)
        deep += p.pp >= 3
    assert len(CASES) >= 20 and binding >= 3 and runs >= 3 and zero_bubble >= 5 and deep >= 3


# ---------------------------------------------------------------- against the grid, on a real model


def _cost_model(model_inputs, cluster, constraints):
    from fxplan.passes.cost.model import CostModel
    from fxplan.planner import analyse

    model, inputs = model_inputs
    analysis = analyse(model, inputs, cluster, constraints)
    return CostModel(analysis.layer_graph, analysis.space, cluster, analysis.layer_graph.batch_size, constraints)


def test_grid_is_at_least_10_percent_slower_than_the_milp_alone():
    """Two heavy layers then seven light ones, 4 stages on 4x8: equal layer counts put both heavy layers
    on stage 0; the MILP, started from nothing, gives them stages of their own."""
    import fxplan
    from fxplan.passes.solve.grid import grid_search
    from test_planner import a100, uneven

    pins = fxplan.Constraints(pp=4, schedule="1f1b", microbatches=16)
    model = _cost_model(uneven([4096, 32768, 4096, 4096, 4096, 4096, 4096, 4096, 4096], 64, 1024), a100(4), pins)
    cand = (4, 16, "1f1b")
    grid = grid_search(model, [cand])
    problem = model.problem(*cand)
    got = solve_milp(problem, time_limit_s=30, mip_gap=1e-6)
    ev = evaluate(problem, got.stage_of, got.strategy_of)
    assert got.status == "optimal" and ev.feasible
    assert grid.evaluation.iteration_s >= 1.10 * ev.iteration_s, (grid.evaluation.iteration_s, ev.iteration_s)
    assert len({got.stage_of.count(i) for i in range(4)}) > 1  # unequal stages


@pytest.mark.parametrize("spec", ["gpt:layers=4,hidden=1024,heads=16,seq=512",
                                  "llama:layers=4,hidden=1024,heads=16,seq=512"])
@pytest.mark.parametrize("nodes", [1, 4])
def test_milp_alone_never_slower_than_grid_on_its_candidate(spec, nodes):
    """On the grid's best (pp, microbatches, schedule) the MILP alone finds a plan at least as fast: the
    grid's plans lie inside the MILP's space."""
    import fxplan
    from fxplan.passes.solve.grid import grid_search
    from fxplan.search_space import candidates
    from test_planner import a100, preset

    cluster = a100(nodes)
    model = _cost_model(preset(spec, 64), cluster, fxplan.Constraints())
    grid = grid_search(model, candidates(cluster, 64, len(model.graph.layers), fxplan.Constraints()))
    problem = model.problem(*grid.candidate)
    got = solve_milp(problem, time_limit_s=30, mip_gap=1e-6)
    assert got.status == "optimal"
    assert evaluate(problem, got.stage_of, got.strategy_of).iteration_s <= grid.evaluation.iteration_s * (1 + 1e-6)


def test_a_run_of_three_classes_is_priced_as_one_walk():
    # A run of 4 identical layers between two singletons that only take class c at its ends. Classes
    # a and b are fast and switch between each other almost for free; entering or leaving c costs 5.
    # Flow balance alone would let a and b form a cycle beside a one-layer path "c" (6.6 s); no
    # arrangement of 4 layers realises that, and the best one is all c (12 s).
    t = np.array([1.0, 1.5, 3.0])
    zero3, one = np.zeros(3), np.zeros(1)
    chain = np.array([[0.0, 0.0, 5.0], [0.1, 0.0, 5.0], [5.0, 5.0, 0.0]])
    enter = np.array([[50.0, 50.0, 0.0]])  # singleton -> a, b, c
    leave = np.array([[50.0], [50.0], [0.0]])  # a, b, c -> singleton
    fwd = (one,) + (t,) * 4 + (one,)
    zeros = (one,) + (zero3,) * 4 + (one,)
    edges = (Edge(0, 1, enter, np.zeros(1)), *(Edge(u, u + 1, chain, zero3) for u in range(1, 4)),
             Edge(4, 5, leave, zero3))
    problem = Problem(1, 1, "gpipe", fwd, zeros, zeros, zeros, zeros, zeros, edges, float("inf"))
    assert [s.n for s in segments(problem)] == [1, 4, 1]
    want = exhaustive(problem)
    assert want.objective == pytest.approx(12.0)
    got = solve_milp(problem, time_limit_s=30, mip_gap=0.0)
    assert got.status == "optimal"
    assert got.objective == pytest.approx(12.0)
    assert evaluate(problem, got.stage_of, got.strategy_of).iteration_s == pytest.approx(12.0)
