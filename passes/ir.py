"""Frozen values passed between the analysis passes (trace -> coarsen -> shard_prop -> cost -> solve)
and read by codegen, plus the one op-name normaliser every pass keys its op tables on.

Apart from `Traced` (which carries the traced GraphModule) everything here is plain data that prints
as a short table. Node names are torch.fx node names of the traced GraphModule; parameter names are
the qualified names of `model.state_dict()` (= get_attr targets).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import torch.fx as fx

from fxplan._torch import OpOverload, OpOverloadPacket

# ---------------------------------------------------------------- placements on one mesh axis


@dataclass(frozen=True, slots=True)
class Replicate:
    """Every device of the axis holds the whole tensor."""

    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True, slots=True)
class Shard:
    """Devices of the axis hold equal slices along tensor dimension `dim` (non-negative).

    blocks > 1: `dim` is `blocks` equal blocks laid end to end, and a device holds its slice of
    every block (what merging a sharded head dim into the batch, [B, H/tp] -> [B*H/tp], leaves).
    """

    dim: int
    blocks: int = 1

    def __str__(self) -> str:
        return f"S({self.dim})" if self.blocks == 1 else f"S({self.dim}/{self.blocks})"


@dataclass(frozen=True, slots=True)
class Partial:
    """Devices of the axis hold addends; the tensor is their sum."""

    def __str__(self) -> str:
        return "P"


Placement = Replicate | Shard | Partial
R = Replicate()
P = Partial()


def frozen_map(data) -> Mapping:
    return MappingProxyType(dict(data))


# ---------------------------------------------------------------- op names

# Python operators in fx graphs, named as the torch function / aten op they compute.
_OPERATOR_NAMES = {operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "div",
                   operator.floordiv: "floordiv", operator.matmul: "matmul", operator.neg: "neg",
                   operator.pow: "pow", operator.getitem: "getitem", operator.iadd: "add",
                   operator.imul: "mul", operator.mod: "remainder"}


def op_name(node: fx.Node) -> str:
    """One name for a node's op on both trace paths: 'linear' for F.linear and aten.linear.default,
    'view' for x.view(...) and aten.view.default, 'add' for operator.add, 'module:Foo' for a leaf
    module; the node's op ('placeholder', 'get_attr', 'output') for nodes that call nothing."""
    target = node.target
    if node.op == "call_method":
        return str(target)
    if node.op == "call_function":
        if isinstance(target, OpOverload):
            return target.overloadpacket.__name__
        if isinstance(target, OpOverloadPacket):
            return target.__name__
        if target in _OPERATOR_NAMES:
            return _OPERATOR_NAMES[target]
        return getattr(target, "__name__", str(target))
    if node.op == "call_module":
        owner = node.graph.owning_module
        return "module:" + type(owner.get_submodule(str(target))).__name__ if owner is not None else "module"
    return node.op


def out_of_place_name(node: fx.Node) -> str:
    """op_name with in-place variants named as their out-of-place op ('add_' -> 'add'): they cost
    and save the same. (Sharding rules keep in-place ops apart: they alias their input.)"""
    name = op_name(node)
    if name.endswith("_") and not name.endswith("__"):
        name = name[:-1]
    return name


BATCH_NORMS = frozenset({"batch_norm", "native_batch_norm", "_native_batch_norm_legit",
                         "_native_batch_norm_legit_functional", "cudnn_batch_norm", "miopen_batch_norm"})
_TRAINING_ARG = 5  # position of `training` in F.batch_norm and the aten batch norms alike


def batch_coupling_op(node: fx.Node) -> str:
    """The op's name when it mixes samples across the batch (BatchNorm in training mode), else "".

    Its statistics come from the whole batch, so splitting the batch over dp ranks or microbatches
    changes the result unless they are synchronised; an eval-mode batch norm (training=False) is
    per-sample and fine.
    """
    if node.op not in ("call_function", "call_method"):
        return ""
    name = out_of_place_name(node)
    if name not in BATCH_NORMS:
        return ""
    training = node.kwargs.get("training", node.args[_TRAINING_ARG] if len(node.args) > _TRAINING_ARG else True)
    return "" if training is False else name


