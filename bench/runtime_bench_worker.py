"""Per-rank program of bench/runtime_bench.py: fxplan's runtime against torch's own, step by step.

    torchrun --standalone --nproc-per-node 4 bench/runtime_bench_worker.py \
        --model gpt:layers=8,hidden=64,heads=4,seq=32,vocab=256,tied=false --batch 32 --plans DIR
    (DIR holds dp.json, pp.json, fsdp.json; bench/runtime_bench.py writes them and launches this)

Three pairs on one model and one global batch, each pair interleaved (fxplan, anchor, fxplan,
anchor, ...) so that load changes on a shared host hit both contenders alike:

  dp   : fxplan plan dp=4 (no fsdp, 1 microbatch)  vs DistributedDataParallel, batch/4 rows per rank
  pp   : fxplan plan pp=4, 1f1b, m microbatches    vs torch.distributed.pipelining Schedule1F1B on the
                                                     same split of the blocks, same m, loss on the last stage
  fsdp : fxplan plan dp=4 + fsdp (1 microbatch)     vs FSDP2 (fully_shard on every block and the root)

What is timed: one training step's forward + backward + gradient synchronisation (fxplan's
`train_step`; DDP/FSDP2's forward and `backward()`; the pipelining schedule's `step`), each started
right after a barrier. A step's time is the slowest rank's (all ranks start together at the
barrier, so the slowest rank's elapsed time is the step's makespan). The SGD step and zero_grad run
after the clock stops, for both contenders alike, so the models do train and their losses can be
compared at the first and the last step. Rank 0 prints one `RESULT {json}` line per pair.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from fxplan.runtime.launch import say

LR = 0.01


# ---------------------------------------------------------------- the model and its batch

def model_and_batch(spec: str, batch: int, seed: int = 0):
    """The same model (seed) and global batch (seed + 1) on every rank."""
    from fxplan.models import build, example_batch

    torch.manual_seed(seed)
    model = build(spec, device="cpu")
    generator = torch.Generator().manual_seed(seed + 1)
    return model, tuple(example_batch(model, batch, generator=generator))


def rank_rows(batch: tuple, rank: int, world: int) -> tuple:
    """This rank's equal share of the global batch (what DDP/FSDP ranks see)."""
    return tuple(b.chunk(world, dim=0)[rank] for b in batch)


# ---------------------------------------------------------------- contenders
# A contender is (step, parameters, owner): step() runs one timed training step and returns a
# callable that gives the full-batch loss as a float (read after the clock stops); parameters feed
# the untimed SGD step; owner keeps the wrapper alive. Every maker takes (model, batch, plan).

def fxplan_contender(model, batch, plan):
    import fxplan

    compiled = fxplan.compile(copy.deepcopy(model), batch, cluster=fxplan.Cluster.local(world_size=plan.world_size),
                              plan=plan, verbose=False)
    runner = compiled.distribute()

    def step():
        loss = runner.train_step(*batch)
        return lambda: float(loss)

    return step, list(runner.parameters()), runner


def _mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().clone().reshape(1)
    dist.all_reduce(value)
    return float(value) / dist.get_world_size()


def ddp_contender(model, batch, plan=None):
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(copy.deepcopy(model))
    rows = rank_rows(batch, dist.get_rank(), dist.get_world_size())

    def step():
        loss = ddp(*rows)
        loss.backward()  # DDP's all-reduce averages the gradients: the full-batch mean gradient
        return lambda: _mean_over_ranks(loss)

    return step, list(ddp.parameters()), ddp


