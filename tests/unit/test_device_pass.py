"""codegen/devices.py on a hand-written fx graph: literal devices (a torch.device, a device string
in `device=` and in `.to(...)`) all become the one device read from the graph's input."""

from __future__ import annotations

import torch
import torch.fx as fx

from fxplan.codegen.devices import runtime_device_pass


class Literal(torch.nn.Module):
    def forward(self, x):
        pos = torch.arange(x.shape[1], device="cpu")
        ones = torch.ones(x.shape[0], device=torch.device("cpu"))
        return (x + pos).to("cpu").sum() + ones.sum() + x.new_zeros(2, device="cpu").sum()


def test_literal_devices_follow_the_input():
    gm = fx.symbolic_trace(Literal())
    runtime_device_pass(gm.graph)
    gm.recompile()
    assert "'cpu'" not in gm.code and "device(type" not in gm.code
    readers = [n for n in gm.graph.nodes if n.target is getattr and n.args[1] == "device"]
    assert len(readers) == 1 and len(readers[0].users) == 4
    x = torch.randn(2, 4)
    assert torch.equal(gm(x), Literal()(x))
    out = gm(x.to("meta"))  # before the pass the cpu tensors would meet a meta one
    assert out.device.type == "meta"
    assert "mean" in fx.symbolic_trace(_Mean()).code  # strings that are not devices stay
    mean = fx.symbolic_trace(_Mean())
    runtime_device_pass(mean.graph)
    assert not [n for n in mean.graph.nodes if n.target is getattr]


class _Mean(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.mse_loss(x, x, reduction="mean")
