"""Ratio losses split into numerator and global denominator: the pieces of any batch split (dp ranks,
microbatches) sum to one device's loss and gradients, where averaging the pieces' means does not."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxplan
from fxplan.passes.loss_ratio import DENOMINATOR, GIVEN, UNPROVEN
from fxplan.passes.trace import trace
from fxplan.runtime.loss_inputs import _runnable

import hf_zoo

CLUSTER = fxplan.Cluster.preset("a100-80g", nodes=1, devices_per_node=4)


def _grads(module):
    return {k: p.grad for k, p in module.named_parameters() if p.grad is not None}


class MaskedMean(nn.Module):
    """fx-traceable: F.cross_entropy with ignore_index and class weights, as users write it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.register_buffer("w", torch.tensor([0.5, 1.0, 2.0, 1.5, 0.7]))

    def forward(self, x, y):
        return 2.0 * F.cross_entropy(self.fc(x).flatten(0, 1), y.flatten(), weight=self.w, ignore_index=-1)


def test_fx_traced_masked_mean_is_split():
    torch.manual_seed(0)
    model = MaskedMean()
    x, y = torch.randn(8, 3, 4), torch.randint(0, 5, (8, 3))
    y[:4, 1:] = -1
    traced = trace(model, (x, y), method="fx")
    info = traced.gm.meta[DENOMINATOR]
    token = GIVEN.set(info["fn"](x, y) / 2)
    try:
        total = sum(traced.gm(a, b) / 2 for a, b in zip(x.chunk(2), y.chunk(2)))
    finally:
        GIVEN.reset(token)
    assert float(total) == pytest.approx(float(model(x, y)), rel=1e-6)


@pytest.mark.parametrize("name", ["bert", "bert_weighted"])
def test_pieces_sum_to_one_device(name):
    model, (ids, labels) = hf_zoo.build(name)
    traced = trace(model, (ids, labels))
    info = traced.gm.meta[DENOMINATOR]
    assert traced.placeholders == ("inputs", "labels")
    ref = model(ids, labels)
    ref.backward()
    ref_grads = _grads(model)
    gm = traced.gm
    denominator = info["fn"](ids, labels)
    pieces = 4
    assert float(gm(ids, labels)) == pytest.approx(float(ref), rel=1e-6)  # called as the model is
    token = GIVEN.set(denominator / pieces)
    try:
        total = sum(gm(i, l) / pieces for i, l in zip(ids.chunk(pieces), labels.chunk(pieces)))
    finally:
        GIVEN.reset(token)
    total.backward()
    assert float(total) == pytest.approx(float(ref), rel=1e-5)
    grads = _grads(gm)
    assert set(grads) == set(ref_grads)
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6)
    # what the split prevents: the mean of the pieces' own means is another loss
    naive = sum(float(model(i, l)) for i, l in zip(ids.chunk(pieces), labels.chunk(pieces))) / pieces
    assert abs(naive - float(ref)) > 1e-4


class TwoMeans(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x, y):
        return F.cross_entropy(self.a(x), y, ignore_index=0) + F.cross_entropy(self.b(x), y, ignore_index=0)


def test_a_mean_that_is_not_the_whole_loss_is_named_at_compile():
    model = TwoMeans()
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    for method in ("fx", "export"):
        traced = trace(model, batch, method=method)
        assert DENOMINATOR not in traced.gm.meta and len(traced.gm.meta[UNPROVEN]) == 2
    with pytest.warns(UserWarning, match="cross_entropy.*cannot split"):
        fxplan.compile(model, batch, cluster=CLUSTER, verbose=False, constraints=fxplan.Constraints(dp=4, pp=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one device's batch in one piece: nothing to say
        fxplan.compile(model, batch, cluster=CLUSTER, verbose=False,
                       constraints=fxplan.Constraints(dp=1, tp=4, pp=1, microbatches=1))


class LabelsMovedToTheLogits(nn.Module):
    """HF's causal-LM loss moves the labels to the logits' device: `labels.to(logits.device)`."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)

    def forward(self, x, y):
        logits = self.fc(x)
        y = y.to(logits.device).view(-1)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), y, ignore_index=-100)


@pytest.mark.parametrize("method", ["fx", "export"])
def test_the_denominator_reads_the_labels_only(method):
    """A read of the logits' device (or dtype, shape) is a constant of the trace for the denominator:
    followed as data, every step would run the whole model's forward once more on every rank."""
    torch.manual_seed(0)
    model = LabelsMovedToTheLogits()
    x, y = torch.randn(6, 3, 4), torch.randint(0, 5, (6, 3))
    y[:2] = -100
    traced = trace(model, (x, y), method=method)
    fn = _runnable(traced.gm.meta[DENOMINATOR])  # as the runtime runs it: the trace's device is the input's
    ops = [n for n in fn.graph.nodes if n.op not in ("placeholder", "output")]
    assert not [n for n in ops if n.op == "get_attr" or "linear" in str(n.target) or "mm" in str(n.target)], \
        [str(n.target) for n in ops]
    assert float(fn(x, y)) == float((y != -100).sum())
