"""Sharding rules of arithmetic ops on the tp axis: elementwise ops, reductions, softmax and norms,
linear / matmul (Megatron's column and row splits come from here), attention and embeddings."""

from __future__ import annotations

import torch.fx as fx

from fxplan.passes.ir import P, R, Shard, op_name
from fxplan.passes.sharding.op_strategy import (ANY, OpStrategy, call_arg, is_tensor, make, moves, norm_dim,
                                                out_shape, shape, shardable)
from fxplan.passes.sharding.rules_vocab import vocab_embedding


def _operands(node):
    """Tensor operands of an elementwise op, in argument order (self first for methods)."""
    return [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, fx.Node) and is_tensor(a)]


def elementwise(node, tp, partial="none"):
    """Broadcasting elementwise op. partial: "none" | "add" (all P) | "mul" (one P, rest R) |
    "div" (the first operand P, rest R) | "unary" (P -> P)."""
    o = out_shape(node)
    ops = _operands(node)
    if o is None or not ops:
        return []
    res = []
    for d in range(len(o)):
        # an operand's dim is the output's (sharded alike) or broadcast (size 1: R); any other size
        # (glu's halved dim) pairs elements that are not at the same index of the shards
        if not shardable(o[d], tp) or any(_size_at(shape(a), len(o), d) not in (None, 1, o[d]) for a in ops):
            continue
        res.append(make(node, [(a, _aligned(shape(a), len(o), d)) for a in ops], Shard(d), "ew"))
    scalars = [a for a in node.args if not isinstance(a, fx.Node) and isinstance(a, (int, float, bool))]
    if partial == "add" and not scalars and len(ops) >= 1:
        res.append(make(node, [(a, P) for a in ops], P, "ew"))
    elif partial in ("mul", "unary"):
        for i, a in enumerate(ops):
            res.append(make(node, [(b, P if j == i else R) for j, b in enumerate(ops)], P, "ew"))
    elif partial == "div" and ops and node.args and node.args[0] is ops[0]:
        res.append(make(node, [(b, P if j == 0 else R) for j, b in enumerate(ops)], P, "ew"))
    return res


def elementwise_unary(node, tp, x, partial):
    s = shape(x)
    return moves(node, x, [(d, d) for d in range(len(s)) if shardable(s[d], tp)], "ew", partial)


def type_as_rule(node, tp):
    x, y = node.args[0], node.args[1]
    res = elementwise_unary(node, tp, x, partial=True)
    return [OpStrategy(tuple(ANY if n is y and n is not x else a for n, a in zip(node.all_input_nodes, st.args)),
                       st.out, st.tag) for st in res] + [
        OpStrategy(tuple(ANY if n is y and n is not x else R for n in node.all_input_nodes), R, "ew")]


def _dims(spec, rank):
    if spec is None:
        return list(range(rank))
    if isinstance(spec, int):
        return [norm_dim(spec, rank)]
    return [norm_dim(d, rank) for d in spec]


def reduce_like(node, tp, kind):
    """sum / mean / amax ...: shards of kept dims survive; `sum` over a sharded dim gives P."""
    x = node.args[0]
    s = shape(x)
    if s is None:
        return []
    dims = _dims(call_arg(node, 1, "dim", None), len(s))
    keep = call_arg(node, 2, "keepdim", False)
    res = []
    for d in range(len(s)):
        if not shardable(s[d], tp):
            continue
        if d in dims:
            if kind == "sum":
                res.append(make(node, [(x, Shard(d))], P, "reduce"))
            continue
        od = d if keep else d - sum(1 for r in dims if r < d)
        res.append(make(node, [(x, Shard(d))], Shard(od), "reduce"))
    if kind == "sum":
        res.append(make(node, [(x, P)], P, "reduce"))
    return res


def softmax_like(node, tp):
    x = node.args[0]
    s = shape(x)
    dim = norm_dim(call_arg(node, 1, "dim", -1), len(s))
    return moves(node, x, [(d, d) for d in range(len(s)) if d != dim and shardable(s[d], tp)], "softmax", partial=False)


def norm_like(node, tp, n_norm_dims=None):
    """layer_norm / rms_norm: the normalized (last) dims must not be sharded."""
    x = node.args[0]
    s = shape(x)
    if n_norm_dims is None:
        ns = call_arg(node, 1, "normalized_shape")
        n_norm_dims = len(ns) if isinstance(ns, (list, tuple)) else 1
    return moves(node, x, [(d, d) for d in range(len(s) - n_norm_dims) if shardable(s[d], tp)], "norm", partial=False)


