"""Forward FLOPs and saved-activation bytes of one traced node, from the shapes in node.meta["val"].

Works on both graphs trace() produces: torch-level callables and methods (fx path: F.linear,
torch.matmul, operator.add, "view", ...) and aten OpOverloads (export path: aten.linear.default,
aten.addmm.default, aten.scaled_dot_product_attention.default, ...). Both are reduced to one op name
(`passes.ir.out_of_place_name`) and looked up in the tables below. Numbers are for the whole example (global) batch.

FLOP model (forward only; a multiply-add counts 2):
- matmuls: linear / matmul / mm / bmm / addmm / baddbmm / einsum: 2*m*n*k (+ m*n for a bias);
  convolutions: 2 * out elements * in_channels/groups * kernel elements.
- attention (SDPA and its aten variants): 4*B*H*Tq*Tk*D (QK^T and PV), halved when causal.
- norms ~5 FLOPs per element (RMSNorm 4), softmax ~5, cross entropy ~5 per logit, transcendental
  activations (gelu, silu, tanh, exp, ...) ~4, other float elementwise ops and reductions 1 per
  element (of the output; reductions of the input).
- data movement is free: views, reshapes, transposes, copies, cat/split, indexing, embedding
  lookups, dtype casts, tensor creation, shape arithmetic; get_attr/placeholder/output are 0.
- leaf modules (call_module): 2 * params * rows of the output, or 1 per output element.

Saved-activation model (what autograd keeps for backward, as in eager PyTorch):
- matmuls/convs: their activation inputs (not parameters); norms: their input (+ 8 bytes of
  mean/rstd per row); softmax/log_softmax and relu/sigmoid/tanh/exp/rsqrt/sqrt: their output;
  gelu/silu/erf/pow/log/sin/cos/...: their input; mul/div: their tensor operands;
  SDPA: q, k, v, output and the float32 log-sum-exp (B*H*Tq); dropout: a 1-byte mask per element
  (only when active); cross entropy: its log-softmax (logit-sized) + target; embedding: indices.
- only tensors that carry the batch (`node.meta["fxplan_batch_dim"]` not None) count: parameters,
  weights derived from them (e.g. aten.t(weight)) and batch-independent masks are not activations.
- add/sub, views, copies, reductions and everything else save nothing.
`node_saved` returns the saved nodes by identity so a layer can count a tensor saved by several
consumers once (coarsen does).
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from fxplan.passes.ir import out_of_place_name
from fxplan._torch import OpOverload, op_argument_names

MATMUL = {"linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "addbmm", "einsum", "addmv", "mv", "dot"}
CONV = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution"}
ATTENTION = {
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_cudnn_attention",
}
FREE = {
    # views and layout
    "view", "reshape", "_unsafe_view", "view_as", "reshape_as", "transpose", "permute", "t", "contiguous",
    "expand", "expand_as", "unsqueeze", "squeeze", "flatten", "unflatten", "split", "split_with_sizes",
    "chunk", "unbind", "getitem", "slice", "select", "narrow", "as_strided", "alias", "movedim", "swapaxes",
    # sizes and metadata
    "size", "sym_size", "sym_numel", "sym_stride", "dim", "numel", "getattr", "stride",
    # copies, casts, creation, indexing
    "to", "_to_copy", "type", "float", "half", "bfloat16", "double", "long", "int", "bool", "type_as",
    "detach", "clone", "lift_fresh_copy", "cat", "concat", "stack", "repeat", "repeat_interleave", "roll",
    "pad", "constant_pad_nd", "arange", "zeros", "ones", "full", "empty", "new_zeros", "new_ones",
    "new_empty", "new_full", "zeros_like", "ones_like", "empty_like", "full_like", "rand", "randn",
    "tril", "triu", "embedding", "index_select", "gather", "index", "scalar_tensor", "tensor",
}
NORM5 = {"layer_norm", "native_layer_norm", "batch_norm", "native_batch_norm", "_native_batch_norm_legit",
         "_native_batch_norm_legit_no_training", "group_norm", "native_group_norm", "instance_norm"}
NORM4 = {"rms_norm", "_fused_rms_norm"}
SOFTMAX = {"softmax", "_softmax", "log_softmax", "_log_softmax", "safe_softmax", "_safe_softmax"}
LOSS = {"cross_entropy", "cross_entropy_loss", "nll_loss", "nll_loss_forward", "nll_loss2d"}
TRANSCENDENTAL = {"gelu", "silu", "tanh", "sigmoid", "exp", "log", "erf", "softplus", "mish", "elu", "sin",
                  "cos", "rsqrt", "sqrt", "reciprocal", "pow", "log1p", "expm1", "selu", "celu", "hardswish",
                  "logsigmoid", "log_sigmoid_forward"}
REDUCE = {"sum", "mean", "var", "std", "amax", "amin", "max", "min", "norm", "prod", "logsumexp", "var_mean"}

SAVES_OUTPUT = {"relu", "sigmoid", "tanh", "exp", "rsqrt", "sqrt", "reciprocal"} | SOFTMAX
SAVES_INPUT = {"gelu", "silu", "erf", "pow", "log", "sin", "cos", "softplus", "mish", "elu", "log1p",
               "expm1", "selu", "celu", "hardswish", "logsigmoid", "leaky_relu", "abs"}
SAVES_OPERANDS = {"mul", "div", "truediv", "true_divide", "matmul_", "maximum", "minimum"}

# ---------------------------------------------------------------- helpers on meta values


def _val(x):
    return x.meta.get("val") if isinstance(x, fx.Node) else x


def _tensor(x) -> torch.Tensor | None:
    v = _val(x)
    return v if isinstance(v, torch.Tensor) else None


def _nbytes(t: torch.Tensor | None) -> int:
    return int(t.numel()) * t.element_size() if t is not None else 0


def _out(node: fx.Node) -> torch.Tensor | None:
    v = node.meta.get("val")
    if isinstance(v, (tuple, list)):
        v = v[0] if v and isinstance(v[0], torch.Tensor) else None
    return v if isinstance(v, torch.Tensor) else None


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]


def _arg(node: fx.Node, index: int, name: str, default=None):
    """Argument `name` of a call: by keyword, else by position (an aten op's schema gives the position;
    `index` is the position in the torch-level function)."""
    if name in node.kwargs:
        return node.kwargs[name]
    if isinstance(node.target, OpOverload):
        names = op_argument_names(node.target)
        if name not in names:
            return default
        index = names.index(name)
    if len(node.args) > index:
        return node.args[index]
    return default


# ---------------------------------------------------------------- FLOPs

# metadata lookups: no kernel, no autograd node
_NOT_OPS = {"size", "sym_size", "sym_numel", "sym_stride", "dim", "numel", "getattr", "stride", "getitem"}


def is_dense(node: fx.Node) -> bool:
    """A matmul, convolution or attention: priced on the matmul curve (the rest at the elementwise rate)."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return False
    name = out_of_place_name(node)
    return name in MATMUL or name in CONV or name in ATTENTION or node.op == "call_module"


