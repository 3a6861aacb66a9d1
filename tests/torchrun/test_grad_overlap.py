"""Communication really overlaps compute: a timestamped log of one train_step per plan
(tests/torchrun/workers/grad_overlap_worker.py, 2 gloo ranks, one launch). The runtime's own
observer (comm.Timeline) says when each collective was issued and waited for; the worker logs
backward actions and linear layers beside it.

- dp=2, 2 microbatches, small buckets: the first bucket's all-reduce is issued while the LAST
  microbatch's backward is still running (after it began, before its last autograd node ran), and
  is not waited on before that last backward action; each bucket is reduced exactly once per step,
  every dp parameter in exactly one bucket.
- dp=2 FSDP (ZeRO-3): in forward, each layer's gather after the first is issued before the layer
  before it has finished computing (linear layers run between its issue and its wait), and so is
  a backward re-gather before the layer after it in forward has finished its backward.
- Both train like one device.
"""

from __future__ import annotations

import functools
import os

import pytest

from torchrun_rows import torchrun_rows

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "workers", "grad_overlap_worker.py")


@functools.cache
def _results() -> dict:
    rows = torchrun_rows(WORKER, 2, env={"FXPLAN_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1"})
    return {r["plan"]: r for r in rows}


def _step(r: dict, kind: str, phase: str):
    """[(t_issue, t_wait or None)] of the logged step's `kind` collectives in `phase`, in issue order
    (a wait belongs to the latest earlier issue filling the same buffer), and the step's events."""
    begin = next(e[1] for e in r["events"] if e[0] == "step_begin")
    end = next(e[1] for e in r["events"] if e[0] == "step_end")
    calls, open_by_buffer = [], {}
    for what, t, k, _, ph, buf in r["comm"]:
        if k != kind or ph != phase or not begin <= t <= end:
            continue
        if what == "issue":
            open_by_buffer[buf] = len(calls)
            calls.append([t, None])
        elif buf in open_by_buffer:
            calls[open_by_buffer.pop(buf)][1] = t
    return calls, [e for e in r["events"] if begin <= e[1] <= end]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_first_bucket_reduces_while_backward_runs():
    r = _results()["dp2"]
    buckets, events = _step(r, "all_reduce", "grad")
    backward = [(e[1], e[2]) for e in events if e[0] == "backward"]
    assert {mb for _, mb in backward} == {0, 1}  # two microbatches, each with its backward
    last_mb_start = min(t for t, mb in backward if mb == 1)
    last_action = max(t for t, _ in backward)
    assert len(buckets) == r["buckets"] >= 3  # one all-reduce per bucket in the logged step
    t_issue, t_wait = buckets[0]
    assert last_mb_start < t_issue < last_action  # on the last microbatch, before backward ends
    assert t_wait is not None and t_wait >= last_action  # not waited on before the last backward action
    # several buckets went out before backward ended: the reduction is spread over it
    assert sum(t < last_action for t, _ in buckets) >= 2
    assert all(w is not None for _, w in buckets)  # each waited for inside train_step (before opt.step)


def test_each_dp_parameter_in_one_bucket_and_trains_like_one_device():
    r = _results()["dp2"]
    assert r["bucket_params"] == r["dp_params"]  # every dp parameter in exactly one bucket
    assert r["param_close"]
    assert r["losses"] == pytest.approx(r["reference"], rel=1e-4, abs=1e-5)


def _overlapped(calls, computes) -> int:
    """How many prefetched gathers had compute running between their issue and their wait."""
    return sum(1 for t_issue, t_wait in calls if t_wait is not None and
               any(t_issue < t < t_wait for t in computes))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fsdp_next_gather_issued_before_the_current_layer_finishes():
    r = _results()["dp2-fsdp"]
    assert r["fsdp_params"] > 0 and r["param_close"]
    assert r["losses"] == pytest.approx(r["reference"], rel=1e-4, abs=1e-5)
    forward, events = _step(r, "all_gather", "fwd")
    linears = [e[1] for e in events if e[0] == "linear"]
    assert len(forward) >= 4 and all(w is not None for _, w in forward)  # one gather per layer, each used
    # every gather after the first is issued when the previous one is done, before the previous
    # layer's compute (the linears before this gather is waited for) has ended
    for (_, prev_wait), (t_issue, t_wait) in zip(forward, forward[1:]):
        assert prev_wait <= t_issue < t_wait
    assert _overlapped(forward[1:], linears) >= len(forward) - 2
    # backward: the re-gather of a layer is issued while the layer after it still runs backward
    backward_gathers, _ = _step(r, "all_gather", "bwd")
    actions = [e[1] for e in events if e[0] == "backward"]
    assert len(backward_gathers) >= 2
    assert _overlapped(backward_gathers[1:], actions) >= len(backward_gathers) - 2
