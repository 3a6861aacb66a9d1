"""What every preset shares: a frozen config and a matching example batch."""

from __future__ import annotations

import torch
from torch import nn

from fxplan.errors import ModelError


def check(ok: bool, message: str) -> None:
    """Raise ModelError(message) unless ok (config validation)."""
    if not ok:
        raise ModelError(message)


def check_heads(hidden: int, heads: int, preset: str) -> None:
    check(heads > 0 and hidden % heads == 0,
          f"{preset}: hidden={hidden} is not divisible by heads={heads}; pick heads dividing hidden")


MAX_LAYERS = 2048  # planning traces every layer: 1,000 layers take minutes, a million would take days


def check_positive(preset: str, **values: int) -> None:
    for key, value in values.items():
        check(value > 0, f"{preset}: {key} must be positive, got {value}")
    layers = values.get("layers", 0)
    check(layers <= MAX_LAYERS, f"{preset}: layers={layers:,} is more than the {MAX_LAYERS:,} fxplan plans (every "
                                f"layer is traced and costed, which would take hours); use layers <= {MAX_LAYERS:,}")


class Preset(nn.Module):
    """Base of the preset models: `forward(inputs, targets)` returns the scalar mean loss.

    Subclasses set `preset` (registry name), pass their config (a frozen dataclass with a
    `validate()`) to `__init__`, and implement `_example(batch, device, generator)`.
    """

    preset: str = "?"

    def __init__(self, config):
        super().__init__()
        config.validate()  # before any layer is built from it
        self.config = config

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """x through the preset's repeated layers (`self.blocks`, an nn.ModuleList) in order."""
        for block in self.blocks:
            x = block(x)
        return x

    def example_batch(self, batch: int, device=None, generator: torch.Generator | None = None):
        """(inputs, targets) for `batch` samples, on the model's device unless `device` is given."""
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ModelError(f"example_batch: batch must be a positive int, got {batch!r}")
        if device is None:
            first = next(iter(self.parameters()), None)
            device = first.device if first is not None else torch.device("cpu")
        device = torch.device(device)
        if device.type == "meta":
            generator = None  # meta tensors have no values; a CPU generator would be rejected
        return self._example(batch, device, generator)

    def _float_dtype(self) -> torch.dtype:
        first = next(iter(self.parameters()), None)
        return first.dtype if first is not None and first.is_floating_point() else torch.float32

    def _example(self, batch: int, device: torch.device, generator):
        raise NotImplementedError


def randint(high: int, shape: tuple[int, ...], device: torch.device, generator) -> torch.Tensor:
    if generator is not None and generator.device != device:
        # Draw on the generator's device so a seeded batch is the same whatever the target device.
        return torch.randint(0, high, shape, generator=generator, device=generator.device).to(device)
    return torch.randint(0, high, shape, generator=generator, device=device)


def randn(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, generator) -> torch.Tensor:
    if generator is not None and generator.device != device:
        return torch.randn(shape, generator=generator, device=generator.device).to(device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)
