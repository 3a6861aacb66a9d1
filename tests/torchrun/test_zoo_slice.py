"""A representative slice of bench/zoo_bench.py's architecture matrix in ONE torchrun: a KV-cache
decoder with lifted constants (Mistral) under dp, masked-LM with ignored labels (BERT) under pp x dp
with 4 microbatches, a class-weighted loss under dp, an encoder-decoder (T5) under pp=4, and ResNet-18
(BatchNorm) under pp=4, dp=4 and pp=2 x dp=2 (synchronised statistics, one microbatch), and under
pinned tp=4 Gemma (tied embeddings, a norm cast back with type_as), ConvNeXt (depthwise convolutions
run channel-split) and Falcon (linears written `x @ w.T`, a loss that moves the labels to the logits'
device): losses, parameters and buffers (running statistics) equal one device's."""

import os

import pytest

from fxplan.runtime.launch import run_torchrun, tagged

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = [("mistral", "dp4"), ("bert", "pp2dp2"), ("bert_weighted", "dp4"), ("t5", "pp4"), ("resnet18", "pp4mb1"),
         ("resnet18", "dp4"), ("resnet18", "pp2dp2mb1"), ("gemma", "tp4"), ("convnext", "tp4"),
         ("falcon", "tp4")]


def _trained(cases, timeout_s: float):
    """(case name, record) of every case, each run by the zoo worker on 4 ranks beside one device and
    found equal to it (no error, same state_dict keys, losses and parameters within tolerance)."""
    proc = run_torchrun(os.path.join(HERE, "workers", "zoo_worker.py"), 4,
                        ["--cases", ",".join(f"{m}:{p}" for m, p in cases)], timeout_s=timeout_s)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = tagged(proc.stdout)
    assert sorted((r["model"], r["plan"]) for r in results) == sorted(cases)
    for r in results:
        case = f"{r['model']} {r['plan']}"
        assert "error" not in r, (case, r.get("error"), r.get("where"))
        assert r["keys_equal"] and r["ok"], (case, r)
    return [(f"{r['model']} {r['plan']}", r) for r in results]


@pytest.mark.timeout(900)
def test_zoo_slice_trains_like_one_device():
    for case, r in _trained(CASES, timeout_s=800):
        if r["plan"] == "dp4":
            assert r["flops_ratio"] <= 1.1, case  # dp divides the work
        if r["plan"] == "tp4":
            assert r["flops_ratio"] <= 1.5, case  # tp divides the work too
        if r["plan"].startswith("pp4"):
            # each weight on one stage (a tied embedding, T5's, on both stages that use it)
            assert r["pp"] == 4 and r["numel_ratio"] <= 1.1, case
        if r["model"] == "resnet18":
            assert r["microbatches"] == 1, case
            if r["plan"] == "pp4mb1":
                # one microbatch: the time formula is the sum of the stages, so any split costs the
                # same compute and most layers could pile onto one stage (passes/solve/balance.py
                # re-cuts within a slack). How even the split gets is a trade against the sends of
                # the cut activations, priced by this host's calibration (1.15 is the most even
                # split of these layers' estimated times; 1.50 was chosen on one VM, with or
                # without the re-cut): no stage may do half the model's work
                assert r["layers"] >= 8 and r["stage_balance"] < 2.0, case
            if r["plan"] == "pp2dp2mb1":
                assert r["pp"] == 2 and r["numel_ratio"] <= 2.2, case  # each weight on its stage's 2 dp ranks


SP_CASES = [("gpt2", "sp4"), ("llama", "sp4"), ("gpt2", "sp2dp2"), ("llama", "sp2dp2")]


@pytest.mark.timeout(600)
def test_hf_causal_lms_under_sequence_parallelism_train_like_one_device():
    """HF causal LMs (their loss shifts the labels along the sequence and flattens the logits) with
    sequence parallelism pinned, 2 microbatches, under tp4 and dp2 x tp2: every layer runs a
    sequence-parallel sharding and losses and parameters equal one device's."""
    for case, r in _trained(SP_CASES, timeout_s=500):
        assert r["microbatches"] == 2 and all(":sp:" in s for s in r["strategies"]), (case, r["strategies"])
