"""Ratio losses made exact under any batch split: a mean over the valid tokens (ignore_index) or a
class-weighted mean is sum(w_i * nll_i) / sum(w_i) over the WHOLE batch. Averaging the means of batch
pieces (dp ranks, microbatches) gives other gradients as soon as the pieces hold different numbers of
valid tokens, so the loss is rewritten into its numerator and its denominator:

    cross_entropy(x, y, weight, reduction=mean, ignore_index)
      ->  cross_entropy(x, y, weight, reduction=sum, ignore_index) / pick_denominator(local denominator)

`pick_denominator` returns the denominator the runtime gives for this step (GIVEN, set around the
step) and, when none is given, the batch's own: called as the model is called, the graph computes the
model's loss. The denominator depends on the labels (and the class weights) only, never on
parameters, and every rank holds the whole global batch, so the runtime computes the global one with
`denominator_fn` (gm.meta[DENOMINATOR]) before the step and divides it by the number of pieces the
loss is averaged over: the pieces' sum is then exactly one device's loss and gradients. The rewrite
does not look at how the logits are sharded: it changes the reduction and the divisor only.

Losses this cannot prove decomposable (a mean cross-entropy that is not the whole loss, e.g. one term
of a sum, or one with label smoothing and weights) are left as they are and named in
gm.meta[UNPROVEN]; compile() warns when its plan splits such a loss's batch.
"""

from __future__ import annotations

import contextvars
import operator
from typing import Callable

import torch
import torch.fx as fx

from fxplan.passes.ir import Traced

DENOMINATOR = "fxplan_loss_denominator"  # gm.meta key: {"fn": GraphModule, "given": GIVEN}
UNPROVEN = "fxplan_loss_unproven"  # gm.meta key: tuple of "op (node)" strings
# The runtime sets it through gm.meta[DENOMINATOR]["given"] (it does not import passes).
GIVEN: contextvars.ContextVar = contextvars.ContextVar("fxplan_loss_denominator", default=None)

_CE = torch.ops.aten.cross_entropy_loss.default
_MEAN, _SUM = 1, 2
# Ops that scale the loss by a constant on its way out: the ratio survives them.
_DIVISIONS = {torch.ops.aten.div.Scalar, torch.ops.aten.div.Tensor, operator.truediv}
_LINEAR_SCALARS = {torch.ops.aten.mul.Tensor, torch.ops.aten.mul.Scalar, operator.mul} | _DIVISIONS


_F_CE = torch.nn.functional.cross_entropy
_F_NAMES = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")
_REDUCTIONS = {"none": 0, "mean": _MEAN, "sum": _SUM}


