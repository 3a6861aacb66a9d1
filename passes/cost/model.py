"""Cost tables: per layer and strategy, time and memory of one microbatch on one device, as a Problem.

`CostModel(layer_graph, space, cluster, batch_size, constraints)` prices every strategy that
`passes.cost.strategies.layer_strategies` lists for a stage of n/pp devices and hands
`passes.solve.problem` arrays to the planners (miqp, grid, exhaustive all read the same arrays and
score with the same `passes.solve.problem.evaluate`).

Where the collectives run: cost/mesh.py. What one spec costs per sample: cost/spec_facts.py (rescaled
from the traced batch, at the cluster's training precision). Tensors between layers:
cost/tensor_pricing.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from fxplan.cluster import Cluster
from fxplan.constraints import Constraints, chunks_of, enough_microbatches, stages_fit
from fxplan.passes.cost.mesh import StageMesh
from fxplan.passes.cost.compute_time import forward_time
from fxplan.passes.cost.schedule_costs import schedule_fields
from fxplan.passes.cost.spec_facts import SpecFacts, matmul_numel, param_tensors, spec_facts
from fxplan.passes.cost.strategies import layer_strategies
from fxplan.passes.cost.tensor_pricing import TensorPricer
from fxplan.passes.ir import R, LayerGraph, StrategySpace, TPSpec, frozen_map
from fxplan.passes.solve.problem import Edge, Problem
from fxplan.plan import Strategy


@dataclass(frozen=True)
class _Arrays:
    fwd: np.ndarray
    bwd: np.ndarray
    wgt: np.ndarray
    sync: np.ndarray
    mem_fixed: np.ndarray
    mem_act: np.ndarray
    mem_peak: np.ndarray
    mem_work: np.ndarray
    mem_grad: np.ndarray


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
        self._facts: dict[tuple[int, int, str], SpecFacts] = {}
        self._fact_ids: dict[SpecFacts, int] = {}  # equal facts -> one small id (cheap keys)
        self._spec_ids: dict[tuple[int, int, str], int] = {}
        self._specs: dict[tuple[int, int, str], TPSpec] = {
            (u, tp, spec.label): spec for (u, tp), specs in self.space.specs.items() for spec in specs}
        self._layer_specs: dict[int, list[TPSpec]] = {u: [] for u in range(len(layer_graph.layers))}
        for (u, tp, label) in sorted(self._specs):
            self._layer_specs[u].append(self._specs[(u, tp, label)])
        self._tables: dict[tuple[int, int], tuple] = {}  # (pp, c) -> (arrays, edges): schedule-free
        self._strategies: dict[tuple[int, int | None], tuple[tuple[Strategy, ...], ...]] = {}
        self._arrays: dict[tuple, _Arrays] = {}
        self._edge_cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self.mesh = StageMesh(cluster)
        self._pricer = TensorPricer(cluster, self.mesh, self.batch_size / layer_graph.batch_size)
        self._params = param_tensors(layer_graph)
        self._twins: dict[tuple, SpecFacts] = {}
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
                # A layer that mixes samples (training BatchNorm) synchronises its statistics over dp
                # (priced in its facts' comms); only microbatches stay whole (problem()).
                value = tuple(layer_strategies(u, self.space, n_s, self.constraints)
                              for u in range(len(self.graph.layers)))
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

    def problem(self, pp: int, microbatches: int, schedule: str, share_floor: bool = False) -> Problem | None:
        """The arrays of one (pp, microbatches, schedule) candidate, or None when it cannot exist:
        pp does not divide the devices or exceeds the layers, the batch does not split into
        microbatches x dp, or the constraints' pins rule it (or every strategy of a layer) out.
        `share_floor`: a bubble share that may be below the schedule's (cheap; for bounds only)."""
        pins = self.constraints
        if not pins.allows(pp=pp, microbatches=microbatches, schedule=schedule):
            return None
        chunks = chunks_of(schedule)  # stages per rank
        if pp < 1 or self.world % pp or not stages_fit(schedule, pp, len(self.graph.layers)):
            return None
        if chunks > 1 and not enough_microbatches(schedule, pp, microbatches):
            return None  # a chunked list cannot be built (one-chunk ones degrade to GPipe's shape)
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
        fwd, bwd, wgt = (tuple(a.fwd for a in arrays), tuple(a.bwd for a in arrays), tuple(a.wgt for a in arrays))
        problem = Problem(
            pp=pp, microbatches=microbatches, schedule=schedule,
            fwd=fwd, bwd=bwd, wgt=wgt,
            sync=tuple(a.sync for a in arrays), mem_fixed=tuple(a.mem_fixed for a in arrays),
            mem_act=tuple(a.mem_act for a in arrays), mem_peak=tuple(a.mem_peak for a in arrays),
            mem_work=tuple(a.mem_work for a in arrays), mem_grad=tuple(a.mem_grad for a in arrays), edges=edges,
            memory_limit=float(self.cluster.memory_bytes),
            labels=labels,
            **schedule_fields(schedule, pp, microbatches, fwd, bwd, wgt, self.cluster, share_floor),
        )
        if chunks == 1:
            return problem
        # pp * chunks stages on the same n/pp devices: a stage gets 1/chunks of a device's memory and
        # pays its rank's gradient sync (each chunk's, one after another) at most chunks times its own
        return replace(problem, pp=pp * chunks, microbatches=microbatches * chunks, chunks=chunks,
                       memory_limit=problem.memory_limit / chunks, sync=tuple(a * chunks for a in problem.sync))

    def bound_problem(self, pp: int, microbatches: int, schedule: str) -> Problem | None:
        """problem(..., share_floor=True): what the search's lower bounds read."""
        return self.problem(pp, microbatches, schedule, share_floor=True)

    def candidate(self, pp: int, microbatches: int, schedule: str):
        """(Problem, strategies) of one candidate, or None: the pair whose indices agree."""
        problem = self.problem(pp, microbatches, schedule)
        return None if problem is None else (problem, self.strategies(pp, microbatches))

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
            "efficiency": (f"calibrated on {c.calibration.host} at {c.calibration.date}: matmul curve, "
                           f"elementwise rate, op overhead" if c.calibration is not None else
                           f"{c.max_efficiency} * size / (size + {c.half_efficiency_dim}), size = geomean(m, n, k)"),
            "backward": "2x forward FLOPs; weight matmuls split equally into B and W",
            "collectives": ("alpha-beta fitted per collective and group size on the real backend"
                            if c.calibration is not None else
                            "alpha-beta ring; hierarchical (intra then inter-node) for groups spanning nodes"),
            "fsdp": "reshard (ZeRO-3): params all-gathered per microbatch in forward and again in backward, "
                    "keep: gathered once per step and held; grads reduce-scattered",
            "grad_sync": "not overlapped with compute; its flat buffers hold a second gradient copy",
            "memory": "max(params + optimizer + in-flight activations (+ grads accumulated so far) + the largest "
                      "layer working set, params + grads + optimizer + dp sync buffers)",
            "activation_precision": "float activations at dtype_bytes",
            "batch_size": self.batch_size,
        }

    # ------------------------------------------------------------ per layer
    def facts(self, u: int, tp: int, label: str) -> SpecFacts:
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
                facts = spec_facts(self.graph, u, spec, self.cluster, counts_shared, self._params)
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
            rows = [self._strategy_cost(self.facts(u, s.tp, s.spec), s.dp, s.fsdp, s.recompute, n_s, c,
                                        reshard=s.reshard) for s in strategies]
            cached = _Arrays(*(_frozen(col) for col in zip(*rows)))
            self._arrays[key] = cached
        return cached

    def _strategy_cost(self, f: SpecFacts, dp: int, fsdp: bool, recompute: bool, n_s: int, c: int,
                       reshard: bool = True):
        """(fwd, bwd, wgt, sync, mem_fixed, mem_act, mem_peak, mem_work, mem_grad) of one strategy, one
        microbatch, one device (what each memory term holds: passes/solve/problem.py)."""
        cl = self.cluster
        samples = self.batch_size / (c * dp)  # per device per microbatch
        flops = f.flops * samples
        t_f = forward_time(cl, f, samples)
        # Weight-gradient FLOPs equal the weight matmuls' forward FLOPs; the rest of backward is B.
        w_frac = min(1.0, 2.0 * f.rows_per_sample * samples * matmul_numel(f) / flops) if flops > 0 else 0.0
        t_b, t_w = t_f * (2.0 - w_frac), t_f * w_frac
        comm = {"fwd": 0.0, "bwd": 0.0}
        for kind, axis, nbytes, per_sample, phase in f.comms:
            size = nbytes * samples if per_sample else nbytes
            comm[phase] += self.mesh.comm_time(kind, n_s, f.tp, axis, size)
        param_bytes = f.param_numel * cl.dtype_bytes
        gather = self.mesh.comm_time("all_gather", n_s, f.tp, "dp", param_bytes) if fsdp else 0.0
        # ZeRO-3 gathers in every microbatch's forward and again in its backward; keep gathers once
        # per step (spread over the microbatches' forwards) plus the copy of the gathered buffer out
        # into the parameters (no memory bandwidth figure: priced at the link's rate rather than at
        # no cost), and again in backward only where recompute re-runs the forward.
        kept = (gather + param_bytes / cl.intra_bw) / c if fsdp and not reshard else 0.0
        fwd = t_f + comm["fwd"] + (gather if reshard else kept)
        bwd = t_b + comm["bwd"] + (gather if reshard or recompute else 0.0) + \
            ((t_f + comm["fwd"]) if recompute else 0.0)
        if dp > 1:
            sync = self.mesh.comm_time("reduce_scatter" if fsdp else "all_reduce", n_s, f.tp, "dp", param_bytes)
        else:
            sync = 0.0
        # weights + optimizer state, and gradients: sharded over dp under FSDP
        state = f.param_numel * (cl.dtype_bytes + cl.optimizer_bytes_per_param) / (dp if fsdp else 1)
        grads = param_bytes / (dp if fsdp else 1)
        # keep: the gathered copy lives from the first forward of the step to its end
        kept = param_bytes if fsdp and not reshard else 0.0
        # With one microbatch the step's gradients do not exist when backward starts (zero_grad sets
        # them to None): a layer's appear as its backward runs, after the later layers' activations
        # were freed (`mem_grad`, summed over the later layers of the stage by evaluate). Under gradient
        # accumulation the earlier microbatches' gradients are there throughout.
        mem_fixed = state + kept + (grads if c > 1 else 0.0)
        mem_grad = grads if c == 1 else 0.0
        if recompute:
            mem_act = f.input_bytes * samples + f.input_fixed_bytes
        else:
            mem_act = f.act_bytes * samples
        # While the layer's backward runs: an op's incoming gradient and the one it makes (at most
        # twice the layer's largest tensor); under FSDP its full-size weight gradients and the
        # reduce-scatter buffer they are packed into, and under ZeRO-3 the prefetched re-gather of the
        # layer before it (priced at this layer's size; the layer's own re-gathered weights are
        # dropped before the buffer is made, runtime/fsdp.py, so three copies at most).
        mem_work = 2.0 * f.largest_bytes * samples
        # sequence parallelism's re-gathered input, kept while its matmuls' backward runs, and the
        # flat buffer it is gathered into
        mem_work += 2.0 * f.regather_bytes * samples
        if fsdp:
            mem_work += param_bytes * (3.0 if reshard else 2.0)
        if recompute:  # its backward re-runs the forward: the saved activations are back meanwhile
            mem_work += f.act_bytes * samples
        # The dp sum concatenates the gradients into flat all-reduce buffers (runtime/grad_sync.py,
        # as DDP's buckets): while they live, a second gradient copy exists, but no activation.
        mem_peak = state + grads + (param_bytes if dp > 1 and not fsdp else 0.0)
        return fwd, bwd, t_w, sync, mem_fixed, mem_act, mem_peak, mem_work, mem_grad

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




# ---------------------------------------------------------------- helpers


def _distinct(items):
    order: dict = {}
    index = tuple(order.setdefault(item, len(order)) for item in items)
    return list(order), index


def _placement(placements, name):
    return placements.get(name, R)






def _with_replicated_specs(graph: LayerGraph, space: StrategySpace) -> StrategySpace:
    """Add the always-valid tp=1 replicated spec for layers the space lacks one for."""
    missing = [layer for layer in graph.layers if not space.for_layer(layer.index, 1)]
    if not missing:
        return space
    specs = dict(space.specs)
    for layer in missing:
        specs[(layer.index, 1)] = (TPSpec.replicated(layer),)
    return StrategySpace(specs=frozen_map(specs))






