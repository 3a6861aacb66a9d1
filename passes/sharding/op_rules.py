"""Per-op sharding rules on the tp axis: which (input placements -> output placement) an op admits.

A rule sees one fx node (shapes from node.meta["val"]) and returns every admissible `OpStrategy`
except the replicated one (all inputs R -> R), which `strategies()` always adds for ops that can
run replicated. Rules only describe what is CORRECT; propagation (shard_prop.py) picks by cost.

Invariant every rule keeps (it is what makes the f rule of redistribute.py exact): in a sharded
strategy each term of the op's computation is done on exactly one tp rank, so the local gradient
of an R input is a partial sum over the ranks.

Keys: torch functions / operator.* / builtins (call_function), Tensor method names (call_method),
and aten OpOverloadPackets (graphs from torch.export), all mapped onto the same few families.
Non-tensor arguments get the placement None; `ANY` means "taken as it is" (shape-only use, e.g.
x.size(), type_as's second argument): no conversion, and the op's sizes must be the GLOBAL ones.
"""

from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxplan.errors import UnsupportedOpError
from fxplan.passes.ir import P, R, Partial, Placement, Replicate, Shard
from fxplan._torch import OpOverload, OpOverloadPacket


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY = _Any()  # accept the input as it is (shape / dtype only use)


@dataclass(frozen=True, slots=True)
class OpStrategy:
    """Placements an op needs for node.all_input_nodes (None: not a tensor) and the one it gives.

    For tuple-valued ops (split, native_layer_norm, ...) `out` is the placement of every element.
    """

    args: tuple
    out: Placement
    tag: str = ""  # short text for labels: "col", "row", "batch", "heads", ...
    compute: bool = True  # False for shape-only ops (size, getattr shape): never "sharded compute"

    @property
    def sharded(self) -> bool:
        """Sharded compute: some input or the output is S or P (the f rule applies to R inputs)."""
        if not self.compute:
            return False
        return not isinstance(self.out, Replicate) or any(
            isinstance(a, (Shard, Partial)) for a in self.args)


# ---------------------------------------------------------------- helpers on nodes


def val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def is_tensor(n) -> bool:
    return isinstance(val(n), torch.Tensor)


def is_tensor_like(n) -> bool:
    v = val(n)
    return isinstance(v, torch.Tensor) or (isinstance(v, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in v))


def shape(n) -> tuple | None:
    v = val(n)
    return tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else None


def out_shape(node) -> tuple | None:
    v = val(node)
    if isinstance(v, torch.Tensor):
        return tuple(int(s) for s in v.shape)
    if isinstance(v, (tuple, list)) and v and isinstance(v[0], torch.Tensor):
        return tuple(int(s) for s in v[0].shape)
    return None


