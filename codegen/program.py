"""The values codegen hands its callers: the functions a graph's collectives call (GraphOps, given
by the caller), what programs are emitted from (EmitSource), and one rank's program (RankProgram)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.fx as fx

from fxplan.codegen.params import ParamShard
from fxplan.passes.ir import LayerGraph, StrategySpace, Traced
from fxplan.passes.sharding.redistribute import Layout

Tensor = torch.Tensor


@dataclass(frozen=True)
class GraphOps:
    """The functions emitted graphs call for each collective (the runtime's GRAPH_OPS); a graph
    names them by their qualified names, e.g. fxplan_tp_all_reduce(x, 'tp:0,1')."""

    tp_f: Callable[[Tensor, str], Tensor]  # (x, key)
    tp_all_reduce: Callable[[Tensor, str], Tensor]
    all_gather: Callable[[Tensor, int, str], Tensor]  # (x, dim, key)
    slice: Callable[[Tensor, int, str], Tensor]
    reduce_scatter: Callable[[Tensor, int, str], Tensor]
    all_to_all: Callable[[Tensor, int, int, str], Tensor]  # (x, src_dim, dst_dim, key)
    all_gather_rs: Callable[[Tensor, int, str], Tensor]
    r_to_p: Callable[[Tensor, str], Tensor]
    rows: Callable[[Tensor, int, int, int, str], Tensor]  # (x, dim, index, parts, bwd_key)
    regroup_rows: Callable[[Tensor, int, str, int, int, str], Tensor]  # (x, dim, fwd_key, index, parts, bwd_key)
    dp_grad_fix: Callable[[Tensor, str, float], Tensor]  # (x, key, scale)
    fsdp_gather_layer: Callable[[list, str, tuple, bool], tuple]  # (shards, dp key, tp-local shapes, keep)
    # (x, weight, bias, running_mean, running_var, momentum, eps, dp key): training batch norm, dp-wide statistics
    sync_batch_norm: Callable | None = None


@dataclass(frozen=True)
class EmitSource:
    """What every rank's program is emitted from: the traced model, its layers, their TP shardings."""

    traced: Traced
    layer_graph: LayerGraph
    space: StrategySpace


@dataclass(frozen=True)
class RankProgram:
    rank: int
    stage: int
    gm: fx.GraphModule
    inputs: tuple[str, ...]  # placeholder names (traced node names), in call order
    outputs: tuple[str, ...]  # returned tensors (a tuple; the last stage returns the scaled loss alone)
    input_layouts: tuple[Layout, ...]  # how each input arrives (stage 0: Layout(1, n, R), the full microbatch)
    output_layouts: tuple[Layout, ...]  # how each output leaves (the next stage's rank at our position gets it)
    params: Mapping[str, ParamShard]  # attribute name in gm -> its shard
    group_keys: tuple[str, ...]  # process groups this rank's graph uses
    loss_scale: float = 1.0  # the factor applied to the local loss (1 / dp of the loss layer)
