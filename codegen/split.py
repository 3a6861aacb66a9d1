"""Cut the traced graph into pipeline stages: one GraphModule per stage, chained in order.

Stage 0 takes the model's placeholders; stage s > 0 takes exactly what stage s-1 returns. A stage
returns, as a tuple in graph order, every tensor that a later stage needs (a tensor skipping a
stage passes through it unchanged, e.g. the targets on their way to the loss); the last stage
returns the loss itself. Parameters and buffers (get_attr nodes) never travel: every stage that
reads one gets its own get_attr (a weight tied across stages is then held by both stages, and the
runtime sums its gradient over them). Non-tensor values that cross a boundary (sizes computed in
one stage and used in the next) are inlined as the constants recorded at trace time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.fx as fx

from fxplan.errors import PlanFileError, TraceError


@dataclass(frozen=True)
class StageGraph:
    index: int
    gm: fx.GraphModule
    inputs: tuple[str, ...]  # node names (of the traced graph) of the placeholders, in order
    outputs: tuple[str, ...]  # node names returned (a tuple; the last stage returns the loss alone)
    layers: tuple[str, ...]  # layer names computed here

    def table(self) -> str:
        return (f"stage {self.index}: layers {', '.join(self.layers)}\n"
                f"  in : {', '.join(self.inputs)}\n  out: {', '.join(self.outputs)}")


def stage_index_map(layer_graph, stage_of_layer) -> list[int]:
    """Normalise a layer -> stage assignment (list by layer index, or mapping by index or name)."""
    layers = layer_graph.layers
    if isinstance(stage_of_layer, Mapping):
        out = []
        for layer in layers:
            if layer.name in stage_of_layer:
                out.append(int(stage_of_layer[layer.name]))
            elif layer.index in stage_of_layer:
                out.append(int(stage_of_layer[layer.index]))
            else:
                raise PlanFileError(f"layer {layer.name!r} has no stage; assign every layer of the model")
        return out
    out = [int(s) for s in stage_of_layer]
    if len(out) != len(layers):
        raise PlanFileError(f"{len(out)} stage assignments for {len(layers)} layers; give one per layer")
    return out


def node_stages(traced, layer_graph, stage_of: Sequence[int]) -> dict[str, int]:
    """Stage of every non-placeholder, non-output node (-1 for placeholders)."""
    where: dict[str, int] = {}
    for layer, s in zip(layer_graph.layers, stage_of):
        for name in layer.nodes:
            where[name] = s
    for node in traced.gm.graph.nodes:
        if node.op == "placeholder":
            where[node.name] = -1
        elif node.op != "output" and node.name not in where:
            # Not in any layer (coarsening leaves nothing out, but be safe): as early as its inputs allow.
            where[node.name] = max([where.get(a.name, 0) for a in node.all_input_nodes] + [0])
    return where


def _is_tensor(traced, node: fx.Node) -> bool:
    if node.name in traced.tensors:
        return True
    return isinstance(node.meta.get("val"), torch.Tensor)


def _constant(node: fx.Node):
    """The trace-time value of a non-tensor node, if it is plain data we can inline."""
    val = node.meta.get("val", None)
    if isinstance(val, (int, float, bool)) and not isinstance(val, torch.SymInt):
        return val
    if isinstance(val, (tuple, list, torch.Size)) and all(isinstance(v, (int, float, bool)) for v in val):
        return tuple(val) if not isinstance(val, list) else list(val)
    raise TraceError(f"node {node.name} ({node.format_node()}) is a non-tensor value used by a later pipeline "
                     f"stage and its value is unknown; compute it inside the stage that uses it or pin pp=1")


def split_stages(traced, layer_graph, stage_of_layer) -> tuple[StageGraph, ...]:
    """One StageGraph per stage; running them in order (outputs of s feed s+1) equals the model."""
    stage_of = stage_index_map(layer_graph, stage_of_layer)
    if any(b < a for a, b in zip(stage_of, stage_of[1:])):
        raise PlanFileError("layers must be assigned to stages in non-decreasing order (pipeline order)")
    n_stages = max(stage_of) + 1 if stage_of else 1
    where = node_stages(traced, layer_graph, stage_of)
    graph = traced.gm.graph
    nodes = [n for n in graph.nodes if n.op != "output"]
    by_name = {n.name: n for n in nodes}
    loss = traced.loss_node

    # last stage using each tensor (the loss is "used" by the last stage's return)
    last_use: dict[str, int] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            last_use[a.name] = max(last_use.get(a.name, -1), where[n.name])
    last_use[loss] = max(last_use.get(loss, -1), n_stages - 1)

    def travels(n: fx.Node) -> bool:
        return n.op != "get_attr" and _is_tensor(traced, n)

    outputs_of: list[tuple[str, ...]] = []
    for s in range(n_stages):
        if s == n_stages - 1:
            outputs_of.append((loss,))
            continue
        outs = [n.name for n in nodes
                if travels(n) and where[n.name] <= s and last_use.get(n.name, -1) > s]
        outputs_of.append(tuple(outs))

    placeholders = tuple(n.name for n in nodes if n.op == "placeholder")
    stages = []
    for s in range(n_stages):
        inputs = placeholders if s == 0 else outputs_of[s - 1]
        gm = _build_stage(traced, by_name, where, s, inputs, outputs_of[s], last_stage=s == n_stages - 1)
        layer_names = tuple(layer.name for layer, st in zip(layer_graph.layers, stage_of) if st == s)
        stages.append(StageGraph(index=s, gm=gm, inputs=tuple(inputs), outputs=outputs_of[s], layers=layer_names))
    return tuple(stages)


def _build_stage(traced, by_name, where, s, inputs, outputs, last_stage) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for name in inputs:
        ph = graph.placeholder(name)
        ph.meta.update(by_name[name].meta)
        env[name] = ph
        if ph.name != name:
            raise TraceError(f"node name {name!r} clashes inside stage {s}; rename it in the model")

    def value(a: fx.Node):
        if a.name in env:
            return env[a.name]
        if a.op == "get_attr":  # parameters and buffers are read where used, never sent
            env[a.name] = graph.node_copy(a, lambda x: value(x))
            return env[a.name]
        if not _is_tensor(traced, a):
            return _constant(a)
        raise TraceError(f"stage {s} needs tensor {a.name} which no earlier stage provides "
                         f"(layer order does not follow the data flow)")

    for n in traced.gm.graph.nodes:
        if n.op in ("placeholder", "output") or where[n.name] != s or n.name in env:
            continue
        env[n.name] = graph.node_copy(n, value)
    if last_stage:
        graph.output(value(by_name[outputs[0]]))
    else:
        graph.output(tuple(value(by_name[o]) for o in outputs))
    graph.lint()
    gm = fx.GraphModule(traced.gm, graph, class_name=f"Stage{s}")
    gm.recompile()
    return gm
