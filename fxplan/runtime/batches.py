"""The global batch a train_step receives: checked against the example batch, cut into microbatches."""

from __future__ import annotations

import torch

from fxplan.errors import ConstraintError
from fxplan.codegen.program import LayerGraph  # the IR type, as codegen hands it on
from fxplan.plan import Plan


def is_batched(graph: LayerGraph, index: int) -> bool:
    """Whether input `index` has a batch dim (dim 0); inputs without one are handed to every microbatch."""
    try:
        return graph.tensors[graph.placeholders[index]].batch_dim is not None
    except (AttributeError, IndexError, KeyError, TypeError):
        return True


def check_batch(graph: LayerGraph, plan: Plan, batch: tuple) -> None:
    # Every rank's graph was emitted with static local shapes for the example batch (views,
    # factories, p2p buffers): a batch of another shape cannot run, so say so before any rank
    # starts (all ranks get the same batch, so all raise together and none hangs).
    expected = [graph.tensors.get(name) for name in graph.placeholders]
    if len(batch) != len(expected):
        raise ConstraintError(f"train_step takes {len(expected)} inputs, like the example batch given to "
                              f"compile(), but got {len(batch)}")
    for i, (value, meta) in enumerate(zip(batch, expected)):
        if meta is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise ConstraintError(f"train_step input {i} is a {type(value).__name__}; pass tensors like the "
                                  f"example batch")
        if tuple(value.shape) != tuple(meta.shape) or str(value.dtype) != meta.dtype:
            raise ConstraintError(
                f"train_step input {i} has shape {tuple(value.shape)} and {value.dtype}; the plan was compiled "
                f"for {tuple(meta.shape)} and {meta.dtype} (the example batch). The per-rank graphs have static "
                f"shapes: pass batches shaped like the example inputs, or compile with the shape you train with")
    sizes = {b.shape[0] for i, b in enumerate(batch) if isinstance(b, torch.Tensor) and is_batched(graph, i)}
    if len(sizes) != 1:
        raise ConstraintError(f"train_step inputs disagree on the batch size (dim 0): {sorted(sizes)}")
    size, m = sizes.pop(), plan.microbatches
    if size % m:
        raise ConstraintError(f"global batch {size} does not divide into {m} microbatches; pass a batch that is "
                              f"a multiple of {m}")
    for stage in plan.stages:
        for layer, strat in stage.strategies.items():
            if (size // m) % strat.dp:
                raise ConstraintError(
                    f"microbatch of {size // m} rows does not split over dp={strat.dp} of layer {layer}; "
                    f"pass a batch that is a multiple of {m * strat.dp}")


def microbatches(graph: LayerGraph, batch: tuple, m: int) -> list[tuple]:
    """The batch cut into `m` equal pieces along dim 0 (inputs without a batch dim repeated)."""
    pieces = [b.chunk(m, dim=0) if isinstance(b, torch.Tensor) and is_batched(graph, i) else (b,) * m
              for i, b in enumerate(batch)]
    return [tuple(p[k] for p in pieces) for k in range(m)]
