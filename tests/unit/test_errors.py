"""Bad inputs raise FxplanError subclasses that name the problem and the fix."""

import pytest
import torch
from torch import nn

import fxplan
from fxplan.models import build, example_batch

CLUSTER = fxplan.Cluster.preset("a100-80g", nodes=1, devices_per_node=4)


@pytest.fixture(scope="module")
def gpt():
    model = build("gpt")
    return model, example_batch(model, 8)


def _compile(model, batch, **kwargs):
    return fxplan.compile(model, batch, cluster=CLUSTER, verbose=False, **kwargs)


def test_inputs_that_do_not_fit_forward(gpt):
    model, batch = gpt
    with pytest.raises(fxplan.ModelError, match="targets"):
        _compile(model, batch[:1])
    with pytest.raises(fxplan.ModelError, match="3 example inputs"):
        _compile(model, batch + (batch[0],))
    with pytest.raises(fxplan.ModelError, match="pass tensors only"):
        _compile(model, ([1, 2],))


def test_forward_must_return_a_scalar_loss():
    class Vector(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x)

    with pytest.raises(fxplan.ModelError, match="scalar training loss"):
        _compile(Vector(), (torch.randn(8, 4),))


def test_pins_and_batches_that_cannot_hold(gpt):
    model, batch = gpt
    with pytest.raises(fxplan.ConstraintError, match="does not split over dp=4"):
        _compile(model, example_batch(model, 6), constraints=fxplan.Constraints(dp=4, pp=1))
    with pytest.raises(fxplan.ConstraintError, match="dp\\*tp = 2\\*4 = 8"):
        _compile(model, batch, constraints=fxplan.Constraints(dp=2, tp=4))
    with pytest.raises(fxplan.ConstraintError, match="pp=3 does not divide"):
        _compile(model, batch, constraints=fxplan.Constraints(pp=3))
    with pytest.raises(fxplan.ConstraintError, match="unknown schedule 'zb-h3'"):
        _compile(model, batch, constraints=fxplan.Constraints(schedule="zb-h3", pp=2))
    with pytest.raises(fxplan.ConstraintError, match="unknown planner"):
        _compile(model, batch, planner="fastest")


def test_a_plan_for_another_model_or_cluster_is_refused(gpt):
    model, batch = gpt
    plan = _compile(model, batch).plan
    llama = build("llama")
    with pytest.raises(fxplan.PlanFileError, match="parameters"):
        _compile(llama, example_batch(llama, 8), plan=plan)
    with pytest.raises(fxplan.PlanFileError, match="plan is for 4 devices but the cluster has 8"):
        fxplan.compile(model, batch, cluster=fxplan.Cluster.preset("a100-80g"), plan=plan, verbose=False)


def test_out_of_memory_names_need_and_capacity():
    model = build("gpt:size=gpt3-175b", device="meta")
    with pytest.raises(fxplan.InfeasiblePlanError, match=r"needs [\d.]+ GiB per device, a device has 73.60 GiB"):
        _compile(model, example_batch(model, 8))


def test_distribute_needs_torchrun(gpt):
    model, batch = gpt
    compiled = _compile(model, batch)
    with pytest.raises(fxplan.DistributedSetupError, match="torchrun"):
        compiled.distribute()
    with pytest.raises(fxplan.DistributedSetupError, match="outside the plan"):
        compiled.rank_module(9)
