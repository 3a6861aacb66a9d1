"""STAND-IN for codegen/emit (tp=1 only) so the runtime can be tested before emit lands.

REMOVE when fxplan.codegen.emit.emit_rank exists: the worker then runs the real
compile -> emit path. It follows emit's contract (RankProgram / ParamShard, see the brief):
stage 0 takes the full microbatch and slices this rank's dp rows; stage i>0 takes what the peer
at the same position of stage i-1 produced; the last stage returns loss / dp. Layers are given
as module-path prefixes; every stage uses one dp degree; fsdp uses collectives.fxplan_fsdp_gather.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.fx as fx
from torch import nn

from fxplan.codegen import collectives, groups
from fxplan.codegen.materialize import fsdp_chunk_numel
from fxplan.plan import Plan, Stage, Strategy


@dataclass(frozen=True)
class ParamShard:
    name: str
    global_shape: tuple
    tp_dim: int | None
    tp: int
    tp_index: int
    fsdp: bool
    dp: int
    dp_index: int
    dp_group: str | None
    numel_local: int
    requires_grad: bool


class _InlineTracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):  # params become get_attr nodes named by state_dict keys
        return False


def trace(model: nn.Module) -> fx.GraphModule:
    return fx.GraphModule(model, _InlineTracer().trace(model))


def make_plan(layers: list[str], world: int, pp: int, microbatches: int, schedule: str, fsdp: bool = False,
              batch: int = 0) -> Plan:
    n = world // pp
    base, extra = divmod(len(layers), pp)
    stages, start = [], 0
    for i in range(pp):
        names = layers[start:start + base + (i < extra)]
        start += len(names)
        stages.append(Stage(index=i, layers=tuple(names), devices=tuple(range(i * n, (i + 1) * n)),
                            strategies={k: Strategy(dp=n, tp=1, fsdp=fsdp and n > 1) for k in names}))
    return Plan(pp=pp, microbatches=microbatches, schedule=schedule, stages=tuple(stages),
                estimated_iteration_s=0.0, batch_size=batch, world_size=world)


def _layer_of(target: str, layers: list[str]) -> str | None:
    best = None
    for name in layers:
        if target == name or target.startswith(name + "."):
            if best is None or len(name) > len(best):
                best = name
    return best


def emit_rank(traced: fx.GraphModule, layer_graph, space, plan: Plan, rank: int, params="meta"):
    layers = list(plan.layers)
    stage_of = {name: plan.stage_of(name) for name in layers}
    # assign every non-placeholder node to a stage: get_attr by name, others follow the last get_attr
    node_stage: dict[fx.Node, int] = {}
    current = 0
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            node_stage[node] = -1
        elif node.op == "get_attr":
            current = stage_of[_layer_of(node.target, layers)]
            node_stage[node] = current
        elif node.op != "output":
            node_stage[node] = current
    s = next(st.index for st in plan.stages if rank in st.devices)
    stage = plan.stages[s]
    q = stage.devices.index(rank)
    dp = len(stage.devices)
    fsdp = any(st.fsdp for st in stage.strategies.values())
    dp_key = groups.group_key(stage.devices, "dp") if dp > 1 else None
    order = list(traced.graph.nodes)

    def crossing(k: int) -> list[fx.Node]:  # values made at stages <= k used at stages > k
        return [n for n in order if n in node_stage and node_stage[n] <= k
                and any(node_stage.get(u, 99) > k for u in n.users)]

    inputs = [n for n in order if n.op == "placeholder"] if s == 0 else crossing(s - 1)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in inputs:
        ph = graph.placeholder(n.name)
        if s == 0 and dp > 1:  # full microbatch in: keep this rank's rows
            size = graph.call_function(getattr, (ph, "shape"))
            b = graph.call_function(operator.getitem, (size, 0))
            per = graph.call_function(operator.floordiv, (b, dp))
            rows = graph.call_method("narrow", (ph, 0, graph.call_function(operator.mul, (per, q)), per))
            env[n] = rows
        else:
            env[n] = ph
    params: dict[str, ParamShard] = {}
    root: dict[str, torch.Tensor] = {}
    for n in order:
        if node_stage.get(n) != s:
            continue
        if n.op == "get_attr":
            full = traced.get_parameter(n.target) if n.target in dict(traced.named_parameters()) \
                else traced.get_buffer(n.target)
            shape = tuple(full.shape)
            is_param = isinstance(full, nn.Parameter)
            shard_fsdp = fsdp and is_param
            numel = full.numel()
            local = (fsdp_chunk_numel(numel, dp),) if shard_fsdp else shape
            params[n.target] = ParamShard(n.target, shape, None, 1, 0, shard_fsdp, dp, q, dp_key,
                                          fsdp_chunk_numel(numel, dp) if shard_fsdp else numel, is_param)
            root[n.target] = nn.Parameter(torch.empty(local, device="meta"), requires_grad=is_param) \
                if is_param else torch.empty(local, device="meta")
            got = graph.get_attr(n.target)
            env[n] = graph.call_function(collectives.fxplan_fsdp_gather, (got, dp_key, shape)) if shard_fsdp else got
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
    if s == plan.pp - 1:
        out = next(n for n in order if n.op == "output").args[0]
        loss = env[out]
        graph.output(graph.call_function(operator.truediv, (loss, dp)) if dp > 1 else loss)
        outputs = [out]
    else:
        outputs = crossing(s)
        graph.output(tuple(env[n] for n in outputs))
    graph.lint()
    gm = fx.GraphModule(root, graph)
    return SimpleNamespace(rank=rank, stage=s, gm=gm, inputs=[n.name for n in inputs],
                           outputs=[getattr(n, "name", str(n)) for n in outputs], params=params,
                           group_keys=[dp_key] if dp_key else [])


def codegen():
    """What Runner(_codegen=...) needs: this emit plus the real groups/collectives modules."""
    return SimpleNamespace(emit_rank=emit_rank, groups=groups, collectives=collectives)


def compiled(model: nn.Module, plan: Plan, example_inputs=()):
    return SimpleNamespace(model=model, plan=plan, traced=trace(model), layer_graph=None, space=None,
                           example_inputs=example_inputs)
