"""torch.export fallback of passes/trace.py: export the model with a dynamic batch dim and clean the
exported graph into the shape the fx path gives (forward(*inputs) -> loss, plain ops, no guards).

The result still has aten OpOverloads instead of torch callables; passes/cost/flops.py reads both.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxplan.errors import TraceError, UnsupportedOpError
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
    inline_lifted_constants(gm, tuple(ep.graph_signature.lifted_tensor_constants))
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


# ---------------------------------------------------------------- lifted constants

# A constant up to this size is written into the graph as a literal; larger ones must be buffers.
MAX_LITERAL_NUMEL = 4096
# Ops whose result is a new tensor no one else sees: an in-place op on it with no users is dead.
_FRESH = {"lift_fresh_copy", "clone", "full", "empty", "zeros", "ones", "tensor", "_to_copy", "detach_"}


def inline_lifted_constants(gm: fx.GraphModule, names: tuple[str, ...]) -> None:
    """Export lifts tensors that forward creates from Python values (`torch.tensor(start_id)`, the KV
    cache's empty tensors) into attributes `lifted_tensor_N` of the exported module. They are not model
    state: each becomes a factory node that rebuilds its value (`full` when every element is equal,
    else a literal `torch.tensor`), so the model's state_dict keys stay exactly the model's and the
    value is replicated with its consumers like any other factory. Chains left without users (a
    `lift_fresh_copy -> detach_` nobody reads) are removed."""
    graph = gm.graph
    lifted = set(names)
    for node in list(graph.nodes):
        if node.op != "get_attr" or str(node.target) not in lifted:
            continue
        value = _fetch(gm, str(node.target))
        with graph.inserting_before(node):
            factory = _factory_node(graph, value, node)
        for user in list(node.users):
            if user.target is torch.ops.aten.lift_fresh_copy.default:
                user.replace_all_uses_with(factory)
                graph.erase_node(user)
        node.replace_all_uses_with(factory)
        graph.erase_node(node)
        _forget(gm, str(node.target))
    drop_legacy_empty_cat_inputs(graph)
    remove_dead_fresh_chains(graph)
    gm.recompile()


def drop_legacy_empty_cat_inputs(graph: fx.Graph) -> None:
    """torch.cat skips 1-D empty tensors beside tensors of more dims (the legacy rule a KV cache
    relies on when it starts from `torch.tensor([])`): drop them from the cat, so that the graph says
    what the op computes and no placement rule is asked to shard a (0,) tensor along a head dim."""
    for node in graph.nodes:
        if node.target is not torch.ops.aten.cat.default or not isinstance(node.args[0], (list, tuple)):
            continue
        parts = list(node.args[0])
        vals = [p.meta.get("val") if isinstance(p, fx.Node) else None for p in parts]
        if not any(isinstance(v, torch.Tensor) and v.dim() > 1 for v in vals):
            continue
        out = node.meta.get("val")
        kept = [p for p, v in zip(parts, vals) if not (isinstance(v, torch.Tensor) and v.dim() == 1
                                                      and v.numel() == 0 and (out is None or v.dtype == out.dtype))]
        if kept and len(kept) < len(parts):
            node.args = (kept,) + tuple(node.args[1:])


def remove_dead_fresh_chains(graph: fx.Graph) -> None:
    """Erase nodes without users that compute a fresh value or mutate only a fresh value."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.op != "call_function" or node.users or not isinstance(node.target, OpOverload):
                continue
            name = node.target.overloadpacket.__name__
            inplace = name.endswith("_")
            if (name in _FRESH and not inplace) or (inplace and node.args and isinstance(node.args[0], fx.Node)
                                  and _fresh(node.args[0]) and len(node.args[0].users) == 1):
                graph.erase_node(node)
                changed = True


def _fresh(node: fx.Node) -> bool:
    return isinstance(node.target, OpOverload) and node.target.overloadpacket.__name__ in _FRESH


def _factory_node(graph: fx.Graph, value: torch.Tensor, where: fx.Node) -> fx.Node:
    value = value.detach()
    cpu = torch.device("cpu")
    flat = value.reshape(-1)
    if flat.numel() == 0 or bool((flat == flat[0]).all()):
        fill = flat[0].item() if flat.numel() else 0
        return graph.call_function(torch.ops.aten.full.default, (list(value.shape), fill),
                                   {"dtype": value.dtype, "device": cpu})
    if flat.numel() > MAX_LITERAL_NUMEL:
        raise UnsupportedOpError(
            f"forward creates a constant tensor of shape {tuple(value.shape)} from Python values "
            f"({where.name}); constants above {MAX_LITERAL_NUMEL} elements must be model state: register it "
            f"with self.register_buffer(name, tensor, persistent=False) in __init__")
    return graph.call_function(torch.tensor, (value.tolist(),), {"dtype": value.dtype, "device": cpu})


def _fetch(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _forget(gm: fx.GraphModule, target: str) -> None:
    *path, leaf = target.split(".")
    owner = gm
    for part in path:
        owner = getattr(owner, part)
    if hasattr(owner, leaf):
        delattr(owner, leaf)
