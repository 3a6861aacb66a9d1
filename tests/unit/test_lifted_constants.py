"""torch.export's lifted constants (tensors forward builds from Python values) are graph constants,
never model state: every get_attr of the traced graph is a state_dict key or buffer of the model, the
values still reach the computation, and the rank programs' shards can be cut from the model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxplan
from fxplan.passes.trace import trace
from fxplan.runtime import materialize

import hf_zoo

CLUSTER = fxplan.Cluster.preset("a100-80g", nodes=1, devices_per_node=4)


class Constants(nn.Module):
    """A non-uniform constant, a uniform one, and a dead one (built, never read)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x, y):
        scale = torch.tensor([1.0, 2.0, 3.0])
        offset = torch.tensor(0.5)
        torch.tensor([7.0, 8.0])  # dead
        return F.mse_loss(self.fc(x) * scale + offset, y)


class HugeConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.values = list(range(10_000))

    def forward(self, x, y):
        return F.mse_loss(self.fc(x).sum(-1, keepdim=True) * torch.tensor(self.values, dtype=torch.float32)[:1], y)


def _run(traced, batch):
    return float(traced.gm(*batch))


def _state_names(model):
    return set(model.state_dict()) | {k for k, _ in model.named_buffers()}


def _check_no_lifted(traced, model):
    targets = {str(n.target) for n in traced.gm.graph.nodes if n.op == "get_attr"}
    assert targets <= _state_names(model), targets - _state_names(model)
    assert not any("lift_fresh_copy" in str(n.target) for n in traced.gm.graph.nodes)


def test_constants_become_factories_with_their_values():
    torch.manual_seed(0)
    model = Constants()
    batch = (torch.randn(4, 3), torch.randn(4, 3))
    traced = trace(model, batch, method="export")
    _check_no_lifted(traced, model)
    assert _run(traced, batch) == pytest.approx(float(model(*batch)), rel=1e-6)
    # the dead constant left nothing behind: only the two live ones are rebuilt
    factories = [n for n in traced.gm.graph.nodes if n.op == "call_function"
                 and n.target in (torch.tensor, torch.ops.aten.full.default)]
    assert len(factories) == 2


def test_a_large_constant_must_be_a_buffer():
    model = HugeConstant()
    with pytest.raises(fxplan.FxplanError, match="register_buffer"):
        trace(model, (torch.randn(4, 3), torch.randn(4, 1)), method="export")


@pytest.mark.parametrize("name", ["mistral", "t5"])
def test_hf_lifted_constants_plan_and_materialise(name):
    """Mistral/GPT-NeoX's KV cache (dead or concatenated empties) and T5's decoder start token."""
    model, batch = hf_zoo.build(name)
    compiled = fxplan.compile(model, batch, cluster=CLUSTER, verbose=False,
                              constraints=fxplan.Constraints(dp=2, pp=2, microbatches=2))
    _check_no_lifted(compiled.traced, model)
    assert _run(compiled.traced, batch) == pytest.approx(float(model(*batch)), rel=1e-5)
    for rank in (0, 3):
        program = compiled.rank_program(rank, meta=True)
        values = materialize.shard_values(model, dict(program.params))
        assert set(values) == set(program.params)
        assert {s.name for s in program.params.values()} <= _state_names(model)


def test_kv_cache_empty_starts_leave_the_concatenations():
    """Llama's cache concatenates each layer's keys onto a 1-D empty tensor, which torch.cat skips:
    the cleaned graph drops it, so sharding never meets a (0,) tensor along the head dim."""
    model, batch = hf_zoo.build("llama")
    traced = trace(model, batch)
    cats = [n for n in traced.gm.graph.nodes if n.target is torch.ops.aten.cat.default]
    assert cats
    for cat in cats:
        shapes = [tuple(a.meta["val"].shape) for a in cat.args[0] if isinstance(a, torch.fx.Node)]
        assert (0,) not in shapes, (cat.name, shapes)
    assert not any(n.target is torch.ops.aten.detach_.default for n in traced.gm.graph.nodes)
    assert _run(traced, batch) == pytest.approx(float(model(*batch)), rel=1e-5)