def counts_as_op(node: fx.Node) -> bool:
    """A call that dispatches a kernel (or a view) and records an autograd node: each costs a fixed
    overhead in eager mode, which dominates small layers on a CPU."""
    return node.op in ("call_function", "call_method", "call_module") and out_of_place_name(node) not in _NOT_OPS



def node_flops(node: fx.Node) -> float:
    """Forward FLOPs of `node` for the whole example batch (see the module docstring)."""
    if node.op in ("placeholder", "get_attr", "output"):
        return 0.0
    name = out_of_place_name(node)
    out = _out(node)
    if name in MATMUL:
        return _matmul_flops(node, name, out)
    if name in CONV:
        return _conv_flops(node, out)
    if name in ATTENTION:
        return _attention_flops(node)
    if node.op == "call_module":
        mod = node.graph.owning_module.get_submodule(str(node.target))
        params = sum(p.numel() for p in mod.parameters())
        if out is None:
            return 0.0
        rows = math.prod(out.shape) / max(out.shape[-1], 1) if out.dim() else 1
        return float(2 * params * rows) if params else float(math.prod(out.shape))
    if name in FREE or out is None or not (out.is_floating_point() or out.is_complex()):
        return 0.0
    if name in NORM5 or name in SOFTMAX:
        return 5.0 * math.prod(out.shape)
    if name in NORM4:
        return 4.0 * math.prod(out.shape)
    if name in LOSS:
        logits = _tensor(node.args[0]) if node.args else None
        return 5.0 * math.prod(logits.shape) if logits is not None else 0.0
    if name in TRANSCENDENTAL:
        return 4.0 * math.prod(out.shape)
    if name in REDUCE:
        src = _tensor(node.args[0]) if node.args else None
        return float(math.prod(src.shape)) if src is not None else 0.0
    if name == "dropout":
        return float(math.prod(out.shape)) if _dropout_active(node) else 0.0
    return float(math.prod(out.shape))


def _matmul_flops(node: fx.Node, name: str, out) -> float:
    if out is None:
        return 0.0
    tensors = [_tensor(a) for a in _tensor_args(node)]
    if name == "einsum":
        return _einsum_flops(node)
    if name == "linear":
        x = _tensor(node.args[0])
        k = x.shape[-1] if x is not None and x.dim() else 1
        bias = _arg(node, 2, "bias")
        return 2.0 * math.prod(out.shape) * k + (math.prod(out.shape) if bias is not None else 0)
    if name in ("addmm", "baddbmm", "addbmm", "addmv"):
        a = _tensor(node.args[1])
        k = a.shape[-1] if a is not None and a.dim() else 1
        return 2.0 * math.prod(out.shape) * k + math.prod(out.shape)
    # matmul / mm / bmm / mv / dot: the contracted dim is the first operand's last dim.
    a = tensors[0] if tensors else None
    k = a.shape[-1] if a is not None and a.dim() else 1
    return 2.0 * max(math.prod(out.shape), 1) * k


