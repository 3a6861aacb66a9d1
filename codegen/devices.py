"""Device-agnostic rank graphs: every device constant becomes the rank's device, read at run time.

torch.export bakes the trace's device into factory and conversion calls (`aten.arange(8,
device=cpu)`, `meta` for a meta model; `full`, `zeros`, `empty`, `scalar_tensor`, `_to_copy`,
`to.device`, ...), and fx-traced code may name a device literally (`torch.arange(n,
device="cuda")`, `x.to("cpu")`). A rank computes on one device, the one its inputs and its
parameters live on (the runtime moves both there), so ONE node reads that device from the first
input (from the first parameter or buffer when the graph has no input) and every device constant
of the graph is replaced by it: the same graph runs on CPU, on any GPU and on meta tensors.

What counts as a device constant: a `torch.device` anywhere in a node's args/kwargs, and a string
naming a device where an argument takes a device (a `device=` keyword, an aten schema argument
named `device`, the positional argument of a `to` call).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxplan.errors import UnsupportedOpError
from fxplan._torch import OpOverload, op_argument_names


def _names_a_device(value) -> bool:
    if not isinstance(value, str):
        return False
    try:
        torch.device(value)
    except RuntimeError:
        return False
    return True


def _device_slots(node: fx.Node) -> tuple[set[int], set[str]]:
    """Positions and keywords of `node` where a string means a device."""
    positions: set[int] = set()
    target = node.target
    if isinstance(target, OpOverload):
        positions = {i for i, name in enumerate(op_argument_names(target)) if name == "device"}
    elif getattr(target, "__name__", target) == "to":  # x.to("cuda"), torch.Tensor.to(x, "cuda")
        positions = set(range(len(node.args)))
    return positions, {"device"}


def device_constants(node: fx.Node) -> list:
    """The device constants among `node`'s arguments (nested lists and tuples searched)."""
    found: list = []
    positions, keywords = _device_slots(node)

    def scan(value, device_slot: bool) -> None:
        if isinstance(value, torch.device) or (device_slot and _names_a_device(value)):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            for v in value:
                scan(v, False)

    for i, a in enumerate(node.args):
        scan(a, i in positions)
    for k, v in node.kwargs.items():
        scan(v, k in keywords)
    return found


def _replace(node: fx.Node, device: fx.Node) -> None:
    positions, keywords = _device_slots(node)

    def swap(value, device_slot: bool):
        if isinstance(value, torch.device) or (device_slot and _names_a_device(value)):
            return device
        if isinstance(value, (list, tuple)):
            return type(value)(swap(v, False) for v in value)
        return value

    node.args = tuple(swap(a, i in positions) for i, a in enumerate(node.args))
    node.kwargs = {k: swap(v, k in keywords) for k, v in node.kwargs.items()}


def runtime_device_pass(graph: fx.Graph) -> None:
    """Replace every device constant of `graph` (in place) by one node reading the rank's device."""
    holders = [n for n in graph.nodes if n.op != "output" and device_constants(n)]
    if not holders:
        return
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    source = placeholders[0] if placeholders else next((n for n in nodes if n.op == "get_attr"), None)
    if source is None:
        raise UnsupportedOpError("a stage graph names a device but has neither inputs nor parameters to take the "
                                  "run-time device from; give the model's forward at least one tensor input")
    anchor = placeholders[-1] if placeholders else source
    with graph.inserting_after(anchor):
        device = graph.call_function(getattr, (source, "device"))
    for node in holders:
        _replace(node, device)
