"""torch.export fallback of passes/trace.py: export the model with a dynamic batch dim and clean the
exported graph into the shape the fx path gives (forward(*inputs) -> loss, plain ops, no guards).

The result still has aten OpOverloads instead of torch callables; passes/cost/flops.py reads both.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxplan.errors import TraceError
from fxplan._torch import OpOverload, clear_forward_pre_hooks, use_plain_codegen


def export_graph(model, inputs) -> fx.GraphModule:
    from torch.export import Dim

    # Batch 1 would be specialised by export (0/1 specialisation); export on a batch of 2 so the
    # graph stays batch-generic. Inputs are small next to the model, expanding them is cheap.
    ex_inputs = inputs
    if inputs[0].shape[0] == 1:
        ex_inputs = tuple(x.expand(2, *x.shape[1:]).contiguous() for x in inputs)
    dynamic = tuple({0: Dim.AUTO} for _ in ex_inputs)
    ep = torch.export.export(model, ex_inputs, strict=False, dynamic_shapes=dynamic)
    gm = ep.module()
    _clean_export(gm)
    return gm


_ASSERT_PREFIXES = ("_assert", "sym_constrain_range", "_functional_assert")


def _clean_export(gm: fx.GraphModule) -> None:
    """Drop guard/assert nodes and the pytree calling convention: forward(*inputs) -> loss."""
    graph = gm.graph
    _inline_context_hops(gm)
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
            if hasattr(gm, node.target):
                delattr(gm, node.target)
        elif node.op == "call_function" and isinstance(node.target, OpOverload):
            if node.target.overloadpacket.__name__.startswith(_ASSERT_PREFIXES) and not node.users:
                graph.erase_node(node)
            elif node.target is torch.ops.aten.view.default:
                # Export drops .contiguous() calls that were no-ops for the tracing device's kernels
                # (e.g. after CPU SDPA); reshape is the same view where strides allow and a copy
                # where another device's kernel lays memory out differently.
                node.target = torch.ops.aten.reshape.default
    use_plain_codegen(graph)
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    flat = out.args[0]
    if isinstance(flat, (list, tuple)) and len(flat) == 1:
        out.args = (flat[0],)
    # ep.module() checks calls against the exported pytree spec in a forward pre-hook; the plain
    # calling convention above replaces that spec (codegen also calls it on microbatches).
    clear_forward_pre_hooks(gm)
    gm.recompile()


def _inline_context_hops(gm: fx.GraphModule) -> None:
    """Inline export's `wrap_with_set_grad_enabled` / `wrap_with_autocast` regions (HF rotary
    embeddings run under no_grad/autocast(False)) so every pass sees plain ops. Outputs of a no-grad
    region are detached, which keeps its autograd meaning."""
    graph = gm.graph
    for node in list(graph.nodes):
        name = getattr(node.target, "__name__", "") if node.op == "call_function" else ""
        if name not in ("wrap_with_set_grad_enabled", "wrap_with_autocast"):
            continue
        at = next((i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and a.op == "get_attr"
                   and isinstance(getattr(gm, str(a.target), None), fx.GraphModule)), None)
        if at is None:
            continue
        sub_node = node.args[at]
        sub = getattr(gm, str(sub_node.target))
        if any(n.op in ("get_attr", "call_module") for n in sub.graph.nodes):
            continue
        no_grad = name == "wrap_with_set_grad_enabled" and node.args[0] is False
        env = {}
        operands = iter(node.args[at + 1:])
        with graph.inserting_before(node):
            for sn in sub.graph.nodes:
                if sn.op == "placeholder":
                    env[sn] = next(operands)
                elif sn.op == "output":
                    outs = fx.node.map_arg(sn.args[0], lambda x: env[x])
                else:
                    env[sn] = graph.node_copy(sn, lambda x: env[x])
            if no_grad:
                outs = type(outs)(graph.call_function(torch.ops.aten.detach.default, (o,))
                                  if isinstance(o, fx.Node) else o for o in outs)
        for user in list(node.users):
            if user.target is operator.getitem:
                user.replace_all_uses_with(outs[user.args[1]])
                graph.erase_node(user)
        if node.users:
            raise TraceError(f"could not inline {node.format_node()}; please report this model")
        graph.erase_node(node)
        if not sub_node.users:
            graph.erase_node(sub_node)
            delattr(gm, str(sub_node.target))