def linear_rule(node, tp):
    """F.linear(x, w[N, K], b[N]): rows of x -> S(row); w S(0) -> out S(-1) ("col");
    x S(-1), w S(1) -> P ("row", the bias becomes P: added once); x P, w R -> P."""
    x, w = node.args[0], call_arg(node, 1, "weight")
    b = call_arg(node, 2, "bias")
    b = b if isinstance(b, fx.Node) else None
    sx, sw, o = shape(x), shape(w), out_shape(node)
    if sx is None or sw is None or len(sw) != 2:
        return []
    r = len(o)
    res = []
    for d in range(r - 1):
        if shardable(sx[d], tp):
            res.append(make(node, [(x, Shard(d)), (w, R), (b, R)], Shard(d), "batch"))
    if shardable(sw[0], tp):
        res.append(make(node, [(x, R), (w, Shard(0)), (b, Shard(0))], Shard(r - 1), "col"))
    for k in chunk_counts(node, r - 1):  # a fused weight (q|k|v, gate|up): each chunk cut over tp
        if sw[0] % (k * tp) == 0:
            res.append(make(node, [(x, R), (w, Shard(0, k)), (b, Shard(0, k))], Shard(r - 1, k), "col"))
    if shardable(sw[1], tp):
        res.append(make(node, [(x, Shard(len(sx) - 1)), (w, Shard(1)), (b, P)], P, "row"))
    res.append(make(node, [(x, P), (w, R), (b, P)], P, "lin-P"))
    return res


def chunk_counts(node, dim: int) -> set[int]:
    """Into how many equal pieces the users of `node` cut its dim `dim` (chunk / split / unbind)."""
    from fxplan.passes.sharding.rules_shape import equal_pieces

    return {k for u in node.users if u.args and u.args[0] is node and (k := equal_pieces(u, dim)) and k > 1}


def matmul_rule(node, tp, bias=None):
    """a[..., M, K] @ b[..., K, N] (mm, bmm, matmul, @; addmm with `bias`)."""
    a, b = (node.args[1], node.args[2]) if bias is not None else (node.args[0], node.args[1])
    sa, sb, o = shape(a), shape(b), out_shape(node)
    if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
        return []
    r = len(o)
    bias_for = (lambda d: [(bias, _bias_placement(bias, o, d))]) if bias is not None else (lambda d: [])
    res = []
    for d in range(r - 2):  # batch dims (broadcast-aligned)
        if not shardable(o[d], tp):
            continue
        pa = _aligned(sa, r, d)
        pb = _aligned(sb, r, d)
        res.append(make(node, [(a, pa), (b, pb)] + bias_for(d), Shard(d), "batch"))
    if shardable(sa[-2], tp):
        res.append(make(node, [(a, Shard(len(sa) - 2)), (b, R)] + bias_for(r - 2), Shard(r - 2), "rows"))
    if shardable(sb[-1], tp):
        res.append(make(node, [(a, R), (b, Shard(len(sb) - 1))] + bias_for(r - 1), Shard(r - 1), "col"))
    if shardable(sa[-1], tp):
        extra = [(bias, P)] if bias is not None else []
        res.append(make(node, [(a, Shard(len(sa) - 1)), (b, Shard(len(sb) - 2))] + extra, P, "row"))
    extra = [(bias, P)] if bias is not None else []
    res.append(make(node, [(a, P), (b, R)] + extra, P, "mm-P"))
    res.append(make(node, [(a, R), (b, P)] + extra, P, "mm-P"))
    return res


def _size_at(s, r, d):
    """The size of operand shape `s` at output dim `d` of a rank-`r` result (None: broadcast in)."""
    da = d - (r - len(s))
    return None if da < 0 else s[da]


def _aligned(s, r, d):
    da = d - (r - len(s))
    return R if da < 0 or s[da] == 1 else Shard(da)


def _bias_placement(bias, o, d):
    sb = shape(bias)
    if sb is None:
        return R
    return _aligned(sb, len(o), d)


