"""Gradient sums across ranks, overlapped with backward (the graphs did the in-layer ones).

- dp: every non-FSDP parameter's gradient is dp-partial and is SUMMED over its dp group. As in
  torch's DDP reducer, post-accumulate-grad hooks count each parameter's gradients; on the step's
  last microbatch its gradient is complete, and a bucket (fixed-size, one dp group and dtype) whose
  every member is complete is all-reduced asynchronously while backward goes on. The step waits
  for all of them at its end. Buckets of one process group launch in one fixed order, derived
  from the program (reverse first use in the graph, the order backward produces gradients), so
  every member issues the same collectives in the same order whatever the run-time timing.
- stages: a weight used by layers on two stages (GPT's tied embedding/head) gets one copy per
  stage (codegen/split.py), each with only its own stage's gradient. Each holder sums exactly the
  parts of its shard that other holders store (codegen/params.py `stored_runs`), with exactly
  those holders, so no rank builds a full-size tensor; the sum over the stages and the dp sum of
  such a weight are one all-reduce. These launch when the stage's schedule is over: the slowest
  holder (the first stage) only has its gradient then, and the pipeline's point-to-point traffic
  is finished.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import torch
import torch.distributed as dist
from torch import nn

from fxplan.codegen.groups import canonical_ranks, group_key, ranks_of
from fxplan.codegen.params import ParamShard, fetch_attr, stored_runs
from fxplan.runtime.comm import Communicator
from fxplan.runtime.materialize import owners, state_key

BUCKET_BYTES = 25 << 20  # DDP's default bucket_cap_mb
FIRST_BUCKET_BYTES = 1 << 20  # DDP's first bucket: small, so the first reduction starts early


@dataclass(frozen=True)
class Slot:
    """One parameter's part in a bucket: runs (offset, length) of its flat gradient, times scale."""

    attr: str
    runs: tuple[tuple[int, int], ...]
    scale: float = 1.0
    # other attributes of this rank holding the same piece (a weight shared by two stages of one
    # rank): summed into the same part of the buffer, and given the sum back
    also: tuple["Slot", ...] = ()

    @property
    def numel(self) -> int:
        return sum(n for _, n in self.runs)


@dataclass(frozen=True)
class Bucket:
    key: str  # the group it is summed over
    slots: tuple[Slot, ...]
    on_hooks: bool  # launched from backward hooks when complete (else when the schedule is over)


