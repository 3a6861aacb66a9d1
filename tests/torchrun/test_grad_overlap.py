"""The dp gradient reduction really overlaps backward: a timestamped log of one train_step
(tests/torchrun/workers/grad_overlap_worker.py, 2 gloo ranks, dp=2, 2 microbatches, small buckets).

Asserted from the log: the first bucket's all-reduce is issued while the LAST microbatch's backward
is still running (after it began, before its last autograd node ran), and is not waited on before
that last backward action; each bucket is reduced exactly once per step, every dp parameter in
exactly one bucket; the step trains like one device.
"""

from __future__ import annotations

import functools
import json
import os

import pytest

from fxplan.runtime.launch import run_torchrun

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "workers", "grad_overlap_worker.py")


@functools.cache
def _result() -> dict:
    proc = run_torchrun(WORKER, 2, [], timeout_s=240, env={"FXPLAN_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1"})
    lines = [line[len("RESULT "):] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[0])


def _step(r: dict):
    """(issues {call: (t, numel, async)}, waits {call: t}, backward [(t, microbatch)]) inside the step."""
    begin = next(t for kind, t, *_ in r["events"] if kind == "step_begin")
    end = next(t for kind, t, *_ in r["events"] if kind == "step_end")
    inside = [e for e in r["events"] if begin <= e[1] <= end]
    issues = {e[2]: (e[1], e[3], e[4]) for e in inside if e[0] == "issue"}
    waits = {e[2]: e[1] for e in inside if e[0] == "wait"}
    backward = [(e[1], e[2]) for e in inside if e[0] == "backward"]
    return issues, waits, backward


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_first_bucket_reduces_while_backward_runs():
    r = _result()
    issues, waits, backward = _step(r)
    assert {mb for _, mb in backward} == {0, 1}  # two microbatches, each with its backward
    last_mb_start = min(t for t, mb in backward if mb == 1)
    last_action = max(t for t, _ in backward)
    grads = sorted(call for call, (_, _, is_async) in issues.items() if is_async)[:r["buckets"]]
    first = grads[0]
    t_issue = issues[first][0]
    assert last_mb_start < t_issue < last_action  # on the last microbatch, before backward ends
    assert waits[first] >= last_action  # and not waited on before the last backward action
    # several buckets went out before backward ended: the reduction is spread over it
    assert sum(issues[c][0] < last_action for c in grads) >= 2


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_each_dp_parameter_reduced_once_per_step_and_trains_like_one_device():
    r = _result()
    assert r["buckets"] >= 3
    assert r["grad_calls"] == r["buckets"]  # one all-reduce per bucket in the logged step
    assert r["bucket_params"] == r["dp_params"]  # every dp parameter in exactly one bucket
    issues, waits, _ = _step(r)
    grads = sorted(call for call, (_, _, is_async) in issues.items() if is_async)[:r["buckets"]]
    assert all(c in waits for c in grads)  # each waited for inside train_step (before opt.step)
    assert r["param_close"]
    assert r["losses"] == pytest.approx(r["reference"], rel=1e-4, abs=1e-5)
