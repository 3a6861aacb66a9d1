"""Gradient sums across ranks after one step's backward passes (the graphs did the in-layer ones).

- dp: every non-FSDP parameter's gradient is dp-partial; it is SUMMED over its dp group, bucketed
  (one flat all-reduce per group, dtype and bucket). FSDP shards were reduce-scattered in the graph.
- stages: a weight used by layers on two stages (GPT's tied embedding/head) gets one copy per
  stage (codegen/split.py), each with only its own stage's gradient; the holders sum them.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from fxplan.codegen.groups import group_key, ranks_of
from fxplan.codegen.params import ParamShard, fetch_attr, piece_index, place_shard, shard_tensor
from fxplan.runtime.comm import Communicator
from fxplan.runtime.materialize import owners, state_key

BUCKET_NUMEL = 1 << 24  # elements per flat gradient all-reduce


class GradSync:
    """The gradient sums of one rank's stage module; built on every rank together (collective)."""

    def __init__(self, comm: Communicator, gm: nn.Module, params: Mapping[str, ParamShard], model: nn.Module,
                 stage_index: int):
        self.comm, self.gm, self.params = comm, gm, params
        self.shared = self._shared_params(model, stage_index)

    # ------------------------------------------------------------ dp
    def sum_over_dp(self) -> None:
        """SUM each parameter's dp-partial gradient over its dp group (bucketed, one flat buffer each)."""
        buckets: dict[tuple, list[nn.Parameter]] = {}
        for attr, shard in self.params.items():
            p = fetch_attr(self.gm, attr)
            key = shard.dp_group
            if shard.fsdp or not key or not isinstance(p, nn.Parameter) or not p.requires_grad:
                continue
            if len(ranks_of(key)) < 2:
                continue
            if p.grad is None:  # unused here, but the group's other members may have one: send zeros
                p.grad = torch.zeros_like(p)
            buckets.setdefault((key, p.grad.dtype), []).append(p)
        for (key, _), members in sorted(buckets.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            group = self.comm.group(key)
            for chunk in _chunks(members, BUCKET_NUMEL):
                flat = torch.cat([p.grad.reshape(-1) for p in chunk])
                self.comm.record("all_reduce", key, "grad", flat)
                dist.all_reduce(flat, group=group)
                offset = 0
                for p in chunk:
                    n = p.grad.numel()
                    p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                    offset += n

    # ------------------------------------------------------------ weights shared by stages
    def _shared_params(self, model: nn.Module, stage_index: int) -> list[tuple[str, list[tuple[str, int]]]]:
        """[(group key, [(attr, replicas)])]: this rank's parameters that other STAGES hold too.

        Every rank learns every rank's shards here (one all_gather_object at setup), so all ranks
        create the holder groups in the same order (new_group is collective over the world).
        """
        own = owners(model)
        mine = [(state_key(own, s.name), piece_index(s)) for s in self.params.values() if s.requires_grad]
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (stage_index, mine))
        holders: dict[str, dict[int, list[tuple[int, tuple]]]] = {}  # key -> stage -> [(rank, piece)]
        for r, (stage, items) in enumerate(everyone):
            for name, piece in items:
                holders.setdefault(name, {}).setdefault(stage, []).append((r, tuple(piece)))
        shared = {name: by_stage for name, by_stage in sorted(holders.items()) if len(by_stage) > 1}
        keys = sorted({group_key(sorted(r for lst in by_stage.values() for r, _ in lst), "tied")
                       for by_stage in shared.values()}, key=lambda k: (len(ranks_of(k)), k))
        self.comm.groups.create(keys)
        out: dict[str, list[tuple[str, int]]] = {}
        for attr, s in self.params.items():
            name = state_key(own, s.name)
            if not s.requires_grad or name not in shared:
                continue
            by_stage = shared[name]
            ranks = sorted(r for lst in by_stage.values() for r, _ in lst)
            # ranks of this stage holding the very same piece each add it: divide to count it once
            replicas = sum(1 for _, piece in by_stage[stage_index] if piece == tuple(piece_index(s)))
            out.setdefault(group_key(ranks, "tied"), []).append((attr, replicas))
        return sorted(out.items())

    def sum_over_stages(self) -> None:
        """Make every stage's copy of a shared weight carry the SUM of all stages' gradients.

        Runs after the dp sum, so each holder's local grad is its stage's complete contribution in
        its own shard layout (tp slice, FSDP block). Each holder writes it into a full-size zero
        tensor (divided by the ranks of its stage holding the same piece), one flat all-reduce per
        holder group sums the stages, and each holder cuts its own shard back out.
        """
        for key, members in self.shared:
            fulls = []
            for attr, replicas in members:
                p = fetch_attr(self.gm, attr)
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                fulls.append(place_shard(grad, self.params[attr]) / replicas)
            flat = torch.cat([f.reshape(-1) for f in fulls])
            self.comm.record("all_reduce", key, "grad", flat)
            dist.all_reduce(flat, group=self.comm.group(key))
            offset = 0
            for (attr, _), full in zip(members, fulls):
                n = full.numel()
                p = fetch_attr(self.gm, attr)
                local = shard_tensor(flat[offset:offset + n].view_as(full), self.params[attr])
                p.grad = local.view_as(p).to(p.dtype)
                offset += n


def _chunks(params: list[nn.Parameter], limit: int) -> Iterator[list[nn.Parameter]]:
    chunk, size = [], 0
    for p in params:
        if chunk and size + p.numel() > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(p)
        size += p.numel()
    if chunk:
        yield chunk