class GradSync:
    """The gradient sums of one rank's stage module; built on every rank together (collective)."""

    def __init__(self, comm: Communicator, gm: nn.Module, params: Mapping[str, ParamShard], model: nn.Module,
                 stage_of: Mapping[str, int]):
        """stage_of: attribute -> the stage holding it (a rank holds one stage, or one per model chunk)."""
        self.comm, self.gm, self.params = comm, gm, params
        tied = self._tied_buckets(model, stage_of)
        tied_attrs = {slot.attr for b in tied for slot in b.slots}
        self.buckets: tuple[Bucket, ...] = self._dp_buckets(tied_attrs) + tied
        self._bucket_of = {slot.attr: i for i, b in enumerate(self.buckets) if b.on_hooks for slot in b.slots}
        # per process group, its buckets in launch order (keys naming one rank set share a group)
        self._order: dict[tuple[int, ...], list[int]] = {}
        for i, b in enumerate(self.buckets):
            self._order.setdefault(canonical_ranks(b.key), []).append(i)
        self._step: _StepState | None = None
        for attr in self._bucket_of:
            fetch_attr(gm, attr).register_post_accumulate_grad_hook(self._hook(attr))

    # ------------------------------------------------------------ the buckets, from the program
    def _dp_buckets(self, skip: set[str]) -> tuple[Bucket, ...]:
        order = _reverse_first_use(self.gm)
        by_group: dict[tuple[str, str], list[str]] = {}
        for attr, shard in self.params.items():
            p = fetch_attr(self.gm, attr)
            if attr in skip or shard.fsdp or not shard.dp_group or len(ranks_of(shard.dp_group)) < 2:
                continue
            if isinstance(p, nn.Parameter) and p.requires_grad:
                by_group.setdefault((shard.dp_group, str(p.dtype)), []).append(attr)
        out = []
        for (key, _), attrs in sorted(by_group.items()):
            attrs.sort(key=lambda a: order.get(a, len(order)))
            chunk, size, limit = [], 0, FIRST_BUCKET_BYTES
            for attr in attrs:
                p = fetch_attr(self.gm, attr)
                chunk.append(Slot(attr, ((0, p.numel()),)))
                size += p.numel() * p.element_size()
                if size >= limit:
                    out.append(Bucket(key, tuple(chunk), True))
                    chunk, size, limit = [], 0, BUCKET_BYTES
            if chunk:
                out.append(Bucket(key, tuple(chunk), True))
        return tuple(out)

    def _tied_buckets(self, model: nn.Module, stage_of: Mapping[str, int]) -> tuple[Bucket, ...]:
        """Buckets summing this rank's parameters that other STAGES hold too, piece by shared piece.

        Every rank learns every rank's shards here (one all_gather_object at setup), so all ranks
        derive the same pieces and create the holder groups in the same order (new_group is
        collective over the world). Two stages of one rank holding a piece add their parts into one
        place of the buffer; a piece only one rank holds is summed there, with no collective.
        """
        own = owners(model)
        mine = [(state_key(own, s.name), stage_of[a], s) for a, s in self.params.items() if s.requires_grad]
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        holders: dict[str, list[tuple[int, int, ParamShard]]] = {}  # name -> [(rank, stage, shard)]
        for r, items in enumerate(everyone):
            for name, stage, shard in items:
                holders.setdefault(name, []).append((r, stage, shard))
        pieces = []  # (name, full offset, length, [(rank, stage, shard, stored offset)])
        for name in sorted(holders):
            if len({stage for _, stage, _ in holders[name]}) > 1:
                pieces.extend(shared_pieces(name, holders[name]))
        keys = sorted({tied_key(who) for *_, who in pieces}, key=lambda k: (len(ranks_of(k)), k))
        self.comm.groups.create([k for k in keys if len(ranks_of(k)) > 1])
        attr_of = {(state_key(own, s.name), stage_of[a]): a for a, s in self.params.items()}
        slots = tied_slots(pieces, dist.get_rank(), attr_of)
        return tuple(Bucket(key, tuple(members), False) for key, members in sorted(slots.items()))

    # ------------------------------------------------------------ one step
    def begin_step(self, microbatches: int) -> None:
        """Before the step's first backward: each parameter's gradient is complete after `microbatches`."""
        self._step = _StepState(microbatches, [len(b.slots) for b in self.buckets], {})

    def _hook(self, attr: str):
        def on_grad(param: torch.Tensor) -> None:
            step = self._step
            if step is None:  # a backward outside train_step: nothing to sum
                return
            seen = step.seen[attr] = step.seen.get(attr, 0) + 1
            if seen == step.microbatches:
                i = self._bucket_of[attr]
                step.waiting[i] -= 1
                if step.waiting[i] == 0:
                    self._launch_ready(canonical_ranks(self.buckets[i].key))
        return on_grad

    def _launch_ready(self, ranks: tuple[int, ...]) -> None:
        step = self._step
        for i in self._order[ranks]:
            if i in step.works:
                continue
            if step.waiting[i]:
                return  # the group's next bucket in order is not complete yet
            self._launch(i)

    def _launch(self, i: int) -> None:
        bucket, step = self.buckets[i], self._step
        grads = []
        for slot in bucket.slots:
            p = fetch_attr(self.gm, slot.attr)
            if p.grad is None:  # unused here, but the group's other members may have one: send zeros
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        for slot in bucket.slots:
            for other in slot.also:
                q = fetch_attr(self.gm, other.attr)
                if q.grad is None:
                    q.grad = torch.zeros_like(q)
        buf = pack(bucket.slots, grads, self._grad_of)
        if len(ranks_of(bucket.key)) == 1:  # every holder on this rank: the local sum is the sum
            step.works[i] = (_Done(), buf)
            return
        self.comm.record("all_reduce", bucket.key, "grad", buf)
        step.works[i] = (dist.all_reduce(buf, group=self.comm.group(bucket.key), async_op=True), buf)

    def _grad_of(self, attr: str) -> torch.Tensor:
        return fetch_attr(self.gm, attr).grad

    def finish_step(self) -> None:
        """After the step's last backward: launch what is left (in order), wait, write the sums back."""
        step = self._step
        if step is None:
            return
        late = [a for a, seen in step.seen.items() if seen > step.microbatches]
        if late:
            raise RuntimeError(f"gradients of {late[:3]} arrived more than once per microbatch; their dp sum "
                               f"started before they were complete")
        for i, bucket in enumerate(self.buckets):
            if i not in step.works:
                self._launch(i)
        self._step = None
        for i, bucket in enumerate(self.buckets):
            work, buf = step.works[i]
            work.wait()
            if not isinstance(work, _Done):
                self.comm.waited("all_reduce", bucket.key, "grad", buf)
            unpack(bucket.slots, [fetch_attr(self.gm, slot.attr).grad for slot in bucket.slots], buf, self._grad_of)


def pack(slots: tuple[Slot, ...], grads: list[torch.Tensor], grad_of=None) -> torch.Tensor:
    """One flat buffer of the slots' runs of their gradients (scaled): what a bucket all-reduces.
    A slot's `also` holders (grad_of(attr) gives theirs) are added into its part."""
    parts = []
    for slot, grad in zip(slots, grads):
        part = _runs(slot, grad)
        for other in slot.also:
            part = part + _runs(other, grad_of(other.attr))
        parts.append(part)
    return torch.cat(parts) if len(parts) > 1 else parts[0].clone()


