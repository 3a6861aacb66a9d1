"""Forward compute time of one layer's spec on one device, the part of `fwd` that is not communication.

Without a calibration (presets, explicit figures): every FLOP at `peak_flops` times the matmul
efficiency curve of the layer's weights (`spec_facts.inv_efficiency_ratio`). With one
(`Cluster.local()`): the dense FLOPs (matmuls, convolutions, attention) at the measured matmul
rate of each weight's shape, the elementwise rest at the measured elementwise rate, and one
measured dispatch overhead per op, which is what small layers on a CPU spend most of their time on.
Backward is priced from this by the caller (2x: input- and weight-gradient parts).
"""

from __future__ import annotations

from fxplan.cluster import Cluster
from fxplan.passes.cost import collectives as cc
from fxplan.passes.cost.spec_facts import SpecFacts, inv_efficiency_ratio, matmul_numel


def forward_time(cluster: Cluster, f: SpecFacts, samples: float) -> float:
    """Seconds of the forward of `samples` samples through the layer under spec `f`, one device."""
    flops = f.flops * samples
    rows = f.rows_per_sample * samples
    cal = cluster.calibration
    if cal is None or not cal.matmul_curve:
        return flops / cluster.peak_flops * inv_efficiency_ratio(cluster, f, rows)
    dense = flops * f.dense_fraction
    weight_flops = min(dense, 2.0 * rows * matmul_numel(f)) if f.weights else 0.0
    t = 0.0
    if weight_flops > 0:
        total = sum(n * k for n, k in f.weights)
        for n, k in f.weights:
            t += weight_flops * (n * k / total) / cal.matmul_rate(cc.matmul_size(rows, n, k))
    other_dense = dense - weight_flops
    if other_dense > 0:
        # attention's batched matmuls (and weightless matmuls): no shapes at hand; priced at the
        # rate of a (sequence, hidden, sequence) product
        t += other_dense / cal.matmul_rate(cc.matmul_size(f.rows_per_sample, f.hidden, f.rows_per_sample))
    t += (flops - dense) / cal.elementwise_flops
    return t + f.ops * cal.op_overhead_s