def _norm(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _arg(node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def make(node, assign, out, tag="", compute=True) -> OpStrategy | None:
    """OpStrategy from (input node, placement) pairs; other tensor inputs R, non-tensors None.

    None when one input would need two different placements (x used twice, e.g. x * x).
    """
    want: dict = {}
    for n, p in assign:
        if not isinstance(n, fx.Node):
            continue
        if n in want and want[n] != p:
            return None
        want[n] = p
    args = []
    for n in node.all_input_nodes:
        if n in want:
            args.append(want[n])
        elif is_tensor_like(n):
            args.append(R)
        else:
            args.append(None)
    return OpStrategy(tuple(args), out, tag, compute)


def _shardable(size: int, tp: int) -> bool:
    return size >= tp and size % tp == 0


# ---------------------------------------------------------------- families


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
        if not _shardable(o[d], tp):
            continue
        assign = []
        for a in ops:
            s = shape(a)
            da = d - (len(o) - len(s))
            assign.append((a, R if da < 0 or s[da] == 1 else Shard(da)))
        res.append(make(node, assign, Shard(d), "ew"))
    scalars = [a for a in node.args if not isinstance(a, fx.Node) and isinstance(a, (int, float, bool))]
    if partial == "add" and not scalars and len(ops) >= 1:
        res.append(make(node, [(a, P) for a in ops], P, "ew"))
    elif partial in ("mul", "unary"):
        for i, a in enumerate(ops):
            res.append(make(node, [(b, P if j == i else R) for j, b in enumerate(ops)], P, "ew"))
    elif partial == "div" and ops and node.args and node.args[0] is ops[0]:
        res.append(make(node, [(b, P if j == 0 else R) for j, b in enumerate(ops)], P, "ew"))
    return res


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
    """Input dim -> output dim a shard survives a reshape on: the input dim must be the outermost
    non-1 dim of its merged/split group, and both it and the matching output dim divide by tp."""
    mapping = {}
    for gi, gj in reshape_groups(src, dst):
        ii = [d for d in gi if src[d] != 1]
        jj = [d for d in gj if dst[d] != 1]
        if ii and jj and _shardable(src[ii[0]], tp) and _shardable(dst[jj[0]], tp):
            mapping[ii[0]] = jj[0]
    return mapping


def reshape_like(node, tp):
    x = node.args[0]
    s, o = shape(x), out_shape(node)
    if s is None or o is None:
        return []
    res = [make(node, [(x, Shard(a))], Shard(b), "view") for a, b in reshape_map(s, o, tp).items()]
    res.append(make(node, [(x, P)], P, "view"))
    return res


def _perm_of(node, rank):
    name = _name(node)
    args = node.args[1:]
    if name in ("t", "numpy_T") or (name == "mT" and rank >= 2):
        perm = list(range(rank))
        if rank >= 2:
            perm[-1], perm[-2] = perm[-2], perm[-1]
        return perm
    if name in ("transpose", "swapaxes", "swapdims", "transpose_"):
        a, b = _norm(args[0], rank), _norm(args[1], rank)
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    if name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        dims = dims or node.kwargs.get("dims")
        return [_norm(d, rank) for d in dims]
    if name in ("movedim", "moveaxis"):
        src, dst = args[0], args[1]
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src, dst = [_norm(d, rank) for d in src], [_norm(d, rank) for d in dst]
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
    if s is None:
        return []
    perm = _perm_of(node, len(s))
    if perm is None:
        return []
    res = [make(node, [(x, Shard(src))], Shard(dst), "perm") for dst, src in enumerate(perm) if _shardable(s[src], tp)]
    res.append(make(node, [(x, P)], P, "perm"))
    return res


def expand_like(node, tp):
    x = node.args[0]
    s, o = shape(x), out_shape(node)
    if s is None or o is None:
        return []
    off = len(o) - len(s)
    res = [make(node, [(x, Shard(d))], Shard(d + off), "expand")
           for d in range(len(s)) if s[d] == o[d + off] and _shardable(s[d], tp)]
    res.append(make(node, [(x, P)], P, "expand"))
    return res


def _dim_arg(node, i, default=0):
    d = _arg(node, i, "dim", default)
    return d


def cat_like(node, tp):
    tensors = _arg(node, 0, "tensors")
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) and is_tensor(t) for t in tensors):
        return []
    o = out_shape(node)
    stack = _name(node) == "stack"
    dim = _norm(_dim_arg(node, 1), len(o))
    res = []
    for d in range(len(o)):
        if d == dim or not _shardable(o[d], tp):
            continue
        di = d if not stack or d < dim else d - 1
        res.append(make(node, [(t, Shard(di)) for t in tensors], Shard(d), "cat"))
    res.append(make(node, [(t, P) for t in tensors], P, "cat"))
    return res


def split_like(node, tp):
    x = node.args[0]
    s = shape(x)
    if s is None:
        return []
    name = _name(node)
    dim = _norm(_arg(node, 1, "dim", 0) if name == "unbind" else _arg(node, 2, "dim", 0), len(s))
    res = []
    for d in range(len(s)):
        if d == dim or not _shardable(s[d], tp):
            continue
        res.append(make(node, [(x, Shard(d))], Shard(d - 1 if name == "unbind" and d > dim else d), "split"))
    res.append(make(node, [(x, P)], P, "split"))
    return res


def repeat_interleave_rule(node, tp):
    """repeat_interleave(x, repeats: int, dim): every slice is repeated in place, so a shard on `dim`
    itself survives too (rank i's kv heads give exactly rank i's repeated heads, as in GQA)."""
    x = node.args[0]
    s, o = shape(x), out_shape(node)
    dim = _arg(node, 2, "dim")
    if s is None or dim is None or isinstance(_arg(node, 1, "repeats"), fx.Node):
        return []
    dim = _norm(dim, len(s))
    res = [make(node, [(x, Shard(d))], Shard(d), "repeat") for d in range(len(s)) if _shardable(s[d], tp)
           and _shardable(o[d], tp)]
    res.append(make(node, [(x, P)], P, "repeat"))
    return res


def narrow_like(node, tp):
    x = node.args[0]
    s = shape(x)
    dim = _norm(_arg(node, 1, "dim", 0), len(s))
    res = [make(node, [(x, Shard(d))], Shard(d), "narrow") for d in range(len(s)) if d != dim and _shardable(s[d], tp)]
    res.append(make(node, [(x, P)], P, "narrow"))
    return res


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
    res = [make(node, [(x, Shard(a))], Shard(b), "index") for a, b in mapping.items() if _shardable(s[a], tp)]
    res.append(make(node, [(x, P)], P, "index"))
    return res


