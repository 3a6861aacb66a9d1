"""Which ops a chosen tensor-parallel sharding leaves replicated, and why: the plan's warnings.

An op is replicated on its tp ranks when its output and every tensor it consumes are R there: each
rank computes all of it. That is right for cheap glue (a residual add, a norm's statistics), but a
user who asked for tp wants to hear about any op doing real work whole on every rank — above all
an op fxplan has no sharding rule for.
"""

from __future__ import annotations

import torch.fx as fx

from fxplan.passes.cost.flops import node_flops
from fxplan.passes.ir import Layer, Partial, Shard, StrategySpace, TPSpec, Traced, op_name
from fxplan.passes.sharding.op_rules import has_rule, strategies
from fxplan.passes.sharding.op_strategy import is_tensor_like

MIN_SHARE = 0.01  # replicated ops doing less of the layer's FLOPs than this are glue, not worth a word


def _replicated(node: fx.Node, spec: TPSpec) -> bool:
    placed = [spec.placements.get(node.name)] + list(spec.arg_placements.get(node.name, ()))
    return not any(isinstance(p, (Shard, Partial)) for p in placed)


def _why(node: fx.Node, tp: int) -> str:
    if not has_rule(node):
        return f"fxplan has no sharding rule for {op_name(node)!r}, so it runs whole on every rank"
    if not any(s.sharded for s in strategies(node, tp)):
        return f"none of its dims that could be split divides by tp={tp}"
    return "the chosen sharding keeps it whole (its sharded forms cost more communication on this cluster)"


def layer_warnings(traced: Traced, layer: Layer, spec: TPSpec) -> list[str]:
    """One line per op of `layer` that `spec` leaves replicated and that matters (see MIN_SHARE)."""
    if spec.tp <= 1:
        return []
    nodes = {n.name: n for n in traced.gm.graph.nodes}
    ops = [nodes[x] for x in layer.nodes if nodes[x].op in ("call_function", "call_method", "call_module")]
    flops = {n: node_flops(n) for n in ops}
    total = sum(flops.values()) or 1.0
    out = []
    for n in ops:
        if not is_tensor_like(n) or not _replicated(n, spec):
            continue
        share = flops[n] / total
        if share < MIN_SHARE and (has_rule(n) or flops[n] == 0):
            continue
        out.append(f"layer {layer.name}: {n.name} ({op_name(n)}, {share:.0%} of the layer's FLOPs) runs replicated "
                   f"on its {spec.tp} tp ranks under sharding {spec.label!r}: {_why(n, spec.tp)}")
    return out


def replicated_warnings(traced: Traced, layers, space: StrategySpace, strategy_of) -> tuple[str, ...]:
    """Warnings for every layer whose strategy (strategy_of(layer name) -> Strategy) uses tp > 1."""
    out: list[str] = []
    for layer in layers:
        strat = strategy_of(layer.name)
        if strat.tp > 1:
            try:
                spec = space.spec(layer.index, strat.tp, strat.spec)
            except KeyError:
                continue
            out.extend(layer_warnings(traced, layer, spec))
    return tuple(out)
