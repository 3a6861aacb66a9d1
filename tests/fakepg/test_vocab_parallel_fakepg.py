"""Vocab-parallel embedding, head and cross-entropy on the fake process group (4 ranks): the graph
each rank runs looks up only its rows of the table (masked), computes the loss on its quarter of the
classes with the row maxima gathered and the exponential sums and target logits all-reduced, and
never gathers the logits; forward and backward run with those local shapes."""

from __future__ import annotations

import functools
import operator

import pytest
import torch

import fxplan
from tp_blocks import VOCAB, batch_for, build_lm

WORLD = 4
TOKENS = 8 * 16
SLOW = fxplan.Cluster(nodes=1, devices_per_node=WORLD, memory_bytes=16e9, peak_flops=1e11, intra_bw=1e9,
                      inter_bw=1e9, intra_latency=5e-4, inter_latency=5e-4)


@functools.cache
def _compiled(name: str):
    return fxplan.compile(build_lm(name), batch_for(name), cluster=SLOW,
                          constraints=fxplan.Constraints(pp=1, dp=1, tp=WORLD, microbatches=1), verbose=False)


def _calls(gm, fn: str):
    return [n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "__name__", "") == f"fxplan_{fn}"]


def _shape(n):
    return tuple(n.meta["val"].shape) if "val" in n.meta else None


@pytest.mark.parametrize("name", ["vocab", "tied"])
def test_head_and_loss_work_on_a_quarter_of_the_vocabulary(name, fake_pg):
    compiled = _compiled(name)
    rank = 2
    comm = fake_pg(rank, compiled.plan)
    gm = compiled.rank_module(rank)
    head = [n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "__name__", "") == "linear"][-1]
    weight = getattr(gm, head.args[1].target)
    assert weight.shape == (VOCAB // WORLD, 64)  # the head's rows: this rank's quarter of the classes
    full = compiled.model.head.weight.detach()
    assert torch.equal(weight, full.chunk(WORLD, dim=0)[rank])
    # the loss: one all-gather of the row maxima [tokens, 1], two all-reduces of [tokens] (sum-exp, target)
    gathers = [n for n in _calls(gm, "all_gather") if n.args[0].op == "call_method" and n.args[0].target == "amax"]
    assert len(gathers) == 1
    reduced = [n for n in _calls(gm, "tp_all_reduce") if n.args[0].op == "call_method"
               and n.args[0].target in ("sum", "masked_fill")]
    assert len(reduced) >= 2
    # the logits are never gathered or all-reduced whole
    code = gm.code
    assert "reduce_scatter" not in code.split("linear(")[-1]
    for fn in ("all_gather", "tp_all_reduce", "all_gather_rs"):
        for n in _calls(gm, fn):
            src = n.args[0]
            assert not (src.op == "call_function" and getattr(src.target, "__name__", "") == "linear"
                        and src is head), n
    # the target logit is taken on the rank holding its class: labels shifted by this rank's first class
    start = rank * VOCAB // WORLD
    assert any(n.op == "call_function" and n.target is operator.sub and n.args[1] == start for n in gm.graph.nodes)
    with comm.observe() as counter:
        loss = gm(*batch_for(name))  # values are garbage on the fake group; shapes must line up
        assert loss.shape == ()
        loss.backward()
    assert weight.grad is not None and weight.grad.shape == weight.shape
    fwd = {kind for (kind, _, phase) in counter.snapshot() if phase == "fwd"}
    assert "all_gather" in fwd and "all_reduce" in fwd


def test_tied_embedding_cuts_its_table_rows_and_masks_foreign_ids(fake_pg):
    """The tied table is cut along its rows for the lookup too (Megatron's vocab-parallel embedding):
    ids outside the rank's rows are shifted into range and their vectors zeroed; the lookup's sum
    over the ranks is one all-reduce."""
    compiled = _compiled("tied")
    rank = 1
    fake_pg(rank, compiled.plan)
    gm = compiled.rank_module(rank)
    emb = next(n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "embedding")
    table = getattr(gm, emb.args[1].target)
    assert table.shape == (VOCAB // WORLD, 64)
    lookup_ids = emb.args[0]
    assert lookup_ids.target == "masked_fill"  # ids - first row, foreign ids set to 0
    zeroed = next(iter(emb.users))
    assert zeroed.target == "masked_fill" and zeroed.args[2] == 0.0
    # the embedding's partial lookup is summed over tp (an all-reduce or a reduce-scatter)
    after = [u for u in zeroed.users]
    assert any(getattr(u.target, "__name__", "") in ("fxplan_tp_all_reduce", "fxplan_reduce_scatter") for u in after)


def test_vocab_loss_is_priced_with_its_collectives():
    """The cost model sees the vocab-parallel loss's own reductions (a few bytes per token) and its
    logits divided by tp in the saved activations."""
    compiled = _compiled("vocab")
    head = compiled.layer_graph.layers[-1]
    spec = compiled.space.spec(head.index, WORLD, compiled.plan.strategy(head.name).spec)
    inner = [c for c in spec.comms if "vocab-parallel cross-entropy" in c.why]
    assert [c.kind for c in inner] == ["all_gather", "all_reduce", "all_reduce"]
    assert inner[1].nbytes == TOKENS * 4 and inner[0].nbytes == TOKENS * WORLD * 4
    assert not any(c.nbytes >= TOKENS * VOCAB * 4 for c in spec.comms)  # no collective on the whole logits
    replicated = compiled.space.for_layer(head.index, 1)[0]
    assert spec.act_bytes < 0.5 * replicated.act_bytes
