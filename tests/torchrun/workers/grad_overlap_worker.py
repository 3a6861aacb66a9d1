"""torchrun worker for tests/torchrun/test_grad_overlap.py: a timestamped log of one train_step per plan.

    torchrun --standalone --nproc-per-node 2 tests/torchrun/workers/grad_overlap_worker.py

Two plans of one GPT on 2 ranks: dp=2 with 2 microbatches and small gradient buckets (so there are
several), and dp=2 FSDP (ZeRO-3). What the runtime does comes from its own observer
(`fxplan.runtime.comm.Timeline` through `runner.comm.observe`): when each collective is issued and
when it is waited for. What the step computes is logged beside it with time.perf_counter_ns: every
backward action (a post hook on each autograd node reachable from the stage module's output) and
every linear layer's forward (a TorchFunctionMode). Rank 0 prints `RESULT {json}` per plan; every
rank checks it trained like one device.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import fxplan
from fxplan.demo import train_beside_one_device
from fxplan.models import build
from fxplan.runtime import grad_sync
from fxplan.runtime.comm import Timeline
from fxplan.runtime.launch import say
from fxplan.runtime.process import init_default_group

SPEC = "gpt:layers=4,hidden=64,heads=4,seq=16,vocab=128"
BATCH, STEPS = 8, 2
PLANS = {"dp2": dict(fsdp=False, microbatches=2), "dp2-fsdp": dict(fsdp=True, reshard=True, microbatches=1)}


class Computes(TorchFunctionMode):
    """Logs (t_ns, "linear") for every F.linear call while active."""

    def __init__(self, events: list):
        super().__init__()
        self.events = events

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            self.events.append(("linear", time.perf_counter_ns()))
        return func(*args, **(kwargs or {}))


def log_backward(runner, events: list) -> None:
    """After each forward of the stage module: a hook on every autograd node of its graph."""
    count = [-1]

    def after_forward(module, args, out):
        count[0] += 1
        mb = count[0]
        seen, todo = set(), [(out[0] if isinstance(out, (tuple, list)) else out).grad_fn]
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            node.register_hook(lambda grad_in, grad_out, mb=mb: events.append(("backward", time.perf_counter_ns(), mb)))
            todo.extend(fn for fn, _ in node.next_functions)

    runner.gm.register_forward_hook(after_forward)


def run_plan(name: str, model, data) -> dict:
    reference = copy.deepcopy(model)
    c = PLANS[name]
    compiled = fxplan.compile(model, data[0], cluster=fxplan.Cluster.local(world_size=2), verbose=False,
                              constraints=fxplan.Constraints(pp=1, dp=2, tp=1, **c))
    runner = compiled.distribute()
    warm = train_beside_one_device(runner, reference, data[:1], lr=0.05)  # warm-up step, not logged
    events: list = []
    log_backward(runner, events)
    timeline = Timeline()

    @contextlib.contextmanager
    def logged_step():
        events.append(("step_begin", time.perf_counter_ns()))
        with runner.comm.observe(timeline), Computes(events):
            yield
        events.append(("step_end", time.perf_counter_ns()))

    losses, ref_losses = train_beside_one_device(runner, reference, data[1:], lr=0.05, around_step=logged_step)
    full, ref_state = runner.full_state_dict(), reference.state_dict()
    close = all(torch.allclose(full[k], v, rtol=1e-4, atol=1e-5) for k, v in ref_state.items())
    buckets = runner.grad_sync.buckets
    return {"plan": name, "rank": dist.get_rank(), "events": events, "comm": timeline.events,
            "losses": warm[0] + losses, "reference": warm[1] + ref_losses, "param_close": close,
            "buckets": len(buckets), "bucket_params": sorted(s.attr for b in buckets for s in b.slots),
            "dp_params": sorted(a for a, s in runner.program.params.items() if s.requires_grad and not s.fsdp),
            "fsdp_params": sum(1 for s in runner.program.params.values() if s.fsdp)}


def main() -> None:
    torch.set_num_threads(1)
    init_default_group()
    grad_sync.BUCKET_BYTES = grad_sync.FIRST_BUCKET_BYTES = 16 << 10  # several buckets on a small model
    torch.manual_seed(0)
    model = build(SPEC)
    g = torch.Generator().manual_seed(1)
    data = [tuple(model.example_batch(BATCH, generator=g)) for _ in range(STEPS)]
    for name in PLANS:
        result = run_plan(name, model, data)
        if dist.get_rank() == 0:
            say("RESULT " + json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
