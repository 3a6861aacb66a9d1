"""Peak live tensor bytes of a stretch of CPU training, from torch.profiler's allocation events.

Why this method (CPU has no `torch.cuda.max_memory_allocated`):

- `torch.profiler.profile(profile_memory=True)` records every allocation and free of the CPU
  allocator as a signed `[memory]` event with its nanosecond timestamp, from every thread (the
  autograd engine's too). Summed in time order they give the exact live tensor bytes at every
  instant, so the peak includes short-lived transients (a gradient bucket, Adam's `sqrt`
  temporaries) that a sampled figure would miss.
- It counts what `estimated_memory_bytes` describes and what `max_memory_allocated` counts on a
  GPU: tensors. Peak RSS above a baseline would add the allocator's retained free pages, Python's
  heap and gloo's own scratch (not torch tensors), and its high-water mark is not per phase; it
  stays the right tool for "did distribute() allocate a full model", not for a 10 % comparison.
- The profiler is started before the model, its shards and the optimizer exist, so every live
  tensor of the run was allocated inside it (the live sum starts at 0); a tensor allocated earlier
  (the global batch) is not counted, which is why contenders are built inside `measure`.

Events are read from the profiler's result tree (`kineto_results.experimental_event_tree()`), whose
allocation records carry the address: a free of a tensor allocated before the probe started (an
earlier contender's garbage collected late) is then recognised and ignored, not subtracted.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.profiler import ProfilerActivity, profile, record_function

MARK = "memory_probe.measured"


class Probe:
    """`with Probe() as probe:` build things, then `with probe.measured():` the stretch whose peak counts."""

    def __init__(self, breakdown: bool = False):
        self.keep_breakdown = breakdown  # also say, at the peak, which ops allocated what is live

    def __enter__(self):
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    @contextmanager
    def measured(self):
        with record_function(MARK):
            yield

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        results = self._prof.profiler.kineto_results
        marks = [(e.start_ns(), e.end_ns()) for e in results.events() if e.name() == MARK]
        allocs = sorted(_allocations(results.experimental_event_tree()))
        self.peak_bytes = self.start_bytes = 0
        if not marks:
            return False
        start, end = min(m[0] for m in marks), max(m[1] for m in marks)
        live, born, self.start_bytes, peak = 0, {}, None, 0
        late: dict[tuple[int, int], int] = {}  # (address, bytes) -> frees known to have happened, not yet seen
        self.breakdown: dict[str, int] = {}  # at the peak: live bytes by what allocated them
        for t, ptr, nbytes, label in allocs:
            if t > end:
                break
            if t >= start and self.start_bytes is None:
                self.start_bytes = peak = live
            if nbytes > 0:
                old = born.pop(ptr, None)
                if old is not None:
                    # The allocator never hands out a live address: the tensor there was freed, by a
                    # thread (gloo's, the autograd engine's) whose free event carries a later stamp
                    # than this allocation. Count it freed now and skip its event when it comes.
                    live -= old[0]
                    late[(ptr, old[0])] = late.get((ptr, old[0]), 0) + 1
                born[ptr] = (nbytes, label)
                live += nbytes
            else:
                if late.get((ptr, -nbytes), 0) > 0:
                    late[(ptr, -nbytes)] -= 1
                    continue
                old = born.pop(ptr, None)
                if old is None:
                    continue  # freed here, allocated before the probe: never counted, so never subtracted
                live -= old[0]
            if t >= start and live > peak:
                peak = live
                self._peak_live = born.copy() if self.keep_breakdown else None
        if self.start_bytes is None:  # nothing allocated in the measured stretch
            self.start_bytes = peak = live
        self.peak_bytes = peak
        for nbytes, label in (getattr(self, "_peak_live", None) or {}).values():
            self.breakdown[label] = self.breakdown.get(label, 0) + nbytes
        self._peak_live = None
        return False

def _allocations(roots):
    """(ns, address, signed bytes, label) of every allocator event below the profiler's event trees;
    the label names the outermost and the two innermost ops around the allocation."""
    stack = [(r, ()) for r in roots]
    while stack:
        node, names = stack.pop()
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation":
            label = " > ".join(dict.fromkeys(names[:1] + names[-2:])) if names else "?"
            yield node.start_time_ns, fields.ptr, fields.alloc_size, label
            continue
        names = names + (node.name[:60],)
        stack.extend((c, names) for c in node.children)


def train_steps(step, parameters, steps: int, lr: float = 1e-3) -> None:
    """`steps` iterations of step() (forward + backward + sync) + Adam's step + zero_grad(set_to_none)."""
    opt = torch.optim.Adam(parameters, lr=lr)
    for _ in range(steps):
        step()
        opt.step()
        opt.zero_grad(set_to_none=True)
