"""Models outside the presets: leaf modules (via torch.export), einsum attention, several inputs,
and BatchNorm, whose batch statistics keep one microbatch (dp synchronises them)."""

import os
import sys

import pytest
import torch

import fxplan
from fxplan.runtime.launch import run_torchrun, tagged

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


def test_batch_norm_layers_keep_one_microbatch_and_sync_over_dp():
    model, batch = BUILDERS["cnn"]()
    compiled = fxplan.compile(model, batch, cluster=CLUSTER, verbose=False)
    coupled = [layer for layer in compiled.layer_graph.layers if layer.batch_coupled]
    assert [layer.batch_coupled for layer in coupled] == ["batch_norm"]
    assert compiled.plan.microbatches == 1
    # dp synchronises the statistics (codegen/batch_stats.py): allowed, and priced
    fxplan.compile(model, batch, cluster=CLUSTER, verbose=False, constraints=fxplan.Constraints(dp=4, pp=1))
    # several microbatches would normalise each alone: refused, naming the layer and the op
    with pytest.raises(fxplan.ConstraintError, match=f"layer {coupled[0].name} uses batch_norm.*microbatches=2"):
        fxplan.compile(model, batch, cluster=CLUSTER, verbose=False,
                       constraints=fxplan.Constraints(dp=2, pp=2, microbatches=2))
    # a hand-edited plan with several microbatches is refused too
    data = compiled.plan.to_dict()
    data["microbatches"] = 2
    data["schedule"] = "gpipe"
    with pytest.raises(fxplan.PlanFileError, match=f"{coupled[0].name} uses batch_norm.*2 microbatches"):
        fxplan.compile(model, batch, cluster=CLUSTER, verbose=False, plan=fxplan.Plan.from_dict(data))
    # eval-mode batch norm is per-sample: no restriction
    model.eval()
    assert not any(layer.batch_coupled for layer in fxplan.compile(
        model, batch, cluster=CLUSTER, verbose=False).layer_graph.layers)


@pytest.mark.timeout(600)
def test_unseen_models_train_like_one_device_under_torchrun():
    proc = run_torchrun(os.path.join(HERE, "workers", "unseen_worker.py"), 4, timeout_s=560)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = tagged(proc.stdout)
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
            assert r["microbatches"] == 1, case
    assert any(r["pp"] == 2 for r in results if r["model"] == "cnn")
