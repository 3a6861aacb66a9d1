"""Cluster.local()'s calibration on real gloo ranks: quick, cached, and its alpha-beta fits predict
message sizes they were not fitted on."""

from __future__ import annotations

import statistics
import time

import pytest

import fxplan
from fxplan.runtime.calibrate import HELD_OUT


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_calibration_is_quick_cached_and_predicts_held_out_sizes(tmp_path, monkeypatch):
    monkeypatch.setenv("FXPLAN_CALIBRATION_CACHE", str(tmp_path / "local.json"))
    start = time.monotonic()
    cluster = fxplan.Cluster.local(world_size=2)
    measured_s = time.monotonic() - start
    cal = cluster.calibration
    assert measured_s < 30, f"calibration took {measured_s:.1f} s"
    kinds = {f.kind for f in cal.collectives}
    assert kinds == {"all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv"}
    # every fit carries the held-out sizes, measured in the same rounds but not fitted
    for fit in cal.collectives:
        assert sorted(p[0] for p in fit.held_out) == sorted(float(b) for b in HELD_OUT)
    print(cal.table())
    # On a host shared with other jobs one size can be unlucky, and a whole calibration can fall in a
    # busy spell (CI once measured 98 % noise): each collective's typical held-out error must be
    # within 20 %, and 80 % of all held-out points too, in this calibration or in one more taken anew.
    # A fit that is wrong (bad model, sizes mixed up) misses in both.
    misses = _held_out_misses(cal)
    if misses:
        cluster = fxplan.Cluster.local(world_size=2, refresh=True)
        cal = cluster.calibration
        print(cal.table())
        assert not _held_out_misses(cal), (misses, _held_out_misses(cal))
    # compute figures are plausible for a CPU core: bigger matmuls run faster than tiny ones
    curve = cal.matmul_curve
    assert curve[0][1] < max(r for _, r in curve) and cal.elementwise_flops > 0 and cal.op_overhead_s > 0
    # cached: another call measures nothing and returns the figures last measured
    start = time.monotonic()
    again = fxplan.Cluster.local(world_size=2)
    assert time.monotonic() - start < 2.0
    assert again.calibration == cal and again.peak_flops == cluster.peak_flops


def _held_out_misses(cal) -> list:
    """What breaks the held-out bounds: (kind, its errors) per collective, and the share of all points."""
    errors = {fit.kind: fit.held_out_errors() for fit in cal.collectives}
    misses = [(kind, errs) for kind, errs in errors.items() if statistics.median(errs) > 0.20]
    flat = [e for errs in errors.values() for e in errs]
    if sum(e <= 0.20 for e in flat) < 0.8 * len(flat):
        misses.append(("share within 20 %", sum(e <= 0.20 for e in flat) / len(flat)))
    return misses
