"""bench/memory_probe.py (the memory bench's measuring method) against bytes computed by hand."""

from __future__ import annotations

import os

from torchrun_rows import torchrun_rows

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "workers", "memory_probe_worker.py")


def test_probe_counts_weights_grads_adam_state_and_transients():
    rows = torchrun_rows(WORKER, 2)
    assert len(rows) == 2
    weight = 512 * 512 * 4  # one Linear(512, 512) in fp32
    params = 3 * weight
    for r in rows:
        # Only the weights are alive when the measured steps start.
        assert r["start"] == params
        # Weights + grads + Adam's exp_avg and exp_avg_sq are all alive at the second step's Adam
        # step; above that only the activations of 2 rows (a few KB) and Adam's temporaries (its
        # denominator sqrt(v) / c + eps, one parameter's worth per parameter at most).
        assert 4 * params <= r["peak"] <= 5 * params + 64 * 1024
        # A tensor allocated and freed inside the measured stretch counts exactly; freeing one
        # allocated before the probe leaves the count alone.
        assert r["second_start"] == weight
        assert r["second_peak"] == weight + 4_000_000