def _runs(slot: Slot, grad: torch.Tensor) -> torch.Tensor:
    flat = grad.detach().reshape(-1)
    parts = [flat[start:start + n] for start, n in slot.runs]
    part = torch.cat(parts) if len(parts) > 1 else parts[0]
    return part * slot.scale if slot.scale != 1 else part


def unpack(slots: tuple[Slot, ...], grads: list[torch.Tensor], buf: torch.Tensor, grad_of=None) -> None:
    """Write a summed buffer back into the slots' runs of their gradients (and their `also` holders')."""
    offset = 0
    for slot, grad in zip(slots, grads):
        for target, runs in [(grad, slot.runs)] + [(grad_of(o.attr), o.runs) for o in slot.also]:
            flat, at = target.view(-1), offset
            for start, n in runs:
                flat[start:start + n].copy_(buf[at:at + n])
                at += n
        offset += slot.numel


class _Done:
    """The completed 'work' of a sum that needed no collective."""

    def wait(self) -> None:
        return None


@dataclass
class _StepState:
    microbatches: int
    waiting: list[int]  # per bucket: members whose gradient is not complete yet
    seen: dict[str, int]  # attr -> gradients accumulated this step
    works: dict = None  # bucket -> (async work, its buffer)

    def __post_init__(self):
        self.works = {}


def _reverse_first_use(gm: nn.Module) -> dict[str, int]:
    """attr -> rank in the order backward finishes gradients: the last used in forward first (over
    the rank's stages in pipeline order, when the module holds several: runtime/chunks.py)."""
    graph = getattr(gm, "graph", None)
    if graph is not None:
        targets = [n.target for n in graph.nodes if n.op == "get_attr"]
    else:
        targets = [f"{name}.{n.target}" for name, child in gm.named_children() if hasattr(child, "graph")
                   for n in child.graph.nodes if n.op == "get_attr"]
    first = list(dict.fromkeys(targets))
    return {t: i for i, t in enumerate(reversed(first))}


def shared_pieces(name: str, holders: list[tuple[int, int, ParamShard]]):
    """The full tensor cut at every holder's run boundary: [(name, full offset, length, [(rank, stage,
    shard, stored offset)])] for each maximal part the same holders store (dropping adjacent equal cuts)."""
    runs = {(r, stage): stored_runs(s) for r, stage, s in holders}
    cuts = sorted({x for rs in runs.values() for f, _, n in rs for x in (f, f + n)})
    out = []
    for a, b in zip(cuts, cuts[1:]):
        who = []
        for r, stage, s in holders:
            for f, start, n in runs[(r, stage)]:
                if f <= a and b <= f + n:
                    who.append((r, stage, s, start + a - f))
                    break
        if len({stage for _, stage, _, _ in who}) < 2:
            continue
        prev = out[-1] if out else None
        if prev and prev[1] + prev[2] == a and [h[:2] for h in prev[3]] == [h[:2] for h in who] and \
                all(p[3] + prev[2] == w[3] for p, w in zip(prev[3], who)):
            out[-1] = (name, prev[1], prev[2] + b - a, prev[3])
        else:
            out.append((name, a, b - a, who))
    return out


def tied_key(who) -> str:
    """The group summing a piece: the distinct ranks among its holders."""
    return group_key(sorted({r for r, *_ in who}), "tied")


def tied_slots(pieces, rank: int, attr_of: Mapping[tuple[str, int], str]) -> dict[str, list[Slot]]:
    """Group key -> this rank's slots, for the shared pieces it stores (pieces as `shared_pieces`;
    attr_of: (name, stage) -> this rank's attribute)."""
    slots: dict[str, list[Slot]] = {}
    for name, _, n, who in pieces:
        mine = [h for h in who if h[0] == rank]
        if not mine:
            continue
        held = []
        for _, stage, shard, offset in mine:
            same = sum(1 for _, s, _, _ in who if s == stage)  # this stage's ranks holding this piece
            # Non-FSDP gradients are still dp-partial (1/dp of the stage's); an FSDP block's is the
            # stage's whole contribution. Scaled so the sum counts each stage exactly once.
            scale = (1 if shard.fsdp else shard.dp) / same
            held.append(Slot(attr_of[(name, stage)], ((offset, n),), scale))
        slots.setdefault(tied_key(who), []).append(replace(held[0], also=tuple(held[1:])))
    return {key: _merged(members) for key, members in slots.items()}


def _merged(slots: list[Slot]) -> list[Slot]:
    """Consecutive slots of one parameter and scale as one. The pieces keep their global order,
    so every member of a group lays its buffer out alike whatever its own attribute names."""
    out: list[Slot] = []
    for s in slots:
        if out and out[-1].attr == s.attr and out[-1].scale == s.scale and not s.also and not out[-1].also:
            out[-1] = Slot(s.attr, out[-1].runs + s.runs, s.scale)
        else:
            out.append(s)
    return out
