"""The sharding rules on blocks written as real code writes them (tests/support/tp_blocks.py) train
like one device under tp=2 (dp2 x tp2) and tp=4 (vocab-parallel heads tied and untied, sequence
parallelism among them, also beside FSDP, recompute and a pipeline) and really divide the work: one torchrun launch
(tests/torchrun/workers/tp_rules_worker.py) runs every block under both plans; FLOPs are counted by
torch's FlopCounterMode around each rank's real step, not by fxplan."""

from __future__ import annotations

import functools
import json
import os
import re

import pytest

from fxplan.runtime.launch import run_torchrun

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "workers", "tp_rules_worker.py")
ENV = {"FXPLAN_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1"}
MODELS = ["einsum", "bmm", "fused", "conv", "dwconv", "vocab"]
PLANS = ["tp2", "tp4"]
# the tied head under tp4, sequence parallelism under tp4 (beside bmm's tp4: its memory) and tp2
EXTRA = [("tied", "tp4"), ("bmm", "sp4"), ("vocab", "sp2")]
# sequence parallelism's saved shards beside FSDP's saved-weight handles, recompute and a 1f1b pipeline
EXTRA += [("bmm", "sp2-fsdp"), ("bmm", "sp2-recompute"), ("bmm", "sp2-pp2")]
RUNS = [(m, p) for m in MODELS for p in PLANS] + EXTRA


@functools.cache
def _launch() -> tuple[dict, str]:
    runs = ",".join(f"{m}:{p}" for m, p in RUNS)
    proc = run_torchrun(WORKER, 4, ["--runs", runs], timeout_s=420, env=ENV)
    lines = [line[len("RESULT "):] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return {(r["model"], r["plan"]): r for r in map(json.loads, lines)}, proc.stderr[-3000:]


def _tp(plan: str) -> int:
    return int(re.match(r"[a-z]+(\d+)", plan).group(1))


def _result(model: str, plan: str) -> dict:
    results, stderr = _launch()
    assert (model, plan) in results, f"{model} {plan}: no result; torchrun stderr:\n{stderr}"
    r = results[(model, plan)]
    assert "error" not in r, r["error"]
    return r


@pytest.mark.slow
@pytest.mark.timeout(500)
@pytest.mark.parametrize("model,plan", RUNS)
def test_block_trains_like_one_device(model, plan):
    r = _result(model, plan)
    assert r["losses"] == pytest.approx(r["reference"], rel=1e-4, abs=1e-5)
    assert r["param_close"], r["max_param_diff"]
    assert all(s[1] == _tp(plan) for s in r["strategies"].values())


@pytest.mark.slow
@pytest.mark.timeout(500)
@pytest.mark.parametrize("model", MODELS)
def test_tp4_divides_each_ranks_flops(model):
    """Under tp=4 each rank does at most 0.3 of one device's FLOPs for the same step."""
    r = _result(model, "tp4")
    for p in r["per_rank"]:
        assert all(f <= 0.3 * r["reference_flops"] for f in p["flops"]), (p["rank"], p["flops"], r["reference_flops"])
        kinds = {kind for kind, key, _, _ in p["counts"]}
        # the loss may take its rows split, and a channel-split residual stream (depthwise convs) takes
        # the MLP's partial sums as a reduce-scatter
        assert kinds <= {"all_reduce", "all_gather", "reduce_scatter"} and all(key == "tp:0,1,2,3" for _, key, _, _ in p["counts"]), kinds


@pytest.mark.slow
@pytest.mark.timeout(500)
@pytest.mark.parametrize("model,plan", [("vocab", "tp2"), ("vocab", "tp4"), ("tied", "tp4"), ("vocab", "sp2")])
def test_vocab_parallel_head_holds_a_tp_th_of_the_logits(model, plan):
    """One device's largest saved tensor is the logits' log-softmax [tokens, vocab]; with the vocab
    split over tp (the head's weight, tied to the embedding or not) no rank saves more than 1/tp of it."""
    r = _result(model, plan)
    tp = _tp(plan)
    for p in r["per_rank"]:
        assert p["largest_saved"] * tp <= r["reference_largest_saved"], (p["rank"], p["largest_saved"], r["strategies"])


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_sequence_parallelism_divides_activation_memory():
    """Pinned sp: every layer runs its sequence-parallel sharding, and each rank saves for backward
    little more than a quarter of one device's activation bytes (norms, residuals and the loss's
    inputs on 1/4 of the sequence, the column-parallel inputs saved as their shard), far below
    plain tp4, whose norms and gathered matmul inputs are whole on every rank."""
    plain, sp = _result("bmm", "tp4"), _result("bmm", "sp4")
    assert all(spec.startswith("sp:") for _, _, spec in sp["strategies"].values()), sp["strategies"]
    assert all(p["saved_per_step"] <= 0.7 * q["saved_per_step"] for p, q in zip(sp["per_rank"], plain["per_rank"])), (
        [p["saved_per_step"] for p in sp["per_rank"]], [q["saved_per_step"] for q in plain["per_rank"]])
    assert all(p["saved_per_step"] <= 0.3 * sp["reference_saved"] for p in sp["per_rank"]), (
        [p["saved_per_step"] for p in sp["per_rank"]], sp["reference_saved"])
    kinds = {kind for p in sp["per_rank"] for kind, _, _, _ in p["counts"]}
    assert {"all_gather", "reduce_scatter"} <= kinds  # Megatron-SP's all-gather / reduce-scatter pairs
