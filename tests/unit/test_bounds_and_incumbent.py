"""The stage-split bound's memory knapsack and the heuristic's mixing of strategies inside a stage,
against brute force: the bound must never pass a feasible assignment's bottleneck, and where memory
forces a stage of identical layers to mix a fast and a lean strategy, both must see it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fxplan.passes.solve.bounds import lower_bound, min_bottleneck
from fxplan.passes.solve.exhaustive import exhaustive
from fxplan.passes.solve.heuristic import heuristic
from fxplan.passes.solve.problem import Edge, Problem, evaluate
from solver_problems import random_problem


def _least_feasible_bottleneck(p: Problem) -> float:
    """min over memory-feasible assignments of max(max_i p_i, max_j o_j), by enumeration."""
    best = np.inf
    L = p.num_layers
    for cuts in itertools.combinations(range(1, L), p.pp - 1):
        bounds = (0, *cuts, L)
        stage_of = [i for i in range(p.pp) for _ in range(bounds[i + 1] - bounds[i])]
        for ks in itertools.product(*(range(p.num_strategies(u)) for u in range(L))):
            ev = evaluate(p, stage_of, ks)
            if ev.feasible:
                best = min(best, max(ev.stage_compute_s + ev.boundary_s))
    return best


@pytest.mark.parametrize("chain", [False, True])
@pytest.mark.parametrize("seed", range(30))
def test_the_bounds_never_pass_a_feasible_assignment(seed, chain):
    p = random_problem(700 + seed, tight=True, skew=seed % 4 == 0, identical=seed % 3 == 0,
                       schedule_terms=seed % 5 == 1, max_strategies=3)
    want = _least_feasible_bottleneck(p)
    if np.isfinite(want):
        assert min_bottleneck(p, chain=chain) <= want * (1 + 1e-9)
        assert lower_bound(p, chain=chain) <= exhaustive(p).objective * (1 + 1e-9)


def test_the_chain_bound_prices_layouts_that_disagree_and_the_cut_prices_wide_activations():
    # two layers on one stage: each is fastest in a layout the other's input cannot take without a
    # 10 s reshard, so the best assignment pays 1 s of slower strategy; two stages: the only cut sends 5 s
    fast_slow = np.array([1.0, 2.0])
    zero = np.zeros(2)
    reshard = np.array([[10.0, 0.0], [0.0, 0.0]])  # fast -> fast costs 10 s, anything else is free
    arrays = ((fast_slow,) * 2, (zero,) * 2, (zero,) * 2, (zero,) * 2, (zero,) * 2, (zero,) * 2)
    one = Problem(1, 1, "gpipe", *arrays, (Edge(0, 1, reshard, np.zeros(2)),), float("inf"))
    assert exhaustive(one).objective == pytest.approx(3.0)
    assert min_bottleneck(one) == pytest.approx(2.0)  # per-layer minima: 1 + 1
    assert min_bottleneck(one, chain=True) == pytest.approx(3.0)
    two = Problem(2, 1, "gpipe", *arrays, (Edge(0, 1, np.zeros((2, 2)), np.full(2, 5.0)),), float("inf"))
    assert min_bottleneck(two) == pytest.approx(5.0)  # the transfer, not a stage, is the bottleneck
    assert lower_bound(two) <= exhaustive(two).objective * (1 + 1e-9)


def _mixing_problem(pp: int, layers: int, fits_fast: float) -> Problem:
    """`layers` identical layers; strategy 0 is fast (1 s) and holds 1 byte, strategy 1 slow (2 s) and
    holds 0.25 byte; each stage holds `fits_fast` + 0.25 * (its other layers) bytes at most."""
    t = np.array([1.0, 2.0])
    zero = np.zeros(2)
    held = np.array([1.0, 0.25])
    chain = Edge(0, 1, np.zeros((2, 2)), np.zeros(2))
    edges = tuple(Edge(u, u + 1, chain.reshard, chain.send) for u in range(layers - 1))
    per_stage = layers // pp
    limit = fits_fast + 0.25 * (per_stage - fits_fast)
    return Problem(pp, 1, "gpipe", (t,) * layers, (zero,) * layers, (zero,) * layers, (zero,) * layers,
                   (held,) * layers, (zero,) * layers, edges, limit)


def test_the_bound_prices_what_memory_keeps_from_the_fast_strategy():
    # 4 layers on one stage, room for 2 fast ones: the best stage takes 2 + 2 * 2 = 6 s; the fastest
    # strategy of each layer alone would claim 4 s. The knapsack's LP optimum is integral here, so
    # the bound (its dual at the hull's slope) is exact
    p = _mixing_problem(pp=1, layers=4, fits_fast=2)
    assert exhaustive(p).objective == pytest.approx(6.0)
    assert min_bottleneck(p) == pytest.approx(6.0)
    assert lower_bound(p) == pytest.approx(6.0, rel=1e-6)


@pytest.mark.parametrize("pp, layers, fits_fast", [(1, 6, 2), (2, 8, 1), (2, 8, 3), (3, 9, 2)])
def test_the_heuristic_mixes_strategies_in_a_stage_of_identical_layers(pp, layers, fits_fast):
    # identical layers share a cost vector, so a Lagrangian choice alone gives all of a stage's layers
    # one strategy: all fast does not fit, all lean loses to the mix
    p = _mixing_problem(pp, layers, fits_fast)
    want = exhaustive(p)
    got = heuristic(p)
    assert got is not None
    ev = evaluate(p, *got)
    assert ev.feasible and ev.iteration_s == pytest.approx(want.objective)
