"""Emit one rank's program: its stage graph with local parameter shards and collectives inserted.

    prog = emit_rank(traced, layer_graph, space, plan, rank, ops=GRAPH_OPS)  # fxplan/runtime/collectives.py
    print(prog.gm.code)        # fxplan_tp_all_reduce(x, 'tp:0,1') ... visible as calls

Codegen only places the calls: the functions come from the caller as a GraphOps value, so nothing
here knows about process groups or how a collective runs.

What a rank computes (shared semantics, fxplan.passes.sharding.redistribute is the source of truth for which
collective each placement change needs):
- a layer with strategy (dp, tp) sees the stage's n devices as a (dp, tp) mesh, tp innermost;
- inside a layer a tensor has the placement its TPSpec gives; a consumer wanting another one gets
  `consume_steps` (incl. Megatron's f: one per tensor and layer, shared by its sharded consumers);
- a tensor produced in another layer (or received from the previous stage, or a stage-0 input
  that is the full microbatch on every rank) is converted with `layout_steps`;
- FSDP parameters are stored per parameter (a flat 1/dp block each, codegen/params.py) but
  gathered per layer: at the first use of any of them, ONE fxplan_fsdp_gather_layer call gathers
  every FSDP parameter of that layer (same dp group and dtype) and getitems hand out each one; its
  backward is one reduce-scatter; the call says whether the layer keeps the gathered weights for
  the step (reshard=False) or frees them after forward and re-gathers in backward (the runtime's);
- shape arguments become static local shapes (codegen/shapes.py);
- the last stage returns the local loss times 1/dp of the loss layer (the runtime applies
  1/microbatches), so summing over the dp group gives the true loss;
- every emitted node is tagged with its layer (node.meta["fxplan_layer"]); the layers whose
  strategy has `recompute` then run under activation checkpointing (codegen/recompute.py).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.fx as fx

from fxplan.codegen.batch_stats import needs_sync, sync_batch_norm
from fxplan.codegen.devices import runtime_device_pass
from fxplan.codegen.groups import group_key
from fxplan.codegen.params import MeshSeat, StageParams
from fxplan.codegen.program import GraphOps, RankProgram
from fxplan.codegen.recompute import LAYER_META, recompute_pass
from fxplan.codegen.shapes import (is_size_query, is_split, local_shape, rewrite_conv_groups, rewrite_shape_args,
                                   rewrite_split_args, split_dim)
from fxplan.codegen.split import split_stages
from fxplan.codegen.tp_steps import emit_tp_step, local_blocks
from fxplan.codegen.vocab import vocab_rewrite
from fxplan.errors import PlanFileError
from fxplan.passes.ir import R, LayerGraph, Partial, Replicate, Shard, StrategySpace, TPSpec, Traced, frozen_map
from fxplan.passes.sharding.redistribute import Layout, layout_steps, tensor_steps, transition


@dataclass
class _Ctx:
    """One layer's strategy seen from this rank."""

    index: int
    name: str
    spec: TPSpec
    dp: int
    tp: int
    fsdp: bool
    dp_index: int
    tp_index: int
    tp_key: str
    dp_key: str
    keep: bool = False  # FSDP keeps the gathered weights for the step (the strategy's reshard=False)

    def layout(self, placement) -> Layout:
        return Layout(self.dp, self.tp, placement)

    def seat(self) -> MeshSeat:
        return MeshSeat(self.name, self.dp, self.tp, self.dp_index, self.tp_index, self.fsdp, self.dp_key, self.tp_key)

    def placement(self, node: str):
        # A node outside the layer's own nodes (a stage-local get_attr of a weight another layer
        # owns, e.g. a tied embedding read by the head) has the placement it enters the layer with,
        # the same one its stored shard was cut with (_shard).
        pl = self.spec.placements.get(node)
        return pl if pl is not None else self.spec.input_placements.get(node, R)


def replicated_spec(layer) -> TPSpec:
    """tp = 1: every node replicated (what shard_prop calls "R")."""
    return TPSpec.replicated(layer)


def _stage_of_rank(plan, rank: int, index: int | None = None):
    """(stage, rank's position in it): the rank's only stage, or stage `index` of those it holds."""
    for stage in plan.stages:
        if rank in stage.devices and index in (None, stage.index):
            return stage, stage.devices.index(rank)
    if index is not None:
        raise PlanFileError(f"rank {rank} does not hold stage {index} of the plan (it holds "
                            f"{list(plan.stages_of_rank(rank))})")
    raise PlanFileError(f"rank {rank} is not a device of any stage of the plan (world size {plan.world_size})")


