"""codegen's rank modules on 2 gloo ranks (tests/torchrun/workers/codegen_worker.py): tp, FSDP, mixed
plans and recompute equal the model."""

import os

import pytest

from fxplan.runtime.launch import run_torchrun

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers", "codegen_worker.py")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_gloo_two_ranks_match_model():
    """tp=2 Megatron, dp=2 FSDP and a mixed plan (dp embed/head, tp blocks): loss and grads exact."""
    res = run_torchrun(WORKER, 2, timeout_s=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    for case in ("tp", "dp_fsdp", "mixed", "fsdp_paths"):
        assert f"CASE {case} ok" in res.stdout


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_gloo_recompute_matches_model():
    """2 ranks: tp=2 Megatron, dp=2 FSDP and mixed plans with recompute equal the model, and the
    recomputed regions' forward collectives really ran again (in the same order on both ranks,
    else gloo would hang or the gradients would differ)."""
    res = run_torchrun(WORKER, 2, args=["recompute"], timeout_s=150)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    for case in ("tp", "dp_fsdp", "mixed"):
        assert f"CASE {case}_rc ok" in res.stdout
        assert f"CASE {case}_rc collectives" in res.stdout
