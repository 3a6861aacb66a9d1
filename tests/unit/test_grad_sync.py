"""The gradient sums' bookkeeping, without process groups: where a shard's elements sit in the full
tensor, and the tied-weight sum over stages with different layouts, all-reduces emulated by adding
the buffers of each group's members."""

from __future__ import annotations

import math

import pytest
import torch

from fxplan.codegen.groups import ranks_of
from fxplan.codegen.params import ParamShard, shard_tensor, stored_runs
from fxplan.runtime.grad_sync import pack, shared_pieces, tied_slots, unpack

SHAPE = (6, 4)


def _shard(tp_dim, tp, t, fsdp, dp, d, shape=SHAPE) -> ParamShard:
    return ParamShard(name="w", global_shape=shape, tp_dim=tp_dim, tp=tp, tp_index=t, fsdp=fsdp, dp=dp,
                      dp_index=d, dp_group="", numel_local=0, requires_grad=True)


@pytest.mark.parametrize("shape,tp_dim,tp,fsdp,dp", [
    ((6, 4), None, 1, False, 1), ((6, 4), 0, 2, False, 1), ((6, 4), 1, 2, False, 1), ((6, 4), 1, 2, True, 3),
    ((3, 4, 6), 1, 2, True, 5), ((3, 4, 6), 2, 3, False, 1), ((7,), None, 1, True, 4)])
def test_stored_runs_locate_every_stored_element(shape, tp_dim, tp, fsdp, dp):
    index = torch.arange(math.prod(shape)).view(shape)  # each element's full flat index
    for t in range(tp):
        for d in range(dp if fsdp else 1):
            shard = _shard(tp_dim, tp, t, fsdp, dp, d, shape)
            stored = shard_tensor(index, shard).reshape(-1)
            runs = stored_runs(shard)
            covered = sum(n for _, _, n in runs)
            located = torch.cat([torch.arange(f, f + n) for f, _, n in runs])
            assert [s for _, s, _ in runs] == [sum(n for _, _, n in runs[:i]) for i in range(len(runs))]
            assert torch.equal(stored[:covered], located)
            assert torch.count_nonzero(stored[covered:]) == 0  # the rest is FSDP padding


# Three stages share the weight, each with its own layout: stage 0 (ranks 0-3) tp=2 along dim 0 x
# dp=2 without FSDP (gradients dp-partial); stage 1 (ranks 4-7) FSDP over dp=4 (gradients already
# summed over dp, one flat block each); stage 2 (ranks 8-9) tp=2 along dim 1, the copies equal.
LAYOUTS = {0: (0, 2, False, 2), 1: (None, 1, True, 4), 2: (1, 2, False, 1)}


def _holders():
    out, rank = [], 0
    for stage, (tp_dim, tp, fsdp, dp) in LAYOUTS.items():
        for d in range(dp):
            for t in range(tp):
                out.append((rank, stage, _shard(tp_dim, tp, t, fsdp, dp, d)))
                rank += 1
    return out


def test_tied_sum_over_stages_with_different_layouts():
    torch.manual_seed(0)
    holders = _holders()
    contributions = {s: torch.randn(SHAPE) for s in LAYOUTS}  # each stage's whole gradient
    grads = {}
    for rank, stage, shard in holders:
        full = contributions[stage]
        if stage == 0:  # dp-partial: the two dp replicas' gradients add up to the stage's
            full = full * (0.25 if shard.dp_index == 0 else 0.75)
        grads[rank] = shard_tensor(full, shard)
    pieces = shared_pieces("w", holders)
    assert sum(n for _, _, n, _ in pieces) == math.prod(SHAPE)  # every element shared, once
    slots = {rank: tied_slots(pieces, rank, {("w", stage): "w"}) for rank, stage, _ in holders}
    buffers = {(rank, key): pack(tuple(s), [grads[rank]] * len(s)) for rank in slots for key, s in slots[rank].items()}
    for key in {k for rank in slots for k in slots[rank]}:
        members = ranks_of(key)
        assert all(key in slots[r] for r in members)  # every member of a group joins it
        total = sum(buffers[(r, key)] for r in members)  # the all-reduce
        for r in members:
            unpack(tuple(slots[r][key]), [grads[r]] * len(slots[r][key]), total)
    expected = sum(contributions.values())
    for rank, _, shard in holders:
        assert torch.allclose(grads[rank], shard_tensor(expected, shard), atol=1e-6), rank
    # no group larger than the holders of one piece: stage 0 holds each row half on 2 ranks,
    # stage 1 each element on 1, stage 2 each element on 1
    assert max(len(ranks_of(k)) for rank in slots for k in slots[rank]) == 4


def test_tied_sum_with_two_stages_on_one_rank():
    """Under zbv a rank holds the first and the last stage: a weight tied between them has two
    holders on one rank (their parts add up in one place of the buffer, and both get the sum back)
    beside a third stage on another rank; a piece only one rank holds needs no group at all."""
    torch.manual_seed(0)
    whole = _shard(None, 1, 0, False, 1, 0)
    for holders in ([(0, 0, whole), (0, 3, whole), (1, 1, whole)], [(0, 0, whole), (0, 3, whole)]):
        contributions = {stage: torch.randn(SHAPE) for _, stage, _ in holders}
        grads = {(r, stage): contributions[stage].clone() for r, stage, _ in holders}
        pieces = shared_pieces("w", holders)
        ranks = sorted({r for r, _, _ in holders})
        attr = {(r, stage): f"stage{stage}.w" for r, stage, _ in holders}
        slots = {r: tied_slots(pieces, r, {("w", s): attr[(q, s)] for q, s, _ in holders if q == r}) for r in ranks}
        assert all(len(slot.also) == 1 for r in ranks for s in slots[r].values() for slot in s if r == 0)
        by_attr = {attr[key]: grads[key] for key in grads}
        for key in {k for r in ranks for k in slots[r]}:
            assert sorted(ranks_of(key)) == ranks  # one member per rank, however many stages it holds
            members = {r: tuple(slots[r][key]) for r in ranks}
            total = sum(pack(s, [by_attr[x.attr] for x in s], by_attr.__getitem__) for s in members.values())
            for s in members.values():
                unpack(s, [by_attr[x.attr] for x in s], total, by_attr.__getitem__)
        expected = sum(contributions.values())
        for key, grad in grads.items():
            assert torch.allclose(grad, expected, atol=1e-6), key
