"""Train one rank's program under torchrun: `Runner` (what `compiled.distribute()` returns).

    torchrun --standalone --nproc-per-node 4 train.py      # every rank runs the same script

Per iteration (`train_step`): cut the global batch into the plan's microbatches (batches.py), run
forward and backward of this rank's stage (a plain loop when pp == 1, a torch pipelining schedule
otherwise, pipeline.py), SUMMING parameter gradients over each parameter's dp group while backward
runs and over the stages sharing a weight when this stage's schedule is over (grad_sync.py; FSDP
shards are reduce-scattered by the graph), waiting for those sums before returning.
The loss comes back as an async all-reduce that only waits when the caller reads it: no global
barrier at the end of an iteration, so a stage can start the next one as soon as it is done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from fxplan._torch import forget_tensor
from fxplan.codegen.emit import emit_rank
from fxplan.codegen.groups import group_key, required_group_keys
from fxplan.codegen.params import fetch_attr
from fxplan.codegen.program import EmitSource, RankProgram
from fxplan.errors import DistributedSetupError
from fxplan.plan import Plan
from fxplan import schedules
from fxplan.runtime import chunks, full_state, materialize, pipeline
from fxplan.runtime.batches import check_batch, is_batched, microbatches
from fxplan.runtime.collectives import GRAPH_OPS, fxplan_all_gather_rs
from fxplan.runtime.comm import CollectiveCounter, Communicator
from fxplan.runtime.fsdp_state import FsdpState
from fxplan.runtime.sequence_saved import SequenceSaved
from fxplan.runtime.grad_sync import GradSync
from fxplan.runtime import step_report
from fxplan.runtime.step_report import StepTimes
from fxplan.runtime.loss_inputs import loss_denominator
from fxplan.runtime.process import check_same_plan, check_world_size, device, init_default_group
from fxplan.runtime.launch import say


class StepLoss:
    """The mean loss of one train_step; waits for its all-reduce only when read (float(), item())."""

    def __init__(self, value: torch.Tensor, work):
        self._value, self._work = value, work

    def _wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._value

    def item(self) -> float:
        return float(self._wait().item())

    def __float__(self) -> float:
        return self.item()

    def tensor(self) -> torch.Tensor:
        return self._wait().clone()

    def __repr__(self) -> str:
        return f"StepLoss({self.item():.6g})"

    def __format__(self, spec: str) -> str:
        return format(self.item(), spec)


class Runner:
    """This rank's stage module, its parameter shards, and the plan's training step."""

    def __init__(self, model: nn.Module, plan: Plan, source: EmitSource,
                 init_fn: Callable[[nn.Module], None] | None = None):
        init_default_group()
        self.plan = plan
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        check_world_size(plan)
        check_same_plan(plan)
        self.comm = Communicator.for_default_group()
        self.device = device()
        self.model = model
        self.layer_graph = source.layer_graph
        self._traced_gm = source.traced.gm  # its meta holds the split ratio loss's denominator
        # Every rank creates every group, in one order: new_group is collective over the world.
        self.comm.groups.create(required_group_keys(plan))
        # this rank's stages: one, or one per model chunk (interleaved-1f1b, zbv), in pipeline order
        self.stage_indices = plan.stages_of_rank(self.rank)
        self.stage_index = self.stage_indices[0]
        stage = plan.stages[self.stage_index]
        self.position = stage.devices.index(self.rank)
        # the ranks at this local position of every place along the pipeline (the stages' devices
        # repeat for the places holding several chunks)
        self.lane = tuple(sorted({s.devices[self.position] for s in plan.stages}))
        self.place = self.lane.index(self.rank)
        placement = plan.placement
        if any(s.devices[self.position] != self.lane[placement.rank_of(s.index)] for s in plan.stages):
            raise DistributedSetupError(
                f"pipeline lane {self.lane} is not in increasing rank order along the pipeline; give later "
                f"places higher ranks")
        self._loss_group = self.comm.loss_group()
        # meta shards: we materialise them (a meta model has no values to cut)
        self.programs = [emit_rank(source.traced, source.layer_graph, source.space, plan, self.rank, params="meta",
                                   ops=GRAPH_OPS, stage=index) for index in self.stage_indices]
        self.program = self.programs[0] if len(self.programs) == 1 else _merged_program(self.programs)
        self.gm = chunks.rank_module(self.programs)
        self._install_params(init_fn)
        self.grad_sync = GradSync(self.comm, self.gm, self.program.params, model, chunks.stage_of(self.programs))
        # per stage: ZeRO-3 handles, kept units and prefetches of its FSDP layers; sequence-parallel
        # gathers saved for backward as their shards (after FSDP's: it nests inside)
        self.fsdp = [FsdpState(self.comm, p.gm) for p in self.programs
                     if any(s.fsdp for s in p.params.values())]
        self.sequence = [SequenceSaved(self.comm, p.gm) for p in self.programs if _calls(p.gm, fxplan_all_gather_rs)]
        self._pipe: pipeline.PipelineRun | None = None
        self._pipe_key: tuple | None = None
        self.step_times = StepTimes()  # measured, for report()

    # ------------------------------------------------------------ setup
    def _install_params(self, init_fn) -> None:
        shards = dict(self.program.params)
        values = materialize.shard_values(self.model, shards, init_fn, self.device)
        for attr, shard in shards.items():
            value = values[attr]
            tensor = nn.Parameter(value, requires_grad=bool(shard.requires_grad)) if shard.requires_grad \
                or _is_param(self.gm, attr) else value
            _set_attr(self.gm, attr, tensor)
        leftover = [n for n, t in list(self.gm.named_parameters()) + list(self.gm.named_buffers()) if t.is_meta]
        if leftover:
            raise DistributedSetupError(f"rank {self.rank}: the stage module still has meta tensors {leftover[:5]} "
                                        f"after materialisation; codegen/emit must list them in RankProgram.params")
        self.gm.to(self.device)

    # ------------------------------------------------------------ parameters
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(state_dict key, local shard) of every trainable parameter this rank holds."""
        for attr, shard in self.program.params.items():
            tensor = fetch_attr(self.gm, attr)
            if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
                yield shard.name, tensor

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, p in self.named_parameters():
            yield p

    # ------------------------------------------------------------ one iteration
    def train_step(self, *batch) -> StepLoss:
        try:
            self.lockstep().begin_step(self.stage_index, defer=self.plan.pp > 1 and pipeline.chains(self.plan.schedule),
                                       batch=batch)
            self.step_times.start()
            loss = self._train_step(batch)
            self.step_times.stop()
            self.lockstep().end_step()
            return loss
        except Exception as exc:
            # torchrun kills the other ranks when this one exits; name the rank so the log says who.
            exc.add_note(f"fxplan: raised on rank {self.rank} (stage {self.stage_index}) during train_step")
            self._note_lost_peers(exc)
            say(f"[fxplan rank {self.rank} stage {self.stage_index}] train_step failed: {_causes(exc)}", sys.stderr)
            raise

    def _train_step(self, batch) -> StepLoss:
        m = self.plan.microbatches
        batch = tuple(b.to(self.device) if isinstance(b, torch.Tensor) else b for b in batch)
        check_batch(self.layer_graph, self.plan, batch)
        params = [p for _, p in self.named_parameters()]
        stash = [p.grad for p in params]  # grads from earlier steps: not re-summed over dp
        for p in params:
            p.grad = None
        self.grad_sync.begin_step(m)  # dp sums start in backward as buckets complete
        with loss_denominator(self._traced_gm, self.plan, batch):
            local = self._run_loop(batch, m) if self.plan.pp == 1 else self._run_pipeline(batch, m)
        for state in self.fsdp:
            state.end_step()
        self.grad_sync.finish_step()
        for p, old in zip(params, stash):
            if old is not None:
                p.grad = old if p.grad is None else old.add_(p.grad)
        return self._reduce_loss(local)

    def _run_loop(self, batch, m) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for mb in microbatches(self.layer_graph, batch, m):
            out = self.gm(*mb)
            loss = (out[0] if isinstance(out, (tuple, list)) else out) / m
            loss.backward()
            total += loss.detach().float()
        return total

    def _run_pipeline(self, batch, m) -> torch.Tensor:
        key = tuple((tuple(b.shape), b.dtype) for b in batch if isinstance(b, torch.Tensor))
        if self._pipe is None or self._pipe_key != key:
            group = self.comm.group(group_key(self.lane))
            first = microbatches(self.layer_graph, batch, m)[0] if 0 in self.stage_indices else None
            num_stages = len(self.plan.stages)
            stage_ranks = [s.devices[self.position] for s in self.plan.stages]
            specs = pipeline.probe_shapes([(p.stage, p.gm) for p in self.programs], num_stages, stage_ranks,
                                          group, first, self.device)
            replicate = {i for i in range(len(batch)) if not is_batched(self.layer_graph, i)}
            self._pipe = pipeline.PipelineRun([(p.stage, p.gm, *specs[p.stage]) for p in self.programs], num_stages,
                                              self.place, group, self.plan.schedule, m, self.device, replicate,
                                              plan_schedule=schedules.for_plan(self.plan))
            self._pipe_key = key
        losses = self._pipe.step(batch)
        total = torch.zeros((), device=self.device)
        for loss in losses or ():
            total += loss.detach().float()
        return total

    def _reduce_loss(self, local: torch.Tensor) -> StepLoss:
        # Every last-stage rank holds a dp-partial loss; the tp replicas of the loss layer each hold
        # one full copy of the dp sum, so the world sum counts it tp times.
        last = self.plan.stages[-1]
        copies = last.strategies[last.layers[-1]].tp
        value = (local / copies if last.index in self.stage_indices else torch.zeros_like(local)).reshape(1)
        work = dist.all_reduce(value, group=self._loss_group, async_op=True)
        return StepLoss(value.view(()), work)

    # ------------------------------------------------------------ full tensors (tests, checkpoints)
    def report(self) -> str:
        """Measured step time per rank beside the plan's estimate, with the error (collective)."""
        return step_report.report(self.plan, self.rank, self.step_times)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full CPU tensors on every rank, keys exactly as model.state_dict() (collective: call on all ranks)."""
        return full_state.full_state_dict(self.gm, self.program.params, self.model, self.device)

    def lockstep(self):
        """The step counter every train_step compares across ranks (lockstep.py)."""
        if getattr(self, "_lockstep", None) is None:
            from fxplan.runtime.lockstep import LockStep

            self._lockstep = LockStep(self.rank, self.world_size, self.device)
        return self._lockstep

    def _note_lost_peers(self, exc: Exception) -> None:
        # the lost-rank line itself is printed by whoever sees the death first (peer_watch.py)
        lost = self.lockstep().lost_peers()
        if lost:
            exc.add_note(f"fxplan: rank{'s' if len(lost) > 1 else ''} {lost} of this job died (process gone); "
                         f"this rank's failure follows from losing {'them' if len(lost) > 1 else 'it'}")

    def save(self, path, optimizer=None) -> None:
        """Checkpoint through torch.distributed.checkpoint, keyed by model.state_dict() names (optimizer
        state too): loads under any plan or into the plain model (collective: call on all ranks)."""
        from fxplan.runtime import checkpoint

        checkpoint.save(self, path, optimizer)

    def load(self, path, optimizer=None) -> None:
        """Load a checkpoint written under any plan into this rank's shards (collective)."""
        from fxplan.runtime import checkpoint

        checkpoint.load(self, path, optimizer)

    def grads_full(self) -> dict[str, torch.Tensor]:
        """Full gradients (zeros where none) of every trainable parameter, on every rank. For tests."""
        return full_state.grads_full(self.gm, self.program.params, self.model, self.device)

    # ------------------------------------------------------------ observing (tests, benchmarks)
    def count_collectives(self) -> contextlib.AbstractContextManager[CollectiveCounter]:
        """`with runner.count_collectives() as c: ...` counts every collective the block runs (the
        graphs' and the gradient sums'); `c.snapshot()` -> {(kind, key, phase): Count}."""
        return self.comm.observe()


