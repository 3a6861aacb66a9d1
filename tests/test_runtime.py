"""The runtime: Runner under torchrun (gloo, 4 CPU processes) against single-device training.

Multi-process tests launch ONE torchrun per model; the worker loops over plans and prints a
`RESULT {json}` line per plan (tests/workers/runtime_worker.py). Until codegen/emit lands the
workers use a clearly marked tp=1 stand-in (tests/workers/runtime_standin.py).
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from fxplan.codegen import materialize
from fxplan.codegen.launch import run_torchrun
from fxplan.errors import DistributedSetupError, ModelError

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "workers", "runtime_worker.py")
FAIL_WORKER = os.path.join(HERE, "workers", "runtime_fail_worker.py")
ENV = {"FXPLAN_TIMEOUT_S": "30", "OMP_NUM_THREADS": "1"}


def _results(proc) -> dict[str, dict]:
    lines = [line[len("RESULT "):] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return {r["plan"]: r for r in map(json.loads, lines)}


def _check(result: dict) -> None:
    assert "error" not in result, result["error"]
    assert result["keys_equal"]
    assert result["init_diff"] == 0.0  # every rank starts from the model's exact values
    assert result["losses"] == pytest.approx(result["reference"], rel=1e-4, abs=1e-5)
    # the loss is one number on every rank, bit for bit
    assert all(losses == result["losses"] for losses in result["losses_by_rank"])
    assert result["param_close"], result["max_param_diff"]
    assert result["grad_diff"] < 1e-5  # two steps without zero_grad accumulate like two backward()


@pytest.fixture(scope="module")
def gpt_run():
    proc = run_torchrun(WORKER, 4, ["--model", "gpt"], timeout_s=240, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return _results(proc)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("plan", ["dp4", "dp4-fsdp", "pp4-gpipe", "pp4-1f1b", "pp2xdp2-1f1b",
                                  "pp2xdp2-fsdp-gpipe", "pp2xdp2-meta"])
def test_gpt_plans_match_single_device(gpt_run, plan):
    _check(gpt_run[plan])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_rows_and_shards_follow_the_plan(gpt_run):
    # global batch 16: dp4 with 2 microbatches -> the stage module sees the full 8-row microbatch
    assert [r["rows_seen"] for r in gpt_run["dp4"]["per_rank"]] == [[8] * 4] * 4
    # pp4, 4 microbatches: stage i on rank i, 4 rows per forward
    pp4 = gpt_run["pp4-1f1b"]["per_rank"]
    assert [r["stage"] for r in pp4] == [0, 1, 2, 3]
    assert all(r["rows_seen"] == [4] * 4 for r in pp4)
    # pp2 x dp2: stage 1 receives its peer's dp half of each 8-row microbatch
    hybrid = gpt_run["pp2xdp2-1f1b"]["per_rank"]
    assert [r["rows_seen"][0] for r in hybrid] == [8, 8, 4, 4]
    # pipeline stages hold disjoint parameters covering the model; fsdp holds ~1/dp of a stage
    full = gpt_run["dp4"]["full_numel"]
    assert sum(r["local_numel"] for r in pp4) == full
    fsdp = gpt_run["dp4-fsdp"]["per_rank"]
    assert all(full / 4 <= r["local_numel"] < full / 4 + 64 for r in fsdp)


E2E_WORKER = os.path.join(HERE, "workers", "runtime_e2e_worker.py")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compile_distribute_end_to_end():
    # the real path: fxplan.compile inside torchrun -> codegen/emit -> Runner, several pinned plans
    proc = run_torchrun(E2E_WORKER, 4, ["--pins", "pp=2;tp=2;pp=1,fsdp=true"], timeout_s=280, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert [r["pins"] for r in lines] == ["pp=2", "tp=2", "pp=1,fsdp=true"]
    for r in lines:
        assert r["keys_equal"], r["plan"]
        assert r["losses"] == pytest.approx(r["reference"], rel=1e-4, abs=1e-5), r["plan"]
        assert r["max_param_diff"] < 1e-5, r["plan"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_setup_errors_and_failing_rank_end_the_job():
    start = time.monotonic()
    proc = run_torchrun(FAIL_WORKER, 4, [], timeout_s=90, env=ENV)
    elapsed = time.monotonic() - start
    out = proc.stdout
    for r in range(4):
        assert f"CHECK world rank{r} ok" in out
        assert f"CHECK same-plan rank{r} ok" in out
    assert "world size 2" in out and "4 processes" in out
    assert "different plan" in out
    # a good pp=4 step first: float targets pass through every stage untouched (no gradient is
    # sent back for them) and the loss equals the single-device loss on every rank
    good = [line.split()[2:] for line in out.splitlines() if line.startswith("GOOD ")]
    assert len(good) == 4 and len({loss for loss, _ in good}) == 1
    assert float(good[0][0]) == pytest.approx(float(good[0][1]), rel=1e-5)
    assert "STEP2 rank1" in out
    assert "UNREACHED" not in out
    assert proc.returncode != 0
    assert "timed out" not in proc.stderr
    assert elapsed < 60
    # torchrun names the first failing rank; our note names it too
    assert "rank 1 (stage 1)" in proc.stderr
    assert "injected failure on purpose" in proc.stderr


# ---------------------------------------------------------------- single process


def test_runner_outside_torchrun_says_run_under_torchrun(monkeypatch):
    from fxplan.codegen.runtime import Runner

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(DistributedSetupError, match="torchrun"):
        Runner(object())


class _Shard:
    def __init__(self, shape, tp_dim=None, tp=1, tp_index=0, fsdp=False, dp=1, dp_index=0):
        self.name, self.global_shape = "w", shape
        self.tp_dim, self.tp, self.tp_index, self.fsdp, self.dp, self.dp_index = tp_dim, tp, tp_index, fsdp, dp, dp_index


@pytest.mark.parametrize("tp_dim,tp,fsdp,dp", [(None, 1, False, 1), (0, 2, False, 2), (1, 2, True, 3),
                                               (None, 1, True, 4)])
def test_local_shard_and_unshard_round_trip(tp_dim, tp, fsdp, dp):
    full = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4)
    pieces = {}
    for t in range(tp):
        for d in range(dp):
            shard = _Shard((6, 4), tp_dim, tp, t, fsdp, dp, d)
            local = materialize.local_shard(full, shard)
            if fsdp:
                assert local.numel() == materialize.fsdp_chunk_numel(full.numel() // tp, dp)
            pieces[(t, d if fsdp else None)] = local
    assert torch.equal(materialize.unshard(pieces, _Shard((6, 4), tp_dim, tp, 0, fsdp, dp, 0)), full)


def _meta_model():
    with torch.device("meta"):
        return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))


def test_meta_model_materialises_per_module_deterministically():
    a = materialize.full_model(_meta_model()).state_dict()
    b = materialize.full_model(_meta_model()).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.weight"][:2, :2], a["2.weight"][:2, :2])  # modules get their own seeds
    assert torch.equal(a["1.weight"], torch.ones(3))  # LayerNorm.reset_parameters ran
    # one module alone gives the same values as in the whole model (seed by module name only)
    only = dict(materialize.full_values(_meta_model(), ["2.weight"]))
    assert torch.equal(only["2.weight"], a["2.weight"])
    # init_fn replaces reset_parameters
    c = materialize.full_model(_meta_model(), init_fn=lambda m: [torch.nn.init.zeros_(p) for p in m.parameters(False)])
    assert all(float(v.abs().sum()) == 0 for v in c.state_dict().values())


def test_meta_module_without_initialiser_is_refused():
    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.s = torch.nn.Parameter(torch.empty(3))

    with torch.device("meta"):
        model = Scale()
    with pytest.raises(ModelError, match="init_fn"):
        materialize.full_model(model)


def test_launch_timeout_kills_the_job(tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text("import time\ntime.sleep(60)\n")
    start = time.monotonic()
    proc = run_torchrun(str(script), 1, [], timeout_s=8)
    assert proc.returncode != 0 and "timed out" in proc.stderr
    assert time.monotonic() - start < 30
