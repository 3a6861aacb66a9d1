"""Sequence parallelism on the fake process group (4 ranks): with sp pinned, each rank's graph runs
the layer norms on its quarter of the sequence, all-gathers the sequence before the column-parallel
MLP input and reduce-scatters the row-parallel output back onto the sequence shard (Megatron-SP),
and forward and backward run with those local shapes."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections import Counter

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import fxplan
from fxplan.runtime.sequence_saved import SequenceSaved
from tp_blocks import batch_for, build_lm

WORLD = 4
SEQ = 16
SLOW = fxplan.Cluster(nodes=1, devices_per_node=WORLD, memory_bytes=16e9, peak_flops=1e11, intra_bw=1e9,
                      inter_bw=1e9, intra_latency=5e-4, inter_latency=5e-4)


@functools.cache
def _compiled(sp: bool):
    return fxplan.compile(build_lm("bmm"), batch_for("bmm"), cluster=SLOW, verbose=False,
                          constraints=fxplan.Constraints(pp=1, dp=1, tp=WORLD, microbatches=1, sp=sp))


def _fn(n) -> str:
    return getattr(n.target, "__name__", "") if n.op == "call_function" else ""


class _NormInputs(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.layer_norm:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def test_sp_norms_run_on_the_sequence_shard_between_gather_and_reduce_scatter(fake_pg):
    compiled = _compiled(True)
    assert all(s.spec.startswith("sp:") for st in compiled.plan.stages for s in st.strategies.values())
    comm = fake_pg(1, compiled.plan)
    gm = compiled.rank_module(1)
    nodes = list(gm.graph.nodes)
    for block in ("blocks_0", "blocks_1"):
        fc = next(n for n in nodes if _fn(n) == "linear" and n.args[1].target == f"{block}_mlp_fc_weight")
        proj = next(n for n in nodes if _fn(n) == "linear" and n.args[1].target == f"{block}_mlp_proj_weight")
        # the column-parallel input is the sequence (dim 1) all-gathered from the norm's shard
        gather = fc.args[0]
        assert _fn(gather).startswith("fxplan_all_gather") and gather.args[1] == 1, gather.format_node()
        assert _fn(gather.args[0]) == "layer_norm"
        # the row-parallel partial sum goes back onto the sequence shard by a reduce-scatter (not an all-reduce)
        users = [_fn(u) for u in proj.users]
        assert users == ["fxplan_reduce_scatter"] and next(iter(proj.users)).args[1] == 1, users
    modes = _NormInputs()
    with comm.observe() as counter, modes:
        loss = gm(*batch_for("bmm"))  # values are garbage on the fake group; shapes must line up
        loss.backward()
    block_norms = modes.shapes[:4]  # norm1, norm2 of both blocks
    assert block_norms and all(shape[1] == SEQ // WORLD for shape in block_norms), modes.shapes
    kinds = {(kind, phase) for kind, _, phase in counter.snapshot()}
    assert {("all_gather", "fwd"), ("reduce_scatter", "fwd"), ("all_gather", "bwd"), ("reduce_scatter", "bwd")} <= kinds, kinds


def test_without_sp_the_norms_see_the_whole_sequence_and_partial_sums_are_all_reduced(fake_pg):
    compiled = _compiled(False)
    comm = fake_pg(1, compiled.plan)
    gm = compiled.rank_module(1)
    modes = _NormInputs()
    with comm.observe(), modes:
        gm(*batch_for("bmm")).backward()
    assert modes.shapes and all(shape[1] == SEQ for shape in modes.shapes[:4]), modes.shapes
    assert not any(_fn(n) == "fxplan_reduce_scatter" for n in gm.graph.nodes)


def _with_spec(compiled, layer: str, spec: str):
    """The compiled plan with `layer`'s strategy given the sharding `spec`."""
    stages = tuple(dataclasses.replace(st, strategies={n: dataclasses.replace(s, spec=spec) if n == layer else s
                                                       for n, s in st.strategies.items()}) for st in compiled.plan.stages)
    return dataclasses.replace(compiled.plan, stages=stages)


