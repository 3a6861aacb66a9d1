"""Train one rank's program under torchrun: `Runner` (what `compiled.distribute()` returns).

    torchrun --standalone --nproc-per-node 4 train.py      # every rank runs the same script

Per iteration (`train_step`): cut the global batch into the plan's microbatches, run forward and
backward of this rank's stage (a plain loop when pp == 1, a torch pipelining schedule otherwise,
codegen/pipeline.py), then SUM parameter gradients over each parameter's dp group (one flat
all-reduce per group and bucket; FSDP shards were already reduce-scattered inside the graph). The
loss comes back as an async all-reduce that only waits when the caller reads it: no global
barrier at the end of an iteration, so a stage can start the next one as soon as it is done.
"""

from __future__ import annotations

import hashlib
import os
import sys
from datetime import timedelta
from types import SimpleNamespace
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from fxplan.runtime import materialize
from fxplan.codegen.params import fetch_attr
from fxplan.errors import ConstraintError, DistributedSetupError
from fxplan._torch import forget_tensor

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
BUCKET_NUMEL = 1 << 24  # elements per flat gradient all-reduce


def timeout_s() -> float:
    """Process-group timeout: a rank stuck in a collective fails after this instead of hanging."""
    return float(os.environ.get("FXPLAN_TIMEOUT_S", "300"))


def init_default_group() -> None:
    """Join the torchrun job's default process group (gloo on CPU, NCCL with CUDA) unless joined."""
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise DistributedSetupError(
            f"distribute() needs the torchrun environment ({', '.join(missing)} not set); run under torchrun, "
            f"e.g. `torchrun --standalone --nproc-per-node N your_script.py`")
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s()))


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _default_codegen():
    from fxplan.codegen import emit
    from fxplan.runtime import collectives, groups

    return SimpleNamespace(emit_rank=emit.emit_rank, groups=groups, collectives=collectives)


class StepLoss:
    """The mean loss of one train_step; waits for its all-reduce only when read (float(), item())."""

    def __init__(self, value: torch.Tensor, work):
        self._value, self._work = value, work

    def _wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._value

    def item(self) -> float:
        return float(self._wait().item())

    def __float__(self) -> float:
        return self.item()

    def tensor(self) -> torch.Tensor:
        return self._wait().clone()

    def __repr__(self) -> str:
        return f"StepLoss({self.item():.6g})"

    def __format__(self, spec: str) -> str:
        return format(self.item(), spec)


