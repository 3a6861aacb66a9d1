"""The ONE adapter over torch.distributed.pipelining (PipelineStage + its action-list runtime).

The runtime hands us this rank's stage GraphModules (one, or one per model chunk under
interleaved-1f1b / zbv), its lane group (the pp process group {q, q + n_s, ...} of the ranks at
local position q of every place along the pipeline) and the schedule name. Every
schedule runs as the per-rank action lists fxplan.schedules builds (the very lists its simulator
times) on torch's `_PipelineScheduleRuntime` (reached through fxplan/_torch.py), which adds the
sends and receives: F, fused B, or B split into I (input gradient, sent upstream at once) and W
(weight gradient, deferred to fill bubbles).

Shapes are static: before the first step the lane runs one probe forward in pipeline order
(stage 0 on the real first microbatch, later stages on zeros of the received shapes) and passes
shapes/dtypes/requires_grad along with send_object_list (in place between two stages of one rank).
A probe with real tensors (not meta) works with collectives inside the stage graphs, which meta
tensors cannot run through gloo/NCCL.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.microbatch import TensorChunkSpec

from fxplan import schedules
from fxplan.errors import ConstraintError
from fxplan.runtime.boundary import boundary_checked
from fxplan._torch import loaded_compute_actions, pipeline_schedule_runtime, replicated_chunk_spec

CHAINED = ("zb-h2", "zb-auto", "zbv")
"""Schedules that need iterations chained: their later stages start the next iteration while the
first stage still drains its weight gradients; a barrier between steps costs them their gain
(zb-h2 at pp=2, m=6: no bubble chained, 5.3 % with one). GPipe, 1F1B and ZB-H1 end every stage's
list after the first stage's last input gradient anyway, so they lose nothing to one."""


def chains(schedule: str) -> bool:
    return schedule in CHAINED


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorSpec":
        return cls(tuple(t.shape), t.dtype, bool(t.requires_grad))

    def example(self, device) -> torch.Tensor:
        t = torch.zeros(self.shape, dtype=self.dtype, device=device)
        return t.requires_grad_(self.requires_grad and t.is_floating_point())


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def probe_shapes(gms: Sequence[tuple[int, Callable]], num_stages: int, stage_ranks: Sequence[int], group,
                 first_inputs: tuple | None, device) -> dict[int, tuple[list[TensorSpec], list[TensorSpec]]]:
    """{stage: (input specs, output specs)} of this rank's stages for one microbatch, found in
    pipeline order: stage s receives its input specs from the rank of stage s - 1 (global rank
    `stage_ranks[s - 1]`; handed over in place when that is this rank, as at a V's turn)."""
    out: dict[int, tuple[list[TensorSpec], list[TensorSpec]]] = {}
    mine = dict(gms)
    for stage in sorted(mine):
        if stage == 0:
            inputs = tuple(first_inputs)
        else:
            if stage - 1 in out:
                specs = out[stage - 1][1]
            else:
                box: list = [None]
                dist.recv_object_list(box, src=stage_ranks[stage - 1], group=group)
                specs = box[0]
            # An input needs grad exactly when the sender's output has one: a float tensor passed through
            # untouched (e.g. regression targets) has none, and a gradient sent for it would never be received.
            inputs = tuple(s.example(device) for s in specs)
        outputs = _probe_forward(mine[stage], inputs)
        out[stage] = ([TensorSpec.of(t) for t in inputs], [TensorSpec.of(t) for t in outputs])
        if stage < num_stages - 1 and stage + 1 not in mine:
            dist.send_object_list([out[stage][1]], dst=stage_ranks[stage + 1], group=group)
    return out


def _probe_forward(gm: Callable, inputs: tuple) -> tuple:
    # The probe is a real forward: undo its side effects (buffer updates such as BatchNorm's running
    # statistics, random numbers drawn by dropout) so the first real step matches one device.
    saved_buffers = [(b, b.detach().clone()) for b in gm.buffers()] if isinstance(gm, torch.nn.Module) else []
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    with torch.enable_grad():
        outputs = _as_tuple(gm(*inputs))
    with torch.no_grad():
        for buffer, value in saved_buffers:
            buffer.copy_(value)
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    return outputs


