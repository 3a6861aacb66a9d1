"""bench/runtime_bench.py: the harness's own logic, and one short real run of all three pairs.

The real run checks what the bench claims beyond timing: each anchor (DDP, FSDP2, torch pipelining
Schedule1F1B) and fxplan compute the same loss on the same model and batch, at the first step and
after a few SGD steps. Timings are not asserted (a shared CI host is too noisy for that).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "bench")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("runtime_bench")


@pytest.fixture(scope="module")
def worker():
    return _load("runtime_bench_worker")


def _plan(stage_layers):
    import fxplan

    stages = [fxplan.Stage(index=i, layers=layers, devices=(i,),
                           strategies={n: fxplan.Strategy(dp=1, tp=1) for n in layers})
              for i, layers in enumerate(stage_layers)]
    return fxplan.Plan(pp=len(stages), microbatches=4, schedule="1f1b", stages=stages, estimated_iteration_s=0.0,
                       batch_size=16, world_size=len(stages))


def test_stage_blocks_mirrors_the_plan_split(worker):
    plan = _plan([("embed",), ("blocks.0", "blocks.1", "blocks.2"), ("blocks.3",), ("blocks.4", "head")])
    assert worker.stage_blocks(plan) == [[], [0, 1, 2], [3], [4]]


def test_stage_blocks_refuses_a_split_it_cannot_mirror(worker):
    plan = _plan([("blocks.0",), ("embed", "blocks.1"), ("blocks.2",), ("head",)])
    with pytest.raises(ValueError, match="'embed'"):
        worker.stage_blocks(plan)


def test_rank_rows_cover_the_batch_once(worker):
    import torch

    batch = (torch.arange(16).view(8, 2), torch.arange(8))
    pieces = [worker.rank_rows(batch, r, 4) for r in range(4)]
    assert torch.equal(torch.cat([p[0] for p in pieces]), batch[0])
    assert torch.equal(torch.cat([p[1] for p in pieces]), batch[1])


def test_pinned_constraints(bench):
    dp, pp, fsdp = (bench.pinned_constraints(p, 8) for p in ("dp", "pp", "fsdp"))
    assert (dp.pp, dp.dp, dp.fsdp, dp.tp) == (1, 4, False, 1)
    assert (fsdp.pp, fsdp.dp, fsdp.fsdp) == (1, 4, True)
    assert (pp.pp, pp.dp, pp.schedule, pp.microbatches) == (4, 1, "1f1b", 8)


def _result(pair, ours_ms, anchor_ms):
    side = lambda ms: dict(median_ms=ms, loss_first=1.0, loss_last=0.5)  # noqa: E731
    return dict(pair=pair, anchor="torch X", results={"fxplan": side(ours_ms), "torch X": side(anchor_ms)})


def test_table_passes_and_fails_on_the_ratio(bench, capsys):
    assert bench.print_table([_result("dp", 102.0, 100.0), _result("pp", 109.0, 100.0)])
    out = capsys.readouterr().out
    assert "1.020  pass*" in out and "1.090  pass " in out
    assert not bench.print_table([_result("dp", 100.0, 100.0), _result("fsdp", 120.0, 100.0)])
    assert "1.200  FAIL" in capsys.readouterr().out


@pytest.mark.timeout(420)
def test_short_run_all_pairs_same_losses(tmp_path):
    """One invocation, 4 gloo ranks, all three pairs on a tiny GPT: both sides agree on the losses."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(BENCH, "runtime_bench.py"), "--model",
           "gpt:layers=4,hidden=32,heads=2,seq=16,vocab=64,tied=false", "--batch", "16", "--microbatches", "4",
           "--warmup", "1", "--steps", "2", "--timeout", "360", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]  # 1: a ratio over 1.10
    results = json.loads(out.read_text())
    assert [r["pair"] for r in results] == ["dp", "pp", "fsdp"]
    assert "pair" in proc.stdout and "ratio" in proc.stdout
    for r in results:
        ours, theirs = r["results"]["fxplan"], r["results"][r["anchor"]]
        assert len(ours["steps_ms"]) == len(theirs["steps_ms"]) == 2
        assert all(t > 0 for t in ours["steps_ms"] + theirs["steps_ms"])
        for key in ("loss_first", "loss_last"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4), (r["pair"], key)
        # training happened: 3 SGD steps on one batch lower the loss for both
        assert ours["loss_last"] < ours["loss_first"]
