"""This process's place in the torchrun job: the environment, the default process group, its
timeout, the device, and the checks every rank makes before it builds anything."""

from __future__ import annotations

import hashlib
import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from fxplan._torch import set_group_timeout
from fxplan.errors import DistributedSetupError
from fxplan.plan import Plan

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def in_torchrun() -> bool:
    return all(k in os.environ for k in TORCHRUN_VARS)


DEFAULT_TIMEOUT_S = 30.0
PLAN_WAIT_MARGIN_S = 120.0  # tracing and the cost model on rank 0, beyond the solver's own budget


_given: list = [None]  # distribute(timeout_s=) of this process, ahead of the environment


def timeout_s() -> float:
    """Timeout of every training collective and p2p transfer (the default group and every group fxplan
    makes): a stuck or lost peer ends the job after this instead of hanging. `distribute(timeout_s=)`
    sets it, else FXPLAN_TIMEOUT_S, else DEFAULT_TIMEOUT_S."""
    if _given[0] is not None:
        return _given[0]
    text = os.environ.get("FXPLAN_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise DistributedSetupError(f"FXPLAN_TIMEOUT_S={text!r} is not a positive number of seconds; unset it "
                                    f"(default {DEFAULT_TIMEOUT_S:g} s) or give e.g. FXPLAN_TIMEOUT_S=60")
    return value


def collective_timeout() -> timedelta:
    return timedelta(seconds=timeout_s())


def set_timeout(value) -> None:
    """distribute(timeout_s=): checked here, used by every group made from now on and by the default
    group (which compile() may have joined already, under the environment's timeout)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise DistributedSetupError(f"distribute(timeout_s={value!r}): give a positive number of seconds, e.g. "
                                    f"timeout_s=60, or leave it out (default {DEFAULT_TIMEOUT_S:g} s or FXPLAN_TIMEOUT_S)")
    _given[0] = float(value)
    if dist.is_initialized():
        set_group_timeout(collective_timeout())


def plan_wait_group(time_limit_s: float):
    """A world group for waiting on rank 0's plan: the search may take time_limit_s plus a margin,
    longer than a training collective may wait (collective over the world: every rank calls it)."""
    return dist.new_group(list(range(dist.get_world_size())),
                          timeout=timedelta(seconds=float(time_limit_s) + PLAN_WAIT_MARGIN_S + timeout_s()))


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
