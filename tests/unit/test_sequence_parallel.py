"""Sequence parallelism as a planner choice: its shardings divide the activations the cost model
counts, `Constraints(sp=)` pins it, and an unpinned search picks it when memory is tight."""

from __future__ import annotations

import functools

import pytest

import fxplan
from fxplan.errors import ConstraintError
from fxplan.models import build, example_batch

MODEL = "gpt:layers=2,hidden=256,heads=4,seq=1024"  # activations, not weights, fill the memory
PINS = dict(pp=1, dp=1, tp=4, microbatches=1, fsdp=False, recompute=False)


def _cluster(memory: float) -> fxplan.Cluster:
    return fxplan.Cluster(nodes=1, devices_per_node=4, memory_bytes=memory, peak_flops=1e14, intra_bw=1e11,
                          inter_bw=1e10, intra_latency=5e-6, inter_latency=5e-6)


@functools.cache
def _plan(memory: float, sp):
    model = build(MODEL)
    return fxplan.compile(model, example_batch(model, 8), cluster=_cluster(memory),
                          constraints=fxplan.Constraints(**PINS, sp=sp), verbose=False).plan


def _specs(plan) -> dict:
    return {name: s.spec for st in plan.stages for name, s in st.strategies.items()}


def test_pinned_sp_shards_every_layer_on_the_sequence_and_divides_its_activations():
    plain, sp = _plan(80e9, False), _plan(80e9, True)
    assert all(spec.startswith("sp:") for spec in _specs(sp).values()), _specs(sp)
    assert not any(spec.startswith("sp:") for spec in _specs(plain).values()), _specs(plain)
    blocks = [name for name in _specs(sp) if name.startswith("blocks.")]
    assert all(_specs(sp)[b] == "sp:" + _specs(plain)[b] for b in blocks)  # Megatron's sharding, its SP form
    # the column-parallel inputs are saved as their sequence shard too (runtime/sequence_saved.py)
    assert sp.stages[0].estimated_memory_bytes < 0.75 * plain.stages[0].estimated_memory_bytes


def test_sp_specs_price_the_backward_regather_of_the_shards_they_save():
    """An sp spec whose gathered input is saved by a matmul keeps the shard (acts /tp for it) and pays
    one backward all-gather of that input; its plain twin saves the gathered copy whole."""
    model = build(MODEL)
    compiled = fxplan.compile(model, example_batch(model, 8), cluster=_cluster(80e9),
                              constraints=fxplan.Constraints(**PINS, sp=True), verbose=False)
    block = next(u for u in compiled.layer_graph.layers if u.name.startswith("blocks."))
    specs = {s.label: s for s in compiled.space.for_layer(block.index, 4)}
    chosen = specs[_specs(compiled.plan)[block.name]]
    twin = specs[chosen.label[len("sp:"):]]
    regathers = [c for c in chosen.comms if c.why.startswith("regather")]
    assert regathers and all(c.kind == "all_gather" and c.phase == "bwd" and c.axis == "tp" for c in regathers)
    assert not any(c.why.startswith("regather") for c in twin.comms)
    assert chosen.act_bytes < 0.7 * twin.act_bytes, (chosen.act_bytes, twin.act_bytes)


def test_planner_picks_sequence_parallelism_when_memory_is_tight():
    without, with_sp = (_plan(80e9, pin).stages[0].estimated_memory_bytes for pin in (False, True))
    tight = (without + with_sp) / 2  # the plain shardings no longer fit
    plan = _plan(tight, None)
    assert any(spec.startswith("sp:") for spec in _specs(plan).values()), _specs(plan)
    assert plan.stages[0].estimated_memory_bytes <= tight
    with pytest.raises(fxplan.InfeasiblePlanError):
        _plan(tight, False)


def test_sp_pin_is_checked_and_parsed():
    with pytest.raises(ConstraintError):
        fxplan.Constraints(sp="yes")
    assert fxplan.Constraints.parse("tp=4,sp=true").sp is True
