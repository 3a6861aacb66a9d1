"""compile()'s checks that a model can train as planned, made before anything is planned, so that a
model fxplan cannot run fails at the door with a ModelError naming the input, op or parameter and
the fix, not inside train_step with a raw torch error:

- the example inputs live where the weights live and mix with them in matmuls at their dtype;
- forward, run once on meta copies of the weights and inputs (shapes only, no compute), returns a
  loss that requires grad, moves nothing to another device and updates no parameter in place;
- tracing leaves the user's module as it was (fx tracing a forward that assigns a buffer would
  leave an fx Proxy on the module, and its state_dict would no longer save).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from fxplan._torch import DispatchMode, is_functional_op, own_buffers, own_parameters, tensor_version
from fxplan.errors import ModelError
from fxplan.passes.ir import Traced, op_name
from fxplan.passes.meta_prop import from_spec, op_key, value_spec

# ops whose operands torch requires to share one dtype (the CPU and CUDA kernels refuse a mix)
_SAME_DTYPE_OPS = {"linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "conv1d", "conv2d", "conv3d",
                   "convolution", "einsum", "embedding_bag"}


def check_input_devices(model: nn.Module, inputs) -> None:
    weights = [t for t in list(model.parameters()) + list(model.buffers())]
    if not weights:
        return
    home = weights[0].device
    if home.type == "meta":
        return  # a meta model plans with inputs anywhere (they are only shapes)
    for i, x in enumerate(inputs):
        if x.device.type != "meta" and x.device != home:
            raise ModelError(f"example_inputs[{i}] is on {x.device} but the model's weights are on {home}; "
                             f"move the inputs with .to('{home}') (or the model), or pass meta tensors")


def check_matmul_dtypes(traced: Traced) -> None:
    """Matmul-like ops whose operands differ in dtype (a half input into float weights, integer ids
    into a Linear): the op and the input it came from."""
    tensors = traced.tensors
    placeholders = list(traced.placeholders)
    for node in traced.gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or op_name(node) not in _SAME_DTYPE_OPS:
            continue
        args = [a for a in node.all_input_nodes if a.name in tensors]
        dtypes = {tensors[a.name].dtype for a in args}
        if len(dtypes) < 2:
            continue
        source = next((a for a in _upstream_inputs(node) if a.name in placeholders), None)
        where = (f"example_inputs[{placeholders.index(source.name)}] ({tensors[source.name].dtype})"
                 if source is not None else "its operands")
        raise ModelError(
            f"op {op_name(node)} (node {node.name}) mixes dtypes {sorted(dtypes)}: {where} meets weights of "
            f"another dtype, which torch refuses at run time; cast the inputs to the weights' dtype (e.g. "
            f"x.float()) or the model to the inputs' (model.to(dtype)); integer ids go through an nn.Embedding")


def _upstream_inputs(node):
    seen, todo = set(), [node]
    while todo:
        cur = todo.pop()
        for arg in cur.all_input_nodes:
            if arg.name not in seen:
                seen.add(arg.name)
                if arg.op == "placeholder":
                    yield arg
                todo.append(arg)


def check_forward_on_meta(model: nn.Module, inputs) -> None:
    """Run forward once on meta copies of every weight and input; refuse what cannot train."""
    from torch.func import functional_call

    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    by_id: dict[int, torch.Tensor] = {}
    state = {}
    for name, t in list(params.items()) + list(buffers.items()):
        if id(t) not in by_id:
            meta = torch.empty_like(t, device="meta").requires_grad_(t.requires_grad and t.is_floating_point())
            by_id[id(t)] = meta
        state[name] = by_id[id(t)]
    versions = {name: tensor_version(state[name]) for name in params}
    meta_inputs = tuple(x.detach().to("meta") for x in inputs)
    home = next((t.device for t in [*params.values(), *buffers.values()]), None)
    try:
        with _restored(model), _DeviceMoves(home), _RepeatedOps():
            out = functional_call(model, state, meta_inputs)
    except ModelError:
        raise
    except Exception:  # noqa: BLE001 - forward that cannot run on meta: trace reports what it cannot follow
        return
    loss = out[0] if isinstance(out, (tuple, list)) and out else out
    if isinstance(loss, torch.Tensor) and loss.numel() == 1 and any(p.requires_grad for p in params.values()) \
            and not loss.requires_grad:
        raise ModelError("forward returns a loss that does not require grad (computed under torch.no_grad(), "
                         "detached, or from frozen weights only): backward would have nothing to train; return "
                         "the loss as computed from the trainable parameters")
    changed = [name for name in params if tensor_version(state[name]) != versions[name]]
    if changed:
        raise ModelError(f"forward updates parameter {changed[0]} in place; sharded copies on every rank would "
                         f"drift apart: update parameters in the optimizer step, not in forward")


class _RepeatedOps(DispatchMode):
    """Below autograd: an op that neither mutates nor aliases its inputs, called again on the same
    meta shapes (the same block repeated), returns fresh meta tensors of the first call's shapes
    instead of re-running its meta kernel (many are Python). Autograd above still records it, so
    requires_grad and version counters are what the model's own forward gives."""

    def __init__(self):
        super().__init__()
        self.specs: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        key = op_key(func, args, kwargs) if is_functional_op(func) else None
        if key is not None and key in self.specs:
            return from_spec(self.specs[key])
        result = func(*args, **kwargs)
        if key is not None and (spec := value_spec(result)) is not None:
            self.specs[key] = spec
        return result


