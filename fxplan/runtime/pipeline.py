"""The ONE adapter over torch.distributed.pipelining (PipelineStage + schedules).

Everything private in torch's pipelining package is touched here only, so a torch upgrade breaks
one file. The runtime hands us this rank's stage GraphModule, its lane group (the pp process group
{q, q + n_s, ...} of the ranks at local position q of every stage) and the schedule name.

Shapes are static: before the first step the lane runs one probe forward in pipeline order
(stage 0 on the real first microbatch, later stages on zeros of the received shapes) and passes
shapes/dtypes/requires_grad along with send_object_list. A probe with real tensors (not meta)
works with collectives inside the stage graphs, which meta tensors cannot run through gloo/NCCL.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.pipelining.microbatch import TensorChunkSpec

from fxplan.errors import ConstraintError
from fxplan._torch import replicated_chunk_spec

SCHEDULES: dict[str, type] = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


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


def probe_shapes(gm: Callable, stage: int, num_stages: int, lane: Sequence[int], group,
                 first_inputs: tuple | None, device) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(input specs, output specs) of this rank's stage for one microbatch, found in pipeline order."""
    if stage == 0:
        inputs = tuple(first_inputs)
    else:
        box: list = [None]
        dist.recv_object_list(box, src=lane[stage - 1], group=group)
        # An input needs grad exactly when the sender's output has one: a float tensor passed through
        # untouched (e.g. regression targets) has none, and a gradient sent for it would never be received.
        inputs = tuple(s.example(device) for s in box[0])
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
    in_specs = [TensorSpec.of(t) for t in inputs]
    out_specs = [TensorSpec.of(t) for t in outputs]
    if stage < num_stages - 1:
        dist.send_object_list([out_specs], dst=lane[stage + 1], group=group)
    return in_specs, out_specs


class PipelineRun:
    """One rank's stage under a torch pipelining schedule; `step` runs one iteration."""

    def __init__(self, gm: torch.nn.Module, stage: int, num_stages: int, lane: Sequence[int], group,
                 schedule: str, microbatches: int, in_specs, out_specs, device, replicate_args=()):
        if schedule not in SCHEDULES:
            raise ConstraintError(f"the runtime cannot run schedule {schedule!r} yet; it runs "
                                  f"{', '.join(SCHEDULES)}: re-plan with Constraints(schedule=...) pinned to one")
        self.stage_index = stage
        self.is_last = stage == num_stages - 1
        self.microbatches = microbatches
        meta = torch.device("meta")
        self.stage = PipelineStage(
            gm, stage, num_stages, torch.device(device),
            input_args=tuple(s.example(meta) for s in in_specs),
            output_args=tuple(s.example(meta) for s in out_specs),
            group=group,
        )
        # The last stage's graph returns its loss contribution already; the schedule's "loss_fn"
        # only divides by the microbatch count so gradients accumulate as on one device. We do not
        # use the schedule's scale_grads: it would also divide gradients the user accumulated in
        # .grad before this step.
        m = microbatches

        def loss_fn(output, target=None):
            return _as_tuple(output)[0] / m

        spec = tuple(replicated_chunk_spec() if i in replicate_args else TensorChunkSpec(0)
                     for i in range(len(in_specs))) if stage == 0 else None
        kwargs = dict(n_microbatches=microbatches, loss_fn=loss_fn, args_chunk_spec=spec)
        if "scale_grads" in inspect.signature(SCHEDULES[schedule].__init__).parameters:
            kwargs["scale_grads"] = False
        self.schedule = SCHEDULES[schedule](self.stage, **kwargs)
        self._step_kwargs = {"return_outputs": False} \
            if "return_outputs" in inspect.signature(self.schedule.step).parameters else {}

    def step(self, batch: tuple) -> list[torch.Tensor] | None:
        """Run all microbatches; on the last stage return each microbatch's (loss / microbatches)."""
        args = tuple(batch) if self.stage_index == 0 else ()
        losses: list | None = [] if self.is_last else None
        kwargs = dict(self._step_kwargs)
        if self.is_last:  # the schedule indexes one target per microbatch; our loss needs none
            kwargs["target"] = torch.zeros(self.microbatches, device=self.stage.device)
        self.schedule.step(*args, losses=losses, **kwargs)
        return losses

