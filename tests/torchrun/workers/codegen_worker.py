"""torchrun worker for tests/unit/test_codegen.py: emitted rank modules on gloo equal the model.

    torchrun --standalone --nproc-per-node 2 tests/torchrun/workers/codegen_worker.py [recompute]

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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "support"))

import codegen_fixtures as fx_  # noqa: E402

from fxplan.codegen.emit import emit_rank  # noqa: E402
from fxplan.codegen.groups import required_group_keys  # noqa: E402
from fxplan.codegen.params import unshard_ranks  # noqa: E402
from fxplan.runtime.collectives import GRAPH_OPS  # noqa: E402
from fxplan.runtime.comm import Communicator  # noqa: E402
from fxplan.plan import Strategy  # noqa: E402
from fxplan.runtime.launch import say


def check(name, comm, plan, model, inputs, traced, lg, space):
    rank, world = dist.get_rank(), dist.get_world_size()
    comm.groups.create(required_group_keys(plan))
    prog = emit_rank(traced, lg, space, plan, rank, ops=GRAPH_OPS)
    with comm.observe() as counter:
        loss = prog.gm(*inputs)
        loss.backward()
    ran = counter.snapshot()
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
            full = unshard_ranks(pieces, shard_of)
            torch.testing.assert_close(full, ref_grads[s0.name], rtol=1e-4, atol=1e-5, msg=f"{name}: {s0.name}")
            checked.add(s0.name)
        assert checked == set(ref_grads), (name, set(ref_grads) - checked)
        say(f"CASE {name} ok")
    dist.barrier()
    return ran


def calls(counts, phase, kind=None):
    return sum(c.calls for (k, _, ph), c in counts.items() if ph == phase and kind in (None, k))


def recompute_cases(comm, model, inputs, traced, lg, space):
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
        base = check(name, comm, fx_.make_plan(lg, world, one, strategy), model, inputs, traced, lg, space)
        rc = check(name + "_rc", comm, fx_.make_plan(lg, world, one, with_rc(strategy, which)), model, inputs,
                   traced, lg, space)
        # Recomputation re-runs forward collectives (during backward); backward ones are unchanged.
        assert calls(rc, "fwd") > calls(base, "fwd"), (name, calls(rc, "fwd"), calls(base, "fwd"))
        assert calls(rc, "bwd") == calls(base, "bwd"), (name, calls(rc, "bwd"), calls(base, "bwd"))
        if dist.get_rank() == 0:
            say(f"CASE {name}_rc collectives fwd {calls(base, 'fwd')} -> {calls(rc, 'fwd')}")


def fsdp_paths(comm, model, inputs, traced, lg, space):
    """The FSDP unit's three gradient paths agree: async reduce-scatter finished by the end-of-backward
    callback (.backward()), synchronous (autograd.grad), and emulated collectives (a torch whose gloo
    lacks reduce_scatter_tensor / all_gather_into_tensor); a second backward accumulates."""
    world = dist.get_world_size()
    plan = fx_.make_plan(lg, world, lambda layer: 0, fx_.uniform(world, 1, fsdp=True))
    comm.groups.create(required_group_keys(plan))
    prog = emit_rank(traced, lg, space, plan, dist.get_rank(), ops=GRAPH_OPS)
    attrs = [a for a, s in prog.params.items() if s.fsdp]
    shards = [prog.gm.get_parameter(a) for a in attrs]
    assert len({prog.params[a].fsdp_unit for a in attrs}) < len(attrs)  # units hold several parameters

    synced = torch.autograd.grad(prog.gm(*inputs), shards)
    drained = []  # how many async reduce-scatters each end-of-backward callback finished
    real_finish = comm.finish_deferred
    comm.finish_deferred = lambda: (drained.append(len(comm.deferred)), real_finish())
    try:
        prog.gm(*inputs).backward()
    finally:
        del comm.finish_deferred  # the class's method again
    units = {prog.params[a].fsdp_unit for a in attrs}
    assert sum(drained) == len(units) and not comm.deferred, drained
    for a, p, g in zip(attrs, shards, synced):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0, msg=a)
    if hasattr(dist, "reduce_scatter_single"):  # torch 2.13: gloo runs both flat ops natively
        assert comm.native_support() == {("all_gather", "gloo"): True, ("reduce_scatter", "gloo"): True}
    seen = []  # a hook on a shard: its unit falls back to the synchronous path, the hook sees the grad
    shards[0].register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    prog.gm(*inputs).backward()
    for a, p, g in zip(attrs, shards, synced):
        torch.testing.assert_close(p.grad, 2 * g, msg=a)
    assert len(seen) == 1 and torch.equal(seen[0], shards[0].grad)

    def unsupported(*args, **kwargs):
        raise RuntimeError("ProcessGroupGloo does not support this collective")
    names = ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor", "reduce_scatter_tensor")
    saved = {n: getattr(dist, n) for n in names if hasattr(dist, n)}
    try:
        for n in saved:
            setattr(dist, n, unsupported)
        # a communicator of its own (same groups) learns afresh that the native ops are missing
        with Communicator(comm.groups).installed() as emulated:
            for p in shards:
                p.grad = None
            prog.gm(*inputs).backward()
        assert emulated.native_support() == {("all_gather", "gloo"): False, ("reduce_scatter", "gloo"): False}
    finally:
        for n, fn in saved.items():
            setattr(dist, n, fn)
    for a, p, g in zip(attrs, shards, synced):
        torch.testing.assert_close(p.grad, g, msg=a)
    if dist.get_rank() == 0:
        say("CASE fsdp_paths ok")
    dist.barrier()


def main():
    dist.init_process_group("gloo")
    comm = Communicator().install()
    world = dist.get_world_size()
    model, inputs, traced, lg, space = fx_.setup(tp_degrees=(world,))
    if sys.argv[1:] == ["recompute"]:
        recompute_cases(comm, model, inputs, traced, lg, space)
        dist.destroy_process_group()
        return
    one = lambda layer: 0  # noqa: E731

    check("tp", comm, fx_.make_plan(lg, world, one, fx_.uniform(1, world, space)), model, inputs, traced, lg, space)
    check("dp_fsdp", comm, fx_.make_plan(lg, world, one, fx_.uniform(world, 1, fsdp=True)), model, inputs, traced,
          lg, space)

    def mixed(layer):  # embed / head data-parallel, blocks tensor-parallel (FSDP on the head)
        if layer.name.startswith("blocks"):
            return Strategy(1, world, spec=fx_.megatron_label(space, layer, world))
        return Strategy(world, 1, fsdp=layer.name == lg.layers[-1].name)
    check("mixed", comm, fx_.make_plan(lg, world, one, mixed), model, inputs, traced, lg, space)
    fsdp_paths(comm, model, inputs, traced, lg, space)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