class Runner:
    """This rank's stage module, its parameter shards, and the plan's training step."""

    def __init__(self, compiled, init_fn: Callable[[nn.Module], None] | None = None, *, _codegen=None):
        init_default_group()
        self.plan = plan = compiled.plan
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if self.world_size != plan.world_size:
            raise DistributedSetupError(
                f"torchrun started {self.world_size} processes but the plan is for world size {plan.world_size}; "
                f"run with --nproc-per-node {plan.world_size} (x nodes) or compile for {self.world_size} devices")
        self._check_same_plan()
        self.codegen = cg = _codegen or _default_codegen()
        self.device = _device()
        self.model = compiled.model
        self.layer_graph = compiled.layer_graph
        # Every rank creates every group, in one order: new_group is collective over the world.
        cg.groups.create_groups(cg.groups.required_group_keys(plan, compiled.layer_graph, compiled.space))
        self.stage_index = next(s.index for s in plan.stages if self.rank in s.devices)
        stage = plan.stages[self.stage_index]
        self.position = stage.devices.index(self.rank)
        self.lane = tuple(s.devices[self.position] for s in plan.stages)
        if list(self.lane) != sorted(self.lane):
            raise DistributedSetupError(
                f"pipeline lane {self.lane} is not in increasing rank order; give later stages higher ranks")
        self._loss_group = _loss_group(self.world_size)
        self.program = _emit(cg.emit_rank, compiled, self.rank)
        self.gm = self.program.gm
        self._install_params(init_fn)
        self._shared = self._shared_params()
        self.rows_seen: list[int] = []
        self.gm.register_forward_pre_hook(self._count_rows)
        self._pipe = None
        self._pipe_key = None

    # ------------------------------------------------------------ setup
    def _check_same_plan(self) -> None:
        digest = hashlib.sha256(self.plan.to_json(indent=None).encode()).hexdigest()
        digests: list = [None] * self.world_size
        dist.all_gather_object(digests, digest)
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise DistributedSetupError(
                f"ranks {differ} hold a different plan than rank 0 (plan hashes differ); give every rank the same "
                f"plan (fxplan.compile inside torchrun agrees on one, or load one Plan.to_json() file everywhere)")

    def _install_params(self, init_fn) -> None:
        shards = dict(self.program.params)
        values = materialize.shard_values(self.model, shards, init_fn, self.device)
        for attr, shard in shards.items():
            value = values[attr]
            tensor = nn.Parameter(value, requires_grad=bool(shard.requires_grad)) if shard.requires_grad \
                or _is_param(self.gm, attr) else value
            _set_attr(self.gm, attr, tensor)
        leftover = [n for n, t in list(self.gm.named_parameters()) + list(self.gm.named_buffers()) if t.is_meta]
        if leftover:
            raise DistributedSetupError(f"rank {self.rank}: the stage module still has meta tensors {leftover[:5]} "
                                        f"after materialisation; codegen/emit must list them in RankProgram.params")
        self.gm.to(self.device)

    def _count_rows(self, module, args):
        for a in args:
            if isinstance(a, torch.Tensor) and a.dim() > 0:
                self.rows_seen.append(int(a.shape[0]))
                return

    # ------------------------------------------------------------ parameters
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(state_dict key, local shard) of every trainable parameter this rank holds."""
        for attr, shard in self.program.params.items():
            tensor = fetch_attr(self.gm, attr)
            if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
                yield shard.name, tensor

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, p in self.named_parameters():
            yield p

    # ------------------------------------------------------------ one iteration
    def train_step(self, *batch) -> StepLoss:
        try:
            return self._train_step(batch)
        except Exception as exc:
            # torchrun kills the other ranks when this one exits; name the rank so the log says who.
            exc.add_note(f"fxplan: raised on rank {self.rank} (stage {self.stage_index}) during train_step")
            print(f"[fxplan rank {self.rank}] train_step failed: {type(exc).__name__}: {exc}", file=sys.stderr,
                  flush=True)
            raise

    def _train_step(self, batch) -> StepLoss:
        m = self.plan.microbatches
        batch = tuple(b.to(self.device) if isinstance(b, torch.Tensor) else b for b in batch)
        self._check_batch(batch)
        params = [p for _, p in self.named_parameters()]
        stash = [p.grad for p in params]  # grads from earlier steps: not re-summed over dp
        for p in params:
            p.grad = None
        if self.plan.pp == 1:
            local = self._run_loop(batch, m)
        else:
            local = self._run_pipeline(batch, m)
        self._sum_grads_over_dp()
        self._sum_grads_over_stages()
        for p, old in zip(params, stash):
            if old is not None:
                p.grad = old if p.grad is None else old.add_(p.grad)
        return self._reduce_loss(local)

    def _check_batch(self, batch) -> None:
        # Every rank's graph was emitted with static local shapes for the example batch (views,
        # factories, p2p buffers): a batch of another shape cannot run, so say so before any rank
        # starts (all ranks get the same batch, so all raise together and none hangs).
        graph = self.layer_graph
        expected = [graph.tensors.get(name) for name in graph.placeholders]
        if len(batch) != len(expected):
            raise ConstraintError(f"train_step takes {len(expected)} inputs, like the example batch given to "
                                  f"compile(), but got {len(batch)}")
        for i, (value, meta) in enumerate(zip(batch, expected)):
            if meta is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise ConstraintError(f"train_step input {i} is a {type(value).__name__}; pass tensors like the "
                                      f"example batch")
            if tuple(value.shape) != tuple(meta.shape) or str(value.dtype) != meta.dtype:
                raise ConstraintError(
                    f"train_step input {i} has shape {tuple(value.shape)} and {value.dtype}; the plan was compiled "
                    f"for {tuple(meta.shape)} and {meta.dtype} (the example batch). The per-rank graphs have static "
                    f"shapes: pass batches shaped like the example inputs, or compile with the shape you train with")
        sizes = {b.shape[0] for i, b in enumerate(batch) if isinstance(b, torch.Tensor) and self._batched(i)}
        if len(sizes) != 1:
            raise ConstraintError(f"train_step inputs disagree on the batch size (dim 0): {sorted(sizes)}")
        size, m = sizes.pop(), self.plan.microbatches
        if size % m:
            raise ConstraintError(f"global batch {size} does not divide into {m} microbatches; pass a batch that is "
                                  f"a multiple of {m}")
        for stage in self.plan.stages:
            for layer, strat in stage.strategies.items():
                if (size // m) % strat.dp:
                    raise ConstraintError(
                        f"microbatch of {size // m} rows does not split over dp={strat.dp} of layer {layer}; "
                        f"pass a batch that is a multiple of {m * strat.dp}")

    def _batched(self, index: int) -> bool:
        graph = self.layer_graph
        try:
            return graph.tensors[graph.placeholders[index]].batch_dim is not None
        except (AttributeError, IndexError, KeyError, TypeError):
            return True

    def _split(self, batch, m) -> list[tuple]:
        pieces = [b.chunk(m, dim=0) if isinstance(b, torch.Tensor) and self._batched(i) else (b,) * m
                  for i, b in enumerate(batch)]
        return [tuple(p[k] for p in pieces) for k in range(m)]

    def _run_loop(self, batch, m) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for mb in self._split(batch, m):
            out = self.gm(*mb)
            loss = (out[0] if isinstance(out, (tuple, list)) else out) / m
            loss.backward()
            total += loss.detach().float()
        return total

    def _run_pipeline(self, batch, m) -> torch.Tensor:
        from fxplan.runtime import pipeline

        key = tuple((tuple(b.shape), b.dtype) for b in batch if isinstance(b, torch.Tensor))
        if self._pipe is None or self._pipe_key != key:
            group = self.codegen.groups.get(self.codegen.groups.group_key(self.lane))
            first = self._split(batch, m)[0] if self.stage_index == 0 else None
            with _no_counting(self):
                in_specs, out_specs = pipeline.probe_shapes(self.gm, self.stage_index, self.plan.pp, self.lane,
                                                            group, first, self.device)
            replicate = {i for i in range(len(batch)) if not self._batched(i)}
            self._pipe = pipeline.PipelineRun(self.gm, self.stage_index, self.plan.pp, self.lane, group,
                                              self.plan.schedule, m, in_specs, out_specs, self.device, replicate)
            self._pipe_key = key
        losses = self._pipe.step(batch)
        total = torch.zeros((), device=self.device)
        for loss in losses or ():
            total += loss.detach().float()
        return total

    def _sum_grads_over_dp(self) -> None:
        """SUM each parameter's dp-partial gradient over its dp group (bucketed, one flat buffer each)."""
        buckets: dict[tuple, list[nn.Parameter]] = {}
        for attr, shard in self.program.params.items():
            p = fetch_attr(self.gm, attr)
            key = getattr(shard, "dp_group", None)
            if shard.fsdp or not key or not isinstance(p, nn.Parameter) or not p.requires_grad:
                continue
            if len(self.codegen.groups.ranks_of(key)) < 2:
                continue
            if p.grad is None:  # unused here, but the group's other members may have one: send zeros
                p.grad = torch.zeros_like(p)
            buckets.setdefault((key, p.grad.dtype), []).append(p)
        for (key, _), members in sorted(buckets.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            group = self.codegen.groups.get(key)
            for chunk in _chunks(members, BUCKET_NUMEL):
                flat = torch.cat([p.grad.reshape(-1) for p in chunk])
                _count("all_reduce", key, "grad", flat)
                dist.all_reduce(flat, group=group)
                offset = 0
                for p in chunk:
                    n = p.grad.numel()
                    p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                    offset += n

    def _shared_params(self) -> list[tuple[str, list[tuple[str, int]]]]:
        """[(group key, [(attr, replicas)])]: this rank's parameters that other STAGES hold too.

        A weight used by layers on two stages (GPT's tied embedding/head) gets one copy per stage
        (codegen/split.py); each copy's gradient holds only its own stage's uses. Every rank learns
        every rank's shards here (one all_gather_object at setup), so all ranks create the holder
        groups in the same order (new_group is collective over the world).
        """
        own = materialize.owners(self.model)
        mine = [(_key(own, s.name), _piece(s)) for s in self.program.params.values() if s.requires_grad]
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, (self.stage_index, mine))
        holders: dict[str, dict[int, list[tuple[int, tuple]]]] = {}  # key -> stage -> [(rank, piece)]
        for r, (stage, items) in enumerate(everyone):
            for name, piece in items:
                holders.setdefault(name, {}).setdefault(stage, []).append((r, tuple(piece)))
        shared = {name: by_stage for name, by_stage in sorted(holders.items()) if len(by_stage) > 1}
        keys = sorted({self.codegen.groups.group_key(sorted(r for lst in by_stage.values() for r, _ in lst), "tied")
                       for by_stage in shared.values()}, key=lambda k: (len(self.codegen.groups.ranks_of(k)), k))
        self.codegen.groups.create_groups(keys)
        out: dict[str, list[tuple[str, int]]] = {}
        for attr, s in self.program.params.items():
            name = _key(own, s.name)
            if not s.requires_grad or name not in shared:
                continue
            by_stage = shared[name]
            ranks = sorted(r for lst in by_stage.values() for r, _ in lst)
            # ranks of this stage holding the very same piece each add it: divide to count it once
            replicas = sum(1 for _, piece in by_stage[self.stage_index] if piece == tuple(_piece(s)))
            out.setdefault(self.codegen.groups.group_key(ranks, "tied"), []).append((attr, replicas))
        return sorted(out.items())

    def _sum_grads_over_stages(self) -> None:
        """Make every stage's copy of a shared weight carry the SUM of all stages' gradients.

        Runs after the dp sum, so each holder's local grad is its stage's complete contribution in
        its own shard layout (tp slice, FSDP block). Each holder writes it into a full-size zero
        tensor (divided by the ranks of its stage holding the same piece), one flat all-reduce per
        holder group sums the stages, and each holder cuts its own shard back out.
        """
        for key, members in self._shared:
            group = self.codegen.groups.get(key)
            fulls = []
            for attr, replicas in members:
                p, shard = fetch_attr(self.gm, attr), self.program.params[attr]
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                fulls.append(_scatter_full(grad, shard) / replicas)
            flat = torch.cat([f.reshape(-1) for f in fulls])
            _count("all_reduce", key, "grad", flat)
            dist.all_reduce(flat, group=group)
            offset = 0
            for (attr, _), full in zip(members, fulls):
                n = full.numel()
                p, shard = fetch_attr(self.gm, attr), self.program.params[attr]
                local = materialize.local_shard(flat[offset:offset + n].view_as(full), shard)
                p.grad = local.view_as(p).to(p.dtype)
                offset += n

    def _reduce_loss(self, local: torch.Tensor) -> StepLoss:
        # Every last-stage rank holds a dp-partial loss; the tp replicas of the loss layer each hold
        # one full copy of the dp sum, so the world sum counts it tp times.
        last = self.plan.stages[-1]
        copies = last.strategies[last.layers[-1]].tp
        value = (local / copies if self.stage_index == self.plan.pp - 1 else torch.zeros_like(local)).reshape(1)
        work = dist.all_reduce(value, group=self._loss_group, async_op=True)
        return StepLoss(value.view(()), work)

    # ------------------------------------------------------------ full tensors (tests, checkpoints)
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full CPU tensors on every rank, keys exactly as model.state_dict() (collective: call on all ranks)."""
        full = self._gather_full(lambda p: p.detach())
        own = materialize.owners(self.model)
        keys = list(self.model.state_dict().keys())
        missing = [k for k in keys if _key(own, k) not in full]
        if missing:  # buffers no stage module holds: the model's own (or initial) values
            full.update(dict(materialize.full_values(self.model, {_key(own, k) for k in missing})))
        return {k: full[_key(own, k)].cpu().clone() for k in keys}

    def grads_full(self) -> dict[str, torch.Tensor]:
        """Full gradients (zeros where none) of every trainable parameter, on every rank. For tests."""
        return {k: v.cpu() for k, v in self._gather_full(
            lambda p: p.grad if p.grad is not None else torch.zeros_like(p), trainable=True).items()}

    def _gather_full(self, pick, trainable: bool = False) -> dict[str, torch.Tensor]:
        own = materialize.owners(self.model)
        mine = []
        for attr, s in self.program.params.items():
            if trainable and not s.requires_grad:
                continue
            mine.append(dict(name=_key(own, s.name), piece=_piece(s), global_shape=tuple(s.global_shape),
                             tp_dim=s.tp_dim, tp=s.tp, fsdp=bool(s.fsdp), dp=s.dp, attr=attr,
                             dtype=str(fetch_attr(self.gm, attr).dtype)))
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        owner: dict[tuple, tuple[int, dict]] = {}
        for r, items in enumerate(everyone):
            for item in items:
                owner.setdefault((item["name"], item["piece"]), (r, item))
        names = sorted({name for name, _ in owner})
        out: dict[str, torch.Tensor] = {}
        for name in names:
            pieces = sorted(piece for n, piece in owner if n == name)
            descr = [owner[(name, piece)] for piece in pieces]
            info = SimpleNamespace(**descr[0][1])
            dtype = getattr(torch, info.dtype.split(".")[-1])
            shapes = [_piece_shape(SimpleNamespace(**d)) for _, d in descr]
            flat = torch.zeros(sum(_numel(s) for s in shapes), dtype=dtype, device=self.device)
            offset = 0
            for (r, d), shape in zip(descr, shapes):
                n = _numel(shape)
                if r == self.rank:
                    flat[offset:offset + n] = pick(fetch_attr(self.gm, d["attr"])).reshape(-1).to(dtype)
                offset += n
            dist.all_reduce(flat)  # exactly one rank wrote each piece: the sum is a copy
            split, offset = {}, 0
            for piece, shape in zip(pieces, shapes):
                n = _numel(shape)
                split[piece] = flat[offset:offset + n].view(shape)
                offset += n
            out[name] = materialize.unshard(split, info)
        return out

    def collective_counts(self) -> dict:
        return self.codegen.collectives.counts()


# ---------------------------------------------------------------- helpers

_LOSS_GROUPS: dict[int, object] = {}


def _loss_group(world_size: int):
    # A world group of its own for the async loss all-reduce, so it never queues behind (or
    # ahead of) other traffic on the default group. Made once per process: new_group is collective.
    if world_size not in _LOSS_GROUPS:
        _LOSS_GROUPS[world_size] = dist.new_group(list(range(world_size)))
    return _LOSS_GROUPS[world_size]



def _emit(emit_rank, compiled, rank: int):
    """This rank's RankProgram with meta shards (we materialise them: a meta model has no values)."""
    args = (compiled.traced, compiled.layer_graph, compiled.space, compiled.plan, rank)
    try:
        return emit_rank(*args, params="meta")
    except TypeError:  # an emit without the params switch
        return emit_rank(*args)


