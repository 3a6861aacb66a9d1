"""Per-op sharding rules on the tp axis: which (input placements -> output placement) an op admits.

This module maps an op to its rule family (rules_shape.py: data movement; rules_compute.py:
arithmetic; the strategy value and node helpers in op_strategy.py) and adds the replicated strategy.

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
from typing import Callable

import torch
import torch.fx as fx

from fxplan.errors import UnsupportedOpError
from fxplan.passes.ir import R, Partial, Shard, op_name
from fxplan.passes.sharding.op_strategy import OpStrategy, is_tensor, is_tensor_like, out_shape, shape, val
from fxplan.passes.sharding.rules_compute import (conv_rule, elementwise, embedding_rule, linear_rule, matmul_rule, norm_like,
                                                  reduce_like, sdpa_rule, softmax_like, type_as_rule)
from fxplan.passes.sharding.rules_einsum import einsum_rule
from fxplan.passes.sharding.rules_vocab import cross_entropy_rule
from fxplan.passes.sharding.rules_shape import (cat_like, expand_like, getitem_rule, like_rule, narrow_like,
                                                permute_like, repeat_interleave_rule, reshape_like, shape_only,
                                                split_like, tril_like)
from fxplan._torch import OpOverload

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


def is_permute(node) -> bool:
    """An op that only reorders dims: transpose / permute / t / ..., and `w.T` / `x.mT` as fx traces
    them (getattr(w, "T"): a tensor-valued attribute, not metadata; layers that write
    `x @ self.weight.T` instead of F.linear)."""
    if node.op == "call_function" and node.target is builtins.getattr:
        return len(node.args) > 1 and node.args[1] in ("T", "mT") and is_tensor(node)
    return op_name(node) in _PERMUTE


def _family(node, current) -> Callable | None:
    n = op_name(node)
    if is_permute(node):
        return permute_like
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
        return lambda node, tp: reshape_like(node, tp, current)
    if n in ("expand", "expand_as", "broadcast_to"):
        return expand_like
    if n in ("cat", "concat", "concatenate", "stack"):
        return cat_like
    if n in ("split", "chunk", "unbind", "split_with_sizes", "tensor_split"):
        return lambda node, tp: split_like(node, tp, current)
    if n == "repeat_interleave":
        return repeat_interleave_rule
    if n in ("narrow", "slice"):
        return narrow_like
    if n == "linear":
        return linear_rule
    if n == "einsum":
        return einsum_rule
    if n in ("conv1d", "conv2d", "conv3d", "convolution"):
        return lambda node, tp: conv_rule(node, tp, aten=n == "convolution")
    if n in ("matmul", "mm", "bmm"):
        return matmul_rule
    if n == "addmm":
        return lambda node, tp: matmul_rule(node, tp, bias=node.args[0] if isinstance(node.args[0], fx.Node) else None)
    if n in ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        return sdpa_rule
    if n == "embedding":
        return lambda node, tp: embedding_rule(node, tp, aten=isinstance(node.target, OpOverload))
    if n in ("cross_entropy", "cross_entropy_loss"):
        return cross_entropy_rule
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
    if n in _FACTORY or n == "pick_denominator":  # (the split ratio loss's scalar divisor: whole everywhere)
        return lambda node, tp: []
    return None


def has_rule(node: fx.Node) -> bool:
    """Whether fxplan knows how `node`'s op can be sharded (else it only ever runs replicated)."""
    return _family(node, lambda n: None) is not None


def strategies(node: fx.Node, tp: int, current=lambda n: None) -> list[OpStrategy]:
    """Every admissible strategy of `node` at degree `tp`; the replicated one last.

    `current(n)` gives the placement an input already has (used by ops on tuple elements).
    Unknown ops get only the replicated strategy; ops that cannot run replicated raise.
    """
    name = op_name(node)
    if name in _NEVER:
        raise UnsupportedOpError(
            f"op {name!r} (node {node.name}) is a collective already in the graph: fxplan inserts its own "
            f"collectives; remove it from the model's forward")
    rule = _family(node, current)
    res = [s for s in (rule(node, tp) if rule is not None else []) if s is not None]
    if name not in _RESHAPE:
        res += blocked_variants(node, res, current, tp)
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


def blocked_variants(node, res, current, tp) -> list[OpStrategy]:
    """The strategies of `res` that carry a sharded dim through unchanged (same size in and out, so
    element i of the dim stays element i), redone on the blocked shards (Shard.blocks) its inputs
    already have: a blocked shard passes such ops (bmm over the batch, softmax, transpose, scale)
    without being gathered. Parameters are never blocked (they are stored plain)."""
    ks = {p.blocks for p in map(current, node.all_input_nodes) if isinstance(p, Shard) and p.blocks > 1}
    o = out_shape(node)
    out = []
    for s in res if ks and o is not None else ():
        if not isinstance(s.out, Shard) or s.out.blocks != 1:
            continue
        for k in ks:
            args = []
            for a, need in zip(node.all_input_nodes, s.args):
                if isinstance(need, Partial) or isinstance(need, Shard) and (
                        a.op == "get_attr" or need.blocks != 1 or shape(a)[need.dim] != o[s.out.dim]):
                    break
                args.append(Shard(need.dim, k) if isinstance(need, Shard) else need)
            else:
                if o[s.out.dim] % (k * tp) == 0:
                    out.append(OpStrategy(tuple(args), Shard(s.out.dim, k), s.tag, s.compute))
    return out


def _is_float(n) -> bool:
    v = val(n)
    if isinstance(v, (tuple, list)):
        v = next((x for x in v if isinstance(x, torch.Tensor)), None)
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def _has_partial(s: OpStrategy, node, floats) -> bool:
    if isinstance(s.out, Partial) and not _is_float(node):
        return True
    return any(isinstance(p, Partial) and n not in floats for n, p in zip(node.all_input_nodes, s.args))
