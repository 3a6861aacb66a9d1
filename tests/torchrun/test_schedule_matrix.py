"""The zero-bubble schedules (split backward, deferred weight gradients) and the chunked ones
(interleaved-1f1b, zbv: two stages per rank) train like one device.

One torchrun launch (4 gloo ranks) per model runs a slice of the plans of bench/schedule_matrix.py
(which runs them all): losses and every parameter equal one device after 3 SGD steps, the work is
divided as under 1F1B (runtime_matrix's checks), the backward really is split into I and W, and
the compute actions torch's runtime loaded on every rank equal fxplan.schedules' lists for the
plan, the ones the simulator times.
"""

from __future__ import annotations

import functools
import json
import os

import pytest
from test_runtime_matrix import _check_equal_to_one_device, _check_rows, _check_stored

from fxplan.runtime.launch import run_torchrun

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "workers", "schedule_matrix_worker.py")
ENV = {"FXPLAN_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1"}

SLICE = {
    "gpt": ["pp4-zb-h2", "pp2xtp2-zb-h1", "pp2xdp2-fsdp-zb-auto", "pp2xtp2-interleaved-1f1b", "pp4-zbv"],
    "custom-tied": ["pp4-zb-auto", "pp2xdp2-zb-h1", "pp2xdp2-fsdp-keep-zb-h2", "pp2xdp2-zbv",
                    "pp2xdp2-fsdp-interleaved-1f1b"],
}
CHUNKED = ("interleaved-1f1b", "zbv")


@functools.cache
def _launch(model: str) -> tuple[dict, str]:
    proc = run_torchrun(WORKER, 4, ["--model", model, "--plans", ",".join(SLICE[model])], timeout_s=330, env=ENV)
    lines = [line[len("RESULT "):] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return {r["plan"]: r for r in map(json.loads, lines)}, proc.stderr[-3000:]


@pytest.mark.parametrize("model,plan", [(m, p) for m, plans in SLICE.items() for p in plans])
def test_zero_bubble_schedule_trains_like_one_device(model, plan):
    results, stderr = _launch(model)
    assert plan in results, f"{model} {plan}: no result; torchrun stderr:\n{stderr}"
    r = results[plan]
    assert "error" not in r, r["error"]
    schedule = next((s for s in CHUNKED if plan.endswith("-" + s)), None) or "zb-" + plan.split("-zb-")[1]
    assert r["schedule"] == schedule
    _check_equal_to_one_device(r)
    _check_rows(r)
    _check_stored(r)
    assert r["split_backward"] == (schedule != "interleaved-1f1b")
    assert r["actions_equal_simulated"]
    stages = len(r["stage_layers"])
    assert stages == r["pp"] * (2 if schedule in CHUNKED else 1)
    if schedule in CHUNKED:  # every rank holds two stages, placed as the schedule places them
        for p in r["per_rank"]:
            place = p["rank"] // (4 // r["pp"])
            pair = [place, place + r["pp"]] if schedule == "interleaved-1f1b" else [place, stages - 1 - place]
            assert p["stages"] == sorted(pair), (p["rank"], p["stages"])
    if model == "custom-tied":  # the tied weight lives on the first and the last stage
        held = {s for p in r["per_rank"] if "embed.weight" in p["shards"] or "head.weight" in p["shards"]
                for s in p["stages"]}
        assert {0, stages - 1} <= held
