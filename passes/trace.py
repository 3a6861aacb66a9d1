"""Trace a model into one flat torch.fx graph with shapes, dtypes and batch dims on every node.

Primary path: a torch.fx Tracer that inlines every module (nn.Linear becomes F.linear on `get_attr`
weight/bias, ...) except a few leaves that cannot be traced inside, so each parameter and buffer is a
`get_attr` node whose target is its `model.state_dict()` key and later passes see plain ops.
Fallback (data-dependent control flow, Hugging Face models): `torch.export.export(strict=False)`
with a dynamic batch dim, cleaned into the same shape of graph (aten OpOverloads instead of torch
callables; see passes/flops.py for the ops both paths produce).

Shapes come from propagating meta tensors (no weights are read or allocated, so a 175B model on
the meta device traces in seconds); the batch dim of every tensor is found by propagating a second
time with the batch doubled and looking for the dim that doubled.
"""

from __future__ import annotations

import inspect
import operator
import os
import traceback
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.fx as fx
from torch import nn

from fxplan.errors import ModelError, TraceError
from fxplan.passes.ir import TensorMeta, frozen_map
from fxplan._torch import OpOverload, clear_forward_pre_hooks, use_plain_codegen

# Modules whose forward branches on tensor properties (MultiheadAttention's shape checks, RNNs'
# flatten_parameters, the fused Transformer fast path): they stay call_module nodes.
DEFAULT_LEAF_MODULES: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.RNNBase,
)

_TORCH_DIR = os.path.dirname(torch.__file__)
_FXPLAN_DIRS = (os.path.dirname(os.path.abspath(__file__)),)


@dataclass(frozen=True)
class Traced:
    """The traced model: a runnable GraphModule plus the facts later passes need about its values."""

    gm: fx.GraphModule  # node.meta["val"] (meta tensor / tuple), ["fxplan_batch_dim"], ["nn_module_stack"]
    method: str  # "fx" (symbolic tracing, torch callables) | "export" (torch.export, aten OpOverloads)
    tensors: Mapping[str, TensorMeta]  # every tensor-valued node (params included, batch_dim None)
    batch_size: int  # dim 0 of the example inputs (the global batch)
    loss_node: str  # name of the node forward returns
    placeholders: tuple[str, ...]  # graph inputs, in the order of example_inputs


def trace(model: nn.Module, example_inputs, *, method: str = "auto",
          leaf_modules: tuple[type[nn.Module], ...] = DEFAULT_LEAF_MODULES) -> Traced:
    """Trace `model` called as `model(*example_inputs)` (one global batch; real or meta tensors).

    method: "auto" (fx, then the export fallback), "fx" or "export".
    """
    inputs = _check_inputs(example_inputs)
    if method not in ("auto", "fx", "export"):
        raise ValueError(f"method must be 'auto', 'fx' or 'export', not {method!r}")
    fx_error: Exception | None = None
    if method in ("auto", "fx"):
        try:
            gm = _fx_trace(model, inputs, leaf_modules)
            if method == "auto" and any(n.op == "call_module" for n in gm.graph.nodes):
                # Leaf modules (nn.MultiheadAttention, RNNs, ...) hide their parameters and ops from
                # sharding and codegen; torch.export decomposes them into plain ops on get_attr
                # parameters, so prefer it and keep the fx graph only if export cannot trace.
                try:
                    return _finish(_export_trace(model, inputs), "export", inputs)
                except Exception:  # noqa: BLE001 - fall through to the fx graph with its leaves
                    pass
            try:
                return _finish(gm, "fx", inputs)
            except TraceError:
                # Retrace with stack traces so the message names the source line.
                _finish(_fx_trace(model, inputs, leaf_modules, stack_traces=True), "fx", inputs)
                raise
        except ModelError:
            raise
        except TraceError as exc:
            if method == "fx":
                raise
            fx_error = exc
    try:
        gm = _export_trace(model, inputs)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - every export failure becomes one TraceError
        if isinstance(exc, TraceError):
            export_msg = str(exc)
        else:
            export_msg = _first_lines(f"{type(exc).__name__}: {exc}", 6)
        if fx_error is not None:
            raise TraceError(
                f"{fx_error}\nThe torch.export fallback failed too: {export_msg}"
            ) from None
        raise TraceError(f"torch.export could not trace the model: {export_msg}") from None
    try:
        return _finish(gm, "export", inputs)
    except TraceError as exc:
        if fx_error is not None:
            raise TraceError(f"{fx_error}\nThe torch.export fallback failed too: {exc}") from None
        raise