def sdpa_rule(node, tp):
    """q, k, v [B, H, T, D]: shard B or H (every input alike), or the query sequence (k, v R)."""
    q, k, v = node.args[0], node.args[1], node.args[2]
    mask = call_arg(node, 3, "attn_mask")  # (the flash kernels take it by keyword only)
    mask = mask if isinstance(mask, fx.Node) else node.kwargs.get("attn_mask")
    mask = mask if isinstance(mask, fx.Node) else None
    sq, sk = shape(q), shape(k)
    o = out_shape(node)
    if sq is None or len(sq) != 4:
        return []
    res = []
    for d in (0, 1):
        if shardable(sq[d], tp) and shardable(sk[d], tp):
            extra = [(mask, _aligned(shape(mask), 4, d))] if mask is not None else []
            res.append(make(node, [(q, Shard(d)), (k, Shard(d)), (v, Shard(d))] + extra, Shard(d),
                            "heads" if d == 1 else "batch"))
    if shardable(sq[2], tp) and not _causal(node):  # a causal mask is relative to the whole query sequence
        extra = [(mask, _aligned(shape(mask), 4, 2))] if mask is not None else []
        res.append(make(node, [(q, Shard(2)), (k, R), (v, R)] + extra, Shard(2), "seq"))
    return res


# where is_causal sits among the positional arguments of each attention op
_CAUSAL_AT = {"scaled_dot_product_attention": 5, "_scaled_dot_product_flash_attention": 4,
              "_scaled_dot_product_flash_attention_for_cpu": 4, "_scaled_dot_product_efficient_attention": 6}


def _causal(node) -> bool:
    """Whether the attention applies its own causal mask (unknown counts as causal)."""
    flag = call_arg(node, _CAUSAL_AT.get(op_name(node), 5), "is_causal", False)
    return flag is not False


def embedding_rule(node, tp, aten=False):
    """Table [V, E] sharded on E -> output S(-1); ids sharded on a dim -> output S(dim); the table
    cut along its rows -> P (vocab-parallel, rules_vocab.py; codegen masks the foreign ids)."""
    ids, w = (node.args[1], node.args[0]) if aten else (node.args[0], call_arg(node, 1, "weight"))
    si, sw = shape(ids), shape(w)
    if si is None or sw is None:
        return []
    res = [make(node, [(ids, Shard(d)), (w, R)], Shard(d), "batch") for d in range(len(si)) if shardable(si[d], tp)]
    if shardable(sw[1], tp):
        res.append(make(node, [(ids, R), (w, Shard(1))], Shard(len(si)), "emb"))
    res.append(vocab_embedding(node, tp, ids, w, aten))
    return [s for s in res if s is not None]


def conv_rule(node, tp, aten=False):
    """conv1d/2d/3d(x[N, C, ...], w[O, C/groups, ...], b[O]) and aten.convolution (not transposed):
    samples -> S(0); w S(0) on output channels -> out S(1) ("col"); x S(1) and w S(1) on input
    channels -> P ("row", the bias P: added once); x P -> P (linear in x). A grouped conv (depthwise:
    groups == channels) whose groups divide by tp runs channel-split ("chan"): x S(1), w S(0), b S(0)
    -> out S(1), each rank whole groups (its input channels and the output channels they make), so
    codegen divides `groups` by tp. Spatial dims never (halos)."""
    x, w = node.args[0], call_arg(node, 1, "weight")
    b = call_arg(node, 2, "bias")
    b = b if isinstance(b, fx.Node) else None
    if aten and call_arg(node, 6, "transposed", False):
        return []
    groups = call_arg(node, 8 if aten else 6, "groups", 1)
    sx, sw = shape(x), shape(w)
    if sx is None or sw is None or len(sx) < 3 or not isinstance(groups, int):
        return []
    res = []
    if shardable(sx[0], tp):
        res.append(make(node, [(x, Shard(0)), (w, R), (b, R)], Shard(0), "batch"))
    if groups == 1 and shardable(sw[0], tp):
        res.append(make(node, [(x, R), (w, Shard(0)), (b, Shard(0))], Shard(1), "col"))
    if groups > 1 and groups % tp == 0 and shardable(sw[0], tp) and shardable(sx[1], tp):
        res.append(make(node, [(x, Shard(1)), (w, Shard(0)), (b, Shard(0))], Shard(1), "chan"))
    if groups == 1 and shardable(sw[1], tp):
        res.append(make(node, [(x, Shard(1)), (w, Shard(1)), (b, P)], P, "row"))
    res.append(make(node, [(x, P), (w, R), (b, P)], P, "conv-P"))
    return res
