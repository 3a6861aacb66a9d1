"""distribute() of a META model allocates this rank's shards plus one module at a time, never more
(tests/torchrun/workers/distribute_memory_worker.py: 4 gloo ranks, a GPT on meta, three plans;
peak live tensor bytes by bench/memory_probe.py, the memory bench's method)."""

from __future__ import annotations

import functools
import os

import pytest

from torchrun_rows import torchrun_rows

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "workers", "distribute_memory_worker.py")


@functools.cache
def _results() -> dict:
    rows = torchrun_rows(WORKER, 4, env={"FXPLAN_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1"})
    return {r["plan"]: r for r in rows}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("plan", ["dp4-fsdp", "dp2xtp2", "pp2xdp2-fsdp"])
def test_meta_distribute_peak_is_own_shards_plus_one_module(plan):
    r = _results()[plan]
    layer = r["largest_module_bytes"]  # one module is materialised whole, then sliced and freed
    assert len(r["ranks"]) == 4
    for rank in r["ranks"]:
        assert rank["held"] < 0.6 * r["full_bytes"]  # the plan really divides the model
        assert rank["peak"] >= rank["held"]  # the shards are really allocated (and counted)
        assert rank["peak"] < 1.3 * rank["held"] + layer, (rank, layer)
