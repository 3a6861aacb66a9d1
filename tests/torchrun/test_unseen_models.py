"""Models outside the presets: leaf modules (via torch.export), einsum attention, several inputs,
and BatchNorm, whose batch statistics forbid splitting its batch (dp = 1, one microbatch)."""

import json
import os
import sys

import pytest
import torch

import fxplan
from fxplan.runtime.launch import run_torchrun

from unseen_models import BUILDERS  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CLUSTER = fxplan.Cluster.preset("a100-80g", nodes=1, devices_per_node=4)


@pytest.mark.parametrize("name", ["mha", "lstm"])
def test_leaf_modules_are_traced_through_export(name):
    model, batch = BUILDERS[name]()
    compiled = fxplan.compile(model, batch, cluster=CLUSTER, verbose=False,
                              constraints=fxplan.Constraints(dp=4, pp=1))
    assert compiled.traced.method == "export"
    assert not any(n.op == "call_module" for n in compiled.traced.gm.graph.nodes)
    # every parameter of the leaf module is visible to sharding and codegen
    seen = {str(n.target) for n in compiled.traced.gm.graph.nodes if n.op == "get_attr"}
    assert set(dict(model.named_parameters())) <= seen
    assert "fxplan" in compiled.rank_module(1).code


def test_batch_norm_layers_keep_the_whole_batch():
    model, batch = BUILDERS["cnn"]()
    compiled = fxplan.compile(model, batch, cluster=CLUSTER, verbose=False)
    coupled = [layer for layer in compiled.layer_graph.layers if layer.batch_coupled]
    assert [layer.batch_coupled for layer in coupled] == ["batch_norm"]
    assert compiled.plan.microbatches == 1
    assert all(compiled.plan.strategy(layer.name).dp == 1 for layer in coupled)
    with pytest.raises(fxplan.ConstraintError, match="batch_norm.*dp=4"):
        fxplan.compile(model, batch, cluster=CLUSTER, verbose=False, constraints=fxplan.Constraints(dp=4, pp=1))
    # a hand-edited plan that splits the batch norm's batch is refused too
    data = compiled.plan.to_dict()
    for stage in data["stages"]:
        stage["strategies"] = {name: dict(dp=4, tp=1) for name in stage["strategies"]}
    data["pp"], data["stages"] = 1, [{**data["stages"][0], "devices": [0, 1, 2, 3],
                                      "layers": list(compiled.plan.layers),
                                      "strategies": {n: dict(dp=4, tp=1) for n in compiled.plan.layers}}]
    with pytest.raises(fxplan.PlanFileError, match="batch_norm"):
        fxplan.compile(model, batch, cluster=CLUSTER, verbose=False, plan=fxplan.Plan.from_dict(data))
    # eval-mode batch norm is per-sample: no restriction
    model.eval()
    assert not any(layer.batch_coupled for layer in fxplan.compile(
        model, batch, cluster=CLUSTER, verbose=False).layer_graph.layers)


@pytest.mark.timeout(600)
def test_unseen_models_train_like_one_device_under_torchrun():
    proc = run_torchrun(os.path.join(HERE, "workers", "unseen_worker.py"), 4, timeout_s=560)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 7, proc.stdout[-2000:]
    for r in results:
        case = f"{r['model']} {r['pins']}"
        assert r["keys_equal"], case
        for ours, ref in zip(r["losses"], r["reference"]):
            assert ours == pytest.approx(ref, rel=1e-4, abs=1e-5), case
        assert r["param_diff"] <= 1e-4, case
        assert r["buffer_diff"] <= 1e-4, case  # e.g. BatchNorm running stats after a pipelined step
        if r["model"] in ("mha", "lstm"):
            assert r["method"] == "export", case
        if r["model"] == "cnn":
            assert r["microbatches"] == 1 and r["dp"][0] == 1, case
    assert any(r["pp"] == 2 for r in results if r["model"] == "cnn")
