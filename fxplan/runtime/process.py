"""This process's place in the torchrun job: the environment, the default process group, its
timeout, the device, and the checks every rank makes before it builds anything."""

from __future__ import annotations

import hashlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from fxplan.errors import DistributedSetupError
from fxplan.plan import Plan

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def in_torchrun() -> bool:
    return all(k in os.environ for k in TORCHRUN_VARS)


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


def device() -> torch.device:
    """Where this rank computes: its GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_world_size(plan: Plan) -> None:
    world_size = dist.get_world_size()
    if world_size != plan.world_size:
        raise DistributedSetupError(
            f"torchrun started {world_size} processes but the plan is for world size {plan.world_size}; "
            f"run with --nproc-per-node {plan.world_size} (x nodes) or compile for {world_size} devices")


def check_same_plan(plan: Plan) -> None:
    """Every rank holds the very same plan (collective: one all_gather_object of its hash)."""
    digest = hashlib.sha256(plan.to_json(indent=None).encode()).hexdigest()
    digests: list = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise DistributedSetupError(
            f"ranks {differ} hold a different plan than rank 0 (plan hashes differ); give every rank the same "
            f"plan (fxplan.compile inside torchrun agrees on one, or load one Plan.to_json() file everywhere)")
