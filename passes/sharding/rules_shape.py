"""Sharding rules of data-movement ops on the tp axis: views and reshapes, permutes, expand, cat /
split, indexing, shape queries and *_like factories. A shard survives such an op on the dim its
elements move to; a partial sum (P) stays one where the op is linear in its input."""

from __future__ import annotations

import math

import torch.fx as fx

from fxplan.passes.ir import P, R, Shard, op_name
from fxplan.passes.sharding.op_strategy import (ANY, OpStrategy, call_arg, is_tensor, is_tensor_like, make, moves,
                                                norm_dim, out_shape, shape, shardable)


def reshape_groups(src: tuple, dst: tuple):
    """Pair dims of a reshape into groups with equal products: [(in dims, out dims), ...]."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        gi, gj = [], []
        pi = pj = 1
        while True:
            if pi == pj and gi and gj:
                break
            if (pi <= pj or j >= len(dst)) and i < len(src):
                pi *= src[i]
                gi.append(i)
                i += 1
            elif j < len(dst):
                pj *= dst[j]
                gj.append(j)
                j += 1
            else:
                break
        # trailing size-1 dims join the current group
        while i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):
            gi.append(i)
            i += 1
        while j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
            gj.append(j)
            j += 1
        groups.append((gi, gj))
    return groups


def reshape_map(src: tuple, dst: tuple, tp: int) -> dict[int, int]:
    """Input dim -> output dim a plain shard survives a reshape on (as a plain shard)."""
    out = {}
    for d in range(len(src)):
        if shardable(src[d], tp):
            placed = reshape_placement(src, dst, tp, Shard(d))
            if placed is not None and placed.blocks == 1:
                out[d] = placed.dim
    return out


def reshape_placement(src: tuple, dst: tuple, tp: int, p: Shard) -> Shard | None:
    """Where a shard `p` of the input lies after reshaping `src` to `dst` (None: nowhere whole).

    Dims merged into one: the shard of an inner dim becomes a blocked shard of the merged dim (one
    block per index of the dims outside it: [B, H/tp] -> S(0/B) of [B*H]); a dim split into several:
    the blocks are peeled off by the outer output dims until the cut one ([B*H] S(0/B) -> [B, H]
    S(1)). Groups both merging and splitting keep only a plain shard of their outermost dim."""
    for gi, gj in reshape_groups(src, dst):
        if p.dim not in gi:
            continue
        ii = [d for d in gi if src[d] != 1]
        jj = [d for d in gj if dst[d] != 1]
        if p.dim not in ii or not jj:
            return None
        if len(jj) == 1:  # a merge (or one dim to one dim)
            blocks = p.blocks * math.prod(src[d] for d in ii if d < p.dim)
            return Shard(jj[0], blocks) if dst[jj[0]] % (blocks * tp) == 0 else None
        if len(ii) == 1:  # one dim split into several
            outer = 1
            for j in jj:
                if outer * dst[j] > p.blocks:
                    if p.blocks % outer or dst[j] % (p.blocks // outer * tp):
                        return None
                    return Shard(j, p.blocks // outer)
                outer *= dst[j]
            return None
        if p.blocks == 1 and p.dim == ii[0] and shardable(dst[jj[0]], tp):
            return Shard(jj[0])
        return None
    return None


def reshape_like(node, tp, current=lambda n: None):
    x = node.args[0]
    s, o = shape(x), out_shape(node)
    if s is None or o is None:
        return []
    wanted = [Shard(d) for d in range(len(s)) if shardable(s[d], tp)]
    cur = current(x)
    if isinstance(cur, Shard) and cur.blocks > 1:
        wanted.append(cur)
    res = []
    for p in wanted:
        placed = reshape_placement(s, o, tp, p)
        if placed is not None:
            res.append(make(node, [(x, p)], placed, "view"))
    res.append(make(node, [(x, P)], P, "view"))
    return res


def _perm_of(node, rank):
    name = op_name(node)
    args = node.args[1:]
    if name == "getattr":  # x.T reverses every dim, x.mT swaps the last two
        if args[0] == "T":
            return list(reversed(range(rank)))
        name = "mT"
    if name in ("t", "numpy_T") or (name == "mT" and rank >= 2):
        perm = list(range(rank))
        if rank >= 2:
            perm[-1], perm[-2] = perm[-2], perm[-1]
        return perm
    if name in ("transpose", "swapaxes", "swapdims", "transpose_"):
        a, b = norm_dim(args[0], rank), norm_dim(args[1], rank)
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    if name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        dims = dims or node.kwargs.get("dims")
        return [norm_dim(d, rank) for d in dims]
    if name in ("movedim", "moveaxis"):
        src, dst = args[0], args[1]
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src, dst = [norm_dim(d, rank) for d in src], [norm_dim(d, rank) for d in dst]
        rest = [d for d in range(rank) if d not in src]
        perm = [None] * rank
        for s, d in zip(src, dst):
            perm[d] = s
        it = iter(rest)
        return [p if p is not None else next(it) for p in perm]
    return None


def permute_like(node, tp):
    x = node.args[0]
    s = shape(x)
    perm = _perm_of(node, len(s)) if s is not None else None
    if perm is None:
        return []
    return moves(node, x, [(src, dst) for dst, src in enumerate(perm) if shardable(s[src], tp)], "perm")


def expand_like(node, tp):
    x = node.args[0]
    s, o = shape(x), out_shape(node)
    if s is None or o is None:
        return []
    off = len(o) - len(s)
    return moves(node, x, [(d, d + off) for d in range(len(s)) if s[d] == o[d + off] and shardable(s[d], tp)],
                 "expand")


def cat_like(node, tp):
    tensors = call_arg(node, 0, "tensors")
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) and is_tensor(t) for t in tensors):
        return []
    o = out_shape(node)
    stack = op_name(node) == "stack"
    dim = norm_dim(call_arg(node, 1, "dim", 0), len(o))
    res = []
    for d in range(len(o)):
        if d == dim or not shardable(o[d], tp):
            continue
        di = d if not stack or d < dim else d - 1
        res.append(make(node, [(t, Shard(di)) for t in tensors], Shard(d), "cat"))
    res.append(make(node, [(t, P) for t in tensors], P, "cat"))
    return res


def _split_dim(node, rank: int) -> int:
    name = op_name(node)
    return norm_dim(call_arg(node, 1, "dim", 0) if name == "unbind" else call_arg(node, 2, "dim", 0), rank)


def equal_pieces(node, dim: int) -> int | None:
    """How many equal pieces split / chunk / unbind `node` cuts its input's dim `dim` into (else None)."""
    name = op_name(node)
    if name not in ("split", "chunk", "unbind", "split_with_sizes"):
        return None
    s = shape(node.args[0])
    if s is None or _split_dim(node, len(s)) != norm_dim(dim, len(s)):
        return None
    n = s[norm_dim(dim, len(s))]
    if name == "unbind":
        return n
    arg = call_arg(node, 1, "chunks" if name == "chunk" else "split_size_or_sections")
    if name == "chunk":
        return arg if isinstance(arg, int) and n % arg == 0 else None
    if isinstance(arg, int):
        return n // arg if n % arg == 0 else None
    if isinstance(arg, (list, tuple)) and arg and all(isinstance(a, int) and a == arg[0] for a in arg):
        return len(arg)
    return None


