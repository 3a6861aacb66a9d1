"""Stages evened out where one microbatch makes the iteration time the sum of the stages
(passes/solve/balance.py), checked against every contiguous split; and ResNet-18 under a pinned
pp=4 with one microbatch (BatchNorm keeps it at one) splits its work evenly."""

from __future__ import annotations

import itertools
import os
import sys

import numpy as np
import pytest

import fxplan
from fxplan.passes.solve.balance import SLACK, even_stages
from fxplan.passes.solve.problem import Edge, Problem, evaluate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "support"))
import hf_zoo  # noqa: E402


def _problem(times, sends, microbatches=1, pp=4):
    one = lambda x: np.array([float(x)])  # noqa: E731 - one strategy per layer
    L = len(times)
    zeros = tuple(one(0) for _ in range(L))
    edges = tuple(Edge(u, u + 1, np.zeros((1, 1)), one(sends[u])) for u in range(L - 1))
    return Problem(pp, microbatches, "gpipe", tuple(one(t) for t in times), zeros, zeros, zeros, zeros, zeros,
                   edges, memory_limit=np.inf)


def _splits(L, pp):
    for cuts in itertools.combinations(range(1, L), pp - 1):
        yield tuple(sum(1 for c in cuts if u >= c) for u in range(L))


def test_even_stages_is_the_most_even_split_within_the_slack():
    rng = np.random.default_rng(0)
    for _ in range(20):
        times = rng.uniform(1.0, 10.0, 9)
        sends = rng.uniform(0.0, 0.4, 8)
        problem = _problem(times, sends)
        strategy = (0,) * 9
        # the solver's optimum: the cheapest cuts, whatever the balance
        solved = min(_splits(9, 4), key=lambda s: evaluate(problem, s, strategy).iteration_s)
        got = even_stages(problem, solved, strategy)
        limit = evaluate(problem, solved, strategy).iteration_s * (1 + SLACK)
        allowed = [s for s in _splits(9, 4) if evaluate(problem, s, strategy).iteration_s <= limit]
        best = min(max(evaluate(problem, s, strategy).stage_compute_s) for s in allowed)
        ev = evaluate(problem, got, strategy)
        assert ev.iteration_s <= limit
        assert max(ev.stage_compute_s) == pytest.approx(best)


def test_several_microbatches_keep_the_solved_split():
    problem = _problem([10, 1, 1, 1, 1, 1], [0.1] * 5, microbatches=4, pp=2)
    assert even_stages(problem, (0, 0, 0, 0, 0, 1), (0,) * 6) == (0, 0, 0, 0, 0, 1)


def test_resnet18_pinned_pp4_divides_its_work():
    model, batch = hf_zoo.build("resnet18")
    # a CPU-like host: 200 GFLOP/s, 5 GB/s links, 20 us per message
    cluster = fxplan.Cluster(nodes=1, devices_per_node=4, memory_bytes=8e9, peak_flops=2e11, intra_bw=5e9,
                             inter_bw=5e9, intra_latency=20e-6, half_efficiency_dim=64, dtype_bytes=4,
                             optimizer_bytes_per_param=0)
    compiled = fxplan.compile(model, batch, cluster=cluster, verbose=False,
                              constraints=fxplan.Constraints(pp=4, microbatches=1, schedule="gpipe"))
    assert len(compiled.layer_graph.layers) >= 8
    times = [stage.estimated_compute_s for stage in compiled.plan.stages]
    assert max(times) <= 1.5 * sum(times) / len(times), times
    flops = {layer.name: layer.flops for layer in compiled.layer_graph.layers}
    per_stage = [sum(flops[name] for name in stage.layers) for stage in compiled.plan.stages]
    assert max(per_stage) <= 1.6 * sum(per_stage) / len(per_stage), per_stage