def _scatter_full(local: torch.Tensor, shard) -> torch.Tensor:
    """A zero tensor of the parameter's full shape holding `local` (this rank's shard) in its place."""
    full = torch.zeros(tuple(shard.global_shape), dtype=local.dtype, device=local.device)
    target = full
    if shard.tp_dim is not None and shard.tp > 1:
        target = full.chunk(shard.tp, dim=shard.tp_dim)[shard.tp_index]  # a view into `full`
    if shard.fsdp:
        block = local.numel()
        flat = torch.zeros(block * shard.dp, dtype=local.dtype, device=local.device)
        flat[shard.dp_index * block:(shard.dp_index + 1) * block] = local.reshape(-1)
        target.copy_(flat[:target.numel()].view(target.shape))
    else:
        target.copy_(local.view(target.shape))
    return full


def _count(kind: str, key: str, phase: str, tensor: torch.Tensor) -> None:
    # The runtime's own gradient collectives count next to the graph's (collectives.counts()), so
    # tests see every collective a step executes.
    from fxplan.runtime import collectives

    collectives._count(kind, key, phase, tensor)


def _piece(s) -> tuple:
    t = s.tp_index if (s.tp_dim is not None and s.tp > 1) else 0
    return (t, s.dp_index if s.fsdp else None)


