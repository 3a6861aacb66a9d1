"""Full tensors from every rank's shards (collective: every rank calls, every rank gets them all):
the model's state_dict for checkpoints and tests, and the full gradients for tests."""

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
    """{first owner's state_dict key: full tensor of pick(stored tensor)} for every shard any rank holds."""
    own = owners(model)
    mine = [(state_key(own, s.name), piece_index(s), s, attr, str(fetch_attr(gm, attr).dtype))
            for attr, s in params.items() if not trainable or s.requires_grad]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    owner: dict[tuple, tuple[int, ParamShard, str, str]] = {}  # (name, piece) -> (rank, shard, attr, dtype)
    for r, items in enumerate(everyone):
        for name, piece, shard, attr, dtype in items:
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
        out[name] = unshard(by_piece, holders[0][1])
    return out


def full_state_dict(gm: nn.Module, params: Mapping[str, ParamShard], model: nn.Module,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """Full CPU tensors, keys exactly as model.state_dict()."""
    full = gather_full(gm, params, model, device, lambda p: p.detach())
    own = owners(model)
    keys = list(model.state_dict().keys())
    missing = [k for k in keys if state_key(own, k) not in full]
    if missing:  # buffers no stage module holds: the model's own (or initial) values
        full.update(dict(full_values(model, {state_key(own, k) for k in missing})))
    return {k: full[state_key(own, k)].cpu().clone() for k in keys}


def grads_full(gm: nn.Module, params: Mapping[str, ParamShard], model: nn.Module,
               device: torch.device) -> dict[str, torch.Tensor]:
    """Full gradients (zeros where none) of every trainable parameter."""
    grads = gather_full(gm, params, model, device, lambda p: p.grad if p.grad is not None else torch.zeros_like(p),
                        trainable=True)
    return {k: v.cpu() for k, v in grads.items()}