def fsdp2_contender(model, batch, plan=None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    module = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in module.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    rows = rank_rows(batch, dist.get_rank(), dist.get_world_size())

    def step():
        loss = module(*rows)
        loss.backward()  # reduce-scatter averages over the mesh: the full-batch mean gradient
        return lambda: _mean_over_ranks(loss)

    return step, list(module.parameters()), module


class _FirstStage(nn.Module):
    """GPT embeddings and the first blocks (the GPT preset's forward, cut at a block boundary)."""

    def __init__(self, gpt, blocks):
        super().__init__()
        self.wte, self.wpe, self.blocks = gpt.wte, gpt.wpe, nn.ModuleList(blocks)

    def forward(self, tokens):
        x = self.wte(tokens) + self.wpe.weight[: tokens.size(1)]
        for block in self.blocks:
            x = block(x)
        return x


class _MiddleStage(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class _LastStage(nn.Module):
    """The last blocks, the final norm and the LM head; the loss is the schedule's loss_fn."""

    def __init__(self, gpt, blocks):
        super().__init__()
        self.blocks, self.ln_f, self.lm_head = nn.ModuleList(blocks), gpt.ln_f, gpt.lm_head

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def stage_blocks(plan) -> list[list[int]]:
    """Block indices per pipeline stage, read from fxplan's plan so both sides cut the model alike.

    The anchor's stage modules put the embeddings on the first stage and the norm + head on the
    last: a plan that places those layers elsewhere cannot be mirrored, so it is refused."""
    out = []
    last = len(plan.stages) - 1
    for i, stage in enumerate(plan.stages):
        blocks = []
        for name in stage.layers:
            m = re.fullmatch(r"blocks\.(\d+)", name)
            if m:
                blocks.append(int(m.group(1)))
            elif not ((name == "embed" and i == 0) or (name == "head" and i == last)):
                raise ValueError(f"stage {i} holds layer {name!r}; the pipelining anchor mirrors only plans with "
                                 f"'embed' on the first stage, 'head' on the last and blocks.N in between")
        out.append(blocks)
    return out


def pipelining_contender(model, batch, plan):
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    cfg = model.config
    if cfg.tied or cfg.dropout:
        raise SystemExit("the pipelining anchor needs an untied GPT without dropout (tied=false, dropout=0): "
                         "a head tied to the embedding would need a cross-stage gradient sum torch does not do")
    gpt = copy.deepcopy(model)
    rank, world = dist.get_rank(), dist.get_world_size()
    split = stage_blocks(plan)
    blocks = [gpt.blocks[i] for i in split[rank]]
    if rank == 0:
        module = _FirstStage(gpt, blocks)
    elif rank == world - 1:
        module = _LastStage(gpt, blocks)
    else:
        module = _MiddleStage(blocks)
    del gpt
    m = plan.microbatches
    rows = batch[0].shape[0] // m
    # Activations between stages are marked as requiring grad: torch sends/receives gradients only
    # for those (the shapes given here spare torch a shape-inference pass).
    hidden = torch.zeros(rows, cfg.seq, cfg.hidden).requires_grad_()
    stage = PipelineStage(module, rank, world, torch.device("cpu"),
                          input_args=(batch[0][:rows],) if rank == 0 else (hidden,),
                          output_args=(torch.zeros(rows, cfg.seq, cfg.vocab).requires_grad_(),)
                          if rank == world - 1 else (hidden,))

    def loss_fn(logits, target):
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))

    # scale_grads (default True) divides the summed microbatch gradients by m: the full-batch mean.
    schedule = Schedule1F1B(stage, n_microbatches=m, loss_fn=loss_fn)
    tokens, targets = batch

    def step():
        if rank == 0:
            schedule.step(tokens, return_outputs=False)
            losses = None
        elif rank == world - 1:
            losses = []
            schedule.step(target=targets, losses=losses, return_outputs=False)
        else:
            schedule.step(return_outputs=False)
            losses = None

        def read():
            value = torch.stack(losses).mean() if losses else torch.zeros(())
            return _mean_over_ranks(value) * world  # only the last stage contributes

        return read

    return step, list(module.parameters()), module


# ---------------------------------------------------------------- where the time goes (--profile)

# Not isend/irecv: dist.P2POp checks that its op IS dist.isend / dist.irecv, so a wrapper breaks it.
_WRAPPED = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
            "reduce_scatter_tensor", "reduce_scatter_single",
            "broadcast", "send", "recv", "batch_isend_irecv", "barrier")


