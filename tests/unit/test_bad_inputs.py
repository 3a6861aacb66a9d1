"""A careless user's inputs, through the API, plan files and the command line: each one raises the
right FxplanError subclass, and the message names the field / op / input and says what to do.
(The torchrun surface is in tests/torchrun/test_reliability.py.)"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import fxplan
from fxplan import Plan
from fxplan.models import build, example_batch

CLUSTER = fxplan.Cluster.preset("a100-80g", nodes=1, devices_per_node=4)


@pytest.fixture(scope="module")
def mlp():
    model = build("mlp")
    batch = example_batch(model, 8)
    compiled = fxplan.compile(model, batch, cluster=CLUSTER, constraints=fxplan.Constraints(pp=2, tp=2),
                              verbose=False)
    return model, batch, compiled.plan


def _raises(kind, *words, call):
    """call() raises `kind`; its message holds every word (the field or op, and the fix)."""
    with pytest.raises(kind) as info:
        call()
    text = str(info.value)
    for word in words:
        assert word in text, f"{word!r} not in: {text}"
    return text


# ---------------------------------------------------------------- plan files (the schema)

def _edit(plan, fn):
    data = json.loads(plan.to_json())
    fn(data)
    return json.dumps(data)


def _strat(data, stage=0, layer=None):
    s = data["stages"][stage]
    return s["strategies"][layer or s["layers"][0]]


PLAN_EDITS = {
    "string false is not a boolean": (lambda d: _strat(d).update(fsdp="false"), ["fsdp", "true or false"]),
    "string number for dp": (lambda d: _strat(d).update(dp="1"), ["dp", "an integer"]),
    "bool for tp": (lambda d: _strat(d).update(tp=True), ["tp", "an integer"]),
    "float degree": (lambda d: _strat(d).update(tp=2.0), ["tp", "an integer"]),
    "negative dp": (lambda d: _strat(d).update(dp=-1, tp=-2), ["dp", "positive"]),
    "zero microbatches": (lambda d: d.update(microbatches=0), ["microbatches", "positive"]),
    "NaN iteration estimate": (lambda d: d.update(estimated_iteration_s=math.nan), ["estimated_iteration_s", "finite"]),
    "infinite memory estimate": (lambda d: d["stages"][0].update(estimated_memory_bytes=math.inf),
                                 ["estimated_memory_bytes", "finite"]),
    "negative estimate": (lambda d: d["stages"][1].update(estimated_compute_s=-1.0), ["estimated_compute_s", "negative"]),
    "misspelled strategy field": (lambda d: _strat(d).update(recomput=True), ["recomput", "known"]),
    "unknown top-level field": (lambda d: d.update(stagse=[]), ["stagse", "typo"]),
    "missing stages": (lambda d: d.pop("stages"), ["stages", "missing"]),
    "missing dp": (lambda d: _strat(d).pop("dp"), ["dp", "missing"]),
    "devices not a list": (lambda d: d["stages"][0].update(devices="0,1"), ["devices", "a list"]),
    "negative device": (lambda d: d["stages"][0].update(devices=[-1, 1]), ["devices[0]", "device rank"]),
    "device listed twice in a stage": (lambda d: d["stages"][0].update(devices=[0, 0]), ["devices", "exactly once"]),
    "overlapping stages without world_size": (
        lambda d: (d.pop("world_size"), d["stages"][1].update(devices=[1, 2])), ["[1]", "more than one stage"]),
    "skipped devices without world_size": (
        lambda d: (d.pop("world_size"), d["stages"][1].update(devices=[3, 4])), ["skip devices [2]", "0..3"]),
    "world_size disagrees with stages": (lambda d: d.update(world_size=8), ["world_size=8", "exactly one stage"]),
    "a stage of another size": (lambda d: d["stages"][1].update(devices=[2, 3, 4]), ["dp*tp", "3 devices", "dp*tp = 3"]),
    "layer named twice": (lambda d: d["stages"][0]["layers"].append(d["stages"][0]["layers"][0]), ["twice"]),
    "layer name not a string": (lambda d: d["stages"][0]["layers"].__setitem__(0, 7), ["layers[0]", "layer name"]),
    "stage not an object": (lambda d: d["stages"].__setitem__(1, [1, 2]), ["stages[1]", "an object"]),
    "stages out of order": (lambda d: d["stages"].reverse(), ["index", "pipeline order"]),
    "schedule in upper case": (lambda d: d.update(schedule="1F1B"), ["schedule", "'1F1B'", "lower case", "1f1b"]),
    "chunks with a one-chunk schedule": (lambda d: d.update(chunks=2), ["chunks = 2", "one chunk per rank", "zbv"]),
    "absurd degree": (lambda d: _strat(d).update(dp=10**400), ["dp = 1000", "...", "over the 1,048,576"]),
    "absurd microbatches": (lambda d: d.update(microbatches=2**62), ["microbatches", "over the"]),
}


@pytest.mark.parametrize("case", sorted(PLAN_EDITS))
def test_a_plan_file_with_a_bad_field_is_refused(mlp, case):
    edit, words = PLAN_EDITS[case]
    text = _edit(mlp[2], edit)
    _raises(fxplan.PlanFileError, *words, call=lambda: Plan.from_json(text))


def test_deeply_nested_oversized_and_non_json_plans(mlp):
    _raises(fxplan.PlanFileError, "nests", "levels", call=lambda: Plan.from_json("[" * 100_000 + "]" * 100_000))
    nested = _edit(mlp[2], lambda d: d["model"].update(extra={"a": {"b": {"c": {"d": {"e": [[[1]]]}}}}}))
    _raises(fxplan.PlanFileError, "nests", call=lambda: Plan.from_json(nested))
    big = " " * (17 * 2**20) + mlp[2].to_json()
    _raises(fxplan.PlanFileError, "characters", "Plan.to_json()", call=lambda: Plan.from_json(big))
    _raises(fxplan.PlanFileError, "the JSON text", "open(path).read()", call=lambda: Plan.from_json(mlp[2]))
    _raises(fxplan.PlanFileError, "not an fxplan plan", "Plan.to_json()", call=lambda: Plan.from_json("[1, 2]"))


def test_a_field_given_twice_is_refused_not_last_one_wins(mlp):
    text = mlp[2].to_json().replace('"microbatches":', '"microbatches": 64, "microbatches":', 1)
    _raises(fxplan.PlanFileError, "'microbatches' twice", "keep one", call=lambda: Plan.from_json(text))


def test_overlap_in_a_huge_world_is_found_fast(mlp):
    import time

    d = json.loads(mlp[2].to_json())
    n = 300_000  # a linear check: a quadratic one would take hours here
    for i, stage in enumerate(d["stages"]):
        stage["devices"] = list(range(i * (n - 1), i * (n - 1) + n))  # stage 1 starts on stage 0's last rank
        stage["strategies"] = {k: {"dp": n, "tp": 1} for k in stage["layers"]}
    d["world_size"] = 0
    start = time.monotonic()
    _raises(fxplan.PlanFileError, f"devices [{n - 1}]", "more than one stage", call=lambda: Plan.from_json(json.dumps(d)))
    assert time.monotonic() - start < 20


def test_plan_files_are_json_never_pickle(mlp):
    import pickle

    _raises(fxplan.PlanFileError, "UTF-8", call=lambda: Plan.from_json(pickle.dumps(json.loads(mlp[2].to_json()))))


def test_a_strategy_outside_the_model_space_is_refused(mlp):
    model, batch, plan = mlp
    head = plan.stages[-1].layers[-1]
    text = _edit(plan, lambda d: _strat(d, 1, head).update(spec="diagonal"))
    _raises(fxplan.PlanFileError, head, "diagonal", "known",
            call=lambda: fxplan.compile(model, batch, cluster=CLUSTER, plan=Plan.from_json(text), verbose=False))
    # dp2 with fsdp exists, dp2 with fsdp cut over tp does not: tp=2, dp=1 has nothing to shard
    text = _edit(plan, lambda d: _strat(d, 0).update(dp=1, tp=2, fsdp=True))
    _raises(fxplan.PlanFileError, "fsdp needs dp > 1", call=lambda: Plan.from_json(text))


def test_consistent_hand_edited_plans_still_load(mlp):
    model, batch, plan = mlp

    def to_dp2(d):  # every layer of stage 1 from tp2 to dp2·fsdp, stage 0 keeps its tp
        for name in d["stages"][1]["layers"]:
            d["stages"][1]["strategies"][name] = {"dp": 2, "tp": 1, "fsdp": True}

    def move_layer(d):  # the last layer of stage 0 moves to stage 1
        name = d["stages"][0]["layers"].pop()
        d["stages"][1]["layers"].insert(0, name)
        d["stages"][1]["strategies"][name] = d["stages"][0]["strategies"].pop(name)

    for edit in (to_dp2, move_layer):
        edited = Plan.from_json(_edit(plan, edit))
        given = fxplan.compile(model, batch, cluster=CLUSTER, plan=edited, verbose=False).plan
        assert given.solver.status == "given" and given.layers == edited.layers
        assert [s.strategies for s in given.stages] == [s.strategies for s in edited.stages]


# ---------------------------------------------------------------- compile(): models that cannot train

class _Net(nn.Module):
    def __init__(self, mode=""):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))
        self.mode = mode

    def forward(self, x):
        if self.mode == "no_grad":
            with torch.no_grad():
                return self.lin(x).pow(2).mean()
        if self.mode == "detach":
            return self.lin(x).pow(2).mean().detach()
        if self.mode == "device":
            x = x.to("cuda:7")
        if self.mode == "update_param":
            with torch.no_grad():
                self.lin.weight.mul_(0.5)
        if self.mode == "count":
            self.calls += 1
        return self.lin(x).pow(2).mean()


def _compile(model, inputs, **kwargs):
    kwargs.setdefault("cluster", fxplan.Cluster.preset("a100-80g", nodes=1, devices_per_node=2))
    return fxplan.compile(model, inputs, verbose=False, **kwargs)


X = torch.randn(8, 4)
MODEL_CASES = {
    "half input into float weights": ("", X.half(), ["example_inputs[0]", "torch.float16", "linear", "cast"]),
    "double input into float weights": ("", X.double(), ["torch.float64", "linear", "model.to(dtype)"]),
    "integer input into a Linear": ("", X.long(), ["torch.int64", "linear", "nn.Embedding"]),
    "loss under no_grad": ("no_grad", X, ["does not require grad", "no_grad"]),
    "detached loss": ("detach", X, ["does not require grad", "detached"]),
    "device move in forward": ("device", X, ["moves a tensor to cuda:7", "remove .to(device)"]),
    "parameter updated in forward": ("update_param", X, ["lin.weight", "in place", "optimizer step"]),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_compile_refuses_models_that_cannot_train(case):
    mode, x, words = MODEL_CASES[case]
    _raises(fxplan.ModelError, *words, call=lambda: _compile(_Net(mode), (x,)))


def test_inputs_on_another_device_than_the_weights():
    import types

    from fxplan.model_checks import check_input_devices

    _compile(_Net(), (torch.empty(8, 4, device="meta"),))  # meta inputs are shapes only: fine
    on_gpu = types.SimpleNamespace(device=torch.device("cuda", 0))  # this host has no GPU: its device is all we need
    _raises(fxplan.ModelError, "example_inputs[1]", "cuda:0", "weights are on cpu", ".to('cpu')",
            call=lambda: check_input_devices(_Net(), (X, on_gpu)))


def test_tracing_leaves_the_users_module_untouched():
    model = _Net("count")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _compile(model, (X,))
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in after.items():
        assert type(value) is torch.Tensor, (key, type(value))  # not an fx Proxy
        assert torch.equal(value, before[key]), key
    torch.save(after, __import__("io").BytesIO())  # it saves


def test_cluster_with_missing_or_misspelled_fields():
    _raises(fxplan.ClusterError, "'memory'", "did you mean 'memory_bytes'", "Cluster.preset",
            call=lambda: fxplan.Cluster(memory=8e10, peak_flops=1e14, intra_bw=1e11, inter_bw=1e10))
    _raises(fxplan.ClusterError, "missing field 'peak_flops'", "keyword-only",
            call=lambda: fxplan.Cluster(memory_bytes=8e10, intra_bw=1e11, inter_bw=1e10))
    _raises(fxplan.ClusterError, "Cluster.inter_bw", "positive finite",
            call=lambda: fxplan.Cluster(memory_bytes=8e10, peak_flops=1e14, intra_bw=1e11, inter_bw=math.nan))


def test_exhaustive_on_a_big_model_is_a_clear_error():
    model = build("gpt:layers=24", device="meta")
    _raises(fxplan.ConstraintError, "planner='exhaustive'", "assignments", "planner='miqp'",
            call=lambda: fxplan.compile(model, example_batch(model, 64, device="meta"),
                                        cluster=fxplan.Cluster.preset("a100-80g", nodes=2, devices_per_node=8),
                                        planner="exhaustive", verbose=False))


def test_pins_that_the_given_plan_breaks_are_named(mlp):
    model, batch, plan = mlp
    _raises(fxplan.ConstraintError, "plan= has pp=2", "pin pp=4", "drop the pin",
            call=lambda: fxplan.compile(model, batch, cluster=CLUSTER, constraints=fxplan.Constraints(pp=4), plan=plan,
                                        verbose=False))
    layer = plan.stages[0].layers[0]
    _raises(fxplan.ConstraintError, f"layer {layer} has tp=2", "pin tp=1",
            call=lambda: fxplan.compile(model, batch, cluster=CLUSTER, constraints=fxplan.Constraints(tp=1), plan=plan,
                                        verbose=False))
    kept = fxplan.compile(model, batch, cluster=CLUSTER, constraints=fxplan.Constraints(pp=2, tp=2), plan=plan,
                          verbose=False)  # pins the plan meets are fine
    assert kept.plan.solver.status == "given"


@pytest.mark.parametrize("kwargs,words", [
    ({"pipeline": 2}, ["unknown field 'pipeline'", "keyword-only", "Constraints(pp=2"]),
    ({"micro_batches": 4}, ["'micro_batches'", "did you mean 'microbatches'"]),
])
def test_constraints_with_a_misspelled_field(kwargs, words):
    _raises(fxplan.ConstraintError, *words, call=lambda: fxplan.Constraints(**kwargs))


def test_constraints_given_positionally():
    _raises(fxplan.ConstraintError, "positional", "keyword-only", call=lambda: fxplan.Constraints(2, 2))


@pytest.mark.parametrize("field,value", [("t_f", math.nan), ("t_b", "1.5"), ("t_comm", math.inf), ("t_w", [1, None])])
def test_schedule_simulation_refuses_times_that_are_not_seconds(field, value):
    times = {"t_f": 1.0, "t_b": 1.0, "t_w": 1.0, "t_comm": 0.0, field: value}
    _raises(fxplan.ConstraintError, field, "finite number of seconds",
            call=lambda: fxplan.schedules.simulate("1f1b", stages=2, microbatches=4, **times))


@pytest.mark.parametrize("value", [-1, 0, math.nan, "30", True])
def test_distribute_timeout_that_is_not_seconds(mlp, value):
    compiled = fxplan.compile(mlp[0], mlp[1], cluster=CLUSTER, plan=mlp[2], verbose=False)
    _raises(fxplan.DistributedSetupError, "timeout_s=", "positive number of seconds", "timeout_s=60",
            call=lambda: compiled.distribute(timeout_s=value))


def test_rank_module_of_a_rank_that_is_not_a_rank(mlp):
    compiled = fxplan.compile(mlp[0], mlp[1], cluster=CLUSTER, plan=mlp[2], verbose=False)
    for rank in (4, -1, True, "0"):
        _raises(fxplan.DistributedSetupError, f"rank {rank!r}", "outside the plan's 4 ranks",
                call=lambda: compiled.rank_module(rank))


def test_plan_argument_of_the_wrong_type(mlp):
    model, batch, plan = mlp
    _raises(fxplan.PlanFileError, "plan=", "Plan.from_json",
            call=lambda: fxplan.compile(model, batch, cluster=CLUSTER, plan=plan.to_json(), verbose=False))


# ---------------------------------------------------------------- the command line

def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "fxplan", *args], capture_output=True, text=True, timeout=timeout)


def _one_line(out, *words):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.strip().splitlines() if not line.startswith("[fxplan]")]
    assert len(lines) == 1, out.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


PLAN_ARGS = ("plan", "--model", "mlp", "--batch", "8", "--cluster", "a100-80g:1x2")


@pytest.mark.parametrize("flag,path,words", [
    ("--json", "/nonexistent-folder/p.json", ["--json", "does not exist", "create it"]),
    ("--png", "/tmp", ["--png", "is a folder", "plan.png"]),
    ("--json", "/proc/p.json", ["--json", "cannot be written", "another path"]),
    ("--json", "", ["--json", "names no file"]),
])
def test_cli_bad_output_path_is_one_line_before_the_search(flag, path, words):
    out = _cli(*PLAN_ARGS, flag, path, timeout=30)
    _one_line(out, *words)
    assert "[fxplan] traced" not in out.stderr  # refused before tracing, let alone searching


def test_cli_huge_batch_answers_fast():
    out = _cli("plan", "--model", "mlp", "--batch", "1000000000", "--cluster", "a100-80g:1x4",
               "--pin", "pp=1,tp=1", timeout=60)
    assert out.returncode == 0, out.stderr
    assert "global batch 1000000000" in out.stdout


def test_cli_absurd_layer_count_answers_at_once():
    out = _cli("plan", "--model", "gpt:layers=1000000", "--batch", "8", "--cluster", "a100-80g:1x2", timeout=60)
    _one_line(out, "layers=1,000,000", "layers <= 2,048")


@pytest.mark.parametrize("args,words", [
    (("--time-limit", "-3"), ["--time-limit", "positive"]),
    (("--pin", "pp=two"), ["pp"]),
    (("--pin", "fsdp=maybe"), ["fsdp"]),
])
def test_cli_bad_values_are_one_line(args, words):
    _one_line(_cli(*PLAN_ARGS, *args, timeout=60), *words)


def test_cli_never_prints_a_traceback_without_debug(tmp_path):
    bad = tmp_path / "model_spec"
    out = _cli("plan", "--model", "gpt:layers=zero", "--batch", "8", "--cluster", "a100-80g:1x2", timeout=60)
    _one_line(out, "layers")
    debug = _cli("--debug", "plan", "--model", "gpt:layers=zero", "--batch", "8", "--cluster", "a100-80g:1x2",
                 timeout=60)
    assert "Traceback" in debug.stderr
    assert not bad.exists()


# ---------------------------------------------------------------- checkpoints and the torchrun environment

def test_load_checkpoint_refuses_what_is_not_a_checkpoint(tmp_path):
    model = build("mlp")
    _raises(fxplan.CheckpointError, "no checkpoint at", "runner.save",
            call=lambda: fxplan.load_checkpoint(tmp_path / "nothing", model))
    _raises(fxplan.CheckpointError, "not a torch.distributed.checkpoint folder", "runner.save",
            call=lambda: fxplan.load_checkpoint(tmp_path, model))
    _raises(fxplan.CheckpointError, "meta", "to_empty",
            call=lambda: fxplan.load_checkpoint(tmp_path, build("mlp", device="meta")))


@pytest.mark.parametrize("value", ["soon", "0", "-5"])
def test_a_bad_timeout_setting_names_the_variable(monkeypatch, value):
    from fxplan.runtime.process import timeout_s

    monkeypatch.setenv("FXPLAN_TIMEOUT_S", value)
    _raises(fxplan.DistributedSetupError, "FXPLAN_TIMEOUT_S", "positive number of seconds", call=timeout_s)


def test_the_collective_timeout_defaults_to_30_s_and_follows_the_variable(monkeypatch):
    from fxplan.runtime.process import collective_timeout

    monkeypatch.delenv("FXPLAN_TIMEOUT_S", raising=False)
    assert collective_timeout().total_seconds() == 30
    monkeypatch.setenv("FXPLAN_TIMEOUT_S", "7.5")
    assert collective_timeout().total_seconds() == 7.5
