"""A rank's local shard of one parameter or buffer: what it holds, and the ONE way to cut it from
the full tensor and put full tensors back together (codegen, materialisation, the runtime's
gradient sums and full-state gathers all use these).

tp: a Shard(dim) parameter keeps slice tp_index of tp along tp_dim (R: the whole tensor); with
tp_blocks > 1 (a fused weight, e.g. q|k|v rows) the dim is tp_blocks blocks and the rank keeps
slice tp_index of each block, as Megatron shards a fused qkv weight.
FSDP: the tp-local tensor is flattened, zero-padded to a multiple of dp, and the rank keeps flat
block dp_index. The FSDP parameters of one layer (same dp group, same dtype) form a unit named by
`fsdp_unit`: the graph all-gathers the unit's blocks in ONE collective before the layer's first use
(GraphOps.fsdp_gather_layer) and its backward reduce-scatters (SUM) the unit's gradients in one
collective, so an FSDP shard's .grad is already summed over its dp group. Each parameter keeps its
own stored tensor (attribute), so slicing and reassembling stay per parameter. Non-FSDP parameter
gradients are dp-partial: the runtime sums them over `dp_group` once per iteration.

A piece index names which part of the full tensor a shard holds: (tp piece, FSDP block), the tp
piece 0 when the tensor is not cut over tp, the block None without FSDP. Ranks with equal piece
indices hold equal values.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.fx as fx
from torch import nn

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
    tp_blocks: int = 1  # tp_dim is this many blocks, each cut over tp (Shard.blocks)

    @property
    def padded_numel(self) -> int:
        return self.numel_local * self.dp if self.fsdp else self.numel_local


@dataclass(frozen=True)
class MeshSeat:
    """This rank's seat in one layer's (dp, tp) mesh: what its shards of that layer are cut by."""

    layer: str
    dp: int
    tp: int
    dp_index: int
    tp_index: int
    fsdp: bool  # the layer's strategy shards its trainable parameters over dp
    dp_group: str
    tp_group: str


def make_shard(name: str, full: torch.Tensor, tp_dim: int | None, seat: MeshSeat, *, fsdp: bool,
               requires_grad: bool, is_buffer: bool, tp_blocks: int = 1) -> ParamShard:
    """The shard of `full` (a parameter or buffer of seat.layer) this seat holds."""
    local = tp_local_shape(tuple(full.shape), tp_dim, seat.tp)
    block = fsdp_block(math.prod(local), seat.dp) if fsdp else math.prod(local)
    return ParamShard(name=name, global_shape=tuple(full.shape), tp_dim=tp_dim, tp=seat.tp, tp_index=seat.tp_index,
                      fsdp=fsdp, dp=seat.dp, dp_index=seat.dp_index, dp_group=seat.dp_group, numel_local=block,
                      requires_grad=requires_grad, local_shape=local, stored_shape=(block,) if fsdp else local,
                      is_buffer=is_buffer, dtype=str(full.dtype), tp_group=seat.tp_group,
                      fsdp_unit=f"{seat.layer}/{full.dtype}" if fsdp else "", tp_blocks=tp_blocks)


class StageParams:
    """One stage's parameter and buffer shards while its graph is emitted.

    Every get_attr target gets one shard (later get_attrs of the target alias the first), cut from
    the traced module's tensor, from `source` (a state_dict-like mapping of full tensors), or
    created on the meta device (`source == "meta"`: the runtime materialises it). The FSDP shards
    form units, one per (layer, dtype), whose gather is emitted at the unit's first use.
    """

    def __init__(self, root: fx.GraphModule, requires_grad: Mapping[str, bool], source) -> None:
        self.root, self.requires_grad, self.source = root, requires_grad, source
        self.param_names = {name for name, _ in root.named_parameters()}  # once, not per get_attr
        self.alias: dict[str, str] = {}  # get_attr node -> first get_attr of the same target here
        self.first_of_target: dict[str, str] = {}
        self.shards: dict[str, ParamShard] = {}  # attribute in the rank module -> its shard
        self.tensors: dict[str, torch.Tensor] = {}  # attribute -> stored tensor (Parameter or buffer)
        self.attr_of_node: dict[str, str] = {}
        self.units: dict[str, list[str]] = {}  # unit -> get_attr node names, in graph order
        self.unit_of: dict[str, str] = {}  # get_attr node name -> its unit, until the unit is gathered

    def add(self, node: str, target: str, tp_dim: int | None, seat: MeshSeat, tp_blocks: int = 1) -> None:
        """Shard get_attr `node` (of `target`) for `seat`, or alias it to the target's first get_attr."""
        if target in self.first_of_target:
            self.alias[node] = self.first_of_target[target]
            return
        self.first_of_target[target] = node
        full = self.source.get(target) if isinstance(self.source, Mapping) else None
        if full is None:
            full = fetch_attr(self.root, target)
        is_param = isinstance(full, nn.Parameter) or target in self.param_names
        requires_grad = bool(self.requires_grad.get(node, False)) or (is_param and full.requires_grad and
                                                                     full.is_floating_point())
        shard = make_shard(target, full, tp_dim, seat, fsdp=bool(seat.fsdp and seat.dp > 1 and is_param
                                                                 and requires_grad),
                           requires_grad=requires_grad, is_buffer=not is_param, tp_blocks=tp_blocks)
        if self.source == "meta" or full.device.type == "meta":
            tensor = torch.empty(shard.stored_shape, dtype=full.dtype, device="meta")
        else:
            tensor = shard_tensor(full, shard)
        attr = target.replace(".", "_")
        while attr in self.shards:
            attr += "_"
        self.shards[attr] = shard
        self.tensors[attr] = nn.Parameter(tensor, requires_grad=requires_grad) if is_param else tensor
        self.attr_of_node[node] = attr
        if shard.fsdp_unit:
            self.units.setdefault(shard.fsdp_unit, []).append(node)
            self.unit_of[node] = shard.fsdp_unit

    def gather_unit(self, graph: fx.Graph, gather, node: str, keys: set[str], keep: bool = False) -> dict[str, fx.Node]:
        """At the first use of an FSDP parameter: the get_attr of every member of its unit, one `gather`
        call (a whole layer arrives in one collective), one getitem per member -> {member: node}."""
        unit = self.unit_of.get(self.alias.get(node, node))
        if unit is None:
            return {}
        members = self.units[unit]
        shards = [self.shards[self.attr_of_node[m]] for m in members]
        attrs = [graph.get_attr(self.attr_of_node[m]) for m in members]
        keys.add(shards[0].dp_group)
        shapes = tuple(tuple(s.local_shape) for s in shards)
        gathered = graph.call_function(gather, (attrs, shards[0].dp_group, shapes, keep))
        out = {}
        for i, m in enumerate(members):
            out[m] = graph.call_function(operator.getitem, (gathered, i))
            del self.unit_of[m]
        return out

    def module(self) -> nn.Module:
        """The rank module's root: every stored tensor under its attribute."""
        root = nn.Module()
        for attr, tensor in self.tensors.items():
            if isinstance(tensor, nn.Parameter):
                root.register_parameter(attr, tensor)
            else:
                root.register_buffer(attr, tensor)
        return root


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