class PipelineRun:
    """One rank's stages (one, or one per model chunk) under a schedule's action lists; `step` runs
    one iteration."""

    def __init__(self, stages: Sequence[tuple[int, torch.nn.Module, list, list]], num_stages: int, place: int,
                 group, schedule: str, microbatches: int, device, replicate_args=(),
                 plan_schedule: "schedules.Schedule | None" = None):
        """stages: (stage index, module, input specs, output specs) per stage this rank holds; place:
        this rank's position along the pipeline (its rank in `group`, its list in the schedule)."""
        self.indices = tuple(index for index, *_ in stages)
        self.place = place
        self.holds_first, self.holds_last = 0 in self.indices, num_stages - 1 in self.indices
        self.microbatches = microbatches
        # every rank builds the same lists (zb-auto / zbv from the plan's own pass times when given)
        self.plan_schedule = plan_schedule or schedules.build(schedule, group.size(), microbatches)
        if self.plan_schedule.placement.num_stages != num_stages or self.plan_schedule.microbatches != microbatches:
            raise ConstraintError(f"schedule lists for {self.plan_schedule.placement.num_stages} stages x "
                                  f"{self.plan_schedule.microbatches} microbatches given to a {num_stages}-stage, "
                                  f"{microbatches}-microbatch pipeline")
        meta = torch.device("meta")
        self.stages = [
            PipelineStage(boundary_checked(gm, out_specs, index, index == num_stages - 1), index, num_stages,
                          torch.device(device), input_args=tuple(s.example(meta) for s in in_specs),
                          output_args=tuple(s.example(meta) for s in out_specs), group=group)
            for index, gm, in_specs, out_specs in stages]
        # The last stage's graph returns its loss contribution already; the schedule's "loss_fn"
        # only divides by the microbatch count so gradients accumulate as on one device. We do not
        # use the schedule's scale_grads: it would also divide gradients the user accumulated in
        # .grad before this step.
        m = microbatches

        def loss_fn(output, target=None):
            return _as_tuple(output)[0] / m

        first = next((in_specs for index, _, in_specs, _ in stages if index == 0), None)
        spec = tuple(replicated_chunk_spec() if i in replicate_args else TensorChunkSpec(0)
                     for i in range(len(first))) if first is not None else None
        self.schedule = pipeline_schedule_runtime(
            self.stages, {r: [(a.stage, a.kind, a.microbatch) for a in ops]
                          for r, ops in enumerate(self.plan_schedule.actions)},
            n_microbatches=microbatches, loss_fn=loss_fn, args_chunk_spec=spec, scale_grads=False)
        self.busy: dict[str, float] = {}  # seconds per pass kind ("F", "I", "W", "B") of the last step
        self.counts: dict[str, int] = {}
        # the last step's passes in order: (kind, microbatch, start, end), perf_counter seconds (one
        # monotonic clock for every process on a host, so ranks' timelines line up)
        self.events: list[tuple[str, int, float, float]] = []
        self.window = (0.0, 0.0)
        for stage in self.stages:
            self._time_passes(stage)
        self._step_kwargs = {"return_outputs": False} \
            if "return_outputs" in inspect.signature(self.schedule.step).parameters else {}

    def _time_passes(self, stage) -> None:
        """Wrap the stage's three compute entry points with wall-clock timers: each rank's busy time
        per pass kind and its timeline, for benchmarks (the bubble is the rest of the step)."""

        def timed(fn, kind_of):
            def run(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    end = time.perf_counter()
                    kind = kind_of(kwargs)
                    self.busy[kind] = self.busy.get(kind, 0.0) + end - start
                    self.counts[kind] = self.counts.get(kind, 0) + 1
                    self.events.append((kind, int(args[0]) if args else -1, start, end))
            return run

        stage.forward_one_chunk = timed(stage.forward_one_chunk, lambda kw: "F")
        stage.backward_one_chunk = timed(stage.backward_one_chunk,
                                         lambda kw: "B" if kw.get("full_backward", True) else "I")
        stage.backward_weight_one_chunk = timed(stage.backward_weight_one_chunk, lambda kw: "W")

    def loaded_actions(self) -> list[tuple[int, str, int]]:
        """The compute actions torch will run on this rank, read back from torch's lowered lists."""
        return loaded_compute_actions(self.schedule, self.place)

    def step(self, batch: tuple) -> list[torch.Tensor] | None:
        """Run all microbatches; on the last stage's rank return each microbatch's (loss / microbatches)."""
        args = tuple(batch) if self.holds_first else ()
        losses: list | None = [] if self.holds_last else None
        kwargs = dict(self._step_kwargs)
        if self.holds_last:  # the runtime indexes one target per microbatch; our loss needs none
            kwargs["target"] = torch.zeros(self.microbatches, device=self.stages[0].device)
        self.busy, self.counts, self.events = {}, {}, []
        start = time.perf_counter()
        self.schedule.step(*args, losses=losses, **kwargs)
        self.window = (start, time.perf_counter())  # the schedule's own part of the step
        return losses
