"""Which collectives a placement change implies: the single source of truth for costs and codegen.

Shared semantics (codegen and the cost model both follow them):
- tp axis: a tensor is R, S(dim) or P. The gradient of every R tensor is COMPLETE on every tp rank.
- `transition(src, dst)` is a change of placement on the tp axis. Forward / backward pairs:
      R    -> S(d)   slice             / all-gather(d)
      S(d) -> R      all-gather(d)     / slice (the R gradient is complete: no comm)
      P    -> R      all-reduce  (g)   / identity
      P    -> S(d)   reduce-scatter(d) / all-gather(d)
      S(d) -> S(e)   all-to-all(d->e)  / all-to-all(e->d)
      R    -> P      keep on tp rank 0, zeros elsewhere / all-reduce (the local gradients are
                     partial: only rank 0's addend carries it)
      S(d) -> P      = S(d) -> R -> P
      P    -> P, R -> R, S(d) -> S(d): nothing
- The f rule: an R tensor consumed as R by an op whose compute is sharded (any input or its output
  is S or P on tp) gets Megatron's f: identity forward, all-reduce of the gradient over the tp group
  backward (each rank's local gradient is only its shard's contribution). One f per tensor serves
  every sharded consumer (the sum of the partials is all-reduced once); replicated consumers keep
  the f-less tensor. `consume_steps` applies it; when a gathered S(d) -> R copy feeds ONLY sharded
  consumers, gather + f fuse into all-gather / reduce-scatter (the same numbers, half the bytes).
- `layout_steps(src, dst, meta, requires_grad)`: the conversion on an edge between two layers with
  layouts (dp, tp, placement) on the same stage: make the tensor tp-R in the source layout, change
  the batch split dp_src -> dp_dst, apply the destination placement; and for a batch-less tensor
  that requires grad (a shared weight) whose dp groups differ, fix the gradient's dp convention.

Ranks: a layout's mesh is (dp, tp), tp innermost: stage-local position q = dp_index * tp + tp_index.
"""

from __future__ import annotations

from dataclasses import dataclass

from fxplan.passes.ir import P, R, Comm, Partial, Placement, Replicate, Shard, TensorMeta

# ---------------------------------------------------------------- steps


@dataclass(frozen=True, slots=True)
class Step:
    """One conversion codegen emits as one autograd Function (forward collective, backward dual).

    kind (what to emit):
      "slice"           fwd: take this rank's slice along `dim`     bwd: all-gather along `dim`
      "gather"          fwd: all-gather along `dim`                 bwd: take the local slice
      "gather_rs"       fwd: all-gather along `dim`                 bwd: reduce-scatter along `dim`
      "g"               fwd: all-reduce                              bwd: identity
      "f"               fwd: identity                                bwd: all-reduce
      "reduce_scatter"  fwd: reduce-scatter along `dim`             bwd: all-gather along `dim`
      "all_to_all"      fwd: all-to-all split `dim` / concat `dim2` bwd: the reverse all-to-all
      "partial"         fwd: keep on group rank 0, zeros elsewhere  bwd: all-reduce
      "slice_rows"      fwd: keep rows block `index` of `parts` along `dim` (local)
                        bwd: all-gather rows along `dim` over `group` ranks
      "gather_rows"     fwd: all-gather rows along `dim` over `group` ranks, then keep block
                        (`parts` > 1: the gathered rows are cut in `parts` and one is kept)
                        bwd: local slice (`bwd` None) or, when the kept block does not contain the
                        rank's own rows, all-gather of the gradient rows over `bwd_group` ranks
      "dp_grad"         fwd: identity       bwd: all-reduce over `group` (dst dp group), * `scale`
    axis: "tp" (a tp group of the layout with `tp`), "dp" (ranks of one stage holding different
      rows, `group` of them).
    fwd / bwd: collective kind in that phase or None (local). `fwd_bytes` / `bwd_bytes`: fraction of
      the tensor's GLOBAL bytes in one collective's full buffer (see steps_comms).
    """

    kind: str
    axis: str
    group: int
    fwd: str | None
    bwd: str | None
    dim: int | None = None
    dim2: int | None = None
    fwd_bytes: float = 1.0
    bwd_bytes: float = 1.0
    parts: int = 1
    bwd_group: int = 0  # group of the backward collective when it differs from `group`
    scale: float = 1.0
    src: Placement | None = None
    dst: Placement | None = None
    blocks: int = 1  # a tp step on a blocked shard (Shard.blocks): done on each block alike


def _is_s(p) -> bool:
    return isinstance(p, Shard)


