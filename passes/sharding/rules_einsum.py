"""The sharding rule of einsum, read from its equation (any equation, not a list of forms).

Every index letter of `einsum("bhqd,bhkd->bhqk", q, k)` is one of two kinds:
- kept (it appears in the output): shard it on every operand that has it; the output is sharded
  on it too, and operands without it are taken whole (R). A batch index (b, h) shards all alike;
  a free index (q) shards one operand only, as a column split does.
- contracted (summed away): shard it on every operand that has it; each rank then sums its part
  of the index, so the output is a partial sum (P), which is exact because einsum is linear in
  each operand.
And one operand P with the others R gives P (multilinear). A letter repeated inside one operand (a
diagonal, "ii->i") is never sharded: the two dims would have to be cut together.
"""

from __future__ import annotations

import torch.fx as fx

from fxplan.passes.ir import P, R, Shard
from fxplan.passes.sharding.op_strategy import is_tensor, make, shape, shardable


def einsum_parts(node) -> tuple[str, list] | None:
    """(equation, operand nodes) of torch.einsum(eq, a, b) / einsum(eq, [a, b]) / aten.einsum."""
    if not node.args or not isinstance(node.args[0], str):
        return None
    rest = node.args[1:]
    operands = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
    if not operands or not all(isinstance(a, fx.Node) and is_tensor(a) for a in operands):
        return None
    return node.args[0], operands


def parse_equation(equation: str, ranks: list[int]) -> tuple[list[str], str] | None:
    """Per-operand index strings and the output's, with '...' spelled out as fresh capital letters
    (numpy broadcasting: the ellipsis covers the trailing-aligned leading dims) and an implicit
    output ('ij,jk') made explicit (the letters seen once, sorted)."""
    eq = equation.replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    ins = lhs.split(",")
    if len(ins) != len(ranks):
        return None
    width = max([r - len(s.replace("...", "")) for s, r in zip(ins, ranks) if "..." in s] or [0])
    fresh = "".join(chr(ord("Z") - i) for i in range(width))  # capitals: einsum equations use lower case
    expanded = []
    for s, r in zip(ins, ranks):
        if "..." in s:
            n = r - len(s.replace("...", ""))
            s = s.replace("...", fresh[width - n:] if n else "")
        if len(s) != r:
            return None
        expanded.append(s)
    if arrow:
        out = out.replace("...", fresh)
    else:
        letters = "".join(expanded)
        out = fresh + "".join(sorted(c for c in set(letters) if letters.count(c) == 1 and c not in fresh))
    return expanded, out


def einsum_rule(node, tp):
    parts = einsum_parts(node)
    if parts is None:
        return []
    equation, operands = parts
    shapes = [shape(a) for a in operands]
    parsed = parse_equation(equation, [len(s) for s in shapes])
    if parsed is None:
        return []
    ins, out = parsed
    res = []
    for letter in dict.fromkeys("".join(ins)):
        if any(s.count(letter) > 1 for s in ins) or out.count(letter) > 1:
            continue  # a diagonal: never sharded
        holders = [(a, s.index(letter), sh) for a, s, sh in zip(operands, ins, shapes) if letter in s]
        if any(sh[d] == 1 for _, d, sh in holders):
            continue  # broadcast along this letter: the size-1 operand cannot be cut
        if not all(shardable(sh[d], tp) for _, d, sh in holders):
            continue
        assign = [(a, Shard(d)) for a, d, _ in holders] + [(a, R) for a in operands if all(a is not h for h, _, _ in holders)]
        placed = Shard(out.index(letter)) if letter in out else P
        res.append(make(node, assign, placed, "einsum"))
    for i, a in enumerate(operands):
        res.append(make(node, [(b, P if j == i else R) for j, b in enumerate(operands)], P, "einsum-P"))
    return res
