"""Facts about the traced graph that sharding propagation looks up for every layer: nodes by name,
tensor metas and which values carry gradients (computed once per graph)."""

from __future__ import annotations

import torch
import torch.fx as fx

from fxplan.passes.ir import TensorMeta, Traced


class GraphFacts:
    """Name lookups, metas and requires-grad of the traced graph (computed once)."""

    def __init__(self, traced: Traced):
        self.gm = traced.gm
        self.nodes = {n.name: n for n in self.gm.graph.nodes}
        self.tensors = dict(traced.tensors)
        params = dict(self.gm.named_parameters())
        self.params = params
        self.rg: dict[fx.Node, bool] = {}
        for n in self.gm.graph.nodes:
            v = n.meta.get("val")
            if n.op == "get_attr":
                p = params.get(n.target)
                self.rg[n] = p is not None and p.requires_grad
            elif n.op == "placeholder":
                self.rg[n] = isinstance(v, torch.Tensor) and v.requires_grad
            else:
                floaty = (isinstance(v, torch.Tensor) and v.is_floating_point()) or (
                    isinstance(v, (tuple, list)) and any(isinstance(x, torch.Tensor) and x.is_floating_point() for x in v))
                self.rg[n] = floaty and any(self.rg.get(a, False) for a in n.all_input_nodes)

    def meta(self, n: fx.Node) -> TensorMeta:
        m = self.tensors.get(n.name)
        if m is not None:
            return m
        v = n.meta.get("val")
        if isinstance(v, (tuple, list)):
            v = next((x for x in v if isinstance(x, torch.Tensor)), None)
        if not isinstance(v, torch.Tensor):
            return TensorMeta((), "none", 0, None)
        return TensorMeta(tuple(int(s) for s in v.shape), str(v.dtype), v.element_size(), n.meta.get("fxplan_batch_dim"))

    def is_param(self, n: fx.Node) -> bool:
        return n.op == "get_attr" and n.target in self.params
