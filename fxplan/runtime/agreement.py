"""At distribute(): the ranks check they hold the same model structure, pins, example-batch shapes and
initial weights, and refuse to start (DistributedSetupError naming what differs and on which ranks)
when they do not. Rank 0's plan is broadcast; without this check a rank whose own model, pins or
batch differ would train it silently, and dp replicas of an unseeded model would start apart.

One all_gather_object of a small fingerprint per rank: digests of the structure and weights (a
per-tensor checksum, float64 sums; computed on the rank's own device), the pins and batch shapes as
text. A meta model's weights are created from a fixed per-module seed on every rank (materialize.py),
so they agree by construction and are not summed.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch import nn

from fxplan.errors import DistributedSetupError


def fingerprint(model: nn.Module, constraints, example_inputs) -> dict:
    state = model.state_dict(keep_vars=True)
    structure = [(name, type(m).__name__) for name, m in model.named_modules()]
    structure += [(k, tuple(t.shape), str(t.dtype)) for k, t in state.items()]
    meta = any(t.is_meta for t in state.values())
    return {
        "structure": _digest(structure),
        "structure_text": f"{len(state)} tensors, {sum(t.numel() for t in state.values()):,} elements, "
                          f"{type(model).__name__}",
        "pins": str({k: v for k, v in asdict(constraints).items() if v is not None}) if constraints else "{}",
        "batch": str([(tuple(x.shape), str(x.dtype)) for x in example_inputs]),
        "weights": None if meta else [(k, _checksum(t)) for k, t in state.items()],
    }


def _digest(value) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def _checksum(t: torch.Tensor) -> str:
    with torch.no_grad():
        flat = t.detach().reshape(-1)
        if flat.is_floating_point() or flat.is_complex():
            flat = flat.double() if not flat.is_complex() else torch.view_as_real(flat).double().reshape(-1)
        else:
            flat = flat.to(torch.float64)
        ramp = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device) if flat.numel() else flat
        return f"{float(flat.sum()).hex()}/{float((flat * ramp).sum()).hex()}"


def check_ranks_agree(model: nn.Module, constraints, example_inputs) -> None:
    """Collective over the default group; raises the same DistributedSetupError on every rank."""
    mine = fingerprint(model, constraints, example_inputs)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    first = everyone[0]
    for field, fix in (
            ("structure", "build the same model on every rank (same code, same sizes)"),
            ("pins", "pass the same fxplan.Constraints on every rank"),
            ("batch", "pass example inputs of the same shapes and dtypes on every rank (one global batch)")):
        differ = [r for r, fp in enumerate(everyone) if fp[field] != first[field]]
        if differ:
            r = differ[0]
            shown = (first["structure_text"], everyone[r]["structure_text"]) if field == "structure" else \
                (first[field], everyone[r][field])
            raise DistributedSetupError(
                f"ranks disagree on the model's {field}: rank 0 has {shown[0]}, rank{'s' if len(differ) > 1 else ''} "
                f"{differ} {'have' if len(differ) > 1 else 'has'} {shown[1]}; {fix}")
    if first["weights"] is None:
        return
    differ = [r for r, fp in enumerate(everyone) if fp["weights"] != first["weights"]]
    if differ:
        theirs = dict(everyone[differ[0]]["weights"])
        tensor = next(k for k, c in first["weights"] if theirs.get(k) != c)
        raise DistributedSetupError(
            f"ranks {differ} start from different initial weights than rank 0 (first differing tensor: {tensor}); "
            f"replicas must start identical: call torch.manual_seed(same seed) before building the model on every "
            f"rank, load the same checkpoint everywhere, or build the model on the meta device")