def _einsum_flops(node: fx.Node) -> float:
    equation = node.args[0] if isinstance(node.args[0], str) else None
    operands = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    if equation is None:
        return 0.0
    lhs = equation.replace(" ", "").split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for letters, op in zip(lhs, operands):
        t = _tensor(op)
        if t is None or "." in letters:
            out = _out(node)
            return float(math.prod(out.shape)) if out is not None else 0.0
        for letter, size in zip(letters, t.shape):
            sizes[letter] = int(size)
    return 2.0 * math.prod(sizes.values())


def _conv_flops(node: fx.Node, out) -> float:
    weight = _tensor(node.args[1]) if len(node.args) > 1 else None
    if out is None or weight is None:
        return 0.0
    kernel = math.prod(weight.shape[2:])
    in_per_group = weight.shape[1]
    flops = 2.0 * math.prod(out.shape) * in_per_group * kernel
    bias = _arg(node, 2, "bias")
    return flops + (math.prod(out.shape) if bias is not None else 0)


def _attention_flops(node: fx.Node) -> float:
    q, k = _tensor(node.args[0]), _tensor(node.args[1])
    if q is None or k is None:
        return 0.0
    batch_heads = math.prod(q.shape[:-2])
    tq, d = q.shape[-2], q.shape[-1]
    tk = k.shape[-2]
    flops = 4.0 * batch_heads * tq * tk * d
    causal = _arg(node, 5, "is_causal", False)
    return flops / 2 if causal is True else flops


def _dropout_active(node: fx.Node) -> bool:
    p = _arg(node, 1, "p", 0.5)
    aten = isinstance(node.target, OpOverload)
    train = _arg(node, 2, "train" if aten else "training", True)
    return bool(train) and isinstance(p, (int, float)) and p > 0


# ---------------------------------------------------------------- saved activations


def _is_activation(node: fx.Node) -> bool:
    if node.op == "get_attr" or not isinstance(node.meta.get("val"), torch.Tensor):
        return False
    return node.meta.get("fxplan_batch_dim", 0) is not None


def node_saved(node: fx.Node) -> tuple[tuple[fx.Node, ...], float]:
    """(activation nodes this node keeps for backward, extra bytes of internal buffers it keeps)."""
    if node.op in ("placeholder", "get_attr", "output"):
        return (), 0.0
    name = out_of_place_name(node)
    acts = [a for a in _tensor_args(node) if _is_activation(a)]
    out = _out(node)
    self_saved = (node,) if _is_activation(node) else ()
    if name in MATMUL or name in CONV or node.op == "call_module":
        return tuple(acts), 0.0
    if name in ATTENTION:
        qkv = tuple(a for a in acts[:3])
        q = _tensor(node.args[0])
        lse = 4.0 * math.prod(q.shape[:-1]) if q is not None else 0.0
        # Tuple-valued aten variants: the output is not a node of its own here.
        out_bytes = 0.0 if self_saved else float(_nbytes(out))
        return qkv + self_saved, lse + out_bytes
    if name in NORM5 or name in NORM4:
        src = acts[:1]
        rows = math.prod(out.shape) / out.shape[-1] if out is not None and out.dim() else 0
        return tuple(src), 8.0 * rows
    if name in SAVES_OUTPUT:
        return self_saved, (0.0 if self_saved or not acts else float(_nbytes(out)))
    if name in SAVES_INPUT:
        return tuple(acts[:1]), 0.0
    if name in SAVES_OPERANDS:
        return tuple(acts), 0.0
    if name == "dropout":
        return (), float(math.prod(out.shape)) if out is not None and _dropout_active(node) else 0.0
    if name in LOSS:
        logits = _tensor(node.args[0]) if node.args else None
        # The log-softmax of the logits is internal to the loss; the targets are an input.
        return tuple(acts[1:2]), float(_nbytes(logits))
    if name == "embedding":
        # F.embedding(indices, weight) vs aten.embedding(weight, indices): the indices are activations.
        return tuple(a for a in acts if not a.meta["val"].is_floating_point()), 0.0
    return (), 0.0


def node_saved_bytes(node: fx.Node) -> float:
    """Bytes of activations `node` keeps for backward, whole example batch (see the module docstring)."""
    saved, extra = node_saved(node)
    return float(sum(_nbytes(_tensor(a)) for a in saved)) + extra
