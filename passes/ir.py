"""Frozen values passed between the analysis passes (trace -> coarsen -> shard_prop -> cost -> solve).

Everything here is plain data (no torch objects), prints as a short table and round-trips to JSON.
Node names are torch.fx node names of the traced GraphModule; parameter names are the qualified
names of `model.state_dict()` (= get_attr targets).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

# ---------------------------------------------------------------- placements on one mesh axis


@dataclass(frozen=True, slots=True)
class Replicate:
    """Every device of the axis holds the whole tensor."""

    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True, slots=True)
class Shard:
    """Devices of the axis hold equal slices along tensor dimension `dim` (non-negative)."""

    dim: int

    def __str__(self) -> str:
        return f"S({self.dim})"


@dataclass(frozen=True, slots=True)
class Partial:
    """Devices of the axis hold addends; the tensor is their sum."""

    def __str__(self) -> str:
        return "P"


Placement = Replicate | Shard | Partial
R = Replicate()
P = Partial()


def placement_from_str(text: str) -> Placement:
    if text == "R":
        return R
    if text == "P":
        return P
    if text.startswith("S(") and text.endswith(")"):
        return Shard(int(text[2:-1]))
    raise ValueError(f"bad placement {text!r}")


def frozen_map(data) -> Mapping:
    return MappingProxyType(dict(data))


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
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


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
    # Such a layer only equals one-device training when it sees the whole batch at once: dp = 1 and
    # one microbatch.


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
    arg_placements: Mapping[str, tuple]  # node -> placement each tensor arg must have when consumed
    # (None for non-tensor args), flattened in the order of node.all_input_nodes
    input_placements: Mapping[str, Placement]  # layer input tensor -> placement wanted on entry (R or S)
    output_placements: Mapping[str, Placement]  # layer output tensor -> placement at exit (R or S, never P)
    comms: tuple[Comm, ...]  # tp-axis collectives inside the layer, forward and backward
    flops: float  # forward FLOPs per device, whole global batch (before dp / microbatching)
    param_numel: int  # parameters held per device (before FSDP)
    act_bytes: float  # saved activation bytes per device, whole global batch (before dp / microbatching)

    def describe(self) -> str:
        return f"tp={self.tp} {self.label} ({len(self.comms)} collectives)"


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
