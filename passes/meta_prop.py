"""Shape propagation on meta tensors for passes/trace.py: every node's value (shape, dtype, strides)
without reading or allocating a weight, so a 175B model on the meta device propagates in seconds.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from fxplan.errors import TraceError


def first_lines(text: str, n: int) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " ".join(lines[:n]) if lines else text


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

    def __init__(self, gm: fx.GraphModule, attr_cache: dict, op_cache: dict | None = None):
        super().__init__(gm, garbage_collect_values=True)
        self.attr_cache = attr_cache
        self.vals: dict[str, object] = {}
        # Repeated blocks call the same ops on the same shapes: meta kernels (many in Python) run
        # once per distinct call and later calls rebuild fresh meta tensors from the cached specs.
        # Keyed by the op and its arguments' specs only, so one cache serves several graphs.
        self.op_cache: dict = {} if op_cache is None else op_cache

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
                f"{type(exc).__name__}: {first_lines(str(exc), 2)}"
            ) from exc
        self.vals[n.name] = result
        return result

    def get_attr(self, target, args, kwargs):
        if target not in self.attr_cache:
            self.attr_cache[target] = _to_meta(super().get_attr(target, args, kwargs))
        return self.attr_cache[target]

    def call_function(self, target, args, kwargs):
        args, kwargs = _meta_args(args, kwargs)
        key = op_key(target, args, kwargs)
        if key is not None and key in self.op_cache:
            return from_spec(self.op_cache[key])
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
            spec = value_spec(result)
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


def op_key(target, args, kwargs):
    name = getattr(target, "__name__", "")
    if name.endswith("_") or "random" in name or "rand" in name:  # in-place or random: run it
        return None
    key = _arg_key(tuple(args) + tuple(sorted(kwargs.items())))
    return None if key is _NO_SPEC else (target, key)


def value_spec(result):
    if isinstance(result, torch.Tensor):
        if result.device.type != "meta":
            return None
        return ("T", tuple(result.shape), result.stride(), result.dtype, result.requires_grad)
    if isinstance(result, (tuple, list)) and result and all(isinstance(r, torch.Tensor) for r in result):
        specs = [value_spec(r) for r in result]
        return None if any(s is None for s in specs) else (type(result), specs)
    return None


def from_spec(spec):
    if spec[0] == "T":
        _, shape, stride, dtype, _grad = spec
        return torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    kind, specs = spec
    return kind(from_spec(s) for s in specs)


def _meta_args(args, kwargs):
    args = tuple(_meta_device(a) for a in args)
    if "device" in kwargs:
        kwargs = dict(kwargs, device=torch.device("meta"))
    return args, kwargs


def propagate(gm: fx.GraphModule, inputs, batch_scale: int, op_cache: dict | None = None) -> dict[str, object]:
    """Every node's meta value with the batch dim of the inputs scaled by `batch_scale`. `op_cache`:
    specs of earlier calls to reuse (the same graph re-propagated after a rewrite, say)."""
    metas = []
    for x in inputs:
        shape = (x.shape[0] * batch_scale, *x.shape[1:])
        metas.append(torch.empty(shape, dtype=x.dtype, device="meta"))
    prop = _MetaProp(gm, {}, op_cache)
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