def _dims(spec, rank):
    if spec is None:
        return list(range(rank))
    if isinstance(spec, int):
        return [_norm(spec, rank)]
    return [_norm(d, rank) for d in spec]


def reduce_like(node, tp, kind):
    """sum / mean / amax ...: shards of kept dims survive; `sum` over a sharded dim gives P."""
    x = node.args[0]
    s = shape(x)
    if s is None:
        return []
    dims = _dims(_arg(node, 1, "dim", None), len(s))
    keep = _arg(node, 2, "keepdim", False)
    res = []
    for d in range(len(s)):
        if not _shardable(s[d], tp):
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
    dim = _norm(_arg(node, 1, "dim", -1), len(s))
    return [make(node, [(x, Shard(d))], Shard(d), "softmax") for d in range(len(s)) if d != dim and _shardable(s[d], tp)]


def norm_like(node, tp, n_norm_dims=None, weight_args=(2, 3)):
    """layer_norm / rms_norm: the normalized (last) dims must not be sharded."""
    x = node.args[0]
    s = shape(x)
    if n_norm_dims is None:
        ns = _arg(node, 1, "normalized_shape")
        n_norm_dims = len(ns) if isinstance(ns, (list, tuple)) else 1
    return [make(node, [(x, Shard(d))], Shard(d), "norm") for d in range(len(s) - n_norm_dims) if _shardable(s[d], tp)]


def tril_like(node, tp):
    x = node.args[0]
    s = shape(x)
    return [make(node, [(x, Shard(d))], Shard(d), "tril") for d in range(len(s) - 2) if _shardable(s[d], tp)]


def linear_rule(node, tp):
    """F.linear(x, w[N, K], b[N]): rows of x -> S(row); w S(0) -> out S(-1) ("col");
    x S(-1), w S(1) -> P ("row", the bias becomes P: added once); x P, w R -> P."""
    x, w = node.args[0], _arg(node, 1, "weight")
    b = _arg(node, 2, "bias")
    b = b if isinstance(b, fx.Node) else None
    sx, sw, o = shape(x), shape(w), out_shape(node)
    if sx is None or sw is None or len(sw) != 2:
        return []
    r = len(o)
    res = []
    for d in range(r - 1):
        if _shardable(sx[d], tp):
            res.append(make(node, [(x, Shard(d)), (w, R), (b, R)], Shard(d), "batch"))
    if _shardable(sw[0], tp):
        res.append(make(node, [(x, R), (w, Shard(0)), (b, Shard(0))], Shard(r - 1), "col"))
    if _shardable(sw[1], tp):
        res.append(make(node, [(x, Shard(len(sx) - 1)), (w, Shard(1)), (b, P)], P, "row"))
    res.append(make(node, [(x, P), (w, R), (b, P)], P, "lin-P"))
    return res


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
        if not _shardable(o[d], tp):
            continue
        pa = _aligned(sa, r, d)
        pb = _aligned(sb, r, d)
        res.append(make(node, [(a, pa), (b, pb)] + bias_for(d), Shard(d), "batch"))
    if _shardable(sa[-2], tp):
        res.append(make(node, [(a, Shard(len(sa) - 2)), (b, R)] + bias_for(r - 2), Shard(r - 2), "rows"))
    if _shardable(sb[-1], tp):
        res.append(make(node, [(a, R), (b, Shard(len(sb) - 1))] + bias_for(r - 1), Shard(r - 1), "col"))
    if _shardable(sa[-1], tp):
        extra = [(bias, P)] if bias is not None else []
        res.append(make(node, [(a, Shard(len(sa) - 1)), (b, Shard(len(sb) - 2))] + extra, P, "row"))
    extra = [(bias, P)] if bias is not None else []
    res.append(make(node, [(a, P), (b, R)] + extra, P, "mm-P"))
    res.append(make(node, [(a, R), (b, P)] + extra, P, "mm-P"))
    return res


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
    mask = _arg(node, 3, "attn_mask")
    mask = mask if isinstance(mask, fx.Node) else None
    sq, sk = shape(q), shape(k)
    o = out_shape(node)
    if sq is None or len(sq) != 4:
        return []
    res = []
    for d in (0, 1):
        if _shardable(sq[d], tp) and _shardable(sk[d], tp):
            extra = [(mask, _aligned(shape(mask), 4, d))] if mask is not None else []
            res.append(make(node, [(q, Shard(d)), (k, Shard(d)), (v, Shard(d))] + extra, Shard(d),
                            "heads" if d == 1 else "batch"))
    if _shardable(sq[2], tp):
        extra = [(mask, _aligned(shape(mask), 4, 2))] if mask is not None else []
        res.append(make(node, [(q, Shard(2)), (k, R), (v, R)] + extra, Shard(2), "seq"))
    return res