def batch_stat_channels(node: fx.Node, tensors) -> int:
    """Channels (dim 1 of the input) of a training batch norm, else 0."""
    if not batch_coupling_op(node) or not node.args or not isinstance(node.args[0], fx.Node):
        return 0
    meta = tensors.get(node.args[0].name)
    return int(meta.shape[1]) if meta is not None and len(meta.shape) > 1 else 0


# The arguments of a cross-entropy node on both trace paths: the vocab-parallel loss's rule
# (passes/sharding/rules_vocab.py) and its codegen (codegen/vocab.py) read them alike.
_CE_F_NAMES = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")
_CE_ATEN_NAMES = ("input", "target", "weight", "reduction", "ignore_index", "label_smoothing")
_CE_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}


def cross_entropy_args(node: fx.Node) -> dict | None:
    """{logits, labels, reduction ('none'|'mean'|'sum'), ignore_index} of a plain cross-entropy
    (F.cross_entropy or aten.cross_entropy_loss), None when it has weights, smoothing or legacy flags."""
    aten = op_name(node) == "cross_entropy_loss"
    names = _CE_ATEN_NAMES if aten else _CE_F_NAMES
    vals = dict(zip(names, node.args))
    vals.update({k: v for k, v in node.kwargs.items() if k in names})
    if vals.get("weight") is not None or vals.get("label_smoothing", 0.0) not in (0, 0.0):
        return None
    if vals.get("size_average") is not None or vals.get("reduce") is not None:
        return None
    reduction = vals.get("reduction", 1 if aten else "mean")
    reduction = _CE_REDUCTIONS.get(reduction) if aten else reduction
    if reduction not in ("none", "mean", "sum") or not isinstance(vals.get("input"), fx.Node):
        return None
    return {"logits": vals["input"], "labels": vals.get("target"), "reduction": reduction,
            "ignore_index": vals.get("ignore_index", -100)}


# ---------------------------------------------------------------- tensors and layers


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """Shape/dtype of one node's output for the example GLOBAL batch."""

    shape: tuple[int, ...]
    dtype: str  # e.g. "torch.float32"
    itemsize: int
    batch_dim: int | None  # the dim that scales with the batch (None: batch-independent, e.g. a mask)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass(frozen=True)
class Traced:
    """The traced model (passes/trace.py): a runnable GraphModule plus the facts later passes need
    about its values."""

    gm: fx.GraphModule  # node.meta["val"] (meta tensor / tuple), ["fxplan_batch_dim"], ["nn_module_stack"]
    method: str  # "fx" (symbolic tracing, torch callables) | "export" (torch.export, aten OpOverloads)
    tensors: Mapping[str, TensorMeta]  # every tensor-valued node (params included, batch_dim None)
    batch_size: int  # dim 0 of the example inputs (the global batch)
    loss_node: str  # name of the node forward returns
    placeholders: tuple[str, ...]  # graph inputs, in the order of example_inputs


@dataclass(frozen=True, slots=True)
class Layer:
    """A contiguous group of graph nodes: the unit of pipeline placement and of strategy choice."""

    index: int
    name: str  # human label, e.g. "h.3" or "embed"
    nodes: tuple[str, ...]  # fx node names in topological order (get_attr nodes of its params included)
    params: tuple[str, ...]  # parameter qualified names owned by this layer (first layer that uses them)
    param_numel: int
    flops: float  # forward FLOPs for the whole global batch
    act_bytes: float  # bytes this layer saves for backward, whole global batch, no sharding
    inputs: tuple[str, ...]  # tensors (node names) produced before this layer and used in it
    outputs: tuple[str, ...]  # tensors produced here and used by later layers or returned
    signature: str = ""  # equal for structurally identical layers (same ops, shapes); used to merge runs
    batch_coupled: str = ""  # an op here mixes samples of the batch (training BatchNorm): its name, else ""
    # Such a layer equals one-device training when it sees the whole batch of a step at once: one
    # microbatch; dp > 1 synchronises its statistics over the dp group (codegen/batch_stats.py).
    dense_flops: float = 0.0  # of `flops`, the matmul / convolution / attention part (the rest is elementwise)
    ops: int = 0  # compute ops (calls) in the layer's forward: each costs a dispatch overhead
    # per training batch norm: the bytes of its synchronised statistics' all-reduce (forward; backward alike)
    batch_stat_bytes: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class LayerEdge:
    src: int  # producing layer index (-1: graph input / placeholder)
    dst: int  # consuming layer index
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class LayerGraph:
    layers: tuple[Layer, ...]
    edges: tuple[LayerEdge, ...]
    tensors: Mapping[str, TensorMeta]  # meta of every tensor-valued node
    batch_size: int
    placeholders: tuple[str, ...]
    loss_node: str  # the node whose value forward returns
    shared_params: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: MappingProxyType({}))
    # parameter -> indices of every layer that uses it, for parameters used by more than one layer

    def table(self) -> str:
        rows = [f"{'#':>3} {'layer':<24} {'nodes':>5} {'params':>12} {'GFLOP/sample':>13} {'act MB/sample':>14}"]
        for layer in self.layers:
            rows.append(
                f"{layer.index:>3} {layer.name[:24]:<24} {len(layer.nodes):>5} {layer.param_numel:>12,} "
                f"{layer.flops / self.batch_size / 1e9:>13.3f} {layer.act_bytes / self.batch_size / 1e6:>14.3f}"
            )
        return "\n".join(rows)


