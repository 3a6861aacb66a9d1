"""The search's gap is global: over every (pp, microbatches, schedule) the pins allow, solved, pruned or
cut. Per model (the 96-layer GPT on 8x8, GPT-3 175B on 128x8) one analysis and one CostModel (its cost
tables cached per (pp, microbatches)) serve the unpinned search and a slice of pinned solves; the full
sweep of every pin is bench/plan_sweep.py."""

from __future__ import annotations

import pytest

import fxplan
from fxplan.models import build, example_batch
from fxplan.passes.cost.model import CostModel
from fxplan.passes.solve.candidate import solve
from fxplan.passes.solve.search import OUTCOMES, _dominates, search
from fxplan.planner import analyse
from fxplan.search_space import candidates, dominated_by

GAP = 5e-3  # the planner's target for big chains


def _searched(spec: str, batch: int, nodes: int):
    cluster = fxplan.Cluster.preset("a100-80g", nodes=nodes, devices_per_node=8)
    model = build(spec, device="meta")
    inputs = example_batch(model, batch, device="meta")
    analysis = analyse(model, inputs, cluster, fxplan.Constraints())
    lg = analysis.layer_graph
    costs = CostModel(lg, analysis.space, cluster, lg.batch_size, fxplan.Constraints())
    cands = [c for c in candidates(cluster, lg.batch_size, len(lg.layers), fxplan.Constraints())
             if costs.bound_problem(*c) is not None]
    res = search(costs.problem, cands, time_limit_s=600, mip_gap=GAP, dominated=dominated_by(cands),
                 bound_problem=costs.bound_problem)
    return costs, cands, res


@pytest.fixture(scope="module")
def gpt96():
    return _searched("gpt:layers=96,hidden=4096", 512, 8)


@pytest.fixture(scope="module")
def gpt3():
    return _searched("gpt:size=gpt3-175b", 1536, 128)


def test_every_microbatch_count_and_schedule_is_a_candidate(gpt96):
    _, cands, _ = gpt96
    for pp in (8, 16, 32):
        counts = {c for p, c, _ in cands if p == pp}
        # every divisor of the batch from pp on (1F1B needs one per stage), far past the old 4 * pp cap
        assert {c for c in (pp, 2 * pp, 4 * pp, 8 * pp, 512) if 512 % c == 0} <= counts
        assert {s for p, _, s in cands if p == pp} == set(fxplan.constraints.RUNNABLE_SCHEDULES)


@pytest.mark.parametrize("searched", ["gpt96", "gpt3"])
def test_the_gap_is_global_and_the_counts_add_up(searched, request):
    _, cands, res = request.getfixturevalue(searched)
    best = res.best
    assert 0 <= best.gap <= 0.01
    assert res.floor == pytest.approx(best.objective * (1 - best.gap), rel=1e-9)
    assert res.floor == min(r.bound for r in res.per_candidate if r.outcome != "skipped")
    assert sum(res.count(o) for o in OUTCOMES) == len(cands)
    assert res.count("cut") == 0 and res.count("solved") >= 1
    assert res.pruned == res.count("pruned") + res.count("dominated") > len(cands) // 2
    for r in res.per_candidate:
        if r.outcome in ("pruned", "dominated"):
            assert r.bound >= best.objective * (1 - GAP) * (1 - 1e-9)


@pytest.mark.parametrize("searched,pin", [
    ("gpt96", (8, 64, "1f1b")), ("gpt96", (16, 128, "zb-h1")), ("gpt96", (16, 32, "zb-h2")),
    ("gpt96", (32, 256, "1f1b")), ("gpt96", (32, 64, "zb-h1")), ("gpt96", (4, 16, "gpipe")),
    # GPT-3 175B: its plan's neighbours (pp 8 at 96 microbatches, pp 16 at 96 and 192, other schedules)
    ("gpt3", (8, 96, "zb-h1")), ("gpt3", (16, 96, "1f1b")), ("gpt3", (16, 192, "zb-auto")),
    ("gpt3", (16, 96, "zb-auto"))])
def test_no_pin_beats_the_unpinned_plan(searched, pin, request):
    costs, cands, res = request.getfixturevalue(searched)
    assert pin in cands
    sol = solve(costs.problem(*pin), time_limit_s=120, mip_gap=GAP)
    assert sol.objective >= res.best.objective * (1 - 0.005)
    # the global bound is below what this pin reaches, so below its optimum's upper end (where the
    # bound is exact, the two meet up to the bound's arithmetic)
    assert res.floor <= sol.objective * (1 + 1e-9)


def test_a_dominated_candidate_follows_its_dominator_to_the_end(gpt96):
    """zb-auto with no more microbatches than stages holds as many as zb-h1 at zb-h1's bubble: the same
    problem, solved once. And whatever a dominator's first pass said ("cut" while it waits for its
    MILP), the candidates it dominates end with its final outcome and bound."""
    costs, cands, res = gpt96
    by = {r.candidate: r for r in res.per_candidate}
    for pp in (8, 16):
        auto, h1 = costs.problem(pp, pp, "zb-auto"), costs.problem(pp, pp, "zb-h1")
        assert auto.bubble_share == h1.bubble_share
        assert [auto.in_flight(i) for i in range(pp)] == [h1.in_flight(i) for i in range(pp)]
        assert _dominates(h1, auto)
        assert by[(pp, pp, "zb-auto")].outcome in ("dominated", "pruned")
    dominators = dominated_by(cands)
    followed = [r for r in res.per_candidate if r.outcome == "dominated"]
    assert followed
    for r in followed:
        final = by[dominators[r.candidate]]
        assert final.outcome != "cut" and r.bound >= final.bound