# ---------------------------------------------------------------- input checks


def _check_inputs(example_inputs) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise ModelError(
            f"example_inputs must be a non-empty tuple of tensors (one global batch), got "
            f"{type(example_inputs).__name__}; pass e.g. (input_ids, labels)"
        )
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise ModelError(
                f"example_inputs[{i}] is a {type(x).__name__}, not a tensor; pass only tensors "
                f"(fix other arguments inside the model or with a small wrapper module)"
            )
        if x.dim() == 0:
            raise ModelError(f"example_inputs[{i}] is 0-dim; every input needs the batch as dim 0")
    sizes = [int(x.shape[0]) for x in example_inputs]
    if len(set(sizes)) != 1:
        raise ModelError(
            f"example inputs disagree on the batch size (dim 0): {sizes}; every input must have the "
            f"global batch as dim 0"
        )
    return tuple(example_inputs)


def _check_signature(model: nn.Module, n_inputs: int) -> dict:
    """concrete_args for forward's parameters beyond the example inputs (they must have defaults)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return {}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if n_inputs > len(positional):
        raise ModelError(
            f"{len(positional)} positional parameter(s) in {type(model).__name__}.forward "
            f"({', '.join(p.name for p in positional)}) but {n_inputs} example inputs; pass one tensor per parameter"
        )
    concrete = {}
    for p in params[n_inputs:]:
        if p.kind in (p.VAR_KEYWORD,):
            continue
        if p.default is p.empty:
            raise ModelError(
                f"{type(model).__name__}.forward needs argument {p.name!r} but only {n_inputs} example "
                f"inputs were given; pass it in example_inputs"
            )
        concrete[p.name] = p.default
    return concrete


# ---------------------------------------------------------------- fx path


class _InliningTracer(fx.Tracer):
    """Traces through every module (torch.nn ones included) except `leaf_types`."""

    def __init__(self, leaf_types, stack_traces: bool = False):
        super().__init__()
        self.leaf_types = tuple(leaf_types)
        # Stack traces name the user's source line in errors, but cost most of the tracing time on
        # big models: trace() records them only when it retraces to explain a failure.
        self.record_stack_traces = stack_traces

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return bool(self.leaf_types) and isinstance(m, self.leaf_types)

    def trace(self, root, concrete_args=None):
        # fx looks each parameter up by scanning root.named_parameters() on every access (quadratic
        # in the parameter count); one id -> state_dict name table makes a 48-block model fast.
        self._state_names: dict[int, str] = {}
        if isinstance(root, nn.Module):
            for name, t in list(root.named_parameters()) + list(root.named_buffers()):
                self._state_names.setdefault(id(t), name)
        return super().trace(root, concrete_args)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if isinstance(attr_val, torch.Tensor):
            name = self._state_names.get(id(attr_val))
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return attr_val


def _fx_trace(model, inputs, leaf_modules, stack_traces: bool = False) -> fx.GraphModule:
    concrete = _check_signature(model, len(inputs))
    tracer = _InliningTracer(leaf_modules, stack_traces)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as exc:  # noqa: BLE001 - symbolic tracing raises many types
        where = _user_frame(exc)
        raise TraceError(
            f"torch.fx symbolic tracing failed{where}: {type(exc).__name__}: {_first_lines(str(exc), 2)}. "
            f"Fix: make the control flow independent of tensor values, mark the function with "
            f"torch.fx.wrap or the module as a leaf (trace(..., leaf_modules=...)), or rely on the "
            f"torch.export fallback (method='export')"
        ) from None
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    n_ph = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if n_ph != len(inputs):
        raise ModelError(f"forward takes {n_ph} tensor inputs but {len(inputs)} example inputs were given")
    return gm


def _user_frame(exc: BaseException) -> str:
    """' at file:line `code`' of the innermost frame outside torch and fxplan, or ''."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        fname = os.path.abspath(frame.filename)
        if fname.startswith(_TORCH_DIR) or fname.startswith(_FXPLAN_DIRS) or "<eval_with_key>" in fname:
            continue
        return f" at {frame.filename}:{frame.lineno} `{(frame.line or '').strip()}`"
    return ""


