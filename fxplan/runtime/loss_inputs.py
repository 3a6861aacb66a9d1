"""The global denominator of a split ratio loss (see passes/loss_ratio.py), given to the graphs for
one step: computed on every rank from the whole batch it holds, divided by the number of pieces the
runtime averages the loss over (the loss layer's dp times the microbatches), so that the pieces'
losses and gradients sum to exactly one device's."""

from __future__ import annotations

import contextlib

import copy

import torch

from fxplan.codegen.devices import runtime_device_pass

DENOMINATOR = "fxplan_loss_denominator"  # the traced graph's meta key passes/loss_ratio.py writes


@contextlib.contextmanager
def loss_denominator(traced_gm, plan, batch: tuple):
    """While open, the graphs' split ratio loss divides by the whole batch's denominator (per piece)."""
    info = traced_gm.meta.get(DENOMINATOR)
    if info is None:
        yield
        return
    with torch.no_grad():
        device = next((b.device for b in batch if isinstance(b, torch.Tensor)), torch.device("cpu"))
        denominator = _runnable(info)(*batch).float()
    last = plan.stages[-1]
    pieces = last.strategies[last.layers[-1]].dp * plan.microbatches
    token = info["given"].set(denominator / pieces)
    try:
        yield
    finally:
        info["given"].reset(token)


def _runnable(info: dict):
    """The denominator's graph with the trace's device constants (meta for a meta model) read off
    its inputs at run time, as the rank graphs have them; built once per traced graph."""
    fn = info.get("runnable")
    if fn is None:
        fn = copy.deepcopy(info["fn"])
        runtime_device_pass(fn.graph)
        fn.recompile()
        info["runnable"] = fn
    return fn