def _causes(exc: BaseException) -> str:
    """The error and what it was raised from (torch's pipelining wraps a stage's error in its own)."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = " ".join(str(exc).split())
        parts.append(f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__)
        exc = exc.__cause__ or exc.__context__
    return " <- ".join(parts)


def _calls(gm: torch.fx.GraphModule, fn) -> bool:
    return any(n.op == "call_function" and n.target is fn for n in gm.graph.nodes)


def _is_param(root: nn.Module, target: str) -> bool:
    try:
        return isinstance(fetch_attr(root, target), nn.Parameter)
    except AttributeError:
        return False


def _set_attr(root: nn.Module, target: str, value) -> None:
    *path, last = target.split(".")
    mod = root
    for atom in path:
        if not hasattr(mod, atom):
            mod.add_module(atom, nn.Module())
        mod = getattr(mod, atom)
    forget_tensor(mod, last)
    if isinstance(value, nn.Parameter):
        mod.register_parameter(last, value)
    else:
        mod.register_buffer(last, value)


def _merged_program(programs: list[RankProgram]) -> RankProgram:
    """One RankProgram view of a rank's stages: their parameters under rank_module's paths (what
    gradient sums, full state and checkpoints read); gm and the rest are the first stage's."""
    return dataclasses.replace(programs[0], params=chunks.rank_params(programs),
                               group_keys=tuple(dict.fromkeys(k for p in programs for k in p.group_keys)))
