"""Cluster, Constraints, Plan JSON and the CLI surface of the public contract."""

import json
import subprocess
import sys

import pytest

import fxplan
from fxplan.constraints import RUNNABLE_SCHEDULES, SCHEDULES
from fxplan.plan import Plan, SolverInfo, Stage, Strategy


def test_cluster_presets_and_validation():
    c = fxplan.Cluster.preset("a100-80g", nodes=4, devices_per_node=8)
    assert c.world_size == 32 and 0.85 * 80 * 2**30 <= c.memory_bytes < 80 * 2**30
    assert {"a100-40g", "a100-80g", "h100-80g"} <= set(fxplan.Cluster.presets())
    with pytest.raises(fxplan.ClusterError, match="known presets: a100-40g, a100-80g, h100-80g"):
        fxplan.Cluster.preset("v100")
    with pytest.raises(fxplan.ClusterError, match="nodes"):
        fxplan.Cluster.preset("h100-80g", nodes=0)
    with pytest.raises(fxplan.ClusterError, match="memory_bytes"):
        fxplan.Cluster(memory_bytes=-1, peak_flops=1e12, intra_bw=1e9, inter_bw=1e9)
    explicit = fxplan.Cluster(nodes=2, devices_per_node=4, memory_bytes=16e9, peak_flops=100e12,
                              intra_bw=100e9, inter_bw=10e9)
    assert explicit.world_size == 8 and explicit.node_of(5) == 1
    assert fxplan.Cluster.parse("h100-80g:2x8").world_size == 16
    with pytest.raises(fxplan.ClusterError, match="NODESxDEVICES"):
        fxplan.Cluster.parse("h100-80g:2by8")
    assert issubclass(fxplan.ClusterError, fxplan.FxplanError)


def test_constraints_parse_and_validate():
    c = fxplan.Constraints.parse("pp=2, tp=4, fsdp=true, schedule=1f1b")
    assert (c.pp, c.tp, c.fsdp, c.schedule, c.dp) == (2, 4, True, "1f1b", None)
    for bad in ("pp=x", "zz=1", "fsdp=maybe", "schedule=foo", "pp=0"):
        with pytest.raises(fxplan.ConstraintError):
            fxplan.Constraints.parse(bad)
    # a pinned field allows its value only, an unpinned one anything
    assert c.allows(pp=2, tp=4, fsdp=True, schedule="1f1b", dp=8) and c.allows()
    assert not c.allows(pp=1) and not c.allows(fsdp=False) and not c.allows(tp=4, schedule="gpipe")
    assert set(RUNNABLE_SCHEDULES) <= set(SCHEDULES)


def _plan():
    stages = (
        Stage(index=0, layers=("embed", "h.0"), devices=(0, 1),
              strategies={"embed": Strategy(dp=2, tp=1), "h.0": Strategy(dp=1, tp=2, spec="col>row")},
              estimated_memory_bytes=1e9),
        Stage(index=1, layers=("h.1", "head"), devices=(2, 3),
              strategies={"h.1": Strategy(dp=2, tp=1, fsdp=True), "head": Strategy(dp=2, tp=1, recompute=True)}),
    )
    return Plan(pp=2, microbatches=4, schedule="1f1b", stages=stages, estimated_iteration_s=0.5,
                solver=SolverInfo(status="optimal", objective=0.5, gap=0.0, seconds=0.1), batch_size=8,
                world_size=4)


def test_plan_json_round_trip_and_validation():
    plan = _plan()
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.stages[0].strategies["h.0"].spec == "col>row"
    assert "stage" in plan.summary() and "h.1" in plan.summary()
    with pytest.raises(fxplan.PlanFileError, match="not valid JSON"):
        Plan.from_json("{oops")
    data = json.loads(plan.to_json())
    data["version"] = 99
    with pytest.raises(fxplan.PlanFileError, match="version"):
        Plan.from_json(json.dumps(data))
    data = json.loads(plan.to_json())
    data["stages"][0]["strategies"]["embed"]["dp"] = 4
    with pytest.raises(fxplan.PlanFileError, match="dp\\*tp"):
        Plan.from_json(json.dumps(data))
    data = json.loads(plan.to_json())
    data["stages"][1]["devices"] = [2, 2]
    with pytest.raises(fxplan.PlanFileError, match="cover"):
        Plan.from_json(json.dumps(data))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fxplan", *args], capture_output=True, text=True, timeout=120)


def test_cli_help_describes_api():
    top = _cli("--help")
    assert top.returncode == 0
    for word in ("plan", "schedule", "demo"):
        assert word in top.stdout
    sub = _cli("plan", "--help")
    assert sub.returncode == 0
    for flag in ("--model", "--batch", "--cluster", "--pin", "--planner", "--time-limit", "--json", "--png",
                 "miqp", "grid", "exhaustive", "PRESET:NODESxDEVICES"):
        assert flag in sub.stdout, flag
    sched = _cli("schedule", "--help")
    for flag in ("--name", "--stages", "--microbatches", "--png", "--trace"):
        assert flag in sched.stdout


def test_cli_bad_argument_is_one_line():
    out = _cli("plan", "--model", "gpt", "--batch", "8", "--cluster", "nosuch:1x8")
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "known presets" in out.stderr
    out = _cli("plan", "--batch", "x")
    assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1


def test_cli_plan_writes_json_and_png(tmp_path):
    out = _cli("plan", "--model", "mlp", "--batch", "8", "--cluster", "a100-80g:1x2",
               "--json", str(tmp_path / "p.json"), "--png", str(tmp_path / "p.png"))
    assert out.returncode == 0, out.stderr
    plan = Plan.from_json((tmp_path / "p.json").read_text())
    assert plan.world_size == 2 and sorted(d for s in plan.stages for d in s.devices) == [0, 1]
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "estimated iteration" in out.stdout
