"""A stage's outputs before p2p: contiguous, and checked against the shapes the lane agreed on; pinned
1f1b with fewer microbatches than stages names the real reason."""

import pytest
import torch
from torch import nn

import fxplan
from fxplan.runtime.boundary import boundary_checked
from fxplan.runtime.pipeline import TensorSpec

import hf_zoo


class Strided(nn.Module):
    def forward(self, x):
        return torch.stack([x, x], -1)[..., 0], x.t()


def test_outputs_become_contiguous_and_keep_their_values_and_grads():
    x = torch.randn(4, 3, requires_grad=True)
    raw = Strided()(x)
    assert not raw[0].is_contiguous() and not raw[1].is_contiguous()
    specs = [TensorSpec.of(t) for t in raw]
    out = boundary_checked(Strided(), specs, 0, is_last=False)(x)
    assert all(t.is_contiguous() for t in out)
    assert all(torch.equal(a, b) for a, b in zip(out, raw))
    (out[0].sum() + 2 * out[1].sum()).backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))
    assert boundary_checked(Strided(), specs, 1, is_last=True).__class__ is Strided


def test_a_shape_the_lane_did_not_agree_on_is_named():
    specs = [TensorSpec.of(t) for t in Strided()(torch.randn(4, 3))]
    with pytest.raises(fxplan.FxplanError, match=r"stage 2 output 0 is \(2, 3\).*expects \(4, 3\)"):
        boundary_checked(Strided(), specs, 2, is_last=False)(torch.randn(2, 3))


def test_1f1b_needs_a_microbatch_per_stage():
    model, batch = hf_zoo.build("strided")
    with pytest.raises(fxplan.ConstraintError, match="1f1b needs at least one microbatch per stage.*pp=4"):
        fxplan.compile(model, batch, cluster=fxplan.Cluster.preset("a100-80g", nodes=1, devices_per_node=4),
                       verbose=False, constraints=fxplan.Constraints(pp=4, schedule="1f1b", microbatches=1))
