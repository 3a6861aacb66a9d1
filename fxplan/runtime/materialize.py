"""Give a rank its parameter shards: slice them from a real model, or create them for a meta model.

A META model is never materialised whole. Each module that owns a parameter this rank needs is
materialised alone on CPU, seeded by its qualified name (so every rank computes identical full
values before slicing, whatever its plan), initialised with `reset_parameters()` or the user's
`init_fn(module)`, sliced, and freed: peak memory is about one module.

`full_model(model, init_fn)` builds the same values for the whole model on one device; tests and
single-device references use it to compare against a distributed run of a meta model.

Each full tensor is cut into this rank's piece by codegen/params.py's shard_tensor (the one shard
layout, described there).
"""

from __future__ import annotations

import copy
import zlib
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from fxplan.codegen.params import ParamShard, shard_tensor
from fxplan.errors import ModelError
from fxplan._torch import own_buffers, own_parameters, shallow_copy_module

BASE_SEED = 20240917  # any fixed number: the same on every rank and in full_model()


def module_seed(module_name: str) -> int:
    """Deterministic across processes (Python's hash() is salted per process)."""
    return (BASE_SEED + zlib.crc32(module_name.encode())) % (2**63 - 1)


def is_meta_model(model: nn.Module) -> bool:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.is_meta
    return False


# ---------------------------------------------------------------- which module owns a state_dict key


def owners(model: nn.Module) -> dict[str, tuple[str, str]]:
    """state_dict key -> (module name, attribute) of its FIRST owner (tied tensors: the first name)."""
    seen: dict[int, tuple[str, str]] = {}
    result: dict[str, tuple[str, str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, tensor in list(own_parameters(module).items()) + list(own_buffers(module).items()):
            if tensor is None:
                continue
            key = f"{mod_name}.{attr}" if mod_name else attr
            result[key] = seen.setdefault(id(tensor), (mod_name, attr))
    return result


def state_key(own: Mapping[str, tuple[str, str]], key: str) -> str:
    """The first owner's name for state_dict `key` (tied tensors share one), `key` itself if unknown."""
    mod, attr = own.get(key, ("", key))
    return f"{mod}.{attr}" if mod else attr


def _init_module(model: nn.Module, mod_name: str, init_fn: Callable | None) -> nn.Module:
    """A CPU copy of module `mod_name` with its own tensors allocated and initialised (children stay meta)."""
    module = model.get_submodule(mod_name)
    clone = shallow_copy_module(module)  # shares nothing we mutate
    clone.to_empty(device="cpu", recurse=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(module_seed(mod_name))
        with torch.no_grad():
            # Buffers start at zero, not at whatever the allocator held, so one no initialiser
            # touches agrees on every rank; an initialiser that sets one (reset_running_stats(),
            # Hugging Face's rotary inv_freq) overwrites it below.
            for buf in own_buffers(clone).values():
                if buf is not None:
                    buf.zero_()
            if init_fn is not None:
                init_fn(clone)
            elif hasattr(clone, "reset_parameters"):
                clone.reset_parameters()
            elif any(t is not None for t in own_parameters(clone).values()):
                raise ModelError(f"module {mod_name or '<root>'} ({type(module).__name__}) of a meta model has "
                                 f"parameters but no reset_parameters(); give distribute(init_fn=...) a "
                                 f"function that initialises such a module in place")
    return clone


def full_values(model: nn.Module, keys: Iterable[str], init_fn: Callable | None = None):
    """Yield (key, full tensor on CPU) for state_dict `keys`, one module materialised at a time."""
    own = owners(model)
    by_module: dict[str, list[tuple[str, str]]] = {}
    for key in keys:
        mod_name, attr = own[key]
        by_module.setdefault(mod_name, []).append((key, attr))
    meta = is_meta_model(model)
    for mod_name, items in by_module.items():
        module = _init_module(model, mod_name, init_fn) if meta else model.get_submodule(mod_name)
        for key, attr in items:
            tensor = own_parameters(module).get(attr)
            if tensor is None:
                tensor = own_buffers(module)[attr]
            yield key, tensor.detach()
        # nothing of this module may stay referenced while the next one is materialised
        del module, tensor


def full_model(model: nn.Module, init_fn: Callable | None = None) -> nn.Module:
    """A real CPU copy of `model` with exactly the values distribute() gives a meta model."""
    real = copy.deepcopy(model)
    if not is_meta_model(model):
        return real
    real.to_empty(device="cpu")
    # every tensor, non-persistent buffers too (a rotary table is not in the state_dict, but the
    # ranks' modules hold it, materialised as here)
    tensors = dict(real.named_parameters(remove_duplicate=False))
    tensors.update(real.named_buffers(remove_duplicate=False))
    own = owners(model)
    values = full_values(model, [k for k in tensors if k in own], init_fn)
    with torch.no_grad():
        for key, value in values:
            tensors[key].copy_(value)
    return real


def shard_values(model: nn.Module, shards: Mapping[str, ParamShard], init_fn: Callable | None = None,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """attr -> this rank's local tensor for each ParamShard in `shards` (attr -> ParamShard)."""
    own = owners(model)
    canonical = {attr: _canonical_key(own, shard.name) for attr, shard in shards.items()}
    wanted = sorted(set(canonical.values()), key=list(own).index)
    local: dict[str, torch.Tensor] = {}
    by_key: dict[str, list[str]] = {}
    for attr, key in canonical.items():
        by_key.setdefault(key, []).append(attr)
    for key, full in full_values(model, wanted, init_fn):
        for attr in by_key[key]:
            shard = shards[attr]
            if tuple(full.shape) != tuple(shard.global_shape):
                raise ModelError(f"parameter {shard.name} has shape {tuple(full.shape)} in the model but "
                                 f"{tuple(shard.global_shape)} in the plan; recompile for this model")
            local[attr] = shard_tensor(full, shard).to(device)
        del full
    return local


def _canonical_key(own: Mapping[str, tuple[str, str]], key: str) -> str:
    if key not in own:
        raise ModelError(f"the plan needs parameter {key!r} but the model has no such state_dict key; "
                         f"compile and distribute the same model")
    mod_name, attr = own[key]
    return f"{mod_name}.{attr}" if mod_name else attr