# ---------------------------------------------------------------- tensor-parallel shardings of a layer


@dataclass(frozen=True, slots=True)
class Comm:
    """One collective a strategy executes per microbatch (or per iteration when per_step)."""

    kind: str  # "all_reduce" | "all_gather" | "reduce_scatter" | "all_to_all"
    axis: str  # "tp" | "dp"
    nbytes: float  # bytes of the full (unsharded on this axis) buffer, for the whole global batch
    # when per_sample is True (divide by microbatches * dp for one device's microbatch)
    per_sample: bool
    phase: str  # "fwd" | "bwd"
    why: str = ""  # e.g. "P->R after linear_3"


@dataclass(frozen=True)
class TPSpec:
    """One consistent tensor-parallel sharding of one layer for one degree `tp` (tp axis only).

    The dp axis is implicit: activations are split along their batch dim, parameters replicated
    (or FSDP-sharded) over dp. Codegen emits exactly the collectives these placements imply.
    """

    label: str  # unique per (layer, tp), e.g. "R" for tp=1, "col>row", "row-emb"
    tp: int
    placements: Mapping[str, Placement]  # every node of the layer (get_attr included) -> output placement
    arg_placements: Mapping[str, tuple[Placement | None, ...]]  # node -> placement each tensor arg must have when consumed
    # (None for non-tensor args), flattened in the order of node.all_input_nodes
    input_placements: Mapping[str, Placement]  # layer input tensor -> placement wanted on entry (R or S)
    output_placements: Mapping[str, Placement]  # layer output tensor -> placement at exit (R or S, never P)
    comms: tuple[Comm, ...]  # tp-axis collectives inside the layer, forward and backward
    flops: float  # forward FLOPs per device, whole global batch (before dp / microbatching)
    param_numel: int  # parameters held per device (before FSDP)
    act_bytes: float  # saved activation bytes per device, whole global batch (before dp / microbatching)

    @classmethod
    def replicated(cls, layer: Layer,
                   arg_placements: Mapping[str, tuple[Placement | None, ...]] = MappingProxyType({})) -> TPSpec:
        """tp = 1, every node replicated: the spec labelled "R" that every layer has. Without
        `arg_placements` consumers take each tensor input as it arrives (R)."""
        return cls(label="R", tp=1, placements=frozen_map({n: R for n in layer.nodes}),
                   arg_placements=frozen_map(arg_placements),
                   input_placements=frozen_map({t: R for t in layer.inputs}),
                   output_placements=frozen_map({t: R for t in layer.outputs}), comms=(),
                   flops=float(layer.flops), param_numel=int(layer.param_numel), act_bytes=float(layer.act_bytes))


@dataclass(frozen=True)
class StrategySpace:
    """specs[(layer index, tp)] -> the TP shardings found for that layer and degree."""

    specs: Mapping[tuple[int, int], tuple[TPSpec, ...]]

    def for_layer(self, layer: int, tp: int) -> tuple[TPSpec, ...]:
        return self.specs.get((layer, tp), ())

    def spec(self, layer: int, tp: int, label: str) -> TPSpec:
        for spec in self.for_layer(layer, tp):
            if spec.label == label:
                return spec
        raise KeyError(f"layer {layer} has no tp={tp} sharding labelled {label!r}")
