"""The cost model on a calibrated Cluster: collectives priced by the fitted alpha-beta of their
kind and group size, compute by the matmul curve, the elementwise rate and the op overhead."""

from __future__ import annotations

import dataclasses

import pytest

from fxplan import Cluster
from fxplan.calibration import AlphaBeta, Calibration, fit_alpha_beta
from fxplan.passes.cost import collectives as cc
from fxplan.passes.cost.model import CostModel

from test_cost import index_of, linear_graph


def calibration(world: int = 4) -> Calibration:
    fits = []
    for kind, base in (("all_reduce", 100e-6), ("all_gather", 60e-6), ("reduce_scatter", 70e-6),
                       ("all_to_all", 90e-6)):
        fits.append(AlphaBeta(kind, world, "world", base * 2, 1 / 0.5e9))
        fits.append(AlphaBeta(kind, 2, "adjacent", base, 1 / 1e9))
        fits.append(AlphaBeta(kind, 2, "strided", base * 1.5, 1 / 1e9))
    fits.append(AlphaBeta("send_recv", 2, "adjacent", 40e-6, 1 / 2e9))
    return Calibration(host="h", backend="gloo", world_size=world, date="2026-01-01T00:00:00+00:00",
                       collectives=tuple(fits), matmul_curve=((32.0, 10e9), (256.0, 80e9), (1024.0, 100e9)),
                       elementwise_flops=2e9, op_overhead_s=5e-6, cores_per_rank=0.5, threads_per_rank=1,
                       noise=0.1, load_average=1.0, seconds=5.0)


def cluster(cal: Calibration) -> Cluster:
    return Cluster(nodes=1, devices_per_node=cal.world_size, memory_bytes=8e9, peak_flops=100e9, intra_bw=1e9,
                   inter_bw=1e9, max_efficiency=1.0, half_efficiency_dim=100.0, dtype_bytes=4, calibration=cal,
                   name="local")


def test_collectives_use_the_fit_of_their_kind_and_group_size():
    c = cluster(calibration())
    nbytes = 1 << 20
    assert cc.all_reduce_time(c, [0, 1, 2, 3], nbytes) == pytest.approx(200e-6 + nbytes / 0.5e9)
    # two layouts of pairs were measured: the slower one prices every pair
    assert cc.all_gather_time(c, [0, 2], nbytes) == pytest.approx(90e-6 + nbytes / 1e9)
    assert cc.reduce_scatter_time(c, [2, 3], nbytes) == pytest.approx(105e-6 + nbytes / 1e9)
    assert cc.all_to_all_time(c, [0, 1, 2, 3], nbytes) == pytest.approx(180e-6 + nbytes / 0.5e9)
    assert cc.p2p_time(c, 1, 2, nbytes) == pytest.approx(40e-6 + nbytes / 2e9)
    # a group size it never measured falls back to the figures
    big = dataclasses.replace(c, devices_per_node=8)
    assert cc.all_reduce_time(big, range(8), nbytes) == pytest.approx(
        2 * 7 / 8 * nbytes / c.intra_bw + 14 * c.intra_latency)
    # an uncalibrated cluster of the same figures prices differently
    plain = dataclasses.replace(c, calibration=None)
    assert cc.all_reduce_time(plain, [0, 1, 2, 3], nbytes) != cc.all_reduce_time(c, [0, 1, 2, 3], nbytes)


def test_compute_follows_the_measured_curve_elementwise_rate_and_op_overhead():
    batch, seq, k, n = 4, 64, 256, 512
    graph, space = linear_graph(batch, seq, k, n)
    layer = dataclasses.replace(graph.layers[0], dense_flops=graph.layers[0].flops * 0.9, ops=10)
    graph = dataclasses.replace(graph, layers=(layer,))
    cal = calibration(world=1)
    c = cluster(cal)
    model = CostModel(graph, space, c, batch_size=batch)
    prob = model.problem(1, 1, "1f1b")
    fwd = prob.fwd[0][index_of(model, 1, 1, 0, tp=1, fsdp=False, recompute=False)]
    rows = batch * seq
    dense = layer.flops * 0.9
    size = (rows * n * k) ** (1 / 3)
    expect = dense / cal.matmul_rate(size) + layer.flops * 0.1 / 2e9 + 10 * 5e-6
    assert fwd == pytest.approx(expect, rel=1e-9)
    # interpolation is log-log between measured points, flat outside
    assert cal.matmul_rate(16) == 10e9 and cal.matmul_rate(4096) == 100e9
    assert 80e9 < cal.matmul_rate(512) < 100e9


def test_fit_reproduces_an_exact_line_and_round_trips():
    pts = [(b, 50e-6 + b / 1e9) for b in (4096, 65536, 1 << 20, 1 << 22)]
    alpha, beta = fit_alpha_beta(pts)
    assert alpha == pytest.approx(50e-6) and beta == pytest.approx(1e-9)
    cal = calibration()
    assert Calibration.from_dict(cal.to_dict()) == cal
    c = cluster(cal)
    assert Cluster.from_dict(c.to_dict()) == c
    assert "all_reduce" in cal.table() and "noise 10.0 %" in cal.table()


def test_measured_points_price_piecewise_between_sizes():
    # (nbytes, median, min, lower quartile): a latency floor, a kink where the algorithm changes,
    # and the smallest size reading slower than the next (measured right after the largest)
    pts = ((4096.0, 0, 0, 300e-6), (16384.0, 0, 0, 250e-6), (65536.0, 0, 0, 260e-6),
           (262144.0, 0, 0, 400e-6), (1048576.0, 0, 0, 1000e-6), (4194304.0, 0, 0, 3400e-6))
    fit = AlphaBeta("all_reduce", 2, "world", 280e-6, 1e-9, points=pts,
                    held_out=((32768.0, 0, 0, 255e-6), (2097152.0, 0, 0, 1800e-6)))
    assert fit.time(4096) == pytest.approx(250e-6) and fit.time(100) == pytest.approx(250e-6)
    assert fit.time(262144) == pytest.approx(400e-6)
    # between two sizes: the line through them
    assert fit.time(655360) == pytest.approx(400e-6 + 600e-6 * (655360 - 262144) / (1048576 - 262144))
    # beyond the largest: its time plus the three largest sizes' bandwidth
    _, tail = fit_alpha_beta([(262144.0, 400e-6), (1048576.0, 1000e-6), (4194304.0, 3400e-6)])
    assert fit.time(8 << 20) == pytest.approx(3400e-6 + tail * (4 << 20))
    sizes = [1 << k for k in range(8, 26)]
    assert all(fit.time(a) <= fit.time(b) for a, b in zip(sizes, sizes[1:]))
    assert max(fit.held_out_errors()) < 0.05
    # without measured points (presets, hand-made fits) the line is the price
    line = AlphaBeta("all_reduce", 2, "world", 280e-6, 1e-9)
    assert line.time(1 << 20) == pytest.approx(280e-6 + (1 << 20) * 1e-9)
