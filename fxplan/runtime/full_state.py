"""Full tensors from every rank's shards (collective: every rank calls, every rank gets them all):
the model's state_dict for checkpoints and tests, and the full gradients for tests.

Streamed: one tensor at a time is assembled on the device, copied to CPU and freed, so the device
never holds more than the largest full tensor besides the rank's own shards."""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from fxplan.codegen.params import ParamShard, fetch_attr, piece_index, unshard
from fxplan.runtime.materialize import full_values, owners, state_key


def gather_full(gm: nn.Module, params: Mapping[str, ParamShard], model: nn.Module, device: torch.device,
                pick: Callable[[torch.Tensor], torch.Tensor], trainable: bool = False) -> dict[str, torch.Tensor]:
    """{first owner's state_dict key: full CPU tensor of pick(stored tensor)} for every shard any rank holds."""
    own = owners(model)
    mine = [(state_key(own, s.name), piece_index(s), s, attr, str(fetch_attr(gm, attr).dtype))
            for attr, s in params.items() if not trainable or s.requires_grad]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    # A weight shared by stages may be cut differently on each: assemble it from the pieces of one
    # layout (the lowest rank's), which together cover the whole tensor.
    layout_of: dict[str, tuple] = {}
    owner: dict[tuple, tuple[int, ParamShard, str, str]] = {}  # (name, piece) -> (rank, shard, attr, dtype)
    for r, items in enumerate(everyone):
        for name, piece, shard, attr, dtype in items:
            if layout_of.setdefault(name, _layout(shard)) == _layout(shard):
                owner.setdefault((name, piece), (r, shard, attr, dtype))
    rank = dist.get_rank()
    out: dict[str, torch.Tensor] = {}
    for name in sorted({name for name, _ in owner}):
        pieces = sorted(piece for n, piece in owner if n == name)
        holders = [owner[(name, piece)] for piece in pieces]
        dtype = getattr(torch, holders[0][3].split(".")[-1])
        shapes = [shard.stored_shape for _, shard, _, _ in holders]
        flat = torch.zeros(sum(math.prod(s) for s in shapes), dtype=dtype, device=device)
        offset = 0
        for (r, _, attr, _), shape in zip(holders, shapes):
            n = math.prod(shape)
            if r == rank:
                flat[offset:offset + n] = pick(fetch_attr(gm, attr)).reshape(-1).to(dtype)
            offset += n
        dist.all_reduce(flat)  # exactly one rank wrote each piece: the sum is a copy
        by_piece, offset = {}, 0
        for piece, shape in zip(pieces, shapes):
            n = math.prod(shape)
            by_piece[piece] = flat[offset:offset + n].view(shape)
            offset += n
        full = unshard(by_piece, holders[0][1])
        # its own CPU memory (on a CPU device too: not a view of the buffer), then the buffer goes
        out[name] = full.to("cpu", copy=True) if full.device.type == "cpu" else full.cpu()
        del flat, by_piece, full
    return out


def _layout(shard: ParamShard) -> tuple:
    return shard.tp_dim, shard.tp, shard.fsdp, shard.dp if shard.fsdp else 1


def full_state_dict(gm: nn.Module, params: Mapping[str, ParamShard], model: nn.Module,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """Full CPU tensors, keys exactly as model.state_dict()."""
    full = gather_full(gm, params, model, device, lambda p: p.detach())
    own = owners(model)
    keys = list(model.state_dict().keys())
    missing = [k for k in keys if state_key(own, k) not in full]
    missing_names = {state_key(own, k) for k in missing}
    if missing:  # buffers no stage module holds: the model's own (or initial) values
        full.update(dict(full_values(model, missing_names)))
    out, given = {}, set()
    for k in keys:  # every key its own CPU tensor (a tied weight's second key a copy; the model's own tensors copied)
        name = state_key(own, k)
        value = full[name].cpu()
        out[k] = value.clone() if name in given or name in missing_names else value
        given.add(name)
    return out


def grads_full(gm: nn.Module, params: Mapping[str, ParamShard], model: nn.Module,
               device: torch.device) -> dict[str, torch.Tensor]:
    """Full gradients (zeros where none) of every trainable parameter."""
    grads = gather_full(gm, params, model, device, lambda p: p.grad if p.grad is not None else torch.zeros_like(p),
                        trainable=True)
    return grads
