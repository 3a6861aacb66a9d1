"""The einsum sharding rule read from the equation: kept indices shard the output, contracted
ones give partial sums, diagonals and broadcast (size-1) indices never shard."""

from __future__ import annotations

import torch
from torch import nn

from fxplan.passes.ir import P, R, Shard
from fxplan.passes.sharding.op_rules import strategies
from fxplan.passes.sharding.rules_einsum import parse_equation
from fxplan.passes.trace import trace


def test_parse_spells_out_ellipsis_and_implicit_output():
    assert parse_equation("bij,bjk->bik", [3, 3]) == (["bij", "bjk"], "bik")
    assert parse_equation("ij,jk", [2, 2]) == (["ij", "jk"], "ik")
    ins, out = parse_equation("...ij,jk->...ik", [4, 2])
    assert ins == ["ZYij", "jk"] and out == "ZYik"
    ins, out = parse_equation("...d,...d->...", [3, 2])  # right-aligned broadcasting
    assert ins == ["ZYd", "Yd"] and out == "ZY"
    assert parse_equation("ij,jk->ik", [3, 2]) is None  # ranks do not fit the equation


class Ein(nn.Module):
    """einsum(eq, input, weight): the second operand a parameter (no batch dim to agree on)."""

    def __init__(self, eq, b):
        super().__init__()
        self.eq, self.b = eq, nn.Parameter(b)

    def forward(self, a):
        return torch.einsum(self.eq, a, self.b).sum()


def _node(eq, a, b):
    traced = trace(Ein(eq, b), (a,))
    return next(n for n in traced.gm.graph.nodes if "einsum" in str(n.target))


def _pairs(node, tp):
    return {(s.args, str(s.out)) for s in strategies(node, tp)}


def test_batch_free_and_contracted_indices():
    node = _node("bqhd,khd->bhqk", torch.randn(2, 8, 4, 16), torch.randn(8, 4, 16))
    got = _pairs(node, 4)
    assert ((Shard(2), Shard(1)), "S(1)") in got  # heads: both operands alike
    assert ((Shard(1), R), "S(2)") in got  # q: free index of the first operand only
    assert ((R, Shard(0)), "S(3)") in got  # k: free index of the second operand only
    assert ((Shard(3), Shard(2)), "P") in got  # d: contracted into a partial sum
    assert ((P, R), "P") in got and ((R, P), "P") in got  # multilinear
    assert ((R, R), "R") in got
    assert not any(s.args[0] == Shard(0) for s in strategies(node, 4))  # b = 2 does not divide by 4


def test_diagonal_and_broadcast_indices_never_shard():
    node = _node("bii,i->bi", torch.randn(8, 4, 4), torch.randn(4))
    assert not any(s.args[0] in (Shard(1), Shard(2)) for s in strategies(node, 4))  # i is a diagonal
    node = _node("bij,ijk->bjk", torch.randn(8, 1, 8), torch.randn(4, 8, 4))  # i broadcast from size 1
    assert not any(s.args[1] == Shard(0) for s in strategies(node, 4))
    assert ((R, Shard(2)), "S(2)") in _pairs(node, 4)


def test_reshape_carries_a_head_shard_through_merge_and_split():
    from fxplan.passes.sharding.rules_shape import reshape_placement

    # [B, H, T, hd] -> [B*H, T, hd] with H sharded: blocked, one block per batch index
    assert reshape_placement((8, 4, 16, 16), (32, 16, 16), 4, Shard(1)) == Shard(0, 8)
    assert reshape_placement((8, 4, 16, 16), (32, 16, 16), 4, Shard(0)) == Shard(0)  # outermost: plain
    # and back: the blocks are peeled off by B, H is sharded again
    assert reshape_placement((32, 16, 16), (8, 4, 16, 16), 4, Shard(0, 8)) == Shard(1)
    assert reshape_placement((32, 16, 16), (4, 8, 16, 16), 4, Shard(0, 8)) == Shard(1, 2)  # two blocks per row
    assert reshape_placement((32, 16, 16), (16, 2, 16, 16), 4, Shard(0, 8)) is None  # blocks cut apart
    # [B, T, H, hd] -> [B, T, H*hd]: the outer dim of the merge stays a plain shard
    assert reshape_placement((8, 16, 4, 16), (8, 16, 64), 4, Shard(2)) == Shard(2)
    assert reshape_placement((8, 16, 4, 16), (8, 16, 64), 4, Shard(3)) == Shard(2, 4)