def requires_grad_map(traced) -> dict[str, bool]:
    """Which tensors carry gradients: floating values depending on a trainable parameter."""
    params = dict(traced.gm.named_parameters())
    out: dict[str, bool] = {}
    for node in traced.gm.graph.nodes:
        meta = traced.tensors.get(node.name)
        floating = meta is not None and ("float" in meta.dtype or "complex" in meta.dtype)
        if node.op == "get_attr":
            p = params.get(node.target)
            out[node.name] = bool(floating and p is not None and p.requires_grad)
        elif node.op == "placeholder":
            out[node.name] = False
        else:
            out[node.name] = bool(floating and any(out.get(a.name, False) for a in node.all_input_nodes))
    return out


def emit_rank(traced: Traced, layer_graph: LayerGraph, space: StrategySpace, plan, rank: int, params=None, *,
              ops: GraphOps, stage: int | None = None) -> RankProgram:
    """The program of global rank `rank` under `plan`, its collectives calls to `ops`' functions.

    params: None (cut the shards from the traced module's tensors), a state_dict-like mapping of
    full tensors, or "meta" (local shards created on the meta device; the runtime materialises them).
    stage: which of the rank's stages, when it holds several (plan.chunks > 1; default its first).
    """
    return _Emitter(traced, layer_graph, space, plan, rank, params, ops, stage).run()