def split_like(node, tp, current=lambda n: None):
    """Pieces along another dim keep its shard; a dim cut into k equal pieces that is a blocked shard
    of k blocks (a fused weight's output) gives each piece as a plain shard: every rank already holds
    its slice of each piece, so nothing moves."""
    x = node.args[0]
    s = shape(x)
    if s is None:
        return []
    dim = _split_dim(node, len(s))
    dropped = op_name(node) == "unbind"  # unbind removes `dim`: later dims move one down
    res = moves(node, x, [(d, d - 1 if dropped and d > dim else d) for d in range(len(s))
                          if d != dim and shardable(s[d], tp)], "split")
    cur = current(x)
    if isinstance(cur, Shard) and cur.dim == dim and cur.blocks > 1 and equal_pieces(node, dim) == cur.blocks \
            and not dropped:
        res.append(make(node, [(x, cur)], Shard(dim), "split"))
    return res


def repeat_interleave_rule(node, tp):
    """repeat_interleave(x, repeats: int, dim): every slice is repeated in place, so a shard on `dim`
    itself survives too (rank i's kv heads give exactly rank i's repeated heads, as in GQA)."""
    x = node.args[0]
    s, o = shape(x), out_shape(node)
    dim = call_arg(node, 2, "dim")
    if s is None or dim is None or isinstance(call_arg(node, 1, "repeats"), fx.Node):
        return []
    dim = norm_dim(dim, len(s))
    return moves(node, x, [(d, d) for d in range(len(s)) if shardable(s[d], tp) and shardable(o[d], tp)], "repeat")


def narrow_like(node, tp):
    x = node.args[0]
    s = shape(x)
    dim = norm_dim(call_arg(node, 1, "dim", 0), len(s))
    return moves(node, x, [(d, d) for d in range(len(s)) if d != dim and shardable(s[d], tp)], "narrow")


def getitem_rule(node, tp, current):
    x, idx = node.args[0], node.args[1]
    if not is_tensor(x):  # element of a tuple-valued op: every element has the op's placement
        cur = current(x)
        if cur is None or not is_tensor(node):
            return [OpStrategy((ANY,) + (None,) * (len(node.all_input_nodes) - 1), R, "item", compute=False)]
        return [make(node, [(x, cur)], cur, "item", compute=False)]
    s = shape(x)
    items = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, fx.Node) for i in items):
        return []  # tensor / traced index: replicated only
    mapping, d_in, d_out = {}, 0, 0
    n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
    for i in items:
        if i is Ellipsis:
            for _ in range(len(s) - n_real):
                mapping[d_in] = d_out
                d_in += 1
                d_out += 1
        elif i is None:
            d_out += 1
        elif isinstance(i, int):
            d_in += 1
        elif isinstance(i, slice):
            if i == slice(None, None, None):
                mapping[d_in] = d_out
            d_in += 1
            d_out += 1
        else:
            return []
    while d_in < len(s):
        mapping[d_in] = d_out
        d_in += 1
        d_out += 1
    return moves(node, x, [(a, b) for a, b in mapping.items() if shardable(s[a], tp)], "index")


def shape_only(node, tp):
    """size(), dim(), getattr(x, "shape"), ...: read GLOBAL metadata, no compute, no comm."""
    args = tuple(ANY if is_tensor_like(n) else None for n in node.all_input_nodes)
    return [OpStrategy(args, R, "meta", compute=False)]


def like_rule(node, tp):
    """zeros_like / ones_like / empty_like / full_like: same placement as the input (not P)."""
    x = node.args[0]
    s = shape(x)
    return moves(node, x, [(d, d) for d in range(len(s)) if shardable(s[d], tp)], "like", partial=False)


def tril_like(node, tp):
    x = node.args[0]
    s = shape(x)
    return moves(node, x, [(d, d) for d in range(len(s) - 2) if shardable(s[d], tp)], "tril", partial=False)