def _tp_parts(shard) -> int:
    return shard.tp if shard.tp_dim is not None and shard.tp > 1 else 1


def piece_index(shard) -> tuple[int, int | None]:
    """Which part of the full tensor `shard` holds (see the module docstring)."""
    return (shard.tp_index if _tp_parts(shard) > 1 else 0, shard.dp_index if shard.fsdp else None)


def piece_indices(shard) -> list[tuple[int, int | None]]:
    """Every piece index of the tensor `shard` belongs to, in tp-major order."""
    blocks = range(shard.dp) if shard.fsdp else (None,)
    return [(t, d) for t in range(_tp_parts(shard)) for d in blocks]


def shard_tensor(full: torch.Tensor, shard) -> torch.Tensor:
    """This rank's stored tensor cut from the full one (a new tensor, detached, contiguous: safe to
    free `full` after)."""
    t = full.detach()
    if tuple(t.shape) != tuple(shard.global_shape):
        raise UnsupportedOpError(f"{shard.name}: got a tensor of shape {tuple(t.shape)}, the plan expects "
                                 f"{tuple(shard.global_shape)}")
    local = tp_local_shape(t.shape, shard.tp_dim, shard.tp)
    if _tp_parts(shard) > 1:
        d, blocks = shard.tp_dim, getattr(shard, "tp_blocks", 1)
        if blocks > 1:  # slice tp_index of every block
            t = t.unflatten(d, (blocks, -1)).chunk(shard.tp, dim=d + 1)[shard.tp_index].flatten(d, d + 1)
        else:
            t = t.chunk(shard.tp, dim=d)[shard.tp_index]
    if shard.fsdp:
        flat = t.reshape(-1)
        block = fsdp_block(math.prod(local), shard.dp)
        piece = flat[shard.dp_index * block:(shard.dp_index + 1) * block]
        if piece.numel() < block:  # the last blocks hold the padding: zeros, padded block by block
            return torch.cat([piece, piece.new_zeros(block - piece.numel())])  # (no full-size copy)
        t = piece
    return t.clone().contiguous()