class _DeviceMoves(TorchFunctionMode):
    """Refuses a tensor moved to another device than the weights' inside forward (the ranks place
    tensors themselves); a move to the weights' own device is the no-op it is on one device."""

    def __init__(self, home):
        super().__init__()
        self.home = home

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = _move_target(func, args, kwargs)
        if target is not None and target.type != "meta":
            if self.home is None or self.home.type == "meta" or target != self.home:
                name = getattr(func, "__name__", str(func))
                raise ModelError(f"forward moves a tensor to {target} (Tensor.{name}) while the weights are on "
                                 f"{self.home}; fxplan places every tensor on its rank's device itself: remove "
                                 f".to(device) / .cuda() from forward (dtype casts are fine)")
            if func is torch.Tensor.to and len(args) <= 2 and set(kwargs) <= {"device"}:
                return args[0]
        return func(*args, **kwargs)


def _move_target(func, args, kwargs):
    if func is torch.Tensor.cuda:
        return torch.device("cuda", args[1] if len(args) > 1 and isinstance(args[1], int) else 0)
    if func is torch.Tensor.cpu:
        return torch.device("cpu")
    if func is not torch.Tensor.to:
        return None
    candidate = kwargs.get("device", args[1] if len(args) > 1 else None)
    if isinstance(candidate, torch.Tensor):
        return candidate.device
    if isinstance(candidate, (str, torch.device)):
        device = torch.device(candidate)
        return torch.device(device.type, 0) if device.type == "cuda" and device.index is None else device
    return None


@contextlib.contextmanager
def preserved(model: nn.Module):
    """Tracing must leave `model` as it was: its parameter and buffer tables and tensor attributes
    are put back afterwards (fx tracing assigns Proxies to buffers a forward updates)."""
    with _restored(model):
        yield


@contextlib.contextmanager
def _restored(model: nn.Module):
    saved = []
    for module in model.modules():
        tensors = {k: v for k, v in vars(module).items() if isinstance(v, torch.Tensor)}
        saved.append((module, dict(own_parameters(module)), dict(own_buffers(module)), tensors))
    try:
        yield
    finally:
        for module, params, buffers, tensors in saved:
            own_parameters(module).clear()
            own_parameters(module).update(params)
            own_buffers(module).clear()
            own_buffers(module).update(buffers)
            for key in [k for k, v in vars(module).items() if _is_proxy(v) and k not in tensors]:
                delattr(module, key)
            vars(module).update(tensors)


def _is_proxy(value) -> bool:
    return type(value).__module__.startswith("torch.fx")
