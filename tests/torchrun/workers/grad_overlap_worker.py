"""torchrun worker for tests/torchrun/test_grad_overlap.py: a timestamped log of one train_step.

    torchrun --standalone --nproc-per-node 2 tests/torchrun/workers/grad_overlap_worker.py

A dp=2 GPT with 2 microbatches and small gradient buckets (so there are several). A test-only
observer records, with time.perf_counter_ns: every torch.distributed.all_reduce issued (and when
its work is waited on), and every backward action: each autograd node of each microbatch's graph
(a post hook registered on every node reachable from the stage module's output). Rank 0 prints
`RESULT {json}`; every rank checks it trained like one device.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time

import torch
import torch.distributed as dist

import fxplan
from fxplan.demo import train_beside_one_device
from fxplan.models import build
from fxplan.runtime import grad_sync
from fxplan.runtime.process import init_default_group

SPEC = "gpt:layers=4,hidden=64,heads=4,seq=16,vocab=128"
BATCH, MICRO, STEPS = 8, 2, 2


class Log:
    def __init__(self):
        self.events: list[tuple] = []  # (kind, t_ns, ...)
        self.microbatch = -1

    def add(self, *event):
        self.events.append((event[0], time.perf_counter_ns()) + event[1:])


class _Work:
    def __init__(self, work, log, call):
        self.work, self.log, self.call = work, log, call

    def wait(self, *args, **kwargs):
        out = self.work.wait(*args, **kwargs)
        self.log.add("wait", self.call)
        return out

    def __getattr__(self, name):
        return getattr(self.work, name)


def observe(runner, log: Log):
    calls = [0]

    def all_reduce(tensor, *args, **kwargs):
        call = calls[0]
        calls[0] += 1
        log.add("issue", call, int(tensor.numel()), bool(kwargs.get("async_op", False)))
        work = real_all_reduce(tensor, *args, **kwargs)
        return _Work(work, log, call) if work is not None else None

    dist.all_reduce = all_reduce  # grad_sync and the runner call it through the module

    def after_forward(module, args, out):
        log.microbatch += 1
        mb = log.microbatch
        seen, todo = set(), [(out[0] if isinstance(out, (tuple, list)) else out).grad_fn]
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            node.register_hook(lambda grad_in, grad_out, mb=mb: log.add("backward", mb))
            todo.extend(fn for fn, _ in node.next_functions)

    runner.gm.register_forward_hook(after_forward)


real_all_reduce = dist.all_reduce


def main() -> None:
    torch.set_num_threads(1)
    init_default_group()
    grad_sync.BUCKET_BYTES = grad_sync.FIRST_BUCKET_BYTES = 16 << 10  # several buckets on a small model
    torch.manual_seed(0)
    model = build(SPEC)
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    data = [tuple(model.example_batch(BATCH, generator=g)) for _ in range(STEPS)]
    compiled = fxplan.compile(model, data[0], cluster=fxplan.Cluster.local(world_size=2), verbose=False,
                              constraints=fxplan.Constraints(pp=1, dp=2, tp=1, fsdp=False, microbatches=MICRO))
    runner = compiled.distribute()
    log = Log()
    warm = train_beside_one_device(runner, reference, data[:1], lr=0.05)  # warm-up step, not logged
    observe(runner, log)

    @contextlib.contextmanager
    def logged_step():
        log.add("step_begin")
        yield
        log.add("step_end")
        dist.all_reduce = real_all_reduce  # only the step is logged

    with runner.count_collectives() as counted:
        losses, ref_losses = train_beside_one_device(runner, reference, data[1:], lr=0.05, around_step=logged_step)
    full, ref_state = runner.full_state_dict(), reference.state_dict()
    close = all(torch.allclose(full[k], v, rtol=1e-4, atol=1e-5) for k, v in ref_state.items())
    buckets = runner.grad_sync.buckets
    result = {"rank": dist.get_rank(), "events": log.events, "losses": warm[0] + losses,
              "reference": warm[1] + ref_losses,
              "param_close": close, "buckets": len(buckets),
              "bucket_params": sorted(s.attr for b in buckets for s in b.slots),
              "dp_params": sorted(a for a, s in runner.program.params.items()
                                  if s.requires_grad and not s.fsdp),
              "grad_calls": sum(c.calls for (kind, _, phase), c in counted.snapshot().items() if phase == "grad")}
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