def test_logits_flattened_from_the_sequence_shard_are_gathered_per_local_sample(fake_pg):
    """A head computing its logits on the sequence shard ([B, T/tp, V]) and flattening them to [B*T, V]
    holds B blocks of T/tp rows, gathered block by block for a loss that needs them whole. With 2
    microbatches a rank holds B/2 samples, so the gather must cut its rows into B/2 blocks: cut into
    B (the traced batch), rows of different samples were interleaved and paired with the wrong labels."""
    tokens, targets = batch_for("bmm")
    model = build_lm("bmm")
    pins = fxplan.Constraints(pp=1, dp=1, tp=WORLD, microbatches=2, sp=True)
    base = fxplan.compile(model, (tokens, targets), cluster=SLOW, verbose=False, constraints=pins)
    head = next(u for u in base.layer_graph.layers if u.name == "head")
    blocked = [s.label for s in base.space.for_layer(head.index, WORLD) if s.label.startswith("sp:")
               and any(getattr(p, "blocks", 1) == tokens.shape[0] for p in s.placements.values())]
    assert blocked, [s.label for s in base.space.for_layer(head.index, WORLD)]
    compiled = fxplan.compile(model, (tokens, targets), cluster=SLOW, verbose=False,
                              plan=_with_spec(base, "head", blocked[0]))
    comm = fake_pg(1, compiled.plan)
    gm = compiled.rank_module(1)
    cuts = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "unflatten"
            and any(_fn(u).startswith("fxplan_all_gather") for u in n.users)]
    local = tokens.shape[0] // 2
    assert cuts and all(n.args[1] == 0 and n.args[2][0] == local for n in cuts), [n.format_node() for n in cuts]
    with comm.observe():
        gm(tokens[:local], targets[:local]).backward()  # one microbatch's local shapes line up


def _saved_and_counted(comm, gm):
    """One forward/backward of `gm` under a measuring outer hook: (shapes autograd kept, collectives)."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t
    with comm.observe() as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gm(*batch_for("bmm")).backward()
    return shapes, {k: c.calls for k, c in counter.snapshot().items()}


def test_sp_saves_gathered_inputs_as_their_shard_and_gathers_each_once_again_in_backward(fake_pg):
    """Ops that save an all-gathered sequence shard keep the shard (the outer hook sees its shape, not
    the whole sequence), and backward re-gathers each gather once however many ops saved it."""
    compiled = _compiled(True)
    comm = fake_pg(1, compiled.plan)
    plain_gm = compiled.rank_module(1)
    kept_gm = copy.deepcopy(plain_gm)  # rank_module hands out one module per rank
    SequenceSaved(comm, kept_gm)
    gathers = [n for n in kept_gm.graph.nodes if _fn(n) == "fxplan_all_gather_rs"]
    savers = [sum(1 for u in g.users if _fn(u) == "linear") for g in gathers]
    assert gathers and all(savers) and max(savers) > 1, savers  # the q/k/v projections share one gather
    plain_shapes, plain_counts = _saved_and_counted(comm, plain_gm)
    kept_shapes, kept_counts = _saved_and_counted(comm, kept_gm)
    # each linear that saved (a view of) a gathered input now saves the shard it came from: 1/WORLD the size
    removed, added = Counter(plain_shapes) - Counter(kept_shapes), Counter(kept_shapes) - Counter(plain_shapes)
    assert sum(removed.values()) == sum(savers) == sum(added.values()), (removed, added)
    assert sorted(math.prod(s) for s in added.elements()) == sorted(math.prod(s) // WORLD for s in removed.elements())
    key = next(k for k in kept_counts if k[0] == "all_gather" and k[2] == "bwd")
    assert kept_counts[key] == plain_counts.get(key, 0) + len(gathers), (kept_counts, plain_counts)