def transition(src: Placement, dst: Placement, tp: int) -> tuple[Step, ...]:
    """Steps that turn a tensor placed `src` into `dst` on a tp group of `tp` ranks (no f rule)."""
    if src == dst or tp == 1:
        return ()
    if _blocked(src) or _blocked(dst):  # through R: a blocked shard is gathered / cut per block
        if isinstance(src, Partial):
            return (Step("reduce_scatter", "tp", tp, "reduce_scatter", "all_gather", dim=dst.dim, src=src, dst=dst,
                         blocks=dst.blocks),)
        if isinstance(src, Replicate):
            if isinstance(dst, Shard):
                return (Step("slice", "tp", tp, None, "all_gather", dim=dst.dim, src=src, dst=dst, blocks=dst.blocks),)
            return transition(src, dst, tp)
        if isinstance(dst, Replicate):
            return (Step("gather", "tp", tp, "all_gather", None, dim=src.dim, src=src, dst=dst, blocks=src.blocks),)
        return transition(src, R, tp) + transition(R, dst, tp)
    if isinstance(src, Partial):
        if isinstance(dst, Replicate):
            return (Step("g", "tp", tp, "all_reduce", None, src=src, dst=dst),)
        return (Step("reduce_scatter", "tp", tp, "reduce_scatter", "all_gather", dim=dst.dim, src=src, dst=dst),)
    if isinstance(src, Replicate):
        if isinstance(dst, Shard):
            return (Step("slice", "tp", tp, None, "all_gather", dim=dst.dim, src=src, dst=dst),)
        return (Step("partial", "tp", tp, None, "all_reduce", src=src, dst=dst),)
    # src is S(d)
    if isinstance(dst, Replicate):
        return (Step("gather", "tp", tp, "all_gather", None, dim=src.dim, src=src, dst=dst),)
    if isinstance(dst, Shard):
        return (Step("all_to_all", "tp", tp, "all_to_all", "all_to_all", dim=src.dim, dim2=dst.dim, src=src, dst=dst),)
    return transition(src, R, tp) + transition(R, dst, tp)


def _blocked(p) -> bool:
    return isinstance(p, Shard) and p.blocks > 1


def f_step(tp: int) -> Step:
    """Megatron's f: identity forward, all-reduce of the gradient over the tp group backward."""
    return Step("f", "tp", tp, None, "all_reduce", src=R, dst=R)


def consume_steps(src: Placement, dst: Placement, tp: int, *, sharded_consumer: bool,
                  only_sharded: bool = True) -> tuple[Step, ...]:
    """Steps on the edge from a tensor placed `src` to a consumer that needs it as `dst`.

    `sharded_consumer`: the consumer's compute is sharded (f rule applies when `dst` is R).
    `only_sharded`: every consumer that takes this R copy is sharded (lets gather + f fuse).
    """
    if tp == 1:
        return ()
    steps = transition(src, dst, tp)
    if isinstance(dst, Replicate) and sharded_consumer:
        if len(steps) == 1 and steps[0].kind == "gather" and only_sharded:
            s = steps[0]
            return (Step("gather_rs", "tp", tp, "all_gather", "reduce_scatter", dim=s.dim, src=src, dst=dst,
                         blocks=s.blocks),)
        steps = steps + (f_step(tp),)
    return steps


# ---------------------------------------------------------------- layouts between layers


@dataclass(frozen=True, slots=True)
class Layout:
    """How a tensor lies on a stage's n = dp * tp devices: rows split dp ways, `placement` on tp."""

    dp: int
    tp: int
    placement: Placement = R


def layout_steps(src: Layout, dst: Layout, meta: TensorMeta, requires_grad: bool) -> tuple[Step, ...]:
    """Conversion of one tensor from layer layout `src` to layer layout `dst` on the same stage.

    1. tp-R in the source layout (S(d) -> all-gather over the source tp group);
    2. batch split dp_src -> dp_dst (tensors with a batch dim): a local row slice when dp_dst is a
       multiple of dp_src, else an all-gather of the rows over the ranks holding different rows;
    3. the destination placement (S(d): local slice; its backward all-gathers over the dst tp group);
    4. a batch-less tensor that requires grad, with different dp groups: backward all-reduces the
       gradient over the dst dp group and scales it by 1/dp_src (the source's dp-partial convention).
    """
    if src == dst:
        return ()
    if isinstance(src.placement, Partial) or isinstance(dst.placement, Partial):
        raise ValueError("layer inputs and outputs are never Partial")
    steps: list[Step] = []
    frac = 1.0 / src.dp if meta.batch_dim is not None else 1.0  # one group's rows, of the global tensor
    if _is_s(src.placement) and src.tp > 1:
        steps.append(Step("gather", "tp", src.tp, "all_gather", None, dim=src.placement.dim,
                          fwd_bytes=frac, bwd_bytes=frac, src=src.placement, dst=R))
    if meta.batch_dim is not None and src.dp != dst.dp:
        b = meta.batch_dim
        if dst.dp % src.dp == 0:
            f = dst.dp // src.dp
            steps.append(Step("slice_rows", "dp", 1, None, "all_gather", dim=b, parts=f, bwd_group=f,
                              fwd_bytes=0.0, bwd_bytes=1.0 / src.dp))
        elif src.dp % dst.dp == 0:
            g = src.dp // dst.dp  # ranks holding the g source blocks that make one dst block
            steps.append(Step("gather_rows", "dp", g, "all_gather", None, dim=b, parts=1,
                              fwd_bytes=1.0 / dst.dp, bwd_bytes=0.0))
        else:  # neither divides: gather the whole batch, keep the dst block; gradients likewise
            steps.append(Step("gather_rows", "dp", src.dp, "all_gather", "all_gather", dim=b, parts=dst.dp,
                              bwd_group=dst.dp, fwd_bytes=1.0, bwd_bytes=1.0))
    if _is_s(dst.placement) and dst.tp > 1:
        fr = 1.0 / dst.dp if meta.batch_dim is not None else 1.0
        steps.append(Step("slice", "tp", dst.tp, None, "all_gather", dim=dst.placement.dim,
                          fwd_bytes=fr, bwd_bytes=fr, src=R, dst=dst.placement))
    if meta.batch_dim is None and requires_grad and src.dp != dst.dp:
        steps.append(Step("dp_grad", "dp", dst.dp, None, "all_reduce", scale=1.0 / src.dp))
    return tuple(steps)


