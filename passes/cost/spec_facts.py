"""What pricing one TPSpec needs, read once from the layer graph: per-sample FLOPs, bytes and
collectives at the cluster's training precision, the layer's matmul weights (for the efficiency
curve) and what recompute keeps. Independent of pp and microbatches, so identical layers share them.

Everything the layer graph gives for the traced (example) batch is rescaled per sample, so one
graph plans any global batch; float tensors are re-priced at the cluster's training precision
(`Cluster.dtype_bytes`), e.g. a float32-traced meta model trained in bf16.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fxplan.cluster import Cluster
from fxplan.passes.cost import collectives as cc
from fxplan.passes.ir import R, LayerGraph, Shard, TensorMeta, TPSpec


def is_float(meta: TensorMeta) -> bool:
    return "float" in meta.dtype  # covers float16/32/64, bfloat16 (complex never trains here)


def precision_ratio(cluster: Cluster, meta: TensorMeta) -> float:
    return cluster.dtype_bytes / meta.itemsize if is_float(meta) else 1.0


def _tensor_key(name: str) -> str:
    # fx names a get_attr node after its target with '.' -> '_' (and camelCase -> snake_case);
    # comparing alphanumerics only matches "h.0.attn.weight" with node "h_0_attn_weight".
    return re.sub(r"[^0-9a-z]", "", name.lower())


@dataclass(frozen=True)
class SpecFacts:
    """What pricing one TPSpec needs, independent of pp / microbatches; hashable, so equal facts
    (identical layers) share cache entries and produce identical arrays."""

    label: str
    tp: int
    flops: float  # fwd FLOPs per device, per traced sample
    param_numel: int  # per device (tp-local), before FSDP
    act_bytes: float  # saved activations per device, per traced sample, training precision
    comms: tuple[tuple[str, str, float, bool, str], ...]  # (kind, axis, bytes, per_sample, phase)
    weights: tuple[tuple[int, int], ...]  # tp-local [out, in] of the layer's matmul weights
    hidden: int  # last dim of the layer's main activation (fallback matmul size)
    rows_per_sample: float  # matmul rows (tokens) per sample
    input_bytes: float  # per device per sample, training precision: what recompute keeps
    input_fixed_bytes: float  # batch-independent inputs (masks), kept whole
    dense_fraction: float = 1.0  # of flops, the matmul / conv / attention part (the rest: elementwise)
    ops: int = 0  # compute ops of the layer's forward (each a fixed dispatch cost)
    largest_bytes: float = 0.0  # per device per sample: the largest batch-sized float tensor the layer
    # reads or makes (tp-local), what its backward's gradient temporaries are made of
    regather_bytes: float = 0.0  # per device per sample: the largest sequence shard saved as a shard
    # and gathered again in backward (runtime/sequence_saved.py), gathered whole


def param_tensors(graph: LayerGraph) -> frozenset[str]:
    """Tensor (node) names of parameters that cross layers: the get_attr nodes of shared params."""
    shared = {_tensor_key(p) for p in graph.shared_params}
    return frozenset(t for t in graph.tensors if _tensor_key(t) in shared)


def spec_facts(graph: LayerGraph, u: int, spec: TPSpec, cluster: Cluster, counts_shared: bool,
               params: frozenset[str]) -> SpecFacts:
    """The facts of layer u's `spec`; `params`: param_tensors(graph); `counts_shared`: whether the
    spec's param_numel already includes a tied weight that reaches the layer as an input."""
    layer = graph.layers[u]
    per_sample = 1.0 / graph.batch_size
    metas = [(t, graph.tensors[t]) for t in (*layer.inputs, *layer.outputs) if t in graph.tensors]
    floats = [m for _, m in metas if is_float(m)]
    ratio = cluster.dtype_bytes / floats[0].itemsize if floats else 1.0
    main = next((m for m in floats if m.batch_dim is not None and m.shape), floats[0] if floats else None)
    hidden = int(main.shape[-1]) if main is not None and main.shape else 1
    if main is not None and main.batch_dim is not None:
        rows_per_sample = main.numel / max(hidden, 1) / graph.batch_size
    else:
        rows_per_sample = 1.0
    # Matmul weights: the layer's 2-D parameters (owned or shared) whose forward FLOPs fit in the
    # layer's (an embedding table is 2-D too, but its lookup does no matmul, so it is dropped).
    used = set(layer.params) | {p for p, users in graph.shared_params.items() if u in users}
    by_norm = {_tensor_key(n): n for n in (*layer.nodes, *layer.inputs)}
    weights = []
    budget = spec.flops * per_sample * 1.05
    for p in sorted(used):
        node = by_norm.get(_tensor_key(p))
        meta = graph.tensors.get(node) if node else None
        if meta is None or len(meta.shape) != 2:
            continue
        shape = list(meta.shape)
        placement = spec.placements.get(node, spec.input_placements.get(node, R))
        if isinstance(placement, Shard) and spec.tp > 1:
            shape[placement.dim] = max(1, shape[placement.dim] // spec.tp)
        if 2.0 * rows_per_sample * shape[0] * shape[1] <= budget:
            weights.append((int(shape[0]), int(shape[1])))
    # A weight tied to an earlier layer's (GPT's head) arrives as an input but never travels between
    # stages: this layer's stage holds its own copy (codegen/split.py) and the runtime sums the
    # gradients. Charge the copy here (weights, grads, optimizer state, sync) unless the spec counts
    # it already; on a shared stage this over-counts it once, the safe side of memory.
    shared_in = params & frozenset(layer.inputs)
    extra_params = 0
    input_bytes = input_fixed = 0.0
    for t in layer.inputs:
        meta = graph.tensors.get(t)
        if meta is None:
            continue
        local = meta.nbytes * precision_ratio(cluster, meta)
        if isinstance(spec.input_placements.get(t, R), Shard):
            local /= spec.tp
        if t in shared_in:
            if not counts_shared:
                extra_params += int(round(local / (meta.itemsize * precision_ratio(cluster, meta))))
            continue
        if meta.batch_dim is None:
            input_fixed += local
        else:
            input_bytes += local * per_sample
    return SpecFacts(
        largest_bytes=_largest_bytes(graph, layer, spec, cluster) * per_sample,
        regather_bytes=max((cm.nbytes * ratio * per_sample for cm in spec.comms if cm.why.startswith("regather")),
                           default=0.0),
        label=spec.label, tp=spec.tp, flops=spec.flops * per_sample, param_numel=int(spec.param_numel) + extra_params,
        act_bytes=spec.act_bytes * per_sample * ratio,
        comms=tuple((cm.kind, cm.axis, cm.nbytes * ratio * (per_sample if cm.per_sample else 1.0),
                     cm.per_sample, cm.phase) for cm in spec.comms) + _batch_stat_comms(layer),
        weights=tuple(weights), hidden=hidden, rows_per_sample=rows_per_sample,
        input_bytes=input_bytes, input_fixed_bytes=input_fixed,
        dense_fraction=layer.dense_flops / layer.flops if layer.flops > 0 else 1.0, ops=layer.ops,
    )


def _largest_bytes(graph: LayerGraph, layer, spec: TPSpec, cluster: Cluster) -> float:
    """Bytes (whole traced batch, this device's tp share) of the layer's largest batch-sized float tensor."""
    largest = 0.0
    for name in (*layer.inputs, *layer.nodes):
        meta = graph.tensors.get(name)
        if meta is None or meta.batch_dim is None or not is_float(meta):
            continue
        placement = spec.placements.get(name, spec.input_placements.get(name, R))
        local = meta.nbytes * precision_ratio(cluster, meta) / (spec.tp if isinstance(placement, Shard) else 1)
        largest = max(largest, local)
    return largest


def _batch_stat_comms(layer) -> tuple:
    """Synchronised batch norm (dp > 1): one all-reduce over the dp group per batch norm forward, one
    backward (free at dp = 1: a group of one moves nothing)."""
    return tuple(("all_reduce", "dp", nbytes, False, phase) for nbytes in layer.batch_stat_bytes
                 for phase in ("fwd", "bwd"))


def matmul_numel(f: SpecFacts) -> float:
    return float(sum(n * k for n, k in f.weights)) if f.weights else float(f.param_numel)


def inv_efficiency_ratio(cluster: Cluster, f: SpecFacts, m: float) -> float:
    """1 / efficiency of the layer's matmuls at m rows, weighted by their FLOPs (n*k each)."""
    dims = f.weights or ((max(f.param_numel // max(f.hidden, 1), f.hidden), f.hidden),)
    total = sum(n * k for n, k in dims)
    if total <= 0:
        return 1.0 / cc.efficiency(cluster, cc.matmul_size(m, f.hidden, f.hidden))
    return sum(n * k / total / cc.efficiency(cluster, cc.matmul_size(m, n, k)) for n, k in dims)
