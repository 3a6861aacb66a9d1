"""Static local shapes: rewrite the shape arguments of view/reshape/expand/new_*/factory ops.

A rank computes on its local piece: the batch dim cut by microbatches * dp, a tp-sharded dim cut by
tp. Shape arguments in a traced graph are either run-time sizes (`x.size(0)`, symbolic_trace) or
trace-time constants (export); both can be wrong locally (`C // n_head` with a sharded C, a
constant global batch). Replacing them with the node's local shape, computed from its TensorMeta
and placement, makes both kinds of graph uniform and correct.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxplan.errors import UnsupportedOpError
from fxplan.passes.ir import Shard, op_name
from fxplan._torch import is_aten_op

_FACTORIES = {"zeros", "ones", "empty", "full", "rand", "randn", "arange"}
_SPLITS = {"split", "split_with_sizes"}


def local_shape(meta, placement, tp: int, rows_div: int) -> tuple[int, ...]:
    """Global TensorMeta shape -> this rank's shape (rows / rows_div, sharded dim / tp)."""
    shape = list(meta.shape)
    if meta.batch_dim is not None and rows_div > 1:
        bd = meta.batch_dim
        if shape[bd] % rows_div:
            raise UnsupportedOpError(f"dim {bd} of a tensor of shape {tuple(meta.shape)} does not divide into "
                                     f"{rows_div} row blocks; choose a batch divisible by microbatches * dp")
        shape[bd] //= rows_div
    if isinstance(placement, Shard) and tp > 1:
        d = placement.dim
        if shape[d] % tp:
            raise UnsupportedOpError(f"dim {d} of shape {tuple(meta.shape)} does not divide by tp={tp}")
        shape[d] //= tp
    return tuple(shape)


def rewrite_shape_args(node: fx.Node, shape: tuple[int, ...], global_shape: tuple[int, ...]):
    """New (args, kwargs) of `node` with its shape arguments set to `shape` (None: nothing to do)."""
    name = op_name(node)
    args, kwargs = list(node.args), dict(node.kwargs)
    shape = tuple(int(s) for s in shape)
    is_aten = is_aten_op(node.target)
    if name in ("view", "reshape", "_unsafe_view", "expand"):
        if node.op == "call_method":  # x.view(*sizes) or x.view(sizes)
            return (args[0], shape), kwargs
        if is_aten:  # aten.view(x, size[, implicit])
            return (args[0], shape, *args[2:]), kwargs
        if name == "reshape":  # torch.reshape(x, shape)
            kwargs.pop("shape", None)
            return (args[0], shape), kwargs
        return None
    if name in ("new_zeros", "new_ones", "new_empty", "new_full"):
        kwargs.pop("size", None)
        return (args[0], shape, *args[2:]), kwargs
    if name in _FACTORIES and node.op == "call_function":
        if shape == tuple(global_shape):
            return None
        if name == "arange":
            if len(args) == 1 and not kwargs.get("start"):
                return (shape[0],), kwargs
            raise UnsupportedOpError(f"{node.format_node()}: arange with a sharded or batch-sized length; "
                                     f"write it as torch.arange(n)")
        kwargs.pop("size", None)
        if name == "full":
            fill = args[1] if len(args) > 1 else kwargs.pop("fill_value")
            return (shape, fill), kwargs
        if is_aten:
            return (shape, *args[1:]), kwargs
        return (shape,), kwargs
    return None


def rewrite_split_args(node: fx.Node, ratio: int):
    """split(sizes, dim) on a dim cut `ratio` times locally: divide the sizes."""
    if ratio == 1:
        return None
    args, kwargs = list(node.args), dict(node.kwargs)
    key = "split_size" if "split_size" in kwargs else ("split_size_or_sections" if "split_size_or_sections" in kwargs
                                                      else ("split_sizes" if "split_sizes" in kwargs else None))
    sizes = kwargs[key] if key else args[1]

    def cut(s):
        if s % ratio:
            raise UnsupportedOpError(f"{node.format_node()}: split size {s} does not divide by {ratio}")
        return s // ratio

    new = cut(sizes) if isinstance(sizes, int) else [cut(s) for s in sizes]
    if key:
        kwargs[key] = new
    else:
        args[1] = new
    return tuple(args), kwargs


_CONVS = {"conv1d": 6, "conv2d": 6, "conv3d": 6, "convolution": 8}


def rewrite_conv_groups(node: fx.Node, x_placement, tp: int):
    """A grouped conv whose input arrives channel-split (x S(1)) holds groups / tp whole groups on
    each rank: the local call's `groups` is divided (None: nothing to do)."""
    index = _CONVS.get(op_name(node))
    if index is None or tp == 1 or not (isinstance(x_placement, Shard) and x_placement.dim == 1):
        return None
    args, kwargs = list(node.args), dict(node.kwargs)
    groups = args[index] if len(args) > index else kwargs.get("groups", 1)
    if not isinstance(groups, int) or groups == 1:
        return None
    if groups % tp:
        raise UnsupportedOpError(f"{node.format_node()}: {groups} groups do not divide by tp={tp}")
    if len(args) > index:
        args[index] = groups // tp
    else:
        kwargs["groups"] = groups // tp
    return tuple(args), kwargs


def split_dim(node: fx.Node) -> int:
    if "dim" in node.kwargs:
        return node.kwargs["dim"]
    return node.args[2] if len(node.args) > 2 else 0


def is_split(node: fx.Node) -> bool:
    return op_name(node) in _SPLITS


def is_size_query(node: fx.Node) -> bool:
    """Nodes computing Python sizes (dead once shapes are static): x.size(), x.shape, x.dim(), getitem/math on ints."""
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1 and node.args[1] in ("shape", "ndim"):
        return True
    if node.op == "call_function" and node.target in (operator.getitem, operator.floordiv, operator.mul,
                                                       operator.add, operator.sub, operator.truediv):
        val = node.meta.get("val")
        return isinstance(val, (int, tuple, torch.Size)) and not isinstance(val, torch.Tensor)
    return False
