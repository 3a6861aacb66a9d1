"""torchrun worker: architectures from tests/support/hf_zoo.py under several plans next to one device.

    torchrun --standalone --nproc-per-node 4 tests/torchrun/workers/zoo_worker.py --models gpt2,bert \\
        --plans dp4,tp4,pp2dp2,auto [--steps 2]

Per (model, plan): compile through the public API on Cluster.local(4), distribute, train `steps` SGD
steps beside the same steps on one device. Rank 0 prints `RESULT {json}` with the losses, the largest
parameter/buffer differences against one device (an allclose check at rtol 1e-4, atol 1e-5), the summed
FLOPs of every rank's steps (FlopCounterMode around train_step) beside one device's, and the summed local
parameter numel beside the model's. A case that raises prints its error instead (the other cases go on).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "support"))

import fxplan  # noqa: E402
import hf_zoo  # noqa: E402
from fxplan.runtime.launch import say

PINS = {
    "dp4": dict(dp=4, pp=1),
    "tp4": dict(tp=4, pp=1),
    "dp2tp2": dict(dp=2, tp=2, pp=1),
    "pp2dp2": dict(pp=2, dp=2, microbatches=4, schedule="1f1b"),
    "pp4": dict(pp=4, microbatches=4, schedule="1f1b"),
    "pp2dp2mb1": dict(pp=2, dp=2, microbatches=1),
    "pp4mb1": dict(pp=4, microbatches=1, schedule="gpipe"),
    "auto": {},
    # sequence parallelism pinned, with the batch cut into microbatches (and dp): a rank's rows are
    # fewer than the traced batch's
    "sp4": dict(pp=1, dp=1, tp=4, microbatches=2, sp=True, fsdp=False),
    "sp2dp2": dict(pp=1, dp=2, tp=2, microbatches=2, sp=True, fsdp=False),
}
LR, RTOL, ATOL = 0.05, 1e-4, 1e-5


# FlopCounterMode's own formulas, corrected where they cannot compare a rank with one device: the CPU
# fused attention kernel (scaled_dot_product_attention's kernel here) is not counted at all, while a
# graph that runs attention as matmuls is; a grouped convolution's weight gradient is counted as if
# every input channel met every output channel (depthwise: `channels` times its work), so a rank
# holding a quarter of the groups counted a sixteenth. Attention as the CUDA kernels are counted; a
# convolution's backward as what it is, one conv-sized product per gradient asked for.
def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    forward = 2 * math.prod(x_shape if transposed else grad_out_shape) * math.prod(w_shape[1:])
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop,
                 torch.ops.aten.convolution_backward: _conv_backward_flop}


def _flops(fn, by_op: dict | None = None) -> tuple[object, int]:
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    with counter:
        out = fn()
    if by_op is not None:
        for op, n in counter.get_flop_counts().get("Global", {}).items():
            by_op[str(op)] = by_op.get(str(op), 0) + int(n)
    return out, int(counter.get_total_flops())


def _max_excess(full: dict, ref: dict) -> tuple[float, float, bool]:
    """(largest |difference|, largest difference beyond atol + rtol*|ref|, all close)."""
    worst, beyond = 0.0, 0.0
    for k, r in ref.items():
        d = (full[k].double() - r.detach().double()).abs()
        worst = max(worst, float(d.max()) if d.numel() else 0.0)
        over = d - (ATOL + RTOL * r.detach().double().abs())
        beyond = max(beyond, float(over.max()) if over.numel() else 0.0)
    return worst, beyond, beyond <= 0.0


def run_case(name: str, plan_name: str, steps: int, cluster) -> dict:
    model, first = hf_zoo.build(name)
    reference = copy.deepcopy(model)
    batches = [first] + [hf_zoo.batch(name, seed=2 + i) for i in range(steps - 1)]
    pins = PINS[plan_name]
    t0 = time.time()
    compiled = fxplan.compile(model, first, cluster=cluster, verbose=False, time_limit_s=20,
                              constraints=fxplan.Constraints(**pins) if pins else None)
    runner = compiled.distribute()
    opt = torch.optim.SGD(runner.parameters(), lr=LR)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=LR)
    losses, ref_losses, flops, ref_flops = [], [], 0, 0
    by_op, ref_by_op = {}, {}  # this rank's and one device's FLOPs per op (what a ratio is made of)
    for b in batches:
        opt.zero_grad()
        loss, f = _flops(lambda: runner.train_step(*b), by_op)
        flops += f
        opt.step()
        losses.append(float(loss))
        ref_opt.zero_grad()

        def one_device():
            out = reference(*b)
            out.backward()
            return out

        ref_loss, f = _flops(one_device, ref_by_op)
        ref_flops += f
        ref_opt.step()
        ref_losses.append(float(ref_loss.detach()))
    total = torch.tensor([flops, sum(p.numel() for p in runner.parameters())], dtype=torch.float64)
    dist.all_reduce(total)
    full = runner.full_state_dict()
    state = reference.state_dict()
    params = dict(reference.named_parameters())
    p_diff, p_beyond, p_close = _max_excess(full, params)
    buffers = {k: v for k, v in state.items() if k not in params and v.is_floating_point()}
    b_diff, _, b_close = _max_excess(full, buffers) if buffers else (0.0, 0.0, True)
    l_close = all(abs(a - b) <= ATOL + RTOL * abs(b) for a, b in zip(losses, ref_losses))
    plan = compiled.plan
    return dict(
        model=name, plan=plan_name, ok=bool(p_close and b_close and l_close and sorted(full) == sorted(state)),
        losses=losses, reference=ref_losses, param_diff=p_diff, param_beyond_tol=p_beyond, buffer_diff=b_diff,
        keys_equal=sorted(full) == sorted(state), flops_ratio=float(total[0]) / max(ref_flops, 1),
        numel_ratio=float(total[1]) / sum(p.numel() for p in params.values()),
        pp=plan.pp, microbatches=plan.microbatches, schedule=plan.schedule, layers=len(plan.layers),
        # the slowest stage's estimated compute over the stages' mean (1.0: even)
        stage_balance=max(s.estimated_compute_s for s in plan.stages) * plan.pp /
        max(sum(s.estimated_compute_s for s in plan.stages), 1e-30),
        strategies=sorted({f"dp{s.dp}tp{s.tp}{'' if s.spec in ('', 'R') else ':' + s.spec}"
                           for st in plan.stages for s in st.strategies.values()})[:6],
        flops_by_op=by_op, reference_flops_by_op=ref_by_op,
        method=compiled.traced.method, seconds=round(time.time() - t0, 1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="")
    parser.add_argument("--cases", default="", help="model:plan,... instead of --models x --plans")
    parser.add_argument("--plans", default="dp4,tp4,pp2dp2,auto")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cluster = fxplan.Cluster.local(world_size=dist.get_world_size())
    cases = [tuple(c.split(":")) for c in args.cases.split(",") if c] or \
        [(m, p) for m in args.models.split(",") if m for p in args.plans.split(",")]
    for name, plan_name in cases:
        try:
            result = run_case(name, plan_name, args.steps, cluster)
        except fxplan.FxplanError as exc:  # raised alike on every rank (planning is shared)
            result = dict(model=name, plan=plan_name, ok=False, refused=type(exc).__name__,
                          error=str(exc)[:600])
        except Exception as exc:  # noqa: BLE001 - report and go on with the next case
            result = dict(model=name, plan=plan_name, ok=False, error=f"{type(exc).__name__}: {exc}"[:600],
                          where=traceback.format_exc()[-1200:])
        if dist.get_rank() == 0:
            say("RESULT " + json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
