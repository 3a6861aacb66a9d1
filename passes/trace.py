"""Trace a model into one flat torch.fx graph with shapes, dtypes and batch dims on every node.

Primary path: a torch.fx Tracer that inlines every module (nn.Linear becomes F.linear on `get_attr`
weight/bias, ...) except a few leaves that cannot be traced inside, so each parameter and buffer is a
`get_attr` node whose target is its `model.state_dict()` key and later passes see plain ops.
Fallback (data-dependent control flow, Hugging Face models): `torch.export.export(strict=False)`
with a dynamic batch dim, cleaned into the same shape of graph (aten OpOverloads instead of torch
callables; see passes/cost/flops.py for the ops both paths produce), by passes/export_clean.py.

Shapes come from propagating meta tensors (passes/meta_prop.py) (no weights are read or allocated, so a 175B model on
the meta device traces in seconds); the batch dim of every tensor is found by propagating a second
time with the batch doubled and looking for the dim that doubled.
"""

from __future__ import annotations

import inspect
import os
import traceback

import torch
import torch.fx as fx
from torch import nn

from fxplan.errors import ModelError, TraceError
from fxplan.passes.export_clean import export_graph
from fxplan.passes.ir import TensorMeta, Traced, frozen_map
from fxplan.passes.loss_ratio import split_ratio_loss
from fxplan.passes.meta_prop import first_lines, propagate

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



def trace(model: nn.Module, example_inputs, *, method: str = "auto",
          leaf_modules: tuple[type[nn.Module], ...] = DEFAULT_LEAF_MODULES) -> Traced:
    """Trace `model` called as `model(*example_inputs)` (one global batch; real or meta tensors).

    method: "auto" (fx, then the export fallback), "fx" or "export".
    """
    inputs = check_inputs(example_inputs)
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
                    return _finish(export_graph(model, inputs), "export", inputs)
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
        gm = export_graph(model, inputs)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - every export failure becomes one TraceError
        if isinstance(exc, TraceError):
            export_msg = str(exc)
        else:
            export_msg = first_lines(f"{type(exc).__name__}: {exc}", 6)
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


def check_inputs(example_inputs) -> tuple[torch.Tensor, ...]:
    """`example_inputs` as a tuple of tensors sharing dim 0 (the global batch), else ModelError."""
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
                f"example_inputs[{i}] is a {type(x).__name__}, not a tensor; pass tensors only, dim 0 = batch "
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
        self._state_names: dict[int, str] = {}  # id(tensor) -> state_dict name, filled per trace()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return bool(self.leaf_types) and isinstance(m, self.leaf_types)

    def trace(self, root, concrete_args=None):
        # fx looks each parameter up by scanning root.named_parameters() on every access (quadratic
        # in the parameter count); one id -> state_dict name table makes a 48-block model fast.
        self._state_names = {}
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
            f"torch.fx symbolic tracing failed{where}: {type(exc).__name__}: {first_lines(str(exc), 2)}. "
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


# ---------------------------------------------------------------- common finish


def _finish(gm: fx.GraphModule, method: str, inputs) -> Traced:
    """The finished Traced, its ratio loss (mean over valid tokens, weighted mean) split into numerator
    and denominator (passes/loss_ratio.py) so that every batch split keeps one device's loss."""
    ops: dict = {}  # the split graph is propagated again: its unchanged ops reuse the first pass's specs
    return split_ratio_loss(_finish_graph(gm, method, inputs, ops), tuple(inputs),
                            lambda g, ins: _finish_graph(g, method, ins, ops))


def _finish_graph(gm: fx.GraphModule, method: str, inputs, ops: dict | None = None) -> Traced:
    graph = gm.graph
    _place_get_attrs(graph)
    placeholders = tuple(n.name for n in graph.nodes if n.op == "placeholder")
    if len(placeholders) != len(inputs):
        raise ModelError(f"forward takes {len(placeholders)} tensor inputs but {len(inputs)} example inputs were given")
    vals = propagate(gm, inputs, batch_scale=1, op_cache=ops)
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
    doubled = propagate(gm, inputs, batch_scale=2, op_cache=ops)
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
