"""Model specs ("gpt:layers=48,hidden=4096" / "gpt3-175b") -> preset models.

A spec is `PRESET[:key=value,...]` or a named size `NAME` (from SIZES), and `size=NAME` inside a
preset's spec starts from that size before the other keys apply. Defaults are tiny models so tests
run on a laptop CPU; on `device="meta"` any size builds instantly (no memory is allocated).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import torch
from torch import nn

from fxplan.errors import ModelError
from fxplan.models.bert import Bert, BertConfig
from fxplan.models.gpt import GPT, GPTConfig
from fxplan.models.llama import Llama, LlamaConfig
from fxplan.models.mlp import MLP, MLPConfig
from fxplan.models.vit import ViT, ViTConfig

DEFAULT_PRESET = "gpt"

# name -> (model class, config class); the public PRESETS maps names to builders.
_CLASSES: dict[str, tuple[type[nn.Module], type]] = {
    "gpt": (GPT, GPTConfig),
    "llama": (Llama, LlamaConfig),
    "bert": (Bert, BertConfig),
    "vit": (ViT, ViTConfig),
    "mlp": (MLP, MLPConfig),
}

# Spec keys that are not valid Python identifiers / differ from the config field name.
_ALIASES = {"in": "in_features", "out": "out_features"}
_SPEC_NAMES = {field: key for key, field in _ALIASES.items()}


class Size(NamedTuple):
    """A named model size: the preset and the config values of the public model."""

    preset: str
    config: Mapping[str, Any]


def _gpt(layers, hidden, heads, seq=2048):
    return Size("gpt", {"layers": layers, "hidden": hidden, "heads": heads, "seq": seq, "vocab": 50257})


def _llama(layers, hidden, heads, ffn, kv_heads=0):
    return Size("llama", {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads, "ffn": ffn,
                          "seq": 4096, "vocab": 32000})


def _bert(layers, hidden, heads):
    return Size("bert", {"layers": layers, "hidden": hidden, "heads": heads, "seq": 512, "vocab": 30522})


def _vit(layers, hidden, heads, patch):
    return Size("vit", {"layers": layers, "hidden": hidden, "heads": heads, "patch": patch, "image": 224,
                        "classes": 1000})


# Public configurations: GPT-2 (Radford et al. 2019), GPT-3 (Brown et al. 2020, Table 2.1; 1.3B with
# 16 heads of 128 and 13B with hidden 5120 as trained in practice), Llama-2 (Touvron et al. 2023),
# BERT base/large (Devlin et al. 2019) and BERT-Huge as in UniAP, ViT base/large/huge (Dosovitskiy et
# al. 2021; huge uses 14x14 patches).
SIZES: dict[str, Size] = {
    "gpt2-small": _gpt(12, 768, 12, seq=1024),
    "gpt2-medium": _gpt(24, 1024, 16, seq=1024),
    "gpt2-large": _gpt(36, 1280, 20, seq=1024),
    "gpt2-xl": _gpt(48, 1600, 25, seq=1024),
    "gpt3-1.3b": _gpt(24, 2048, 16),
    "gpt3-2.7b": _gpt(32, 2560, 32),
    "gpt3-6.7b": _gpt(32, 4096, 32),
    "gpt3-13b": _gpt(40, 5120, 40),
    "gpt3-175b": _gpt(96, 12288, 96),
    "llama2-7b": _llama(32, 4096, 32, ffn=11008),
    "llama2-13b": _llama(40, 5120, 40, ffn=13824),
    "llama2-70b": _llama(80, 8192, 64, ffn=28672, kv_heads=8),
    "bert-base": _bert(12, 768, 12),
    "bert-large": _bert(24, 1024, 16),
    "bert-huge": _bert(32, 1280, 16),
    "vit-base": _vit(12, 768, 12, patch=16),
    "vit-large": _vit(24, 1024, 16, patch=16),
    "vit-huge": _vit(32, 1280, 16, patch=14),
}


def _builder(name: str) -> Callable[..., nn.Module]:
    model_cls, config_cls = _CLASSES[name]

    def build_preset(**fields) -> nn.Module:
        """Construct the preset from config fields, on the current default device."""
        return model_cls(config_cls(**fields))

    build_preset.__name__ = f"build_{name}"
    build_preset.__qualname__ = build_preset.__name__
    return build_preset


PRESETS: dict[str, Callable[..., nn.Module]] = {name: _builder(name) for name in _CLASSES}


def spec_keys(preset: str) -> list[str]:
    """The keys a spec of `preset` accepts (config fields, with their spec names)."""
    _, config_cls = _CLASSES[preset]
    return [_SPEC_NAMES.get(f.name, f.name) for f in dataclasses.fields(config_cls)]


def _convert(preset: str, key: str, value: Any, default: Any) -> Any:
    """Coerce a spec value (a string from the command line, or a Python value) to the field's type."""
    kind = type(default)
    if isinstance(value, str):
        text = value.strip()
        try:
            if kind is bool:
                lowered = text.lower()
                if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError
                return lowered in ("1", "true", "yes", "on")
            if kind is int:
                return int(text.replace("_", ""))
            if kind is float:
                return float(text)
            return text
        except ValueError:
            raise ModelError(f"{preset}: {key}={value!r} is not a valid {kind.__name__}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ModelError(f"{preset}: {key}={value!r} should be a {kind.__name__}")
    return value


def _fields(preset: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Spec keys/values -> config field values, rejecting unknown keys with the list of valid ones."""
    _, config_cls = _CLASSES[preset]
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
    out = {}
    for key, value in values.items():
        field = _ALIASES.get(key, key)
        if field not in defaults:
            raise ModelError(f"unknown key {key!r} for model {preset!r}; valid keys: "
                             f"{', '.join(spec_keys(preset) + ['size'])}")
        out[field] = _convert(preset, key, value, defaults[field])
    return out


def _unknown_name(name: str) -> ModelError:
    return ModelError(f"unknown model {name!r}; presets: {', '.join(PRESETS)}; named sizes: {', '.join(SIZES)} "
                      f"(spec form: PRESET[:key=value,...], e.g. gpt:layers=48,hidden=4096,heads=32,seq=2048)")


def _size(preset: str | None, name: str) -> Size:
    size = SIZES.get(name.strip().lower())
    if size is None:
        raise ModelError(f"unknown size {name!r}; named sizes: {', '.join(SIZES)}")
    if preset is not None and size.preset != preset:
        raise ModelError(f"size {name!r} is a {size.preset!r} model, not {preset!r}; use {size.preset}:size={name}")
    return size


def parse_spec(spec: str | None, overrides: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """`"gpt:layers=4"` / `"gpt3-175b"` (+ keyword overrides) -> (preset name, config field values)."""
    if spec is None:
        spec = DEFAULT_PRESET
    if not isinstance(spec, str):
        raise ModelError(f"model spec must be a string like 'gpt:layers=4', got {type(spec).__name__}")
    head, _, tail = spec.strip().partition(":")
    name = head.strip().lower()
    values: dict[str, Any] = {}
    if name in PRESETS:
        preset = name
    elif name in SIZES:
        preset = SIZES[name].preset
        values.update(SIZES[name].config)
    else:
        raise _unknown_name(head)
    given: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in tail.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ModelError(f"bad item {item!r} in model spec {spec!r}; expected key=value, e.g. layers=4")
        given[key.strip().lower()] = value.strip()
    given.update(overrides or {})
    if "size" in given:  # the named size first, then the explicit keys on top of it
        values.update(_size(preset, str(given.pop("size"))).config)
    values.update(given)
    return preset, _fields(preset, values)


def build(spec: str | None = None, *, device="cpu", dtype: torch.dtype | None = None, **overrides) -> nn.Module:
    """Build a preset model from a spec, e.g. `build("gpt:layers=48,hidden=4096", device="meta")`.

    Keyword overrides apply on top of the spec (`build("llama", kv_heads=2)`). On `device="meta"`
    nothing is allocated, so any size builds instantly; the runtime later materialises each rank's
    shards with the modules' `reset_parameters()`. The config is kept as `model.config`.
    """
    preset, fields = parse_spec(spec, overrides)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(f"bad device {device!r} for build(): {exc}") from None
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ModelError(f"dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
    with torch.device(device):
        model = PRESETS[preset](**fields)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model


def example_batch(model: nn.Module, batch: int, device=None, generator: torch.Generator | None = None):
    """(inputs, targets) for `batch` samples of a preset model, on its device unless `device` is given.

    Random token ids / images and labels; a meta model (or device="meta") gives meta tensors.
    """
    make = getattr(model, "example_batch", None)
    if make is None or not hasattr(model, "config"):
        raise ModelError(f"example_batch() needs an fxplan preset model (from fxplan.models.build), got "
                         f"{type(model).__name__}; build your own example inputs for other models")
    return make(batch, device=device, generator=generator)


def num_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied matrix counts once)."""
    return sum(p.numel() for p in model.parameters())


def _human(count: int) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(count)


def describe(spec: str | None = None, **overrides) -> str:
    """One line: preset, its config and the parameter count (built on meta, so instant at any size)."""
    model = build(spec, device="meta", **overrides)
    cfg = model.config
    items = ",".join(f"{_SPEC_NAMES.get(f.name, f.name)}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg))
    count = num_parameters(model)
    return f"{model.preset}:{items}  ({_human(count)} parameters, {count:,})"