class _Emitter:
    def __init__(self, traced, layer_graph, space, plan, rank, params, ops: GraphOps, stage: int | None = None):
        self.traced, self.lg, self.space, self.plan, self.rank = traced, layer_graph, space, plan, rank
        self.ops = ops
        self.stage, self.q = _stage_of_rank(plan, rank, stage)
        self.devices = tuple(self.stage.devices)
        self.n = len(self.devices)
        self.mb = plan.microbatches
        by_name = {layer.name: layer for layer in layer_graph.layers}
        missing = [name for name in plan.layers if name not in by_name]
        if missing or len(plan.layers) != len(layer_graph.layers):
            raise PlanFileError(f"the plan's layers do not match the model's (unknown: {missing[:3]}); "
                                f"re-plan for this model")
        stage_of = {name: plan.stage_of(name) for name in plan.layers}
        self.stage_graph = split_stages(traced, layer_graph, stage_of)[self.stage.index]
        self.ctx_of_layer = {name: self._ctx(by_name[name], strat)
                             for name, strat in self.stage.strategies.items()}
        # Every layer's strategy (any stage) gives the home layout of the tensors it produces.
        self.home_layer: dict[str, tuple] = {}
        for layer in layer_graph.layers:
            strat = plan.strategy(layer.name)
            for node in layer.nodes:
                self.home_layer[node] = (layer, strat)
        self.rg = requires_grad_map(traced)
        self.params = StageParams(traced.gm, self.rg, params)
        self.alias = self.params.alias  # get_attr node -> first get_attr of the same target here
        self.meta = traced.tensors
        self.graph = fx.Graph()
        self.internal: dict[str, fx.Node] = {}  # node value at its own placement in its own layer
        self.ctx_of: dict[str, _Ctx] = {}
        self.home: dict[str, tuple[fx.Node, Layout]] = {}
        self.cache: dict[tuple, fx.Node] = {}
        self.keys: set[str] = set()
        self.uses: dict[tuple, list] = {}  # (tensor, consumer layer index) -> its distinct uses there

    # ------------------------------------------------------------ strategy context
    def _ctx(self, layer, strat) -> _Ctx:
        tp, dp = strat.tp, strat.dp
        if tp == 1:
            specs = self.space.for_layer(layer.index, 1) if self.space is not None else ()
            spec = next((s for s in specs if s.label == strat.spec), None) or replicated_spec(layer)
        else:
            spec = self.space.spec(layer.index, tp, strat.spec)
        dp_index, tp_index = divmod(self.q, tp)
        d = self.devices
        return _Ctx(layer.index, layer.name, spec, dp, tp, strat.fsdp, dp_index, tp_index,
                    group_key(d[dp_index * tp:(dp_index + 1) * tp], "tp"), group_key(d[tp_index::tp], "dp"),
                    keep=strat.fsdp and not strat.reshard)

    def _home_layout(self, name: str) -> Layout:
        """How tensor `name` leaves the layer producing it (stage inputs: the full microbatch)."""
        if name in self.traced.placeholders:
            return Layout(1, self.n, R)
        layer, strat = self.home_layer[name]
        if strat.tp == 1:
            return Layout(strat.dp, 1, R)
        spec = self.space.spec(layer.index, strat.tp, strat.spec)
        pl = spec.output_placements.get(name, spec.placements.get(name, R))
        return Layout(strat.dp, strat.tp, R if isinstance(pl, Partial) else pl)

    # ------------------------------------------------------------ graph helpers
    def _call(self, fn, *args) -> fx.Node:
        for a in args:
            if isinstance(a, str) and ":" in a:
                self.keys.add(a)
        return self.graph.call_function(fn, tuple(args))

    def _key(self, positions, role: str) -> str:
        return group_key([self.devices[p] for p in positions], role)

    def _emit_tp_step(self, step, x: fx.Node, tp_key: str, name: str | None = None, rows: int = 1) -> fx.Node:
        """rows: the microbatch * dp row blocks tensor `name` is cut into (a blocked shard of a dim
        that merged the batch holds only its rows' blocks)."""
        return emit_tp_step(self.graph, self._call, self.ops, step, x, tp_key,
                            local_blocks(step, self.meta.get(name) if name else None, rows))

    def _emit_layout_steps(self, x: fx.Node, src: Layout, dst: Layout, name: str) -> fx.Node:
        meta, rg = self.meta[name], self.rg.get(name, False)
        q = self.q
        for step in layout_steps(src, dst, meta, rg):
            if step.kind == "gather":
                base = (q // src.tp) * src.tp
                x = self._emit_tp_step(step, x, self._key(range(base, base + src.tp), "tp"))
            elif step.kind == "slice":
                base = (q // dst.tp) * dst.tp
                x = self._emit_tp_step(step, x, self._key(range(base, base + dst.tp), "tp"))
            elif step.kind == "slice_rows":
                f = step.parts
                base, r = (q // src.tp) * src.tp, q % dst.tp
                bwd = self._key([base + r + i * dst.tp for i in range(f)], "rows") if rg else ""
                x = self._call(self.ops.rows, x, step.dim, (q // dst.tp) % f, f, bwd)
            elif step.kind == "gather_rows" and step.parts == 1:
                g, b = step.group, q // dst.tp  # the g source blocks making our destination block
                fwd = self._key([(b * g + j) * src.tp + q % src.tp for j in range(g)], "rows")
                x = self._call(self.ops.regroup_rows, x, step.dim, fwd, 0, 1, "")
            elif step.kind == "gather_rows":
                fwd = self._key(range(q % src.tp, self.n, src.tp), "dp")
                bwd = self._key(range(q % dst.tp, self.n, dst.tp), "dp") if rg else ""
                x = self._call(self.ops.regroup_rows, x, step.dim, fwd, q // dst.tp, step.parts, bwd)
            elif step.kind == "dp_grad":
                key = self._key(range(q % dst.tp, self.n, dst.tp), "dp") if dst.dp > 1 else ""
                x = self._call(self.ops.dp_grad_fix, x, key, step.scale)
            else:
                raise NotImplementedError(f"layout step {step.kind!r}")
        return x

    # ------------------------------------------------------------ values
    def _home(self, name: str) -> tuple[fx.Node, Layout]:
        """Value of tensor `name` as it leaves its layer (the output placement)."""
        name = self.alias.get(name, name)
        if name in self.home:
            return self.home[name]
        ctx = self.ctx_of[name]
        pl = ctx.placement(name)
        out = ctx.spec.output_placements.get(name, pl)
        if isinstance(out, Partial):
            out = R
        x = self.internal[name]
        for step in transition(pl, out, ctx.tp):
            x = self._emit_tp_step(step, x, ctx.tp_key, name, self.mb * ctx.dp)
        self.home[name] = (x, ctx.layout(out))
        return self.home[name]

    def _arrive(self, name: str, ctx: _Ctx):
        """Tensor `name` in layer ctx's layout at its entry placement -> (node, placement)."""
        if self.alias.get(name, name) in self.internal and self.ctx_of[self.alias.get(name, name)] is ctx:
            return self.internal[self.alias.get(name, name)], ctx.placement(self.alias.get(name, name))
        key = ("arrive", name, ctx.index)
        want = ctx.spec.input_placements.get(name, ctx.spec.placements.get(name, R))
        if key not in self.cache:
            x, src = self._home(name)
            self.cache[key] = self._emit_layout_steps(x, src, ctx.layout(want), name)
        return self.cache[key], want

    def _consume(self, name: str, consumer: fx.Node, ctx: _Ctx, want) -> fx.Node:
        """Tensor `name` as `consumer` (in layer ctx) needs it: redistribute.tensor_steps' chain.

        Chains of one tensor share prefixes (one f per tensor and layer serves every sharded
        consumer), so every prefix is emitted once and cached.
        """
        x, have = self._arrive(name, ctx)
        if ctx.tp == 1 or not isinstance(want, (Replicate, Shard, Partial)):
            return x  # tp=1, or ANY (shape-only use): taken as it is
        uses = self.uses.get((name, ctx.index), [])
        use = (want, self._sharded(consumer, ctx))
        if use not in uses:
            uses = uses + [use]
        chain = tensor_steps(have, uses, ctx.tp)[use]
        for i, step in enumerate(chain):
            key = ("chain", name, ctx.index, chain[:i + 1])
            if key not in self.cache:
                self.cache[key] = self._emit_tp_step(step, x, ctx.tp_key, name, self.mb * ctx.dp)
            x = self.cache[key]
        return x

    def _sharded(self, node, ctx: _Ctx) -> bool:
        pls = [p for p in ctx.spec.arg_placements.get(node.name, ()) if p is not None]
        pls.append(ctx.placement(node.name))
        return any(isinstance(p, (Shard, Partial)) for p in pls)

    def _wanted(self, node: fx.Node, ctx: _Ctx) -> list:
        args = ctx.spec.arg_placements.get(node.name)
        inputs = node.all_input_nodes
        if args is None or len(args) != len(inputs):
            return [ctx.placement(a.name) if a.name in self.internal and self.ctx_of.get(a.name) is ctx
                    else ctx.spec.input_placements.get(a.name, R) for a in inputs]
        return list(args)

    # ------------------------------------------------------------ parameters
    def _plan_params(self, sg: fx.Graph) -> None:
        """Shard every parameter this stage reads, with the placement it enters its layer with."""
        for node in sg.nodes:
            if node.op == "get_attr":
                ctx = self.ctx_of[node.name]
                pl = ctx.placement(node.name)
                if node.name not in ctx.spec.placements:
                    pl = ctx.spec.input_placements.get(node.name, R)
                tp_dim = pl.dim if isinstance(pl, Shard) and ctx.tp > 1 else None
                self.params.add(node.name, node.target, tp_dim, ctx.seat(), tp_blocks=getattr(pl, "blocks", 1))

    def _ensure_param(self, name: str) -> None:
        """Emit the gather of `name`'s FSDP unit at its first use (nothing for other tensors)."""
        ctx = self.ctx_of.get(self.alias.get(name, name))
        self.internal.update(self.params.gather_unit(self.graph, self.ops.fsdp_gather_layer, name, self.keys,
                                                     keep=bool(ctx and ctx.keep)))

    # ------------------------------------------------------------ the pass
    def _assign_layers(self, sg: fx.Graph) -> None:
        name_ctx = {}
        for ctx in self.ctx_of_layer.values():
            for node in self.lg.layers[ctx.index].nodes:
                name_ctx[node] = ctx
        first = next(iter(self.ctx_of_layer.values()))
        nodes = [n for n in sg.nodes if n.op not in ("placeholder", "output")]
        for n in nodes:  # nodes outside this stage's layers (a get_attr read here too): first user's layer
            if n.name not in name_ctx:
                users = [u for u in n.users if u.name in name_ctx]
                name_ctx[n.name] = name_ctx[users[0].name] if users else (
                    next((name_ctx[a.name] for a in n.all_input_nodes if a.name in name_ctx), first))
        for n in nodes:
            self.ctx_of[n.name] = name_ctx[n.name]
        # every use of each tensor per layer: (wanted placement, consumer is sharded compute)
        self.uses.clear()
        for n in nodes:
            ctx = self.ctx_of[n.name]
            for a, want in zip(n.all_input_nodes, self._wanted_static(n, ctx)):
                if isinstance(want, (Replicate, Shard, Partial)):
                    use = (want, self._sharded(n, ctx))
                    lst = self.uses.setdefault((a.name, ctx.index), [])
                    if use not in lst:
                        lst.append(use)

    def _wanted_static(self, node, ctx):
        args = ctx.spec.arg_placements.get(node.name)
        if args is not None and len(args) == len(node.all_input_nodes):
            return list(args)
        return [None] * len(node.all_input_nodes)

    def run(self) -> RankProgram:
        sg = self.stage_graph.gm.graph
        self._assign_layers(sg)
        self._plan_params(sg)
        inputs, input_layouts = [], []
        for node in sg.nodes:
            if node.op == "placeholder":
                ph = self.graph.placeholder(node.name)
                ph.meta.update(node.meta)
                layout = self._home_layout(node.name)
                self.home[node.name] = (ph, layout)
                inputs.append(node.name)
                input_layouts.append(layout)
            elif node.op == "get_attr":
                if node.name in self.alias or node.name in self.params.unit_of or node.name in self.internal:
                    continue  # an alias, or an FSDP parameter gathered with its unit at first use
                self.internal[node.name] = self.graph.get_attr(self.params.attr_of_node[node.name])
            elif node.op == "output":
                return self._finish(node, inputs, input_layouts)
            else:
                self._emit_node(node)
            self._tag_new(self.ctx_of[node.name].name if node.name in self.ctx_of else None)
        raise AssertionError("stage graph without output")

    def _tag_new(self, layer: str | None) -> None:
        """Mark the nodes emitted for one source node with its layer (recompute regions follow it).

        Conversions emitted lazily (a producer's P -> R, a consumer's layout steps) belong to the
        layer whose node needed them, which is exact either way: they are plain forward ops.
        """
        for new in reversed(self.graph.nodes):
            if LAYER_META in new.meta:
                break
            new.meta[LAYER_META] = layer

    def _emit_node(self, node: fx.Node) -> None:
        ctx = self.ctx_of[node.name]
        wanted = self._wanted(node, ctx)
        for a in node.all_input_nodes:
            self._ensure_param(a.name)
        env = {}
        for a, want in zip(node.all_input_nodes, wanted):
            if a.name not in self.meta and a.name in self.internal:  # non-tensor value (a size)
                env[a] = self.internal[a.name]
            elif a.name in self.internal or a.name in self.home or a.name in self.alias:
                env[a] = self._consume(a.name, node, ctx, want if want is not None else R)
            else:
                raise PlanFileError(f"{node.name} reads {a.name}, which this stage does not have")
        new = self.graph.node_copy(node, lambda a: env[a])
        if needs_sync(node, ctx.dp):  # batch statistics over the whole dp group (batch_stats.py)
            sync_batch_norm(new, node, self.ops.sync_batch_norm, ctx.dp_key)
            self.keys.add(ctx.dp_key)
        meta = self.meta.get(node.name)
        rows = self.mb * ctx.dp
        if meta is not None:
            shape = local_shape(meta, ctx.placement(node.name), ctx.tp, rows)
            rewritten = rewrite_shape_args(new, shape, meta.shape)
            if rewritten is not None:
                new.args, new.kwargs = rewritten
        if wanted and (rewritten := rewrite_conv_groups(new, wanted[0], ctx.tp)) is not None:
            new.args, new.kwargs = rewritten
        if is_split(node):
            src = node.all_input_nodes[0]
            smeta = self.meta.get(src.name)
            if smeta is not None:
                dim = split_dim(node) % len(smeta.shape)
                want = wanted[0]
                ratio = (rows if smeta.batch_dim == dim else 1) * (
                    ctx.tp if isinstance(want, Shard) and want.dim == dim else 1)
                rewritten = rewrite_split_args(new, ratio)
                if rewritten is not None:
                    new.args, new.kwargs = rewritten
        new = vocab_rewrite(self.graph, self._call, self.ops, node, new, wanted, ctx.tp, ctx.tp_index, ctx.tp_key) or new
        self.internal[node.name] = new

    def _finish(self, out_node: fx.Node, inputs, input_layouts) -> RankProgram:
        last = self.stage.index == len(self.plan.stages) - 1
        outputs = self.stage_graph.outputs
        for name in outputs:
            self._ensure_param(name)
        scale = 1.0
        if last:
            x, layout = self._home(outputs[0])
            scale = 1.0 / layout.dp
            if layout.dp > 1:
                x = self.graph.call_function(operator.mul, (x, scale))
            self.graph.output(x)
            output_layouts = (layout,)
        else:
            vals = [self._home(o) for o in outputs]
            self.graph.output(tuple(v for v, _ in vals))
            output_layouts = tuple(lay for _, lay in vals)
        for node in reversed(list(self.graph.nodes)):  # sizes read from local tensors are now unused
            if not node.users and is_size_query(node):
                self.graph.erase_node(node)
        runtime_device_pass(self.graph)
        self.graph.lint()
        gm = fx.GraphModule(self.params.module(), self.graph, class_name=f"Rank{self.rank}Stage{self.stage.index}")
        gm.recompile()
        recompute = [name for name, strat in self.stage.strategies.items() if strat.recompute]
        if recompute:
            gm = recompute_pass(gm, recompute)
        return RankProgram(rank=self.rank, stage=self.stage.index, gm=gm, inputs=tuple(inputs),
                           outputs=tuple(outputs), input_layouts=tuple(input_layouts),
                           output_layouts=output_layouts, params=frozen_map(self.params.shards),
                           group_keys=tuple(sorted(self.keys)), loss_scale=scale)

