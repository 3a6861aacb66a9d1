"""Synchronised BatchNorm on the fake process group: under dp every training batch norm of a rank's
graph becomes one dp-group call, whose step runs one all-reduce of (count, sum, sum of squares) per
channel forward and one of (sum dy, sum dy * xhat) backward; the cost model prices the same two."""

from __future__ import annotations

import dataclasses

import pytest

import fxplan
from fxplan.passes.cost import collectives as cc
from fxplan.passes.cost.model import CostModel
from fxplan.runtime.collectives import fxplan_sync_batch_norm

from unseen_models import BUILDERS  # noqa: E402

WORLD = 4
CLUSTER = fxplan.Cluster.preset("a100-80g", nodes=1, devices_per_node=WORLD)


@pytest.fixture(scope="module")
def cnn_dp4():
    model, batch = BUILDERS["cnn"]()
    compiled = fxplan.compile(model, batch, cluster=CLUSTER, verbose=False,
                              constraints=fxplan.Constraints(dp=WORLD, pp=1, fsdp=False))
    return model, batch, compiled


def test_dp_rank_graph_synchronises_batch_statistics(cnn_dp4, fake_pg):
    model, batch, compiled = cnn_dp4
    prog = compiled.rank_program(2)
    calls = [n for n in prog.gm.graph.nodes if n.target is fxplan_sync_batch_norm]
    assert len(calls) == 1 and calls[0].args[-1] == "dp:0,1,2,3"
    assert calls[0].args[5:7] == (0.1, 1e-5)  # the module's momentum and eps
    assert "dp:0,1,2,3" in prog.group_keys
    assert not any("batch_norm" in str(n.target) for n in prog.gm.graph.nodes if n.op == "call_function"
                   and n.target is not fxplan_sync_batch_norm)
    comm = fake_pg(2, compiled.plan)
    with comm.observe() as counter:
        loss = prog.gm(*batch)  # stage 0 takes the full batch and keeps its rows
        loss.backward()
    counts = counter.snapshot()
    channels = model.bn.num_features
    fwd = counts[("all_reduce", "dp:0,1,2,3", "fwd")]
    bwd = counts[("all_reduce", "dp:0,1,2,3", "bwd")]
    assert (fwd.calls, fwd.nbytes) == (1, (2 * channels + 1) * 8)  # float64 count, sums, squares
    assert (bwd.calls, bwd.nbytes) == (1, 2 * channels * 8)


def test_cost_model_prices_the_statistics_under_dp_only(cnn_dp4):
    _, _, compiled = cnn_dp4
    graph = compiled.layer_graph
    layer = next(layer for layer in graph.layers if layer.batch_coupled)
    assert layer.batch_stat_bytes == (16.0 * 8,)  # one batch norm of 8 channels: 2 x 8 float64 each way
    unsynced = dataclasses.replace(graph, layers=tuple(dataclasses.replace(x, batch_stat_bytes=()) for x in graph.layers))
    pins = fxplan.Constraints(pp=1, fsdp=False, recompute=False)
    with_stats, without = (CostModel(g, compiled.space, CLUSTER, constraints=pins).problem(1, 1, "gpipe")
                           for g in (graph, unsynced))
    strategies = CostModel(graph, compiled.space, CLUSTER, constraints=pins).strategies(1, 1)[layer.index]
    u = layer.index
    for k, s in enumerate(strategies):
        # one all-reduce over the strategy's dp group (ranks tp apart); a group of one moves nothing
        extra = cc.all_reduce_time(CLUSTER, range(0, WORLD, s.tp), 16.0 * 8)
        assert (extra > 0) == (s.dp > 1), s
        assert with_stats.fwd[u][k] - without.fwd[u][k] == pytest.approx(extra, rel=1e-9, abs=1e-15), s
        assert with_stats.bwd[u][k] - without.bwd[u][k] == pytest.approx(extra, rel=1e-9, abs=1e-15), s
    assert {s.dp for s in strategies} >= {1, WORLD}
