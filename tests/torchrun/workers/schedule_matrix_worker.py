"""torchrun worker for tests/torchrun/test_schedule_matrix.py and bench/schedule_matrix.py: the
zero-bubble and the chunked (interleaved-1f1b, zbv) schedules train like one device, ONE launch per
model running many plans.

    torchrun --standalone --nproc-per-node 4 tests/torchrun/workers/schedule_matrix_worker.py \
        --model gpt --plans pp4-zb-h1,pp2xdp2-fsdp-zb-auto

A plan name is <layout>-<schedule>; layouts: pp4, pp2xtp2 (Megatron tp), pp2xdp2, pp2xdp2-fsdp
(ZeRO-3), pp2xdp2-fsdp-keep. The equivalence checks are runtime_matrix_worker's (3 SGD steps
beside one device, all parameters); each rank also reads back the compute actions torch's runtime
loaded and reports whether they equal fxplan.schedules' lists for the plan, the ones the simulator
times.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import runtime_matrix_worker as base  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from fxplan import schedules  # noqa: E402

LAYOUTS = ("pp2xdp2-fsdp-keep", "pp2xdp2-fsdp", "pp2xdp2", "pp2xtp2", "pp4")


class TiedLM(base.CustomLM):
    """The custom model with its head tied to its embedding (one weight on the first and last stage)."""

    def __init__(self):
        super().__init__()
        self.head.weight = self.embed.weight


_build = base.build


def build(name: str, device: str = "cpu"):
    if name == "custom-tied":
        torch.manual_seed(0)
        with torch.device(device):
            return TiedLM()
    return _build(name, device)


def split_name(name: str) -> tuple[str, str]:
    for layout in LAYOUTS:
        if name.startswith(layout + "-"):
            return layout, name[len(layout) + 1:]
    raise SystemExit(f"unknown plan {name}")


def make_plan(name: str, model, batch):
    layout, schedule = split_name(name)
    c = base._compile
    if layout == "pp4":
        return c(model, batch, pp=4, microbatches=4, schedule=schedule, fsdp=False)
    if layout == "pp2xtp2":
        first = c(model, batch, pp=2, dp=1, tp=2, fsdp=False, microbatches=4, schedule=schedule)
        return c(model, batch, plan=base.real_tp(first))
    if layout == "pp2xdp2":
        return c(model, batch, pp=2, dp=2, tp=1, fsdp=False, microbatches=4, schedule=schedule)
    keep = layout.endswith("-keep")
    return c(model, batch, pp=2, dp=2, tp=1, fsdp=True, reshard=not keep, recompute=False, microbatches=4,
             schedule=schedule)


_RUNNERS: list = []
_train = base.train_beside_one_device


def _train_and_keep(runner, *args, **kwargs):
    _RUNNERS.append(runner)
    return _train(runner, *args, **kwargs)


def run_plan(model_name: str, plan_name: str) -> dict:
    _RUNNERS.clear()
    result = base._run_plan(model_name, plan_name)
    runner = _RUNNERS[-1]
    loaded = [list(a) for a in runner._pipe.loaded_actions()]
    simulated = [[a.stage, a.kind, a.microbatch] for a in schedules.for_plan(runner.plan).actions[runner.place]]
    same: list = [None] * dist.get_world_size()
    dist.all_gather_object(same, loaded == simulated)
    result["actions_equal_simulated"] = all(same)
    result["split_backward"] = any(kind == "I" for _, kind, _ in loaded)
    return result


base.build = build
base.make_plan = make_plan
base.train_beside_one_device = _train_and_keep
base._run_plan = base.run_plan
base.run_plan = run_plan

if __name__ == "__main__":
    base.main()
