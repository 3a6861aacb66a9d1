"""Recompute (activation checkpointing) per layer: outline a layer's nodes, run them under checkpoint.

    gm = recompute_pass(gm, {"blocks.0"})   # nodes tagged node.meta["fxplan_layer"] == "blocks.0"
    print(gm.code)   # fxplan_codegen_recompute_fxplan_checkpoint(self.rc_blocks_0, x, w, ...)

Each maximal run of consecutive compute nodes of one recompute layer (emitted collectives
included) becomes a submodule GraphModule `rc_<layer>` called through `fxplan_checkpoint`, i.e.
`torch.utils.checkpoint.checkpoint(region, *inputs, use_reentrant=False)`. Why this shape:
- parameters stay `get_attr` nodes of the outer graph and enter the region as arguments, so the
  runtime can still swap a rank's parameter attributes (materialisation) and the region only
  saves its inputs, never its intermediates;
- an FSDP gather inside the region runs again in backward, so the gathered weight is not kept;
- forward collectives inside the region re-run during backward. Every rank of a group builds the
  same autograd graph (the same stage graph, only keys and indices differ), the engine visits it
  in one deterministic order and the early stop of non-reentrant checkpoint depends on that
  structure only, so all members reach each re-run collective in the same order;
- random ops replay: checkpoint restores the RNG state of the forward for the recomputation.
A layer whose nodes are not contiguous (another layer's node in between) gets one region per run:
each run is checkpointed separately, still exact.
"""

from __future__ import annotations

import operator
from typing import Collection

import torch
import torch.fx as fx
from torch import nn
from torch.utils.checkpoint import checkpoint

LAYER_META = "fxplan_layer"  # node.meta key: name of the plan layer a node was emitted for
REGION_META = "fxplan_recompute_region"  # on the checkpoint call and its getitems: the layer recomputed
_OUTLINED = ("call_function", "call_method")  # get_attr stays outside; call_module (leaf modules) too


def fxplan_checkpoint(region: nn.Module, *args):
    """Run `region(*args)` keeping only its inputs; its forward re-runs in backward (non-reentrant)."""
    return checkpoint(region, *args, use_reentrant=False)


torch.fx.wrap("fxplan_checkpoint")


def region_name(layer: str, part: int) -> str:
    base = "rc_" + "".join(c if c.isalnum() else "_" for c in layer)
    return base if part == 0 else f"{base}_{part}"


def _runs(graph: fx.Graph, layers: Collection[str]) -> list[tuple[str, list[fx.Node]]]:
    """Maximal runs of consecutive outlinable nodes of one recompute layer; get_attr never breaks one."""
    runs: list[tuple[str, list[fx.Node]]] = []
    current: tuple[str, list[fx.Node]] | None = None
    for node in graph.nodes:
        if node.op == "get_attr":
            continue
        layer = node.meta.get(LAYER_META)
        if node.op in _OUTLINED and layer in layers:
            if current is not None and current[0] == layer:
                current[1].append(node)
                continue
            current = (layer, [node])
            runs.append(current)
        else:
            current = None
    return runs


def _outline(graph: fx.Graph, layer: str, nodes: list[fx.Node], name: str) -> fx.GraphModule:
    """Replace `nodes` (a run) in `graph` by one checkpoint call; return the region's GraphModule."""
    inside = set(nodes)
    inputs: list[fx.Node] = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs:
                inputs.append(a)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in inputs:
        env[a] = sub.placeholder(a.name)
        env[a].meta.update(a.meta)
    for n in nodes:
        env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(tuple(env[n] for n in outputs))
    sub.lint()
    region = fx.GraphModule(nn.Module(), sub, class_name="Recompute_" + name)
    first = nodes[0]
    pos = {n: i for i, n in enumerate(graph.nodes)}
    for a in inputs:  # get_attr inputs may sit inside the run: they move in front of it (no inputs)
        if a.op == "get_attr" and pos[a] > pos[first]:
            first.prepend(a)
    with graph.inserting_before(first):
        mod = graph.get_attr(name)
        call = graph.call_function(fxplan_checkpoint, (mod, *inputs))
        call.meta[REGION_META] = layer
        outs = [graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
    for old, new in zip(outputs, outs):
        new.meta.update({k: v for k, v in old.meta.items() if k != LAYER_META})  # outer now: never re-outlined
        new.meta[REGION_META] = layer
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in inside)
    names = [n.name for n in outputs]
    for n in reversed(nodes):
        graph.erase_node(n)
    # name each result after the value it stands for (`add_5 = fxplan_checkpoint[0]`, the base name kept,
    # fx adds a suffix as the old name stays reserved), which reads better than getitem_7
    for new, old_name in zip(outs, names):
        if hasattr(new, "_rename"):
            new._rename(old_name)
    return region


def recompute_pass(gm: fx.GraphModule, layers: Collection[str]) -> fx.GraphModule:
    """A new GraphModule where the nodes tagged with a layer in `layers` run under checkpoint.

    Parameters and buffers are shared with `gm` (same objects); `gm` itself is left unchanged.
    """
    layers = set(layers)
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    regions: dict[str, fx.GraphModule] = {}
    parts: dict[str, int] = {}
    for layer, nodes in _runs(graph, layers):
        part = parts.get(layer, 0)
        parts[layer] = part + 1
        name = region_name(layer, part)
        while hasattr(gm, name) or name in regions:
            name += "_"
        regions[name] = _outline(graph, layer, nodes, name)
    graph.lint()
    root = nn.Module()
    for name, child in gm.named_children():
        root.add_module(name, child)
    for name, p in gm.named_parameters(recurse=False):
        root.register_parameter(name, p)
    for name, b in gm.named_buffers(recurse=False):
        root.register_buffer(name, b)
    for name, region in regions.items():
        root.add_module(name, region)
    new = fx.GraphModule(root, graph, class_name=type(gm).__name__)
    new.recompile()
    return new