# ---------------------------------------------------------------- bytes


def steps_comms(steps, meta: TensorMeta, requires_grad: bool = True, why: str = "") -> tuple[Comm, ...]:
    """The collectives of `steps` for one tensor, as `Comm`s.

    nbytes is the full buffer of ONE collective for the whole global batch (per_sample=True when
    the tensor has a batch dim: divide by the number of microbatches for one microbatch):
      tp steps inside a layer (fwd_bytes=1): the global tensor -> divide by microbatches * dp too,
        as for TPSpec.comms;
      layout_steps: already the per-group share (fwd_bytes/bwd_bytes applied) -> divide by
        microbatches only.
    `Comm.axis` is the step's axis; the group size is `Step.group` (`bwd_group` for backward when set).
    Backward collectives are dropped when the tensor does not require grad.
    """
    out: list[Comm] = []
    per_sample = meta.batch_dim is not None
    for s in steps:
        if s.fwd:
            out.append(Comm(s.fwd, s.axis, meta.nbytes * s.fwd_bytes, per_sample, "fwd", why or s.kind))
        if s.bwd and requires_grad:
            nbytes = meta.nbytes * s.bwd_bytes if s.kind != "dp_grad" else meta.nbytes
            out.append(Comm(s.bwd, s.axis, nbytes, per_sample and s.kind != "dp_grad", "bwd", why or s.kind))
    return tuple(out)


def comm_weight(kind: str, group: int) -> float:
    """Ring traffic per byte of full buffer, for ranking shardings (not for timing)."""
    if group <= 1:
        return 0.0
    frac = (group - 1) / group
    if kind == "all_reduce":
        return 2 * frac
    if kind == "all_to_all":
        return frac / group
    return frac


def steps_score(steps, meta: TensorMeta, requires_grad: bool) -> float:
    """Ring-traffic bytes of `steps` on `meta` (global batch), the comm score of shard_prop."""
    total = 0.0
    for s in steps:
        if s.fwd:
            total += comm_weight(s.fwd, s.group) * meta.nbytes * s.fwd_bytes
        if s.bwd and requires_grad:
            total += comm_weight(s.bwd, s.bwd_group or s.group) * meta.nbytes * s.bwd_bytes
    return total


__all__ = ["Step", "Layout", "transition", "f_step", "consume_steps", "tensor_steps", "distinct_steps", "layout_steps", "steps_comms",
           "steps_score", "comm_weight", "P", "R"]


def tensor_steps(src: Placement, uses, tp: int) -> dict[tuple[Placement, bool], tuple[Step, ...]]:
    """For one tensor placed `src` and its uses [(needed placement, consumer is sharded)], the chain
    of steps each distinct use gets. Chains share prefixes (emit each distinct prefix once): e.g.
    S(d) feeding a replicated and a sharded R consumer -> (gather,) and (gather, f). When every R use
    is sharded, an S(d) source uses the fused all-gather / reduce-scatter instead."""
    uses = list(dict.fromkeys(uses))
    r_uses = [s for p, s in uses if isinstance(p, Replicate)]
    only_sharded = bool(r_uses) and all(r_uses)
    return {(p, s): consume_steps(src, p, tp, sharded_consumer=s, only_sharded=only_sharded) for p, s in uses}


def distinct_steps(chains) -> list[Step]:
    """The steps actually executed for a set of chains of one tensor (shared prefixes once)."""
    seen, out = set(), []
    for chain in chains:
        for i in range(len(chain)):
            key = chain[: i + 1]
            if key not in seen:
                seen.add(key)
                out.append(chain[i])
    return out
