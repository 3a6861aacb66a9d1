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
    """Join the torchrun job's default process group (gloo on CPU, NCCL with CUDA) unless joined, and
    bind this process to its device: also when the caller created the group, NCCL's collectives
    (object broadcasts included) run on the current CUDA device, which must be this rank's own."""
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise DistributedSetupError(
            f"distribute() needs the torchrun environment ({', '.join(missing)} not set); run under torchrun, "
            f"e.g. `torchrun --standalone --nproc-per-node N your_script.py`")
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(rank_device(backend, int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s()))
    device()


def rank_device(backend: str, local_rank: int, cuda_devices: int) -> torch.device:
    """One device per LOCAL_RANK when the group runs NCCL (a process that sees a single GPU, e.g.
    through CUDA_VISIBLE_DEVICES, uses that one); the CPU otherwise."""
    if "nccl" not in backend:
        return torch.device("cpu")
    if cuda_devices == 1:
        return torch.device("cuda", 0)
    if not 0 <= local_rank < cuda_devices:
        raise DistributedSetupError(f"LOCAL_RANK {local_rank} has no GPU of its own: this process sees "
                                    f"{cuda_devices} CUDA devices; start at most {cuda_devices} processes per node")
    return torch.device("cuda", local_rank)


def device() -> torch.device:
    """Where this rank computes (rank_device), made the current CUDA device under NCCL."""
    backend = str(dist.get_backend())
    chosen = rank_device(backend, int(os.environ.get("LOCAL_RANK", "0")),
                         torch.cuda.device_count() if "nccl" in backend else 0)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    return chosen


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