def _is_ce(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (_CE, _F_CE)


def _ce_args(node: fx.Node):
    """(logits, labels, weight, reduction, ignore_index, label_smoothing) of a cross-entropy node (aten
    cross_entropy_loss from torch.export, F.cross_entropy from fx); reduction as aten's number."""
    if node.target is _F_CE:
        vals = dict(zip(_F_NAMES, node.args))
        vals.update({k: v for k, v in node.kwargs.items() if k in _F_NAMES})
        if vals.get("size_average") is not None or vals.get("reduce") is not None:
            return (None, None, None, -1, -100, 0.0)  # legacy reduction flags: not rewritten
        return (vals.get("input"), vals.get("target"), vals.get("weight"),
                _REDUCTIONS.get(vals.get("reduction", "mean"), -1), vals.get("ignore_index", -100),
                vals.get("label_smoothing", 0.0))
    names = ("input", "target", "weight", "reduction", "ignore_index", "label_smoothing")
    vals = [None, None, None, _MEAN, -100, 0.0]
    for i, a in enumerate(node.args):
        vals[i] = a
    for k, v in node.kwargs.items():
        if k in names:
            vals[names.index(k)] = v
    return tuple(vals)


def _loss_site(loss: fx.Node) -> fx.Node | None:
    """The mean cross-entropy the loss is (up to constant factors), or None."""
    node = loss
    while node.op == "call_function" and node.target in _LINEAR_SCALARS:
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if len(tensors) != 1 or len(node.args) != 2 or (node.target in _DIVISIONS and node.args[0] is not tensors[0]):
            break
        node = tensors[0]
    if _is_ce(node) and _ce_args(node)[3] == _MEAN and (node is loss or len(node.users) == 1):
        return node
    return None


def _denominator(graph: fx.Graph, labels, weight, ignore_index) -> fx.Node:
    """sum over the labels of weight[y] * (y != ignore_index) (or of the valid-label count), in float."""
    aten = torch.ops.aten
    valid = graph.call_function(aten.ne.Scalar, (labels, ignore_index))
    if weight is None:
        per = graph.call_function(aten._to_copy.default, (valid,), {"dtype": torch.float32})
    else:
        safe = graph.call_function(aten.where.ScalarOther, (valid, labels, 0))
        picked = graph.call_function(aten.index.Tensor, (weight, [safe]))
        per = graph.call_function(aten.mul.Tensor, (picked, valid))
    return graph.call_function(aten.sum.default, (per,))


_METADATA_ATTRS = ("device", "dtype", "shape", "ndim")
_NOT_METADATA = object()


def _metadata_value(node: fx.Node):
    """What a read of a tensor's metadata (x.device, x.dtype, x.shape, x.size(), x.dim()) gave at trace
    time, else _NOT_METADATA. `labels.to(logits.device)` (HF's loss) reads the logits only for their
    device: followed as data, the denominator would run the whole model."""
    reads = (node.op == "call_function" and node.target is getattr and len(node.args) == 2
             and node.args[1] in _METADATA_ATTRS) or (node.op == "call_method" and node.target in ("size", "dim"))
    value = node.meta.get("val", _NOT_METADATA) if reads else _NOT_METADATA
    constant = (torch.device, torch.dtype, int, torch.Size, tuple)
    if not isinstance(value, constant) or (isinstance(value, tuple) and not all(isinstance(v, int) for v in value)):
        return _NOT_METADATA
    return value


def _denominator_fn(gm: fx.GraphModule, labels: fx.Node, weight, ignore_index) -> fx.GraphModule:
    """A GraphModule forward(*original inputs) -> the denominator over those inputs (the whole batch).
    Metadata reads become the trace's constants (a device constant is the rank's at run time:
    fxplan/runtime/loss_inputs.py), so only the labels' own data flow is computed."""
    needed: set[fx.Node] = set()
    constants: dict[fx.Node, object] = {}
    stack = [labels] + ([weight] if isinstance(weight, fx.Node) else [])
    while stack:
        n = stack.pop()
        if n in needed or n in constants:
            continue
        value = _metadata_value(n)
        if value is not _NOT_METADATA:
            constants[n] = value
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    graph = fx.Graph()
    env: dict[fx.Node, object] = dict(constants)
    for node in gm.graph.nodes:
        if node.op == "placeholder" or node in needed:
            env[node] = graph.node_copy(node, lambda a: env[a])
    d = _denominator(graph, env[labels], env[weight] if isinstance(weight, fx.Node) else None, ignore_index)
    graph.output(d)
    return fx.GraphModule(gm, graph, class_name="LossDenominator")


def pick_denominator(local):
    """The denominator the runtime gives for this step (the whole batch's, per piece), else `local`."""
    given = GIVEN.get()
    if given is None or local.device.type == "meta":  # shape probes on meta need no value
        return local
    return given.to(local.device, local.dtype)


def split_ratio_loss(traced: Traced, inputs: tuple, refinish: Callable[[fx.GraphModule, tuple], Traced]) -> Traced:
    """`traced` with its ratio loss split (see the module docstring); `refinish(gm, inputs)` re-derives the
    shapes and batch dims after the rewrite (passes/trace.py's finishing step)."""
    gm = traced.gm
    graph = gm.graph
    loss = next(n for n in graph.nodes if n.name == traced.loss_node)
    site = _loss_site(loss)
    others = [n for n in graph.nodes if _is_ce(n) and _ce_args(n)[3] == _MEAN and n is not site]
    unproven = tuple(f"cross_entropy ({n.name})" for n in others)
    if site is not None and _ce_args(site)[5] not in (0, 0.0) and _ce_args(site)[2] is not None:
        unproven += (f"cross_entropy_loss with label smoothing and class weights ({site.name})",)
        site = None
    if site is None:
        gm.meta[UNPROVEN] = unproven
        return traced
    logits, labels, weight, _, ignore_index, smoothing = _ce_args(site)
    fn = _denominator_fn(gm, labels, weight, ignore_index)
    with graph.inserting_before(site):
        local = _denominator(graph, labels, weight, ignore_index)
        if site.target is _F_CE:
            total = graph.call_function(_F_CE, (logits, labels), dict(
                weight=weight, ignore_index=ignore_index, reduction="sum", label_smoothing=smoothing))
        else:
            total = graph.call_function(_CE, (logits, labels, weight, _SUM, ignore_index, smoothing))
        d = graph.call_function(pick_denominator, (local,))
        ratio = graph.call_function(torch.ops.aten.div.Tensor, (total, d))
    site.replace_all_uses_with(ratio)
    graph.erase_node(site)
    gm.recompile()
    out = refinish(gm, tuple(inputs))
    out.gm.meta[DENOMINATOR] = {"fn": fn, "given": GIVEN}
    out.gm.meta[UNPROVEN] = unproven
    return out


def unproven_message(traced: Traced, plan) -> str | None:
    """What compile() says when the loss holds a mean fxplan could not split and `plan` splits the batch
    (dp > 1 on the loss layer or several microbatches): the result may differ from one device."""
    ops = traced.gm.meta.get(UNPROVEN) or ()
    last = plan.stages[-1]
    if not ops or (plan.microbatches == 1 and last.strategies[last.layers[-1]].dp == 1):
        return None
    return (f"the loss holds {', '.join(ops)}, a mean over the batch that is not the whole loss, so fxplan "
            f"cannot split it into a global numerator and denominator: with ignored labels or class weights, "
            f"this plan's dp/microbatch pieces average it differently from one device. Return that mean as "
            f"the whole loss, use reduction='sum' and divide by a count, or pin dp=1 and microbatches=1")
