"""Pinned tp divides the work: with tp pinned, every layer whose matmuls can shard gets a sharding
that divides its FLOPs and weights, even on a cluster whose slow links make replicated compute the
cheaper choice; the ops a sharding leaves replicated are named in plan.warnings, the summary and
the CLI."""

from __future__ import annotations

import pytest
import torch

import fxplan
from fxplan.cli import main
from fxplan.models import build, example_batch
from fxplan.passes.cost.strategies import dividing_specs

# CPU-like figures: a collective costs far more than these tiny layers' matmuls
SLOW = fxplan.Cluster(nodes=1, devices_per_node=4, memory_bytes=16e9, peak_flops=1e11, intra_bw=1e9, inter_bw=1e9,
                      intra_latency=5e-4, inter_latency=5e-4)
PINS = dict(pp=1, dp=1, tp=4, fsdp=False, microbatches=1)


def _compile(spec: str, **pins):
    model = build(spec)
    return fxplan.compile(model, example_batch(model, 8), cluster=SLOW, constraints=fxplan.Constraints(**pins),
                          verbose=False)


@pytest.mark.parametrize("preset", ["gpt", "llama", "bert", "vit"])
def test_pinned_tp_divides_every_layer_that_can_shard(preset):
    c = _compile(preset, **PINS)  # default sizes: hidden 64, where replicated layers used to win
    total = per_device = 0.0
    for layer in c.layer_graph.layers:
        s = c.plan.strategy(layer.name)
        specs = c.space.for_layer(layer.index, 4)
        chosen = c.space.spec(layer.index, 4, s.spec)
        least_flops = min(x.flops for x in specs)
        assert s.tp == 4
        assert chosen.flops <= 1.1 * least_flops, (layer.name, s.spec, [x.label for x in specs])
        if least_flops < 0.5 * layer.flops:  # its matmuls can shard: never the replicated spec
            assert s.spec != "R", layer.name
        if layer.param_numel:
            assert chosen.param_numel <= 1.1 * min(x.param_numel for x in specs), layer.name
        total += layer.flops
        per_device += chosen.flops
    assert 4 * per_device <= 1.3 * total


def test_dividing_specs_keeps_the_most_divided():
    from fxplan.passes.ir import TPSpec, frozen_map

    def spec(label, flops, params):
        return TPSpec(label=label, tp=4, placements=frozen_map({}), arg_placements=frozen_map({}),
                      input_placements=frozen_map({}), output_placements=frozen_map({}), comms=(), flops=flops,
                      param_numel=params, act_bytes=0.0)

    specs = (spec("R", 100, 400), spec("half", 52, 210), spec("col", 26, 100), spec("mix", 27, 130),
             spec("colrow", 26.5, 104))
    assert [s.label for s in dividing_specs(specs)] == ["col", "colrow"]
    assert [s.label for s in dividing_specs(specs[:1])] == ["R"]  # nothing shards: replicated stays


class _FlipMLP(torch.nn.Module):
    """An MLP with an op fxplan has no sharding rule for (flip) between its matmuls."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.h = torch.nn.Linear(64, 256), torch.nn.Linear(256, 64), torch.nn.Linear(64, 16)

    def forward(self, x, y):
        h = torch.flip(self.b(torch.nn.functional.gelu(self.a(x))), dims=[1]) * 2
        return torch.nn.functional.cross_entropy(self.h(h), y)


def test_warnings_name_replicated_ops_and_their_layer(capsys):
    torch.manual_seed(0)
    c = fxplan.compile(_FlipMLP(), (torch.randn(8, 64), torch.randint(0, 16, (8,))), cluster=SLOW,
                       constraints=fxplan.Constraints(**PINS), verbose=False)
    warnings = c.plan.warnings
    # flip has no sharding rule: it runs whole on every tp rank, and the plan says so, naming its layer
    assert any(w.startswith("layer ") and "flip" in w and "no sharding rule" in w for w in warnings), warnings
    assert all(w.startswith("layer ") and "replicated" in w for w in warnings)
    assert fxplan.Plan.from_json(c.plan.to_json()).warnings == warnings
    assert all(f"warning: {w}" in c.plan.summary() for w in warnings)
    assert main(["plan", "--model", "bert", "--batch", "8", "--cluster", "a100-80g:1x4",
                 "--pin", "pp=1,tp=4,dp=1"]) == 0
    out = capsys.readouterr().out
    assert "warning: layer" in out and "runs replicated" in out
