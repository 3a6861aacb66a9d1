"""torchrun worker for tests/test_codegen.py: emitted rank modules on gloo equal the model.

    torchrun --standalone --nproc-per-node 2 tests/workers/codegen_worker.py [recompute]

With the argument `recompute` it runs the recompute cases instead (tests/test_recompute.py): the
same plans with layers under activation checkpointing, whose forward collectives re-run in backward.
For each plan (one stage, microbatches=1): every rank emits its module, runs forward + backward on the
full batch; rank 0 reassembles the loss (sum over the loss layer's dp group) and every parameter's
gradient (dp sum or FSDP shards, tp pieces concatenated) and compares with the plain model.
Prints `CASE name ok` lines; any mismatch raises (non-zero exit).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import codegen_fixtures as fx_  # noqa: E402

from fxplan.codegen import collectives, groups  # noqa: E402
from fxplan.codegen.emit import emit_rank  # noqa: E402
from fxplan.codegen.params import unshard  # noqa: E402
from fxplan.plan import Strategy  # noqa: E402


def check(name, plan, model, inputs, traced, lg, space):
    rank, world = dist.get_rank(), dist.get_world_size()
    groups.create_groups(groups.required_group_keys(plan, lg, space))
    prog = emit_rank(traced, lg, space, plan, rank)
    collectives.reset_counts()
    loss = prog.gm(*inputs)
    loss.backward()
    ran = collectives.counts()
    grads = {attr: prog.gm.get_parameter(attr).grad.detach().clone() for attr, s in prog.params.items()
             if s.requires_grad}
    everything = [None] * world
    dist.all_gather_object(everything, (float(loss.detach()), prog.loss_scale, dict(prog.params), grads))
    if rank == 0:
        model.zero_grad()
        ref = model(*inputs)
        ref.backward()
        ref_grads = {k: p.grad for k, p in model.named_parameters()}
        loss_dp = round(1 / everything[0][1])
        total = sum(e[0] for e in everything) * loss_dp / world  # tp replicas hold equal losses
        assert abs(total - float(ref)) < 1e-4, (name, total, float(ref))
        checked = set()
        for attr in everything[0][2]:
            shard_of = {r: everything[r][2][attr] for r in range(world)}
            s0 = shard_of[0]
            if not s0.requires_grad:
                continue
            pieces = {}
            for r in range(world):
                g = everything[r][3][attr]
                if not s0.fsdp:  # dp-partial: sum over the ranks holding the same tp piece
                    g = sum(everything[o][3][attr] for o in range(world) if shard_of[o].tp_index == shard_of[r].tp_index)
                pieces[r] = g
            full = unshard(pieces, shard_of)
            torch.testing.assert_close(full, ref_grads[s0.name], rtol=1e-4, atol=1e-5, msg=f"{name}: {s0.name}")
            checked.add(s0.name)
        assert checked == set(ref_grads), (name, set(ref_grads) - checked)
        print(f"CASE {name} ok", flush=True)
    dist.barrier()
    return ran


def calls(counts, phase, kind=None):
    return sum(c.calls for (k, _, ph), c in counts.items() if ph == phase and kind in (None, k))


def recompute_cases(model, inputs, traced, lg, space):
    """tp / FSDP / mixed plans with recompute: exact, and the forward collectives ran again."""
    world = dist.get_world_size()
    one = lambda layer: 0  # noqa: E731

    def with_rc(strategy, which):
        def strat(layer):
            s = strategy(layer)
            return Strategy(s.dp, s.tp, fsdp=s.fsdp, recompute=which(layer), spec=s.spec)
        return strat

    def mixed(layer):
        if layer.name.startswith("blocks"):
            return Strategy(1, world, spec=fx_.megatron_label(space, layer, world))
        return Strategy(world, 1, fsdp=layer.name == lg.layers[-1].name)

    everything = lambda layer: True  # noqa: E731
    not_embed = lambda layer: layer.index > 0  # noqa: E731
    for name, strategy, which in (("tp", fx_.uniform(1, world, space), everything),
                                  ("dp_fsdp", fx_.uniform(world, 1, fsdp=True), everything),
                                  ("mixed", mixed, not_embed)):
        base = check(name, fx_.make_plan(lg, world, one, strategy), model, inputs, traced, lg, space)
        rc = check(name + "_rc", fx_.make_plan(lg, world, one, with_rc(strategy, which)), model, inputs, traced,
                   lg, space)
        # Recomputation re-runs forward collectives (during backward); backward ones are unchanged.
        assert calls(rc, "fwd") > calls(base, "fwd"), (name, calls(rc, "fwd"), calls(base, "fwd"))
        assert calls(rc, "bwd") == calls(base, "bwd"), (name, calls(rc, "bwd"), calls(base, "bwd"))
        if dist.get_rank() == 0:
            print(f"CASE {name}_rc collectives fwd {calls(base, 'fwd')} -> {calls(rc, 'fwd')}", flush=True)


def main():
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    model, inputs, traced, lg, space = fx_.setup(tp_degrees=(world,))
    if sys.argv[1:] == ["recompute"]:
        recompute_cases(model, inputs, traced, lg, space)
        dist.destroy_process_group()
        return
    one = lambda layer: 0  # noqa: E731

    check("tp", fx_.make_plan(lg, world, one, fx_.uniform(1, world, space)), model, inputs, traced, lg, space)
    check("dp_fsdp", fx_.make_plan(lg, world, one, fx_.uniform(world, 1, fsdp=True)), model, inputs, traced, lg, space)

    def mixed(layer):  # embed / head data-parallel, blocks tensor-parallel (FSDP on the head)
        if layer.name.startswith("blocks"):
            return Strategy(1, world, spec=fx_.megatron_label(space, layer, world))
        return Strategy(world, 1, fsdp=layer.name == lg.layers[-1].name)
    check("mixed", fx_.make_plan(lg, world, one, mixed), model, inputs, traced, lg, space)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