def embedding_rule(node, tp, aten=False):
    """Table [V, E] sharded on E -> output S(-1); ids sharded on a dim -> output S(dim).
    (Vocab-parallel needs masking in codegen: not offered.)"""
    ids, w = (node.args[1], node.args[0]) if aten else (node.args[0], _arg(node, 1, "weight"))
    si, sw = shape(ids), shape(w)
    if si is None or sw is None:
        return []
    res = [make(node, [(ids, Shard(d)), (w, R)], Shard(d), "batch") for d in range(len(si)) if _shardable(si[d], tp)]
    if _shardable(sw[1], tp):
        res.append(make(node, [(ids, R), (w, Shard(1))], Shard(len(si)), "emb"))
    return res


def shape_only(node, tp):
    """size(), dim(), getattr(x, "shape"), ...: read GLOBAL metadata, no compute, no comm."""
    args = tuple(ANY if is_tensor_like(n) else None for n in node.all_input_nodes)
    return [OpStrategy(args, R, "meta", compute=False)]


def like_rule(node, tp):
    """zeros_like / ones_like / empty_like / full_like: same placement as the input (not P)."""
    x = node.args[0]
    s = shape(x)
    return [make(node, [(x, Shard(d))], Shard(d), "like") for d in range(len(s)) if _shardable(s[d], tp)]


def type_as_rule(node, tp):
    x, y = node.args[0], node.args[1]
    res = elementwise_unary(node, tp, x, partial=True)
    return [OpStrategy(tuple(ANY if n is y and n is not x else a for n, a in zip(node.all_input_nodes, st.args)),
                       st.out, st.tag) for st in res] + [
        OpStrategy(tuple(ANY if n is y and n is not x else R for n in node.all_input_nodes), R, "ew")]


def elementwise_unary(node, tp, x, partial):
    s = shape(x)
    res = [make(node, [(x, Shard(d))], Shard(d), "ew") for d in range(len(s)) if _shardable(s[d], tp)]
    if partial:
        res.append(make(node, [(x, P)], P, "ew"))
    return res


# ---------------------------------------------------------------- registry


def _name(node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, OpOverload):
        return t.overloadpacket.__name__
    if isinstance(t, OpOverloadPacket):
        return t.__name__
    return getattr(t, "__name__", str(t))


_UNARY_P = {"dropout", "contiguous", "clone", "to", "float", "half", "bfloat16", "double", "type", "neg",
            "detach", "alias", "_to_copy", "native_dropout", "dropout_", "feature_dropout", "alpha_dropout"}
_UNARY = {"gelu", "silu", "relu", "tanh", "sigmoid", "exp", "log", "rsqrt", "sqrt", "pow", "abs", "sin", "cos",
          "softplus", "leaky_relu", "elu", "erf", "square", "reciprocal", "relu_", "gelu_", "silu_", "mish",
          "hardtanh", "log1p", "expm1", "sign", "clamp", "clamp_min", "clamp_max", "logical_not", "bitwise_not",
          "isnan", "isinf", "exp2", "sgn", "floor", "ceil", "round", "trunc", "masked_fill", "where",
          "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "maximum", "minimum", "fill",
          "masked_fill_", "pow_", "float_power", "lerp", "nan_to_num", "_softmax_backward_data", "glu"}
_ADD = {"add", "sub", "iadd", "isub", "add_", "sub_", "rsub"}
_MUL = {"mul", "imul", "mul_", "multiply"}
_DIV = {"truediv", "div", "itruediv", "div_", "divide", "floordiv"}
_RESHAPE = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
            "_unsafe_view", "squeeze_", "unsqueeze_", "ravel"}
_PERMUTE = {"transpose", "permute", "t", "swapaxes", "swapdims", "movedim", "moveaxis", "mT", "numpy_T"}
_SHAPE = {"size", "dim", "getattr", "numel", "sym_size", "stride", "ndimension", "get_device", "is_floating_point"}
_FACTORY = {"arange", "ones", "zeros", "full", "empty", "tensor", "rand", "randn", "eye", "linspace", "scalar_tensor",
            "empty_strided", "as_tensor", "scalar_tensor", "randint"}
