"""The runtime: setup errors and failure handling under torchrun, and its single-process helpers.

The plan matrix against single-device training (every strategy family, presets, a custom model,
HF models, a meta model) is tests/torchrun/test_runtime_matrix.py.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from fxplan.codegen.params import fsdp_block, place_shard, shard_tensor, unshard
from fxplan.runtime import materialize
from fxplan.runtime.launch import run_torchrun
from fxplan.errors import DistributedSetupError, ModelError

HERE = os.path.dirname(os.path.abspath(__file__))
FAIL_WORKER = os.path.join(HERE, "workers", "runtime_fail_worker.py")
ENV = {"FXPLAN_TIMEOUT_S": "30", "OMP_NUM_THREADS": "1"}


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
    from fxplan.runtime.runner import Runner

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(DistributedSetupError, match="torchrun"):
        Runner(object(), object(), object())


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
            local = shard_tensor(full, shard)
            if fsdp:
                assert local.numel() == fsdp_block(full.numel() // tp, dp)
            pieces[(t, d if fsdp else None)] = local
    assert torch.equal(unshard(pieces, _Shard((6, 4), tp_dim, tp, 0, fsdp, dp, 0)), full)


@pytest.mark.parametrize("tp_dim,tp,fsdp,dp", [(None, 1, False, 1), (1, 2, False, 2), (0, 3, True, 2),
                                               (None, 1, True, 4)])
def test_shared_weight_grads_scatter_into_the_full_tensor(tp_dim, tp, fsdp, dp):
    # the cross-stage sum of a tied weight: every piece scattered into a zero full tensor and summed
    # gives the full tensor back, and each holder cuts exactly its own shard out of the sum
    full = torch.randn(6, 4)
    total = torch.zeros_like(full)
    for t in range(tp):
        for d in range(dp if fsdp else 1):
            shard = _Shard((6, 4), tp_dim, tp, t, fsdp, dp, d)
            local = shard_tensor(full, shard)
            placed = place_shard(local, shard)
            assert torch.equal(shard_tensor(placed, shard), local)
            total += placed
    assert torch.equal(total, full)


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


def test_meta_buffers_keep_what_the_initialiser_sets_non_persistent_ones_too():
    # A rotary table is a non-persistent buffer a model's initialiser fills (as Hugging Face's
    # _init_weights does): the ranks and full_model() both hold its values, not zeros or garbage.
    class Rotary(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("inv_freq", torch.empty(4), persistent=False)
            self.register_buffer("untouched", torch.empty(2))
            self.proj = torch.nn.Linear(4, 4)

    def init_fn(module):
        if isinstance(module, Rotary):
            module.inv_freq.copy_(torch.tensor([1.0, 0.1, 0.01, 0.001]))
        elif isinstance(module, torch.nn.Linear):
            module.reset_parameters()

    with torch.device("meta"):
        model = Rotary()
    real = materialize.full_model(model, init_fn)
    assert torch.equal(real.inv_freq, torch.tensor([1.0, 0.1, 0.01, 0.001]))
    assert torch.equal(real.untouched, torch.zeros(2))  # no initialiser: zeros on every rank
    shard = dict(materialize.full_values(model, ["inv_freq", "untouched"], init_fn))
    assert torch.equal(shard["inv_freq"], real.inv_freq) and torch.equal(shard["untouched"], real.untouched)


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
