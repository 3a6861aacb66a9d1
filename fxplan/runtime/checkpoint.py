"""Checkpoints through torch.distributed.checkpoint (DCP), the one adapter over it.

A checkpoint holds FULL tensors keyed by the model's own state_dict names, so it does not depend
on the plan that wrote it: it loads under any other plan, any world size, or into the plain model.

    model/<state_dict key>                  parameters and buffers (tied tensors once, first name)
    optim/<parameter key>/<state field>     optimizer state: tensors shaped like the parameter
                                            (Adam's exp_avg, SGD's momentum) and scalars (step)

Saving: every rank gathers the full tensors from the shards (full_state.py, the same machinery as
full_state_dict), then DCP writes each key once however many ranks hold it (its planner de-duplicates
replicated tensors: dp replicas, tied copies, tp replicas). Loading: each rank reads the full
tensors of the parameters it holds and cuts its own shard (codegen/params.py's shard_tensor, the
one shard layout), so a checkpoint from pp=2 x tp=2 loads under dp=4 with FSDP.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from fxplan.codegen.params import fetch_attr, shard_tensor
from fxplan.errors import CheckpointError
from fxplan.runtime.full_state import full_state_dict, gather_full
from fxplan.runtime.materialize import owners, state_key

MODEL, OPTIM = "model/", "optim/"


# ---------------------------------------------------------------- saving

def save(runner, path, optimizer=None) -> None:
    """Collective: every rank calls it with its own optimizer (over runner.parameters())."""
    own = owners(runner.model)
    full = full_state_dict(runner.gm, runner.program.params, runner.model, runner.device)
    state = {MODEL + key: value for key, value in full.items() if state_key(own, key) == key}
    if optimizer is not None:
        state.update(_optimizer_full(runner, optimizer, own))
    dcp.save(state, checkpoint_id=str(path))


def _optimizer_full(runner, optimizer, own) -> dict[str, torch.Tensor]:
    by_param = {id(p): state_key(own, name) for name, p in runner.named_parameters()}
    _check_optimizer_params(optimizer, by_param, "runner.parameters()")
    mine: dict[str, tuple] = {}  # field -> shaped like the parameter?
    scalars: dict[str, torch.Tensor] = {}
    for p in _optimizer_params(optimizer):
        for field, value in optimizer.state.get(p, {}).items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.shape == p.shape:
                mine[field] = True
            elif value.dim() == 0:
                scalars[f"{OPTIM}{by_param[id(p)]}/{field}"] = value.detach().cpu().clone()
    fields: list = [None] * dist.get_world_size()
    dist.all_gather_object(fields, sorted(mine))
    out = dict(scalars)
    for field in sorted({f for per_rank in fields for f in per_rank}):
        def pick(p, field=field):
            value = optimizer.state.get(p, {}).get(field)
            return value.detach() if value is not None else torch.zeros_like(p)
        full = gather_full(runner.gm, runner.program.params, runner.model, runner.device, pick, trainable=True)
        out.update({f"{OPTIM}{key}/{field}": value.cpu() for key, value in full.items()})
    return out


# ---------------------------------------------------------------- loading under a plan

def load(runner, path, optimizer=None) -> None:
    """Collective: every rank reads the full tensors it needs and keeps its own shards."""
    meta = _metadata(path)
    own = owners(runner.model)
    wanted: dict[str, torch.Tensor] = {}
    for attr, shard in runner.program.params.items():
        key = MODEL + state_key(own, shard.name)
        wanted[key] = _empty_like_saved(meta, key, path, shard.global_shape)
    params = {id(p): (state_key(own, name), p) for name, p in runner.named_parameters()}
    if optimizer is not None:
        _check_optimizer_params(optimizer, {k: v[0] for k, v in params.items()}, "runner.parameters()")
        for p in _optimizer_params(optimizer):
            for key in _optimizer_keys(meta, params[id(p)][0]):
                wanted[key] = _empty_like_saved(meta, key, path, None)
    dcp.load(wanted, checkpoint_id=str(path))
    with torch.no_grad():
        for attr, shard in runner.program.params.items():
            fetch_attr(runner.gm, attr).copy_(shard_tensor(wanted[MODEL + state_key(own, shard.name)], shard))
    if optimizer is not None:
        shard_of = {id(fetch_attr(runner.gm, attr)): shard for attr, shard in runner.program.params.items()}
        for p in _optimizer_params(optimizer):
            key = params[id(p)][0]
            optimizer.state[p] = {
                k.rsplit("/", 1)[1]: (shard_tensor(wanted[k], shard_of[id(p)]) if wanted[k].dim() else wanted[k])
                .to(p.device if wanted[k].dim() else "cpu")
                for k in _optimizer_keys(meta, key)}


# ---------------------------------------------------------------- loading into the plain model

def load_plain(path, model: nn.Module, optimizer=None) -> None:
    """Into the plain single-device model (and its optimizer over model.parameters())."""
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"load_checkpoint takes an nn.Module, got {type(model).__name__}")
    if any(t.is_meta for t in model.state_dict().values()):
        raise CheckpointError("load_checkpoint needs a model with real tensors, not meta ones; build it on a device "
                              "(or call model.to_empty(device='cpu') first)")
    meta = _metadata(path)
    own = owners(model)
    current = model.state_dict()
    wanted = {MODEL + key: _empty_like_saved(meta, MODEL + key, path, tuple(t.shape), t.dtype)
              for key, t in current.items() if state_key(own, key) == key}
    names = {id(p): state_key(own, name) for name, p in model.named_parameters()}
    if optimizer is not None:
        _check_optimizer_params(optimizer, names, "model.parameters()")
        for p in _optimizer_params(optimizer):
            for key in _optimizer_keys(meta, names[id(p)]):
                wanted[key] = _empty_like_saved(meta, key, path, None)
    with warnings.catch_warnings():  # inside a torchrun job too, this load is one process's own
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(wanted, checkpoint_id=str(path), no_dist=True)
    with torch.no_grad():
        for key, tensor in current.items():
            tensor.copy_(wanted[MODEL + state_key(own, key)])
    if optimizer is not None:
        for p in _optimizer_params(optimizer):
            optimizer.state[p] = {k.rsplit("/", 1)[1]: wanted[k].to(p.device if wanted[k].dim() else "cpu")
                                  for k in _optimizer_keys(meta, names[id(p)])}


# ---------------------------------------------------------------- helpers

def _metadata(path):
    if not os.path.isdir(str(path)):
        raise CheckpointError(f"no checkpoint at {path}: write one with runner.save(path, optimizer=opt)")
    try:
        return dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as exc:  # noqa: BLE001 - a folder without DCP metadata
        raise CheckpointError(f"{path} is not a torch.distributed.checkpoint folder ({type(exc).__name__}: {exc}); "
                              f"write checkpoints with runner.save(path)") from None


def _empty_like_saved(meta, key, path, shape, dtype=None) -> torch.Tensor:
    if key not in meta:
        have = sorted(k for k in meta if k.startswith(MODEL))[:4]
        raise CheckpointError(f"checkpoint {path} has no {key!r} (it holds e.g. {have}); it was saved from another "
                              f"model: load it into the model that wrote it")
    saved = meta[key]
    size = tuple(saved.size)
    if shape is not None and size != tuple(shape):
        raise CheckpointError(f"checkpoint {path}: {key} has shape {size}, this model's is {tuple(shape)}; load it "
                              f"into the model that wrote it")
    return torch.empty(size, dtype=dtype or saved.properties.dtype)


def _optimizer_keys(meta, param_key: str) -> list[str]:
    prefix = f"{OPTIM}{param_key}/"
    return sorted(k for k in meta if k.startswith(prefix) and "/" not in k[len(prefix):])


def _optimizer_params(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def _check_optimizer_params(optimizer, known: dict, where: str) -> None:
    if not hasattr(optimizer, "param_groups"):
        raise CheckpointError(f"optimizer= takes a torch optimizer, got {type(optimizer).__name__}")
    stray = [p for p in _optimizer_params(optimizer) if id(p) not in known]
    if stray:
        raise CheckpointError(f"the optimizer holds {len(stray)} tensor(s) that are not in {where}; build it "
                              f"over {where}")