_LIKE = {"zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_ones", "new_full", "new_empty"}
_REDUCE = {"sum": "sum", "mean": "mean", "amax": "max", "amin": "max", "var": "mean", "std": "mean",
           "logsumexp": "max", "norm": "max", "prod": "max", "all": "max", "any": "max"}
# ops that cannot be run replicated either: raise UnsupportedOpError naming them
_NEVER = {"all_reduce", "all_gather", "broadcast", "reduce_scatter", "all_gather_into_tensor",
          "reduce_scatter_tensor", "send", "recv", "barrier", "wait_tensor"}


def _family(node, current) -> Callable | None:
    n = _name(node)
    if n in _SHAPE or (node.op == "call_function" and node.target is builtins.getattr):
        return shape_only
    if n == "getitem":
        return lambda node, tp: getitem_rule(node, tp, current)
    if n in _ADD:
        return lambda node, tp: elementwise(node, tp, "add")
    if n in _MUL:
        return lambda node, tp: elementwise(node, tp, "mul")
    if n in _DIV:
        return lambda node, tp: elementwise(node, tp, "div")
    if n in _UNARY_P:
        return lambda node, tp: elementwise(node, tp, "unary")
    if n in _UNARY:
        return lambda node, tp: elementwise(node, tp, "none")
    if n in _RESHAPE:
        return reshape_like
    if n in _PERMUTE:
        return permute_like
    if n in ("expand", "expand_as", "broadcast_to"):
        return expand_like
    if n in ("cat", "concat", "concatenate", "stack"):
        return cat_like
    if n in ("split", "chunk", "unbind", "split_with_sizes", "tensor_split"):
        return split_like
    if n == "repeat_interleave":
        return repeat_interleave_rule
    if n in ("narrow", "slice"):
        return narrow_like
    if n == "linear":
        return linear_rule
    if n in ("matmul", "mm", "bmm"):
        return matmul_rule
    if n == "addmm":
        return lambda node, tp: matmul_rule(node, tp, bias=node.args[0] if isinstance(node.args[0], fx.Node) else None)
    if n in ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        return sdpa_rule
    if n == "embedding":
        return lambda node, tp: embedding_rule(node, tp, aten=isinstance(node.target, OpOverload))
    if n in ("layer_norm", "native_layer_norm"):
        return norm_like
    if n in ("rms_norm", "_fused_rms_norm"):
        return norm_like
    if n in ("softmax", "log_softmax", "_softmax", "_log_softmax", "cumsum"):
        return softmax_like
    if n in _REDUCE:
        kind = _REDUCE[n]
        return lambda node, tp: reduce_like(node, tp, kind)
    if n in ("tril", "triu"):
        return tril_like
    if n in _LIKE:
        return like_rule
    if n == "type_as":
        return type_as_rule
    if n in _FACTORY:
        return lambda node, tp: []
    return None


def strategies(node: fx.Node, tp: int, current=lambda n: None) -> list[OpStrategy]:
    """Every admissible strategy of `node` at degree `tp`; the replicated one last.

    `current(n)` gives the placement an input already has (used by ops on tuple elements).
    Unknown ops get only the replicated strategy; ops that cannot run replicated raise.
    """
    name = _name(node)
    if name in _NEVER:
        raise UnsupportedOpError(
            f"op {name!r} (node {node.name}) is a collective already in the graph: fxplan inserts its own "
            f"collectives; remove it from the model's forward")
    rule = _family(node, current)
    res = [s for s in (rule(node, tp) if rule is not None else []) if s is not None]
    # P only for floating values: integer ids / masks are never sums of addends
    floats = {n for n in node.all_input_nodes if _is_float(n)}
    res = [s for s in res if not _has_partial(s, node, floats)]
    if rule is shape_only or name == "getitem" and not is_tensor(node.args[0]):
        return res
    # replicated compute: every tensor input R (shape-only inputs as they are), output R
    rep = []
    for n in node.all_input_nodes:
        rep.append(R if is_tensor_like(n) else None)
    res.append(OpStrategy(tuple(rep), R, "rep"))
    return res


def _is_float(n) -> bool:
    v = val(n)
    if isinstance(v, (tuple, list)):
        v = next((x for x in v if isinstance(x, torch.Tensor)), None)
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def _has_partial(s: OpStrategy, node, floats) -> bool:
    if isinstance(s.out, Partial) and not _is_float(node):
        return True
    return any(isinstance(p, Partial) and n not in floats for n, p in zip(node.all_input_nodes, s.args))