def _piece_shape(info) -> tuple[int, ...]:
    shape = list(info.global_shape)
    if info.tp_dim is not None and info.tp > 1:
        shape[info.tp_dim] //= info.tp
    if info.fsdp:
        return (materialize.fsdp_chunk_numel(_numel(shape), info.dp),)
    return tuple(shape)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _key(own, key: str) -> str:
    mod, attr = own.get(key, ("", key))
    return f"{mod}.{attr}" if mod else attr


def _chunks(params, limit):
    chunk, size = [], 0
    for p in params:
        if chunk and size + p.numel() > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(p)
        size += p.numel()
    if chunk:
        yield chunk


def _is_param(root: nn.Module, target: str) -> bool:
    try:
        return isinstance(fetch_attr(root, target), nn.Parameter)
    except AttributeError:
        return False


def _set_attr(root: nn.Module, target: str, value) -> None:
    *path, last = target.split(".")
    mod = root
    for atom in path:
        if not hasattr(mod, atom):
            mod.add_module(atom, nn.Module())
        mod = getattr(mod, atom)
    forget_tensor(mod, last)
    if isinstance(value, nn.Parameter):
        mod.register_parameter(last, value)
    else:
        mod.register_buffer(last, value)


class _no_counting:
    """Probe forwards are not training: keep the rows counter as it was. (The probe's collectives do
    count, once, on the first pipelined step.)"""

    def __init__(self, runner):
        self.runner = runner

    def __enter__(self):
        self.rows = len(self.runner.rows_seen)

    def __exit__(self, *exc):
        del self.runner.rows_seen[self.rows:]
        return False
