"""The schedule pictures: what the timeline draws and what the chrome trace holds."""

import json

import pytest

pytest.importorskip("matplotlib")

from fxplan import schedules  # noqa: E402
from fxplan.cli import main  # noqa: E402
from fxplan.schedule_draw import chrome_trace, timeline_figure  # noqa: E402


@pytest.mark.parametrize("name,chunks", [("zb-h1", 1), ("1f1b", 1), ("interleaved-1f1b", 2)])
def test_timeline_draws_one_row_per_stage_one_box_per_action(name, chunks):
    r = schedules.simulate(name, stages=3, microbatches=6, t_w=0.5, chunks=chunks)
    fig, ax = timeline_figure(r)
    assert len(r.events) == sum(len(ops) for ops in r.schedule.actions)
    boxes = ax.collections
    assert len(boxes) == len(r.events)  # one box per action
    rows = sorted({round(b.get_paths()[0].get_extents().y0 + 0.4, 6) for b in boxes})
    assert rows == [0, 1, 2]  # one row per stage
    assert [t.get_text() for t in ax.get_yticklabels()] == \
        ([f"stage {i}" for i in range(3)] if chunks == 1 else [f"rank {i}" for i in range(3)])
    labels = [t.get_text() for t in ax.texts]
    timed = [e for e in r.events if e.end > e.start]  # the first stage's empty I passes carry no number
    assert len(timed) == len(r.events) - (6 if r.schedule.split_backward() else 0)
    if chunks == 1:
        assert sorted(labels) == sorted(str(e.action.microbatch) for e in timed)
    else:
        assert all("." in label for label in labels) and len(labels) == len(timed)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    kinds = {e.action.kind for e in r.events}
    assert len(legend) == len(kinds) and all(any(t.startswith(k) for t in legend) for k in kinds)
    assert f"{r.bubble_rate:.1%}" in ax.get_title()


def test_chrome_trace_has_one_event_per_action_on_its_rank():
    r = schedules.simulate("zb-h2", stages=4, microbatches=8)
    trace = chrome_trace(r)
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == len(r.events)
    assert {e["tid"] for e in xs} == set(range(4))
    first = min(xs, key=lambda e: (e["tid"], e["ts"]))
    assert first["name"] == "F0" and first["ts"] == 0


def test_cli_writes_png_and_trace(tmp_path, capsys):
    png, trace = tmp_path / "t.png", tmp_path / "t.json"
    assert main(["schedule", "--name", "zb-h2", "--stages", "4", "--microbatches", "8", "--png", str(png),
                 "--trace", str(trace)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len([e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]) == 3 * 4 * 8
    assert "bubble_rate=0.0000" in capsys.readouterr().out
    assert main(["schedule", "--name", "zb-h3", "--stages", "4", "--microbatches", "8"]) == 2


def test_plan_png_draws_the_pipelined_plans_schedule(tmp_path):
    png = tmp_path / "plan.png"
    assert main(["plan", "--model", "gpt:layers=4,hidden=256,heads=4,seq=128", "--batch", "16",
                 "--cluster", "a100-80g:1x4", "--pin", "pp=2", "--time-limit", "10", "--png", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG" and (tmp_path / "plan-stages.png").exists()