def _first_lines(text: str, n: int) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " ".join(lines[:n]) if lines else text


# ---------------------------------------------------------------- export path


def _export_trace(model, inputs) -> fx.GraphModule:
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


# ---------------------------------------------------------------- common finish


def _finish(gm: fx.GraphModule, method: str, inputs) -> Traced:
    graph = gm.graph
    _place_get_attrs(graph)
    placeholders = tuple(n.name for n in graph.nodes if n.op == "placeholder")
    if len(placeholders) != len(inputs):
        raise ModelError(f"forward takes {len(placeholders)} tensor inputs but {len(inputs)} example inputs were given")
    vals = _propagate(gm, inputs, batch_scale=1)
    for node in graph.nodes:
        if node.name in vals:
            node.meta["val"] = vals[node.name]
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    loss = out.args[0]
    loss_val = loss.meta.get("val") if isinstance(loss, fx.Node) else loss
    if not (isinstance(loss, fx.Node) and isinstance(loss_val, torch.Tensor) and loss_val.dim() == 0
            and loss_val.is_floating_point()):
        got = _describe(loss_val)
        raise ModelError(
            f"forward must return the scalar training loss (a 0-dim floating tensor), got {got}; "
            f"wrap the model so forward(*inputs) returns e.g. F.cross_entropy(...) or output.loss"
        )
    _localize_input_shapes(graph)
    graph.lint()
    gm.recompile()
    doubled = _propagate(gm, inputs, batch_scale=2)
    tensors = {}
    for node in graph.nodes:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            node.meta["fxplan_batch_dim"] = None
            continue
        bdim = _batch_dim(node, val, doubled.get(node.name))
        node.meta["fxplan_batch_dim"] = bdim
        tensors[node.name] = TensorMeta(
            shape=tuple(int(s) for s in val.shape), dtype=str(val.dtype),
            itemsize=val.element_size(), batch_dim=bdim,
        )
    return Traced(gm=gm, method=method, tensors=frozen_map(tensors), batch_size=int(inputs[0].shape[0]),
                  loss_node=loss.name, placeholders=placeholders)


def _describe(val) -> str:
    if isinstance(val, torch.Tensor):
        return f"a tensor of shape {tuple(val.shape)} and dtype {val.dtype}"
    return f"a {type(val).__name__}"