class CollectiveTimer:
    """Counts torch.distributed calls and the wall time spent inside them (the blocking part only:
    an async op's wait is not seen here). Installed by --profile; patched at module level, so it
    sees fxplan's collectives and torch's wrappers alike as long as they call through `dist.*`."""

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.active = False
        for name in _WRAPPED:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.calls[name] = self.calls.get(name, 0) + 1
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    def take(self) -> dict:
        out = {k: dict(calls=self.calls[k], ms=self.seconds[k] * 1e3) for k in sorted(self.calls)}
        self.calls, self.seconds = {}, {}
        return out


TIMER: CollectiveTimer | None = None


# ---------------------------------------------------------------- the interleaved race

def timed(step) -> tuple[float, callable]:
    dist.barrier()
    if TIMER:
        TIMER.active = True
    start = time.perf_counter()
    read = step()
    elapsed = time.perf_counter() - start
    if TIMER:
        TIMER.active = False
    return elapsed, read


def race(contenders: dict, warmup: int, steps: int) -> dict:
    """Alternate the contenders step by step; per step the slowest rank's time; untimed SGD after each."""
    names = list(contenders)
    opts = {n: torch.optim.SGD(contenders[n][1], lr=LR) for n in names}
    times = {n: [] for n in names}
    losses = {n: [] for n in names}
    profile = {n: {} for n in names}
    for i in range(warmup + steps):
        for n in names:
            elapsed, read = timed(contenders[n][0])
            if TIMER:
                calls = TIMER.take()
                if i >= warmup:
                    for k, v in calls.items():
                        acc = profile[n].setdefault(k, dict(calls=0, ms=0.0))
                        acc["calls"] += v["calls"] / steps
                        acc["ms"] += v["ms"] / steps
            losses[n].append(read())
            opts[n].step()
            opts[n].zero_grad(set_to_none=True)
            if i >= warmup:
                times[n].append(elapsed)
    # Per step, the slowest rank's elapsed time (all ranks left the barrier together).
    table = torch.tensor([times[n] for n in names], dtype=torch.float64)
    dist.all_reduce(table, op=dist.ReduceOp.MAX)
    out = {}
    for n, row in zip(names, table.tolist()):
        out[n] = dict(median_ms=statistics.median(row) * 1e3, min_ms=min(row) * 1e3, max_ms=max(row) * 1e3,
                      steps_ms=[t * 1e3 for t in row], loss_first=losses[n][0], loss_last=losses[n][-1],
                      rank0_collectives_per_step=profile[n])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--plans", required=True, help="folder with dp.json, pp.json, fsdp.json (Plan.to_json)")
    parser.add_argument("--pairs", default="dp,pp,fsdp")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--profile", action="store_true", help="count and time torch.distributed calls per step")
    args = parser.parse_args()
    global TIMER
    if args.profile:
        TIMER = CollectiveTimer()

    import fxplan

    torch.set_num_threads(1)  # one core's share per rank: 4 ranks on a small host
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    model, batch = model_and_batch(args.model, args.batch)
    anchors = {"dp": ("torch DDP", ddp_contender), "pp": ("torch Schedule1F1B", pipelining_contender),
               "fsdp": ("torch FSDP2", fsdp2_contender)}
    for pair in args.pairs.split(","):
        with open(os.path.join(args.plans, f"{pair}.json")) as fh:
            plan = fxplan.Plan.from_json(fh.read())
        anchor_name, make_anchor = anchors[pair]
        ours = fxplan_contender(model, batch, plan)
        theirs = make_anchor(model, batch, plan)
        result = race({"fxplan": ours, anchor_name: theirs}, args.warmup, args.steps)
        if dist.get_rank() == 0:
            say("RESULT " + json.dumps(dict(pair=pair, anchor=anchor_name, microbatches=plan.microbatches,
                                               results=result)))
        del ours, theirs
        gc.collect()
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
