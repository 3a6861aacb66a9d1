"""Sharding propagation: the tensor-parallel shardings (TPSpec) of every layer for every tp degree.

How a layer's shardings are found (no module or parameter names are read: ops, shapes, data flow):
- The choices that matter are the placements of the layer's matrix-like weights (parameters with
  >= 2 dims, and batch-less >= 2-dim inputs such as a tied embedding): R, S(0), S(1), ... Each is
  decided at its first consumer, among the placements that consumer's rules admit for it (a weight
  is never redistributed: a combination needing that is dropped).
- Every other op picks greedily, in topological order, the admissible strategy (op_rules.py) with
  the least communication now plus what its output will probably cost later (P: an all-reduce,
  S: an all-gather); ties go to the strategy that converts nothing now (reductions are deferred).
- States (one per weight combination so far) that agree on the placements of every live tensor
  have the same future, so only their Pareto-best (comm, param bytes, activation bytes) survive:
  a dynamic program over the data flow, which keeps a GPT block at tp=8 far below a second.
- At the end, P outputs are all-reduced (outputs are R or S), the comms are derived from the
  placements exactly as codegen will emit them (redistribute.tensor_steps), and the Pareto front
  over (comm, param bytes, activation bytes) is kept, best comm first, at most `max_specs`.
Megatron's column -> row pairs come out of this because they are the cheapest consistent choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from fxplan.passes.cost.flops import node_flops, node_saved
from fxplan.passes.ir import (R, Comm, Layer, LayerGraph, Partial, Placement, Replicate, Shard, StrategySpace, TPSpec,
                              Traced, frozen_map, op_name)
from fxplan.passes.sharding.graph_facts import GraphFacts
from fxplan.passes.sharding.op_rules import is_permute, strategies
from fxplan.passes.sharding.op_strategy import ANY, is_tensor_like
from fxplan.passes.sharding.rules_vocab import inner_comms
from fxplan.passes.sharding.sequence import SP_SPECS, saved_as_shard, sequence_boundary, sequence_specs
from fxplan.passes.sharding.redistribute import (comm_weight, consume_steps, distinct_steps, steps_comms, steps_score,
                                                 tensor_steps, transition)
from fxplan.passes.sharding.spec_front import pareto, select_front

MAX_SPECS = 6
BEAM = 64  # states kept after each op (after exact dominance pruning)
MATMULS = {"matmul", "mm", "bmm", "addmm", "baddbmm", "linear", "einsum"}


def build_strategy_space(traced: Traced, layer_graph: LayerGraph, tp_degrees, max_specs: int = MAX_SPECS) -> StrategySpace:
    """specs[(layer, tp)] for every layer and every tp in `tp_degrees` (tp=1: the single spec "R")."""
    ctx = GraphFacts(traced)
    specs = {}
    cache: dict[tuple, tuple] = {}  # (signature, tp) -> (template layer, specs)
    for layer in layer_graph.layers:
        for tp in sorted(set(int(t) for t in tp_degrees)):
            if tp == 1:
                specs[(layer.index, 1)] = (_replicated(ctx, layer),)
                continue
            key = (layer.signature, tp) if layer.signature else None
            hit = cache.get(key) if key else None
            if hit is not None and _same_shape(ctx, hit[0], layer):
                specs[(layer.index, tp)] = tuple(_remap(ctx, s, hit[0], layer) for s in hit[1])
                continue
            found = LayerProp(ctx, layer, tp, max_specs).run()
            boundary = sequence_boundary(ctx, layer, tp)
            if boundary is not None:
                found += sequence_specs(LayerProp(ctx, layer, tp, SP_SPECS, boundary=boundary).run())
            specs[(layer.index, tp)] = found
            if key:
                cache[key] = (layer, found)
    return StrategySpace(specs=frozen_map(specs))


def _replicated_args(node: fx.Node) -> tuple[Placement | None, ...]:
    """Every tensor input of `node` consumed as R (None for non-tensor inputs)."""
    return tuple(R if is_tensor_like(a) else None for a in node.all_input_nodes)


def _replicated(ctx: GraphFacts, layer: Layer) -> TPSpec:
    return TPSpec.replicated(layer, {x: _replicated_args(ctx.nodes[x]) for x in layer.nodes})


# ---------------------------------------------------------------- one layer, one tp


@dataclass
class _State:
    place: dict = field(default_factory=dict)  # node -> placement (tensor values)
    args: dict = field(default_factory=dict)  # node -> chosen arg placements
    sharded: dict = field(default_factory=dict)  # node -> sharded compute?
    chains: dict = field(default_factory=dict)  # tensor -> set of step chains emitted from it
    tags: list = field(default_factory=list)  # (node index, tag) where a weight was decided
    comm: float = 0.0
    params: float = 0.0
    acts: float = 0.0
    flops: float = 0.0
    out_place: dict = field(default_factory=dict)  # layer output -> placement at exit (set when finishing)

    def fork(self) -> "_State":
        return _State(dict(self.place), dict(self.args), dict(self.sharded), {k: set(v) for k, v in self.chains.items()},
                      list(self.tags), self.comm, self.params, self.acts, self.flops, dict(self.out_place))

    def score(self):
        return (self.comm, self.params, self.acts, self.flops)


class LayerProp:
    """Propagates shardings through one layer at one tp degree; `run()` returns its TPSpecs."""

    def __init__(self, ctx: GraphFacts, layer, tp: int, max_specs: int = MAX_SPECS, boundary=None):
        self.ctx, self.layer, self.tp, self.max_specs = ctx, layer, tp, max_specs
        # boundary(tensor): the placement an activation enters and leaves the layer with (sequence
        # parallelism's S(seq)), None for the default (enter R, leave as computed)
        self.boundary = boundary or (lambda n: None)
        self.nodes = [ctx.nodes[x] for x in layer.nodes]
        self.inputs = [ctx.nodes[x] for x in layer.inputs]
        self.outputs = {ctx.nodes[x] for x in layer.outputs}
        inside = set(self.nodes)
        owned = set(layer.params)
        # weights: decided by enumeration; free: placed by their first consumer at no cost
        self.weights = {n for n in self.nodes if ctx.is_param(n) and len(ctx.meta(n).shape) >= 2
                        and n.target in owned}
        self.weights |= {n for n in self.inputs if ctx.meta(n).batch_dim is None and len(ctx.meta(n).shape) >= 2
                         and ctx.rg.get(n, False)}
        self.free = {n for n in self.nodes if n.op == "get_attr"} - self.weights
        self.consumers = {n: [u for u in n.users if u in inside] for n in list(inside) + self.inputs}
        # a weight a matmul reads through a transpose (`x @ self.weight.T`) is decided at the matmul, as
        # if it read the weight: decided at the transpose, whose strategies all cost nothing, it would
        # leave the matmul one greedy choice per placement. (Other consumers keep the choice at the
        # transpose: an op that only runs replicated then gathers a weight stored sharded.)
        self.views = {n: n.all_input_nodes[0] for n in self.nodes
                      if is_permute(n) and len(n.all_input_nodes) == 1
                      and n.all_input_nodes[0] in self.weights and n.all_input_nodes[0].op == "get_attr"
                      and self.consumers[n.all_input_nodes[0]] == [n] and len(self.consumers[n]) == 1
                      and op_name(self.consumers[n][0]) in MATMULS}
        # a view's strategies from a stored weight placement: the same in every state, found once
        self.view_strategies = {v: [s for s in strategies(v, tp, current=lambda n: None)
                                    if isinstance(s.args[0], (Replicate, Shard))] for v in self.views}
        self.weights |= set(self.views)
        self.last_use: dict = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                self.last_use[a] = i
        for o in self.outputs:
            self.last_use[o] = len(self.nodes)

    # ------------------------------------------------------------ costs
    def _chain_cost(self, state: _State, t, chain) -> float:
        have = state.chains.get(t, ())
        meta, rg = self.ctx.meta(t), self.ctx.rg.get(t, False)
        return sum(steps_score((chain[i],), meta, rg) for i in range(len(chain)) if chain[: i + 1] not in have)

    def _pending(self, node, out) -> float:
        """What a P / S output will probably cost later (its reduction / gather). Measured on the
        smaller of the output and the largest input: an op that grows its output (repeat, expand)
        must not be pushed to gather its input early just because its output is big."""
        if isinstance(out, Replicate):
            return 0.0
        size = self.ctx.meta(node).nbytes
        ins = [self.ctx.meta(a).nbytes for a in node.all_input_nodes if is_tensor_like(a)]
        if ins:
            size = min(size, max(ins))
        return comm_weight("all_reduce" if isinstance(out, Partial) else "all_gather", self.tp) * size

    # ------------------------------------------------------------ propagation
    def run(self) -> tuple[TPSpec, ...]:
        start = _State()
        for x in self.inputs:
            if x not in self.weights:
                start.place[x] = self.boundary(x) or R
        states = [start]
        for i, node in enumerate(self.nodes):
            if node.op == "get_attr" or node in self.views:
                continue  # placed by its first consumer
            nxt = []
            for st in states:
                nxt.extend(self._step(st, i, node))
            if not nxt:
                raise AssertionError(f"no admissible strategy for {node.name}")  # replicated always is
            states = self._prune(nxt, i)
        return self._finish(states)

    def _step(self, st: _State, i: int, node) -> list[_State]:
        tp = self.tp
        best: dict[tuple, tuple] = {}
        for s in strategies(node, tp, current=lambda n: st.place.get(n)):
            key, now, ok = [], 0.0, True
            for a, need in zip(node.all_input_nodes, s.args):
                if need is None or need is ANY:
                    continue
                if a in self.weights and a not in st.place:
                    if isinstance(need, Partial) or (a in self.views and self._view_strategy(a, need) is None):
                        ok = False
                        break
                    key.append((a, need))
                    continue
                if a in self.weights and st.place[a] != need:
                    ok = False
                    break
                if a in self.free and a not in st.place:
                    continue  # stored as needed (P: stored R, priced below)
                cur = st.place.get(a, R)
                chain = consume_steps(cur, need, tp, sharded_consumer=s.sharded, only_sharded=False)
                now += self._chain_cost(st, a, chain)
            if not ok:
                continue
            for a, need in zip(node.all_input_nodes, s.args):  # free params needing P: stored R -> P
                if a in self.free and a not in st.place and isinstance(need, Partial):
                    now += self._chain_cost(st, a, consume_steps(R, need, tp, sharded_consumer=s.sharded))
            total = now + self._pending(node, s.out) if is_tensor_like(node) else now
            k = (tuple(key),)
            if k not in best or (total, now) < best[k][0]:
                best[k] = ((total, now), s)
        out = []
        for k, (_, s) in best.items():
            new = st.fork() if len(best) > 1 else st
            for a, need in k[0]:
                if a in self.views:  # the weight takes what the transpose needs for `need`
                    through = self._view_strategy(a, need)
                    weight = self.views[a]
                    new.place[weight] = through.args[0]
                    new.params += self._param_bytes(weight, through.args[0])
                    self._apply(new, a, through)
                else:
                    new.place[a] = need
                    new.params += self._param_bytes(a, need)
                new.tags.append((i, s.tag if s.sharded else "rep"))
            self._apply(new, node, s)
            for a in node.all_input_nodes:  # a view its consumer takes as it is (ANY): stored whole
                if a in self.views and a not in new.place:
                    new.place[self.views[a]] = R
                    new.params += self._param_bytes(self.views[a], R)
                    self._apply(new, a, self._view_strategy(a, R))
            out.append(new)
        return out

    def _view_strategy(self, view, need):
        """The transpose strategy of a weight view that yields `need` from a stored weight placement."""
        return next((s for s in self.view_strategies[view] if s.out == need), None)

    def _apply(self, st: _State, node, s) -> None:
        tp = self.tp
        args = []
        for a, need in zip(node.all_input_nodes, s.args):
            if need is ANY:  # recorded as ANY: codegen takes it as it is, and it makes no compute sharded
                args.append(ANY)
                continue
            if need is not None and a in self.free and a not in st.place:
                stored = need if isinstance(need, (Replicate, Shard)) else R
                st.place[a] = stored
                st.params += self._param_bytes(a, stored)
            if need is not None:
                chain = consume_steps(st.place.get(a, R), need, tp, sharded_consumer=s.sharded, only_sharded=False)
                if chain:
                    st.comm += self._chain_cost(st, a, chain)
                    have = st.chains.setdefault(a, set())
                    for j in range(len(chain)):
                        have.add(chain[: j + 1])
            args.append(need)
        st.args[node] = tuple(args)
        st.sharded[node] = s.sharded
        st.place[node] = s.out
        st.acts += self._saved(st, node, s)
        st.flops += node_flops(node) / (tp if s.sharded else 1)

    def _param_bytes(self, n, placement) -> float:
        if not self.ctx.is_param(n) or n.target not in self.layer.params:
            return 0.0
        m = self.ctx.meta(n)
        return m.nbytes / (self.tp if isinstance(placement, Shard) else 1)

    def _saved(self, st: _State, node, s) -> float:
        saved, extra = node_saved(node)
        total = 0.0
        for a in saved:
            p = st.args[node][node.all_input_nodes.index(a)] if a in node.all_input_nodes else s.out
            total += self.ctx.meta(a).nbytes / (self.tp if isinstance(p, (Shard, Partial)) else 1)
        return total + extra / (self.tp if s.sharded else 1)

    def _prune(self, states: list[_State], i: int) -> list[_State]:
        """Exact dominance among states with the same live placements, then a beam cap."""
        groups: dict[tuple, list[_State]] = {}
        for st in states:
            live = tuple(sorted((t.name, str(p), len(st.chains.get(t, ())))
                                for t, p in st.place.items() if self.last_use.get(t, -1) > i))
            groups.setdefault(live, []).append(st)
        kept = []
        for group in groups.values():
            kept.extend(pareto(group, _State.score))
        if len(kept) <= BEAM:
            return kept
        # keep the cheapest in comm and the smallest per device (the sharded ones pay comm early)
        by_comm = sorted(kept, key=_State.score)
        by_size = sorted(kept, key=lambda s: (s.params + s.acts, s.comm))
        out, seen = [], set()
        for a, b in zip(by_comm, by_size):
            for st in (a, b):
                if id(st) not in seen and len(out) < BEAM:
                    seen.add(id(st))
                    out.append(st)
        return out

    # ------------------------------------------------------------ results
    def _finish(self, states: list[_State]) -> tuple[TPSpec, ...]:
        done = [self._spec(st) for st in states]
        # A weight another layer reads too (a tied embedding and head) couples the two layers' choices:
        # keep the best specs of each of its placements, for the solver to match them across layers.
        tied = [w for w in self.weights if w in self.inputs or any(u not in self.consumers[w] for u in w.users)]
        groups: dict[tuple, list] = {}
        for d in done:
            groups.setdefault(tuple(str(d[1].place.get(w)) for w in tied), []).append(d)
        fronts = []
        for group in groups.values():
            uniq, seen = [], set()
            for d in sorted(pareto(group, lambda d: d[0]), key=lambda d: d[0]):
                if d[0] not in seen:
                    seen.add(d[0])
                    uniq.append(d)
            fronts.append(select_front(uniq, self.max_specs if len(groups) == 1 else max(2, self.max_specs // 2)))
        chosen = sorted((d for f in fronts for d in f), key=lambda d: d[0])
        specs, labels = [], {}
        for score, st, comms in chosen:
            label = self._label(st)
            labels[label] = labels.get(label, 0) + 1
            if labels[label] > 1:
                label = f"{label}#{labels[label]}"
            specs.append(self._tpspec(st, comms, label))
        return tuple(specs)

    def _spec(self, st: _State):
        """(score, state, comms): comms derived from the final placements as codegen emits them."""
        tp = self.tp
        # layers hand on R or plain shards: P is reduced, a blocked shard gathered, at the exit
        out_place = {o: self.boundary(o) or (R if isinstance(st.place.get(o, R), Partial) or getattr(
            st.place.get(o, R), "blocks", 1) > 1 else st.place.get(o, R)) for o in self.outputs}
        st.out_place.update(out_place)
        comms: list[Comm] = []
        score = 0.0
        for t in list(self.inputs) + self.nodes:
            uses = []
            for u in self.consumers.get(t, ()):
                if u not in st.args:
                    continue
                for a, need in zip(u.all_input_nodes, st.args[u]):
                    if a is t and need is not None and need is not ANY:
                        uses.append((need, st.sharded[u]))
            if t in out_place:
                uses.append((out_place[t], False))
                if isinstance(out_place[t], Shard) and self.boundary(t) is None:  # the next layer will most likely gather it
                    score += steps_score(transition(out_place[t], R, tp), self.ctx.meta(t), self.ctx.rg.get(t, False))
            if not uses:
                continue
            src = st.place.get(t, R)
            chains = tensor_steps(src, uses, tp).values()
            steps = distinct_steps(chains)
            if not steps:
                continue
            meta, rg = self.ctx.meta(t), self.ctx.rg.get(t, False)
            comms.extend(steps_comms(steps, meta, rg, why=f"{{kind}} {t.name}"))
            score += steps_score(steps, meta, rg)
            if any(s.kind == "gather_rs" for s in steps):
                regather, savers = saved_as_shard(self.ctx, t, self.consumers.get(t, ()), st.args)
                if savers:
                    comms.append(regather)
                    score += comm_weight(regather.kind, tp) * regather.nbytes
                    # the savers share one copy (counted by each above): it becomes one shard
                    st.acts -= meta.nbytes * (1 - 1 / tp)
        for node in self.nodes:  # collectives inside an op (the vocab-parallel loss's reductions)
            inner = inner_comms(node, st.args.get(node), tp)
            comms.extend(inner)
            score += sum(comm_weight(c.kind, tp) * c.nbytes for c in inner)
        comms = [Comm(c.kind, c.axis, c.nbytes, c.per_sample, c.phase, c.why.replace("{kind}", c.kind)) for c in comms]
        return (score, st.params, st.acts, st.flops), st, tuple(comms)

    def _label(self, st: _State) -> str:
        tags = [t for _, t in sorted(st.tags)]
        if not tags or all(t == "rep" for t in tags):
            return "R"
        runs: list[list] = []
        for t in tags:
            if runs and runs[-1][0] == t:
                runs[-1][1] += 1
            else:
                runs.append([t, 1])
        return ">".join(t if n == 1 else f"{t}{n}" for t, n in runs)

    def _tpspec(self, st: _State, comms, label: str) -> TPSpec:
        ctx, tp = self.ctx, self.tp
        flops_all = flops_dev = 0.0
        for n in self.nodes:
            f = node_flops(n) if n.op not in ("get_attr",) else 0.0
            flops_all += f
            flops_dev += f / (tp if st.sharded.get(n) else 1)
        flops = self.layer.flops * (flops_dev / flops_all) if flops_all > 0 else float(self.layer.flops)
        param_numel = 0
        for n in self.nodes:
            if ctx.is_param(n) and n.target in self.layer.params:
                numel = ctx.meta(n).numel
                param_numel += numel // tp if isinstance(st.place.get(n, R), Shard) else numel
        acts_all = sum(node_saved_total(n, ctx) for n in self.nodes)
        acts = self.layer.act_bytes * (st.acts / acts_all) if acts_all > 0 else float(self.layer.act_bytes)
        placements = {n.name: (st.place.get(n, R) if is_tensor_like(n) else R) for n in self.nodes}
        return TPSpec(
            label=label, tp=tp,
            placements=frozen_map(placements),
            arg_placements=frozen_map({n.name: st.args.get(n, _replicated_args(n)) for n in self.nodes}),
            input_placements=frozen_map({x.name: st.place.get(x, R) for x in self.inputs}),
            output_placements=frozen_map({o.name: st.out_place[o] for o in self.outputs}),
            comms=comms, flops=float(flops), param_numel=int(param_numel), act_bytes=float(acts))


def node_saved_total(n, ctx) -> float:
    saved, extra = node_saved(n)
    return sum(ctx.meta(a).nbytes for a in saved) + extra


# ---------------------------------------------------------------- identical layers


def _same_shape(ctx: GraphFacts, a, b) -> bool:
    if len(a.nodes) != len(b.nodes) or len(a.inputs) != len(b.inputs) or len(a.outputs) != len(b.outputs):
        return False
    for x, y in zip(a.nodes, b.nodes):
        nx, ny = ctx.nodes[x], ctx.nodes[y]
        if nx.op != ny.op or (nx.op != "get_attr" and nx.target != ny.target):
            return False
    return True


def _remap(ctx: GraphFacts, spec: TPSpec, a, b) -> TPSpec:
    """`spec` of layer a renamed onto the identical layer b (positional node correspondence)."""
    names = dict(zip(a.nodes, b.nodes))
    names.update(zip(a.inputs, b.inputs))
    names.update(zip(a.outputs, b.outputs))
    ren = lambda m: frozen_map({names.get(k, k): v for k, v in m.items()})  # noqa: E731
    comms = tuple(Comm(c.kind, c.axis, c.nbytes, c.per_sample, c.phase,
                       " ".join(names.get(w, w) for w in c.why.split(" "))) for c in spec.comms)
    scale = lambda x, tot_a, tot_b: x * (tot_b / tot_a) if tot_a else x  # noqa: E731
    return TPSpec(label=spec.label, tp=spec.tp, placements=ren(spec.placements), arg_placements=ren(spec.arg_placements),
                  input_placements=ren(spec.input_placements), output_placements=ren(spec.output_placements),
                  comms=comms, flops=scale(spec.flops, a.flops, b.flops), param_numel=spec.param_numel,
                  act_bytes=scale(spec.act_bytes, a.act_bytes, b.act_bytes))


__all__ = ["build_strategy_space", "LayerProp", "MAX_SPECS"]
