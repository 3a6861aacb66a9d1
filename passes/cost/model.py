"""Cost tables: per layer and strategy, time and memory of one microbatch on one device, as a Problem.

`CostModel(layer_graph, space, cluster, batch_size, constraints)` prices every strategy that
`passes.enumerate.layer_strategies` lists for a stage of n/pp devices and hands `passes.problem`
arrays to the planners (miqp, grid, exhaustive all read the same arrays and score with the same
`passes.problem.evaluate`).

Device placement: stage i owns ranks [i*n_s, (i+1)*n_s), tp innermost (rank = base + d*tp + t), so
a tp group of size <= devices_per_node stays inside one node and dp groups span nodes once
n_s > devices_per_node. A layer's arrays cannot depend on its stage, so every collective is priced
on the slowest group of its kind over all stages (identical when stages are alike).

Everything the layer graph gives for the traced (example) batch is rescaled per sample, so one
graph plans any global batch; float tensors are re-priced at the cluster's training precision
(`Cluster.dtype_bytes`), e.g. a float32-traced meta model trained in bf16.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from fxplan.cluster import Cluster
from fxplan.constraints import Constraints
from fxplan.passes.cost import collectives as cc
from fxplan.passes.cost.strategies import layer_strategies
from fxplan.passes.ir import R, LayerGraph, Shard, StrategySpace, TensorMeta, TPSpec
from fxplan.passes.solve.problem import Edge, Problem
from fxplan.passes.sharding.redistribute import Layout, layout_steps
from fxplan.plan import Strategy


def _is_float(meta: TensorMeta) -> bool:
    return "float" in meta.dtype  # covers float16/32/64, bfloat16 (complex never trains here)


def _norm(name: str) -> str:
    # fx names a get_attr node after its target with '.' -> '_' (and camelCase -> snake_case);
    # comparing alphanumerics only matches "h.0.attn.weight" with node "h_0_attn_weight".
    return re.sub(r"[^0-9a-z]", "", name.lower())


@dataclass(frozen=True)
class _SpecFacts:
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


@dataclass(frozen=True)
class _Arrays:
    fwd: np.ndarray
    bwd: np.ndarray
    wgt: np.ndarray
    sync: np.ndarray
    mem_fixed: np.ndarray
    mem_act: np.ndarray


def _frozen(array: list[float]) -> np.ndarray:
    out = np.asarray(array, dtype=float)
    out.setflags(write=False)
    return out


class CostModel:
    """Prices strategies of `layer_graph` on `cluster` for a global batch of `batch_size`."""

    def __init__(self, layer_graph: LayerGraph, space: StrategySpace, cluster: Cluster,
                 batch_size: int | None = None, constraints: Constraints | None = None):
        self.graph = layer_graph
        self.cluster = cluster
        self.batch_size = int(batch_size if batch_size is not None else layer_graph.batch_size)
        self.constraints = constraints or Constraints()
        self.space = _with_replicated_specs(layer_graph, space)
        self.world = cluster.world_size
        self._facts: dict[tuple[int, int, str], _SpecFacts] = {}
        self._fact_ids: dict[_SpecFacts, int] = {}  # equal facts -> one small id (cheap keys)
        self._spec_ids: dict[tuple[int, int, str], int] = {}
        self._specs: dict[tuple[int, int, str], TPSpec] = {
            (u, tp, spec.label): spec for (u, tp), specs in self.space.specs.items() for spec in specs}
        self._layer_specs: dict[int, list[TPSpec]] = {u: [] for u in range(len(layer_graph.layers))}
        for (u, tp, label) in sorted(self._specs):
            self._layer_specs[u].append(self._specs[(u, tp, label)])
        self._tables: dict[tuple[int, int], tuple] = {}  # (pp, c) -> (arrays, edges): schedule-free
        self._strategies: dict[tuple[int, int | None], tuple[tuple[Strategy, ...], ...]] = {}
        self._arrays: dict[tuple, _Arrays] = {}
        self._groups: dict[tuple[int, int, int], tuple[tuple[int, ...], ...]] = {}
        self._edge_cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._pricer = _TensorPricer(self)
        self._params = param_tensors(layer_graph)
        self._twins: dict[tuple, _SpecFacts] = {}
        self._contents: dict[int, tuple[int, ...]] = {}
        self._strategy_labels: dict[tuple[int, int | None], tuple[tuple[str, ...], ...]] = {}
        self._edge_ids: dict = {}  # LayerEdge -> edge content id
        self._edge_contents: dict[tuple, int] = {}

    # ------------------------------------------------------------ public
    def strategies(self, pp: int, microbatches: int | None = None) -> tuple[tuple[Strategy, ...], ...]:
        """Per layer, the strategies whose indices the Problem arrays of (pp, microbatches) use.

        With `microbatches`, strategies whose dp does not divide batch/microbatches are left out
        (so pass the same microbatches as to `problem`); without, every strategy of the stage size.
        """
        key = (pp, microbatches)
        if key not in self._strategies:
            if pp < 1 or self.world % pp:
                raise ValueError(f"pp={pp} does not divide the {self.world} devices")
            if microbatches is None:
                n_s = self.world // pp
                # A layer that mixes samples (training BatchNorm) must see its whole batch: dp = 1.
                value = tuple(tuple(s for s in layer_strategies(u, self.space, n_s, self.constraints)
                                    if s.dp == 1 or not layer.batch_coupled)
                              for u, layer in enumerate(self.graph.layers))
                labels = tuple(tuple(str(s) for s in per_layer) for per_layer in value)
            else:
                rows = self.batch_size // microbatches
                keep = [[k for k, s in enumerate(per_layer) if rows % s.dp == 0] for per_layer in self.strategies(pp)]
                every = self._strategy_labels[(pp, None)]
                value = tuple(tuple(per_layer[k] for k in ks) for per_layer, ks in zip(self._strategies[(pp, None)], keep))
                labels = tuple(tuple(names[k] for k in ks) for names, ks in zip(every, keep))
            self._strategies[key] = value
            self._strategy_labels[key] = labels
        return self._strategies[key]

    def problem(self, pp: int, microbatches: int, schedule: str) -> Problem | None:
        """The arrays of one (pp, microbatches, schedule) candidate, or None when it cannot exist:
        pp does not divide the devices or exceeds the layers, the batch does not split into
        microbatches x dp, or the constraints' pins rule it (or every strategy of a layer) out."""
        pins = self.constraints
        if (pins.pp is not None and pp != pins.pp) or (pins.microbatches is not None and microbatches != pins.microbatches):
            return None
        if pins.schedule is not None and schedule != pins.schedule:
            return None
        if pp < 1 or self.world % pp or pp > len(self.graph.layers):
            return None
        if microbatches < 1 or self.batch_size % microbatches:
            return None
        if microbatches > 1 and any(layer.batch_coupled for layer in self.graph.layers):
            return None  # batch statistics over a microbatch differ from the whole batch's
        strategies = self.strategies(pp, microbatches)
        if any(not per_layer for per_layer in strategies):
            return None
        tables = self._tables.get((pp, microbatches))
        if tables is None:
            n_s = self.world // pp
            arrays = [self._layer_arrays(u, per_layer, n_s, microbatches) for u, per_layer in enumerate(strategies)]
            edges = tuple(self._edge(edge, strategies, n_s, microbatches)
                          for edge in self.graph.edges if edge.src >= 0)
            labels = self._strategy_labels[(pp, microbatches)]
            tables = self._tables[(pp, microbatches)] = (arrays, edges, labels)
        arrays, edges, labels = tables
        return Problem(
            pp=pp, microbatches=microbatches, schedule=schedule,
            fwd=tuple(a.fwd for a in arrays), bwd=tuple(a.bwd for a in arrays), wgt=tuple(a.wgt for a in arrays),
            sync=tuple(a.sync for a in arrays), mem_fixed=tuple(a.mem_fixed for a in arrays),
            mem_act=tuple(a.mem_act for a in arrays), edges=edges,
            memory_limit=float(self.cluster.memory_bytes),
            labels=labels,
        )

    def candidate(self, pp: int, microbatches: int, schedule: str):
        """(Problem, strategies) of one candidate, or None: the pair whose indices agree."""
        problem = self.problem(pp, microbatches, schedule)
        return None if problem is None else (problem, self.strategies(pp, microbatches))

    def stage_devices(self, pp: int, stage: int) -> tuple[int, ...]:
        n_s = self.world // pp
        return tuple(range(stage * n_s, (stage + 1) * n_s))

    def assumptions(self) -> dict:
        """What the estimates assume, recorded in the Plan."""
        c = self.cluster
        return {
            "dtype_bytes": c.dtype_bytes,
            "optimizer_bytes_per_param": c.optimizer_bytes_per_param,
            "bytes_per_param": 2 * c.dtype_bytes + c.optimizer_bytes_per_param,
            "cluster": c.name,
            "cluster_description": c.describe(),
            "memory_limit_bytes": float(c.memory_bytes),
            "peak_flops": c.peak_flops,
            "efficiency": f"{c.max_efficiency} * size / (size + {c.half_efficiency_dim}), size = geomean(m, n, k)",
            "backward": "2x forward FLOPs; weight matmuls split equally into B and W",
            "collectives": "alpha-beta ring; hierarchical (intra then inter-node) for groups spanning nodes",
            "fsdp": "params all-gathered per microbatch in forward and backward; grads reduce-scattered per step",
            "grad_sync": "not overlapped with compute",
            "activation_precision": "float activations at dtype_bytes",
            "batch_size": self.batch_size,
        }

    # ------------------------------------------------------------ groups and collectives
    def strided_groups(self, size: int, stride: int, n_s: int) -> tuple[tuple[int, ...], ...]:
        """One representative per distinct (members per node, nodes) split among all groups of
        `size` ranks `stride` apart inside every stage of n_s devices."""
        key = (n_s, size, stride)
        if key not in self._groups:
            seen: dict[tuple[int, int], tuple[int, ...]] = {}
            span = size * stride
            for base in range(0, self.world, n_s):
                for block in range(base, base + n_s - span + 1, span):
                    for t in range(stride):
                        g = tuple(block + t + j * stride for j in range(size))
                        seen.setdefault(cc._split(self.cluster, g), g)
            self._groups[key] = tuple(seen.values())
        return self._groups[key]

    def groups(self, n_s: int, tp: int, axis: str) -> tuple[tuple[int, ...], ...]:
        """Representative groups of a (n_s / tp) x tp stage mesh: axis "tp" (adjacent ranks), "dp"
        (ranks tp apart) or anything else for the whole stage."""
        if axis == "tp":
            return self.strided_groups(tp, 1, n_s)
        if axis == "dp":
            return self.strided_groups(n_s // tp, tp, n_s)
        return self.strided_groups(n_s, 1, n_s)

    def comm_time(self, kind: str, n_s: int, tp: int, axis: str, nbytes: float) -> float:
        """Slowest group of `axis` doing `kind` on `nbytes` (full buffer)."""
        return max(cc.collective_time(self.cluster, kind, g, nbytes) for g in self.groups(n_s, tp, axis))

    def boundary_pair(self, n_s: int) -> tuple[int, int]:
        """The (sender, receiver) rank pair of the slowest pipeline boundary: inter-node if any is."""
        for rank in range(self.world - n_s):
            if self.cluster.node_of(rank) != self.cluster.node_of(rank + n_s):
                return rank, rank + n_s
        return 0, min(n_s, self.world - 1)

    # ------------------------------------------------------------ per layer
    def facts(self, u: int, tp: int, label: str) -> _SpecFacts:
        key = (u, tp, label)
        if key not in self._facts:
            layer, spec = self.graph.layers[u], self._specs[key]
            # Structurally identical layers (equal signature, equal spec figures) have equal facts:
            # reuse the first one's instead of re-reading 50 transformer blocks.
            twin = (layer.signature, tp, label, spec.flops, spec.param_numel, spec.act_bytes, len(spec.comms),
                    bool(self._params & set(layer.inputs))) if layer.signature else None
            facts = self._twins.get(twin) if twin else None
            if facts is None:
                # Does shard_prop count a tied weight reaching this layer as an input among its
                # params? Its tp=1 spec holds more than the layer owns exactly then.
                replicated = self.space.for_layer(u, 1)
                counts_shared = bool(replicated) and replicated[0].param_numel > layer.param_numel
                facts = _spec_facts(self.graph, u, spec, self.cluster, counts_shared, self._params)
                if twin:
                    self._twins[twin] = facts
            self._facts[key] = facts
            self._spec_ids[key] = self._fact_ids.setdefault(facts, len(self._fact_ids))
        return self._facts[key]

    def _fact_id(self, u: int, tp: int, label: str) -> int:
        key = (u, tp, label)
        if key not in self._spec_ids:
            self.facts(u, tp, label)
        return self._spec_ids[key]

    def _content(self, u: int) -> tuple[int, ...]:
        """Ids of the facts of every spec of layer u: equal for layers that price identically (their
        strategy lists are equal too, as enumerate reads only tp, labels and parameter counts)."""
        if u not in self._contents:
            self._contents[u] = tuple(self._fact_id(u, spec.tp, spec.label) for spec in self._layer_specs[u])
        return self._contents[u]

    def _layer_arrays(self, u: int, strategies: tuple[Strategy, ...], n_s: int, c: int) -> _Arrays:
        # Keyed by content, not by layer: identical layers share one set of arrays.
        key = (self._content(u), n_s, c)
        cached = self._arrays.get(key)
        if cached is None:
            rows = [self._strategy_cost(self.facts(u, s.tp, s.spec), s.dp, s.fsdp, s.recompute, n_s, c)
                    for s in strategies]
            cached = _Arrays(*(_frozen(col) for col in zip(*rows)))
            self._arrays[key] = cached
        return cached

    def _strategy_cost(self, f: _SpecFacts, dp: int, fsdp: bool, recompute: bool, n_s: int, c: int):
        """(fwd, bwd, wgt, sync, mem_fixed, mem_act) of one strategy, one microbatch, one device."""
        cl = self.cluster
        samples = self.batch_size / (c * dp)  # per device per microbatch
        flops = f.flops * samples
        t_f = flops / cl.peak_flops * _inv_eff_ratio(cl, f, f.rows_per_sample * samples)
        # Weight-gradient FLOPs equal the weight matmuls' forward FLOPs; the rest of backward is B.
        w_frac = min(1.0, 2.0 * f.rows_per_sample * samples * _matmul_numel(f) / flops) if flops > 0 else 0.0
        t_b, t_w = t_f * (2.0 - w_frac), t_f * w_frac
        comm = {"fwd": 0.0, "bwd": 0.0}
        for kind, axis, nbytes, per_sample, phase in f.comms:
            size = nbytes * samples if per_sample else nbytes
            comm[phase] += self.comm_time(kind, n_s, f.tp, axis, size)
        param_bytes = f.param_numel * cl.dtype_bytes
        gather = self.comm_time("all_gather", n_s, f.tp, "dp", param_bytes) if fsdp else 0.0
        fwd = t_f + comm["fwd"] + gather
        bwd = t_b + comm["bwd"] + gather + ((t_f + comm["fwd"]) if recompute else 0.0)
        if dp > 1:
            sync = self.comm_time("reduce_scatter" if fsdp else "all_reduce", n_s, f.tp, "dp", param_bytes)
        else:
            sync = 0.0
        per_param = 2 * cl.dtype_bytes + cl.optimizer_bytes_per_param  # weights, grads, optimizer
        if fsdp:
            mem_fixed = f.param_numel * per_param / dp + param_bytes  # + this layer's gathered params
        else:
            mem_fixed = f.param_numel * per_param
        if recompute:
            mem_act = f.input_bytes * samples + f.input_fixed_bytes
        else:
            mem_act = f.act_bytes * samples
        return fwd, bwd, t_w, sync, mem_fixed, mem_act

    # ------------------------------------------------------------ edges
    def _edge_content(self, edge) -> int:
        """Id of what prices an edge: both layers' contents and, per tensor, its meta and its
        placement under every spec of either side. Equal for the edges between identical blocks."""
        key = self._edge_ids.get(edge)
        if key is None:
            src, dst = edge.src, edge.dst
            parts = []
            for name in edge.tensors:
                meta = self.graph.tensors.get(name)
                if meta is None:
                    continue
                outs = tuple(_placement(spec.output_placements, name) for spec in self._layer_specs[src])
                ins = tuple(_placement(spec.input_placements, name) for spec in self._layer_specs[dst])
                parts.append((meta, outs, ins, name not in self._params))
            content = (self._content(src), self._content(dst), tuple(parts))
            key = self._edge_ids[edge] = self._edge_contents.setdefault(content, len(self._edge_contents))
        return key

    def _edge(self, edge, strategies, n_s: int, c: int) -> Edge:
        src, dst = edge.src, edge.dst
        fast = (self._edge_content(edge), n_s, c)
        cached = self._edge_cache.get(fast)
        if cached is not None:
            return Edge(src=src, dst=dst, reshard=cached[0], send=cached[1])
        # Layout = (dp, tp, spec): fsdp / recompute never change a tensor's layout, so price the
        # distinct layouts only and expand.
        src_layouts, src_index = _distinct([(s.dp, s.tp, s.spec) for s in strategies[src]])
        dst_layouts, dst_index = _distinct([(s.dp, s.tp, s.spec) for s in strategies[dst]])
        tensors = []
        for name in edge.tensors:
            meta = self.graph.tensors.get(name)
            if meta is None:
                continue
            outs = tuple((dp, tp, _placement(self._specs[(src, tp, lab)].output_placements, name))
                         for dp, tp, lab in src_layouts)
            ins = tuple((dp, tp, _placement(self._specs[(dst, tp, lab)].input_placements, name))
                        for dp, tp, lab in dst_layouts)
            tensors.append((meta, outs, ins, name not in self._params))  # weights never travel
        key = (n_s, c, tuple(tensors), src_index, dst_index)
        cached = self._edge_cache.get(key)
        if cached is None:
            reshard = np.zeros((len(src_layouts), len(dst_layouts)))
            send = np.zeros(len(src_layouts))
            for meta, outs, ins, travels in tensors:
                for a, out in enumerate(outs):
                    if travels:
                        send[a] += self._pricer.send(meta, out, n_s, c)
                    for b, inn in enumerate(ins):
                        reshard[a, b] += self._pricer.reshard(meta, out, inn, n_s, c)
            full = reshard[np.ix_(src_index, dst_index)]
            full_send = send[list(src_index)]
            full.setflags(write=False)
            full_send.setflags(write=False)
            cached = (full, full_send)
            self._edge_cache[key] = cached
        self._edge_cache[fast] = cached
        return Edge(src=src, dst=dst, reshard=cached[0], send=cached[1])


# ---------------------------------------------------------------- one tensor between two layouts


class _TensorPricer:
    """Time (one microbatch, fwd + bwd) of moving one tensor between layouts (dp, tp, placement)."""

    def __init__(self, model: CostModel):
        self.model = model
        self._cache: dict[tuple, float] = {}

    def local_bytes(self, meta: TensorMeta, layout, c: int) -> float:
        """Bytes one device holds of `meta` for one microbatch under `layout`."""
        dp, tp, placement = layout
        m = self.model
        nbytes = meta.nbytes * _precision_ratio(m.cluster, meta)
        if meta.batch_dim is not None:
            nbytes *= m.batch_size / m.graph.batch_size / (c * dp)
        if isinstance(placement, Shard):
            nbytes /= tp
        return nbytes

    def send(self, meta: TensorMeta, layout, n_s: int, c: int) -> float:
        """p2p of the local tensor across a stage boundary: activation forward, gradient backward."""
        key = ("send", meta, layout, n_s, c)
        if key not in self._cache:
            src, dst = self.model.boundary_pair(n_s)
            t = cc.p2p_time(self.model.cluster, src, dst, self.local_bytes(meta, layout, c))
            self._cache[key] = t * (2 if _is_float(meta) else 1)
        return self._cache[key]

    def reshard(self, meta: TensorMeta, out, inn, n_s: int, c: int) -> float:
        """Conversion from the src layer's output layout to what the dst layer wants: the steps of
        `passes.redistribute.layout_steps` (the same ones codegen emits), priced on their groups."""
        if out == inn:
            return 0.0
        key = ("reshard", meta, out, inn, n_s, c)
        if key not in self._cache:
            src, dst = Layout(*out), Layout(*inn)
            grad = _is_float(meta)
            total = 0.0
            for step in layout_steps(src, dst, meta, grad):
                if step.fwd:
                    total += self._step_time(step.fwd, step, step.group, src.tp, meta, step.fwd_bytes, n_s, c)
                if step.bwd and grad:
                    fraction = 1.0 if step.kind == "dp_grad" else step.bwd_bytes
                    total += self._step_time(step.bwd, step, step.bwd_group or step.group, dst.tp, meta,
                                             fraction, n_s, c, batched=step.kind != "dp_grad")
            self._cache[key] = total
        return self._cache[key]

    def _step_time(self, kind: str, step, group: int, tp: int, meta: TensorMeta, fraction: float, n_s: int,
                   c: int, batched: bool = True) -> float:
        """One collective of a layout step. Buffer = fraction of the global tensor (see
        redistribute.steps_comms), one microbatch of it. Groups: tp steps on `group` adjacent ranks;
        dp steps on `group` ranks `tp` apart (forward ones in the source mesh, backward ones in the
        destination mesh, hence the caller's `tp`)."""
        if group <= 1 or fraction <= 0:
            return 0.0
        m = self.model
        nbytes = meta.nbytes * fraction * _precision_ratio(m.cluster, meta)
        if batched and meta.batch_dim is not None:
            nbytes *= m.batch_size / m.graph.batch_size / c
        stride = 1 if step.axis == "tp" else tp
        return max(cc.collective_time(m.cluster, kind, g, nbytes) for g in m.strided_groups(group, stride, n_s))


# ---------------------------------------------------------------- helpers


def _distinct(items):
    order: dict = {}
    index = tuple(order.setdefault(item, len(order)) for item in items)
    return list(order), index


def _placement(placements, name):
    return placements.get(name, R)


def _matmul_numel(f: _SpecFacts) -> float:
    return float(sum(n * k for n, k in f.weights)) if f.weights else float(f.param_numel)


def _inv_eff_ratio(cluster: Cluster, f: _SpecFacts, m: float) -> float:
    """1 / efficiency of the layer's matmuls at m rows, weighted by their FLOPs (n*k each)."""
    dims = f.weights or ((max(f.param_numel // max(f.hidden, 1), f.hidden), f.hidden),)
    total = sum(n * k for n, k in dims)
    if total <= 0:
        return 1.0 / cc.efficiency(cluster, cc.matmul_size(m, f.hidden, f.hidden))
    return sum(n * k / total / cc.efficiency(cluster, cc.matmul_size(m, n, k)) for n, k in dims)


def _with_replicated_specs(graph: LayerGraph, space: StrategySpace) -> StrategySpace:
    """Add the always-valid tp=1 replicated spec for layers the space lacks one for."""
    missing = [layer for layer in graph.layers if not space.for_layer(layer.index, 1)]
    if not missing:
        return space
    specs = dict(space.specs)
    for layer in missing:
        specs[(layer.index, 1)] = (TPSpec(
            label="R", tp=1, placements=MappingProxyType({n: R for n in layer.nodes}),
            arg_placements=MappingProxyType({}), input_placements=MappingProxyType({t: R for t in layer.inputs}),
            output_placements=MappingProxyType({t: R for t in layer.outputs}), comms=(),
            flops=layer.flops, param_numel=layer.param_numel, act_bytes=layer.act_bytes),)
    return StrategySpace(specs=MappingProxyType(specs))


def _precision_ratio(cluster: Cluster, meta: TensorMeta) -> float:
    return cluster.dtype_bytes / meta.itemsize if _is_float(meta) else 1.0


def param_tensors(graph: LayerGraph) -> frozenset[str]:
    """Tensor (node) names of parameters that cross layers: the get_attr nodes of shared params."""
    shared = {_norm(p) for p in graph.shared_params}
    return frozenset(t for t in graph.tensors if _norm(t) in shared)


def _spec_facts(graph: LayerGraph, u: int, spec: TPSpec, cluster: Cluster, counts_shared: bool,
                params: frozenset[str]) -> _SpecFacts:
    layer = graph.layers[u]
    per_sample = 1.0 / graph.batch_size
    metas = [(t, graph.tensors[t]) for t in (*layer.inputs, *layer.outputs) if t in graph.tensors]
    floats = [m for _, m in metas if _is_float(m)]
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
    by_norm = {_norm(n): n for n in (*layer.nodes, *layer.inputs)}
    weights = []
    budget = spec.flops * per_sample * 1.05
    for p in sorted(used):
        node = by_norm.get(_norm(p))
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
        local = meta.nbytes * _precision_ratio(cluster, meta)
        if isinstance(spec.input_placements.get(t, R), Shard):
            local /= spec.tp
        if t in shared_in:
            if not counts_shared:
                extra_params += int(round(local / (meta.itemsize * _precision_ratio(cluster, meta))))
            continue
        if meta.batch_dim is None:
            input_fixed += local
        else:
            input_bytes += local * per_sample
    return _SpecFacts(
        label=spec.label, tp=spec.tp, flops=spec.flops * per_sample, param_numel=int(spec.param_numel) + extra_params,
        act_bytes=spec.act_bytes * per_sample * ratio,
        comms=tuple((cm.kind, cm.axis, cm.nbytes * ratio * (per_sample if cm.per_sample else 1.0),
                     cm.per_sample, cm.phase) for cm in spec.comms),
        weights=tuple(weights), hidden=hidden, rows_per_sample=rows_per_sample,
        input_bytes=input_bytes, input_fixed_bytes=input_fixed,
    )
