"""A rank's local shard of one parameter or buffer: what it holds and how to cut it from the full tensor.

tp: a Shard(dim) parameter keeps slice tp_index of tp along tp_dim (R: the whole tensor).
FSDP: the tp-local tensor is flattened, zero-padded to a multiple of dp, and the rank keeps flat
block dp_index. The FSDP parameters of one layer (same dp group, same dtype) form a unit named by
`fsdp_unit`: the graph all-gathers the unit's blocks in ONE collective before the layer's first use
(collectives.fxplan_fsdp_gather_layer) and its backward reduce-scatters (SUM) the unit's gradients in
one collective, so an FSDP shard's .grad is already summed over its dp group. Each parameter keeps
its own stored tensor (attribute), so slicing and reassembling stay per parameter. Non-FSDP parameter gradients are dp-partial: the runtime sums them over
`dp_group` once per iteration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxplan.errors import UnsupportedOpError


@dataclass(frozen=True)
class ParamShard:
    name: str  # model.state_dict() key (get_attr target)
    global_shape: tuple[int, ...]
    tp_dim: int | None  # the dim cut over tp (None: replicated over tp)
    tp: int
    tp_index: int
    fsdp: bool
    dp: int
    dp_index: int
    dp_group: str  # group key of the owning layer's dp group (gradient sums run over it)
    numel_local: int  # elements this rank stores (FSDP: the padded flat block)
    requires_grad: bool
    local_shape: tuple[int, ...] = ()  # tp-local shape (what the graph computes with)
    stored_shape: tuple[int, ...] = ()  # shape of the stored tensor (FSDP: (numel_local,))
    is_buffer: bool = False
    dtype: str = "torch.float32"
    tp_group: str = ""  # group key of the owning layer's tp group
    fsdp_unit: str = ""  # FSDP: the unit gathered together ("<layer>/<dtype>"); "" without FSDP

    @property
    def padded_numel(self) -> int:
        return self.numel_local * self.dp if self.fsdp else self.numel_local


def tp_local_shape(global_shape, tp_dim, tp) -> tuple[int, ...]:
    shape = list(global_shape)
    if tp_dim is not None and tp > 1:
        if shape[tp_dim] % tp:
            raise UnsupportedOpError(f"a parameter of shape {tuple(global_shape)} cannot be cut in {tp} equal "
                                     f"pieces along dim {tp_dim}; pick a tp degree dividing {shape[tp_dim]}")
        shape[tp_dim] //= tp
    return tuple(shape)


def fsdp_block(numel: int, dp: int) -> int:
    return -(-numel // dp)


def shard_tensor(full: torch.Tensor, shard: ParamShard) -> torch.Tensor:
    """This rank's stored tensor cut from the full one (a new tensor, detached, contiguous)."""
    t = full.detach()
    if tuple(t.shape) != tuple(shard.global_shape):
        raise UnsupportedOpError(f"{shard.name}: got a tensor of shape {tuple(t.shape)}, the plan expects "
                                 f"{tuple(shard.global_shape)}")
    if shard.tp_dim is not None and shard.tp > 1:
        t = t.chunk(shard.tp, dim=shard.tp_dim)[shard.tp_index]
    if shard.fsdp:
        flat = t.reshape(-1)
        block = shard.numel_local
        pad = block * shard.dp - flat.numel()
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        t = flat[shard.dp_index * block:(shard.dp_index + 1) * block]
    return t.clone().contiguous()


def unshard(pieces, shard_of) -> torch.Tensor:
    """Reassemble a full tensor from every rank's stored tensors of one parameter (tests, checkpoints).

    pieces: {rank: tensor}; shard_of: {rank: ParamShard}. Ranks with equal (tp_index, dp_index) hold
    the same piece; one of each is used.
    """
    first = next(iter(shard_of.values()))
    tp_parts: dict[int, torch.Tensor] = {}
    for tp_index in range(first.tp):
        ranks = [r for r, s in shard_of.items() if s.tp_index == tp_index]
        if first.fsdp:
            blocks = {}
            for r in ranks:
                blocks.setdefault(shard_of[r].dp_index, pieces[r])
            flat = torch.cat([blocks[i] for i in range(first.dp)])
            local = flat[:_numel(first.local_shape)].view(first.local_shape)
        else:
            local = pieces[ranks[0]]
        tp_parts[tp_index] = local
    if first.tp_dim is None or first.tp == 1:
        return tp_parts[0]
    return torch.cat([tp_parts[i] for i in range(first.tp)], dim=first.tp_dim)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def fetch_attr(root, target: str):
    """The attribute at dotted path `target` under `root` (a get_attr target, e.g. 'blocks.0.fc.weight')."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
