"""The planner end to end: speed, miqp = exhaustive, miqp <= grid, memory
pressure, raw-parameter blocks, HF models. Figures for the same points: bench/plan_bench.py."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxplan
import toy_blocks
from fxplan.models import build, example_batch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GiB = 2**30


# ---------------------------------------------------------------- models


class Uneven(nn.Module):
    """Linear layers of the given widths: layers whose costs differ by orders of magnitude."""

    def __init__(self, widths):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x, y):
        for i, fc in enumerate(self.fcs):
            x = fc(x)
            if i < len(self.fcs) - 1:
                x = F.relu(x)
        return F.mse_loss(x, y)


def uneven(widths, batch, seq=None):
    with torch.device("meta"):
        model = Uneven(widths)
    shape = (batch,) if seq is None else (batch, seq)
    return model, (torch.empty(*shape, widths[0], device="meta"), torch.empty(*shape, widths[-1], device="meta"))


def preset(spec, batch):
    model = build(spec, device="meta")
    return model, example_batch(model, batch, device="meta")


def two_nodes(**overrides):
    """2 nodes x 2 devices, A100-like figures, slow links between the nodes."""
    figures = dict(nodes=2, devices_per_node=2, memory_bytes=80 * GiB, peak_flops=312e12, intra_bw=240e9,
                   inter_bw=25e9, half_efficiency_dim=1800)
    figures.update(overrides)
    return fxplan.Cluster(**figures)


def a100(nodes, devices=8, memory_gib=None):
    cluster = fxplan.Cluster.preset("a100-80g", nodes=nodes, devices_per_node=devices)
    return cluster if memory_gib is None else dataclasses.replace(cluster, memory_bytes=memory_gib * GiB)


def plan(model_inputs, cluster, planner="miqp", **kwargs):
    model, inputs = model_inputs
    return fxplan.compile(model, inputs, cluster=cluster, planner=planner, verbose=False, **kwargs).plan


def uniform_key(strategy):
    return (strategy.dp, strategy.tp, strategy.fsdp, strategy.recompute)


# ---------------------------------------------------------------- 1. the 48-layer GPT on 64 devices


def test_cli_48_layer_gpt_on_8x8_is_fast_with_small_gap(tmp_path):
    path = tmp_path / "p.json"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fxplan", "plan", "--model",
                           "gpt:layers=48,hidden=4096,heads=32,seq=2048", "--batch", "512",
                           "--cluster", "a100-80g:8x8", "--json", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=180)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # 20 s on an idle 2-core box; the CPU time is what the machine's other load cannot inflate
    assert cpu <= 20, f"planning took {cpu:.1f} s of CPU"
    assert wall <= 90, f"planning took {wall:.1f} s of wall time"
    data = json.loads(path.read_text())
    for key in ("pp", "microbatches", "schedule", "stages", "estimated_iteration_s", "solver"):
        assert key in data
    assert data["solver"]["gap"] <= 0.01
    assert sorted(d for s in data["stages"] for d in s["devices"]) == list(range(64))
    for stage in data["stages"]:
        assert stage["estimated_memory_bytes"] <= 80 * GiB
        assert stage["layers"] and set(stage["strategies"]) == set(stage["layers"])
    loaded = fxplan.Plan.from_json(path.read_text())
    assert loaded.pp == data["pp"] and len(loaded.layers) == 50


# ---------------------------------------------------------------- 2. miqp == exhaustive

EQUAL_CASES = {
    # name: (model and inputs, cluster, constraints)
    "mlp-1x4": (lambda: preset("mlp:layers=2,hidden=2048", 256), lambda: a100(1, 4), None),
    "uneven-1x4": (lambda: uneven([1024, 16384, 1024], 256), lambda: a100(1, 4), None),
    "uneven-2x2": (lambda: uneven([1024, 16384, 1024], 256), two_nodes, None),
    "uneven4-2x2-tight": (lambda: uneven([256, 8192, 256, 8192], 512, 64), lambda: two_nodes(memory_bytes=0.6 * GiB),
                          fxplan.Constraints(schedule="1f1b")),
    "gpt-2x2": (lambda: preset("gpt:layers=2,hidden=1024,heads=8,seq=256", 16), two_nodes,
                fxplan.Constraints(schedule="1f1b", microbatches=4)),
    "llama-1x4": (lambda: preset("llama:layers=2,hidden=1024,heads=8,seq=256", 16), lambda: a100(1, 4),
                  fxplan.Constraints(schedule="1f1b", microbatches=4, recompute=False)),
}


@pytest.mark.parametrize("name", sorted(EQUAL_CASES))
def test_miqp_equals_exhaustive(name):
    make, cluster, constraints = EQUAL_CASES[name]
    model_inputs, cl = make(), cluster()
    miqp = plan(model_inputs, cl, "miqp", constraints=constraints)
    brute = plan(model_inputs, cl, "exhaustive", constraints=constraints)
    assert miqp.solver.gap <= 1e-6
    assert miqp.estimated_iteration_s == pytest.approx(brute.estimated_iteration_s, rel=1e-6)


def test_equal_cases_are_uneven_and_span_nodes():
    """The instances above are not all alike: layer costs differ > 10x, and some cluster has 2 nodes."""
    from fxplan.planner import analyse

    model, inputs = uneven([1024, 16384, 1024], 256)
    lg = analyse(model, inputs, a100(1, 4), fxplan.Constraints()).layer_graph
    flops = [layer.flops for layer in lg.layers if layer.flops > 0]
    assert max(flops) / min(flops) > 10
    assert two_nodes().nodes == 2


# ---------------------------------------------------------------- 3. miqp <= grid


# (the MILP by itself against the grid and brute force: tests/unit/test_milp_alone.py)


def test_miqp_clearly_beats_grid_on_uneven_layers():
    """Two heavy layers then seven light ones, 4 stages on 4x8: grid's equal layer counts put both heavy
    layers on stage 0; the MIQP gives them stages of their own."""
    model_inputs = uneven([4096, 32768, 4096, 4096, 4096, 4096, 4096, 4096, 4096], 64, 1024)
    pins = fxplan.Constraints(pp=4)
    grid = plan(model_inputs, a100(4), "grid", constraints=pins)
    miqp = plan(model_inputs, a100(4), "miqp", constraints=pins)
    assert grid.estimated_iteration_s / miqp.estimated_iteration_s > 1.3
    counts = [len(s.layers) for s in miqp.stages]
    assert len(set(counts)) > 1  # unequal stages
    assert [len(s.layers) for s in grid.stages] != counts


def test_miqp_mixes_strategies_inside_a_stage_on_a_big_gpt():
    """The 48-layer GPT on 8x8 (see test 1) at 8 stages of 32 microbatches: some stage runs layers under
    different (dp, tp, fsdp, recompute) (the embedding's table sharded, the blocks not), which a
    uniform grid cannot express; its plan is slower. (Unpinned, plans within the 0.5 % gap that do
    not mix exist at other depths.)"""
    model_inputs = preset("gpt:layers=48,hidden=4096,heads=32,seq=2048", 512)
    pins = fxplan.Constraints(pp=8, microbatches=32)
    miqp = plan(model_inputs, a100(8), constraints=pins)
    assert any(len({uniform_key(s) for s in stage.strategies.values()}) > 1 for stage in miqp.stages)
    grid = plan(model_inputs, a100(8), "grid", constraints=pins)
    assert miqp.estimated_iteration_s < grid.estimated_iteration_s


# ---------------------------------------------------------------- 4. raw parameters + F.linear

C, H = 256, 8


def LinearBlock():
    return toy_blocks.Block(C, H)


def RawBlock():
    return toy_blocks.RawBlock(C, H)


def test_raw_parameter_blocks_get_the_same_plan():
    plans = []
    for block in (LinearBlock, RawBlock):
        with torch.device("meta"):
            model = toy_blocks.Stack(block, n=4)
        x = torch.empty(32, 512, C, device="meta")
        # tp pinned: the point is which tensor-parallel shardings propagation finds, not whether tp pays
        plans.append(fxplan.compile(model, (x,), cluster=a100(1, 8), constraints=fxplan.Constraints(tp=4),
                                    verbose=False).plan)
    a, b = plans
    assert a.pp == b.pp and a.microbatches == b.microbatches
    assert [s.strategies[n] for s in a.stages for n in s.layers] == \
        [s.strategies[n] for s in b.stages for n in s.layers]
    # the raw blocks after the first count 0.1 % more FLOPs per device under the chosen sharding (an
    # elementwise op propagation leaves whole there), so the estimates agree to 1e-3, not exactly
    assert a.estimated_iteration_s == pytest.approx(b.estimated_iteration_s, rel=1e-3)
    blocks = [s for stage in a.stages for n, s in stage.strategies.items() if n.startswith("blocks.")]
    assert blocks and all(s.tp == 4 and s.spec != "R" for s in blocks)


# ---------------------------------------------------------------- 5. memory pressure


def test_memory_pressure_moves_from_dp_to_fsdp_recompute_and_pipelines():
    model_inputs = preset("gpt:layers=8,hidden=2048,heads=16,seq=1024", 32)
    steps = []
    for gib in (80, 4, 2, 1.2):
        p = plan(model_inputs, a100(1, 8, memory_gib=gib))
        strategies = [s for stage in p.stages for s in stage.strategies.values()]
        steps.append((gib, p))
        assert max(stage.estimated_memory_bytes for stage in p.stages) <= gib * GiB * (1 + 1e-9)
    roomy = steps[0][1]
    # plenty of memory: no pipeline, nothing FSDP-sharded or recomputed (tp may appear where the cost
    # model finds it faster than pure dp8)
    assert roomy.pp == 1
    assert all(not s.fsdp and not s.recompute for st in roomy.stages for s in st.strategies.values())
    roomy_tp = max(s.tp for st in roomy.stages for s in st.strategies.values())
    roomy_dp = min(s.dp for st in roomy.stages for s in st.strategies.values())

    def pressure(p):  # how many memory-saving measures the plan takes (fewer dp replicas of a weight is one)
        ss = [s for stage in p.stages for s in stage.strategies.values()]
        return (p.pp > 1) + any(s.fsdp for s in ss) + any(s.recompute for s in ss) + any(s.tp > roomy_tp for s in ss) \
            + any(s.dp < roomy_dp for s in ss)

    levels = [pressure(p) for _, p in steps]
    assert levels[0] == 0 and levels[-1] >= 2 and levels == sorted(levels)
    times = [p.estimated_iteration_s for _, p in steps]
    assert times == sorted(times)  # less memory never buys a faster plan


def test_infeasible_error_states_needed_and_available_memory():
    model_inputs = preset("gpt:layers=4,hidden=1024,heads=8,seq=512", 16)
    with pytest.raises(fxplan.InfeasiblePlanError) as info:
        plan(model_inputs, a100(1, 2, memory_gib=0.01))
    message = str(info.value)
    figures = [float(x) for x in re.findall(r"(\d+\.\d+) GiB", message)]
    assert len(figures) == 2, message
    need, have = figures
    assert have == pytest.approx(0.01, abs=0.005) and need > have
    # the figure is right: with that much memory a plan exists, with a bit less none does
    p = plan(model_inputs, a100(1, 2, memory_gib=need + 0.01))
    assert max(s.estimated_memory_bytes for s in p.stages) <= (need + 0.01) * GiB
    with pytest.raises(fxplan.InfeasiblePlanError):
        plan(model_inputs, a100(1, 2, memory_gib=need * 0.98))


# ---------------------------------------------------------------- 6. GPT-3 175B on 1024 devices


@pytest.mark.slow
def test_gpt3_175b_on_128x8_plans_in_a_minute(tmp_path):
    path = tmp_path / "p.json"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-c", (
        "import resource, sys; from fxplan.cli import main\n"
        "rc = main(['plan', '--model', 'gpt:size=gpt3-175b', '--batch', '1536', '--cluster', 'a100-80g:128x8',"
        f" '--json', {str(path)!r}])\n"
        # VmHWM, not ru_maxrss: Linux carries the parent's (pytest's) high-water mark across fork and exec
        "print('RSS', int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM'))))\n"
        "sys.exit(rc or 0)")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu <= 60
    rss_kib = int(re.search(r"RSS (\d+)", proc.stdout).group(1))
    assert rss_kib < 2 * 1024 * 1024
    data = json.loads(path.read_text())
    assert sorted(d for s in data["stages"] for d in s["devices"]) == list(range(1024))


# ---------------------------------------------------------------- 7. HF transformers


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_transformers_models_trace_coarsen_and_plan(family):
    transformers = pytest.importorskip("transformers")
    if family == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=128, vocab_size=128,
                                          max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 128, (8, 16))
    compiled = fxplan.compile(toy_blocks.LossOf(model), (ids, ids), cluster=a100(1, 4), verbose=False)
    layers = compiled.layer_graph.layers
    assert len(layers) >= 3  # embeddings, the 2 blocks (at least), head
    assert sum(layer.param_numel for layer in layers) == sum(p.numel() for p in model.parameters())
    p = compiled.plan
    assert sorted(d for s in p.stages for d in s.devices) == [0, 1, 2, 3]
    assert p.estimated_iteration_s > 0 and p.solver.status == "optimal"


def test_a_pinned_fsdp_plan_with_parameterless_layers_loads_back():
    """A pinned fsdp=True plan marks the loss layer (no parameters) fsdp too; given back through
    compile(plan=) it is accepted and scored at the same estimate."""
    model, batch = preset("gpt:layers=6,hidden=96,heads=6,seq=32,vocab=3000,tied=false", 8)
    cluster = a100(1, 4)
    pinned = fxplan.compile(model, batch, cluster=cluster, verbose=False,
                            constraints=fxplan.Constraints(pp=1, dp=4, tp=1, fsdp=True, microbatches=1)).plan
    assert all(s.fsdp for st in pinned.stages for s in st.strategies.values())
    again = fxplan.compile(model, batch, cluster=cluster, verbose=False, plan=fxplan.Plan.from_json(pinned.to_json())).plan
    assert again.estimated_iteration_s == pytest.approx(pinned.estimated_iteration_s, rel=1e-9)