def _place_get_attrs(graph: fx.Graph) -> None:
    """Move each get_attr right before its first user (export puts them all first); drop unused ones.

    Then a layer's parameters sit inside its contiguous node range.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op != "get_attr":
            continue
        if not node.users:
            graph.erase_node(node)
            continue
        first = min(node.users, key=order.__getitem__)
        first.prepend(node)


def _is_value_only(val) -> bool:
    """True for non-tensor values (ints, SymInts, sizes, devices, dtypes) and tuples of them."""
    if isinstance(val, torch.Tensor):
        return False
    if isinstance(val, (tuple, list)):
        return all(_is_value_only(v) for v in val)
    return True


def _localize_input_shapes(graph: fx.Graph) -> None:
    """Recompute, right before each user, non-tensor values derived only from graph inputs.

    `B, T = idx.shape` in forward and used at the head, or export's batch `sym_size(ids, 0)` used in
    every block, would otherwise carry a Python value across layer (and pipeline stage) boundaries;
    every rank has the inputs, so each user recomputes it from them instead.
    """
    rooted: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if not _is_value_only(node.meta.get("val", 0)) or "val" not in node.meta:
            continue
        if all(a.op == "placeholder" or a in rooted for a in node.all_input_nodes) and node.all_input_nodes:
            rooted.add(node)
    if not rooted:
        return
    for node in list(graph.nodes):
        if node in rooted or node.op in ("placeholder",):
            continue
        used = [a for a in node.all_input_nodes if a in rooted]
        if not used:
            continue
        copies: dict[fx.Node, fx.Node] = {}

        def clone(src: fx.Node, before: fx.Node) -> fx.Node:
            if src not in rooted:
                return src
            if src not in copies:
                args = {a: clone(a, before) for a in src.all_input_nodes}
                with graph.inserting_before(before):
                    copies[src] = graph.node_copy(src, lambda a: args[a])
            return copies[src]

        mapping = {a: clone(a, node) for a in used}
        node.args = fx.node.map_arg(node.args, lambda a: mapping.get(a, a))
        node.kwargs = fx.node.map_arg(node.kwargs, lambda a: mapping.get(a, a))
    for node in reversed(list(graph.nodes)):
        if node in rooted and not node.users:
            graph.erase_node(node)


def _batch_dim(node: fx.Node, val: torch.Tensor, doubled) -> int | None:
    if node.op == "placeholder":
        return 0
    if node.op == "get_attr" or not isinstance(doubled, torch.Tensor) or doubled.dim() != val.dim():
        return None
    for dim, (a, b) in enumerate(zip(val.shape, doubled.shape)):
        if b == 2 * a and a > 0:
            return dim
    return None


# ---------------------------------------------------------------- meta propagation


def _to_meta(x):
    if isinstance(x, torch.Tensor):
        if x.device.type == "meta":
            return x.detach() if isinstance(x, nn.Parameter) else x
        return torch.empty_strided(tuple(x.shape), tuple(x.stride()), dtype=x.dtype, device="meta")
    return x


def _meta_device(x):
    if isinstance(x, torch.device):
        return torch.device("meta")
    return x


class _MetaProp(fx.Interpreter):
    """Runs the graph on meta tensors; devices in the graph (export bakes `device=cpu`) become meta."""

    def __init__(self, gm: fx.GraphModule, attr_cache: dict):
        super().__init__(gm, garbage_collect_values=True)
        self.attr_cache = attr_cache
        self.vals: dict[str, object] = {}
        # Repeated blocks call the same ops on the same shapes: meta kernels (many in Python) run
        # once per distinct call and later calls rebuild fresh meta tensors from the cached specs.
        self.op_cache: dict = {}

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
        except Exception as exc:  # noqa: BLE001 - name the node and its source line
            where = ""
            if n.stack_trace:
                lines = [ln.strip() for ln in n.stack_trace.strip().splitlines()]
                where = " (" + " / ".join(lines[-2:]) + ")"
            raise _PropError(
                f"shape propagation failed at node {n.name} = {n.format_node()}{where}: "
                f"{type(exc).__name__}: {_first_lines(str(exc), 2)}"
            ) from exc
        self.vals[n.name] = result
        return result

    def get_attr(self, target, args, kwargs):
        if target not in self.attr_cache:
            self.attr_cache[target] = _to_meta(super().get_attr(target, args, kwargs))
        return self.attr_cache[target]

    def call_function(self, target, args, kwargs):
        args, kwargs = _meta_args(args, kwargs)
        key = _cache_key(target, args, kwargs)
        if key is not None and key in self.op_cache:
            return _from_spec(self.op_cache[key])
        try:
            result = target(*args, **kwargs)
        except RuntimeError:
            # Meta kernels may pick other strides than the real ones (export drops a .contiguous()
            # after SDPA because the CPU kernel's output is already laid out for it): only shapes
            # matter here, so a view that fails on strides is retried as a reshape.
            if target is not torch.ops.aten.view.default:
                raise
            result = torch.ops.aten.reshape.default(*args, **kwargs)
        if key is not None:
            spec = _to_spec(result)
            if spec is not None:
                self.op_cache[key] = spec
        return result

    def call_method(self, target, args, kwargs):
        if target in ("cuda", "cpu"):
            return args[0]
        args, kwargs = _meta_args(args, kwargs)
        self_obj, *rest = args
        try:
            return getattr(self_obj, target)(*rest, **kwargs)
        except RuntimeError:
            if target != "view" or not isinstance(self_obj, torch.Tensor):
                raise
            return self_obj.reshape(*rest, **kwargs)  # see call_function

    def call_module(self, target, args, kwargs):
        mod = self.fetch_attr(target)
        state = {k: _to_meta(v) for k, v in list(mod.named_parameters()) + list(mod.named_buffers())}
        return torch.func.functional_call(mod, state, args, kwargs)


class _PropError(Exception):
    pass


_NO_SPEC = object()


def _arg_key(a):
    if isinstance(a, torch.Tensor):
        if a.device.type != "meta":
            return _NO_SPEC
        return ("T", tuple(a.shape), a.stride(), a.dtype, a.storage_offset())
    if isinstance(a, (tuple, list)):
        items = tuple(_arg_key(x) for x in a)
        return _NO_SPEC if any(x is _NO_SPEC for x in items) else (type(a).__name__, items)
    if a is None or isinstance(a, (bool, int, float, str, torch.dtype, torch.device, torch.layout,
                                   torch.memory_format)):
        return (type(a).__name__, a)
    return _NO_SPEC


def _cache_key(target, args, kwargs):
    name = getattr(target, "__name__", "")
    if name.endswith("_") or "random" in name or "rand" in name:  # in-place or random: run it
        return None
    key = _arg_key(tuple(args) + tuple(sorted(kwargs.items())))
    return None if key is _NO_SPEC else (target, key)


def _to_spec(result):
    if isinstance(result, torch.Tensor):
        if result.device.type != "meta":
            return None
        return ("T", tuple(result.shape), result.stride(), result.dtype, result.requires_grad)
    if isinstance(result, (tuple, list)) and result and all(isinstance(r, torch.Tensor) for r in result):
        specs = [_to_spec(r) for r in result]
        return None if any(s is None for s in specs) else (type(result), specs)
    return None


def _from_spec(spec):
    if spec[0] == "T":
        _, shape, stride, dtype, _grad = spec
        return torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    kind, specs = spec
    return kind(_from_spec(s) for s in specs)


def _meta_args(args, kwargs):
    args = tuple(_meta_device(a) for a in args)
    if "device" in kwargs:
        kwargs = dict(kwargs, device=torch.device("meta"))
    return args, kwargs


def _propagate(gm: fx.GraphModule, inputs, batch_scale: int) -> dict[str, object]:
    metas = []
    for x in inputs:
        shape = (x.shape[0] * batch_scale, *x.shape[1:])
        metas.append(torch.empty(shape, dtype=x.dtype, device="meta"))
    prop = _MetaProp(gm, {})
    try:
        with torch.no_grad():
            prop.run(*metas)
    except _PropError as exc:
        hint = ""
        if batch_scale != 1:
            hint = (" when the batch was doubled: the graph is not batch-size generic (a hard-coded "
                    "batch size?); compute sizes from x.shape or use -1 in view/reshape")
        raise TraceError(f"{exc}{hint}") from None
    return prop.vals