def unshard(pieces: Mapping[tuple[int, int | None], torch.Tensor], shard) -> torch.Tensor:
    """Inverse of shard_tensor: {piece index: stored tensor} (every piece of the tensor) -> the full tensor."""
    local = tp_local_shape(shard.global_shape, shard.tp_dim, shard.tp)
    tp_parts = []
    for t in range(_tp_parts(shard)):
        if shard.fsdp:
            flat = torch.cat([pieces[(t, d)].reshape(-1) for d in range(shard.dp)])
            tp_parts.append(flat[:math.prod(local)].view(local))
        else:
            tp_parts.append(pieces[(t, None)])
    if len(tp_parts) == 1:
        return tp_parts[0]
    d, blocks = shard.tp_dim, getattr(shard, "tp_blocks", 1)
    if blocks > 1:
        return torch.cat([t.unflatten(d, (blocks, -1)) for t in tp_parts], dim=d + 1).flatten(d, d + 1)
    return torch.cat(tp_parts, dim=d)


def unshard_ranks(pieces: Mapping[int, torch.Tensor], shard_of: Mapping[int, ParamShard]) -> torch.Tensor:
    """unshard from every rank's stored tensor of one parameter: {rank: tensor}, {rank: ParamShard}.
    Ranks holding the same piece hold equal copies; the first of each is used."""
    by_piece: dict[tuple[int, int | None], torch.Tensor] = {}
    for rank, shard in shard_of.items():
        by_piece.setdefault(piece_index(shard), pieces[rank])
    return unshard(by_piece, next(iter(shard_of.values())))


def place_shard(local: torch.Tensor, shard) -> torch.Tensor:
    """A tensor of the full shape holding `local` (this rank's stored tensor) in its place, zeros elsewhere."""
    mine = piece_index(shard)
    return unshard({p: local if p == mine else torch.zeros_like(local) for p in piece_indices(shard)}, shard)


def fetch_attr(root, target: str):
    """The attribute at dotted path `target` under `root` (a get_attr target, e.g. 'blocks.0.fc.weight')."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def stored_runs(shard) -> list[tuple[int, int, int]]:
    """Where the stored tensor's elements sit in the full tensor, as contiguous runs of the flat
    tensors: [(full offset, stored offset, length)] in increasing order (FSDP padding is in none).
    Lets holders with different layouts find the parts they share without building the full tensor."""
    shape = tuple(shard.global_shape)
    local = tp_local_shape(shape, shard.tp_dim, shard.tp)
    if _tp_parts(shard) > 1:
        d = shard.tp_dim
        slab = math.prod(local[d:])  # one contiguous run per index of the dims before tp_dim
        runs = [(o * shape[d] * slab // local[d] + shard.tp_index * slab, o * slab, slab)
                for o in range(math.prod(shape[:d]))]
    else:
        runs = [(0, 0, math.prod(shape))]
    if not shard.fsdp:
        return runs
    block = fsdp_block(math.prod(local), shard.dp)
    lo, hi = shard.dp_index * block, min((shard.dp_index + 1) * block, math.prod(local))
    out = []
    for full, start, n in runs:
        a, b = max(lo, start), min(hi, start + n)
        if a < b:
            out.append((full + a - start, a - lo, b - a))
    return out
