"""Ranks in lock-step: every train_step starts with a step counter all ranks compare, so a rank
that skipped or repeated a step raises on the next collective, naming itself and the step, instead
of its collectives silently pairing with another step's (and torchrun blaming whoever timed out).

Before the comparison each rank also writes its step to the job's key-value store: when the
comparison itself fails (a peer left, is stuck, or sits in another collective) the message names
the ranks whose last step lags, read from the store.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from fxplan._torch import default_store
from fxplan.errors import DistributedSetupError
from fxplan.runtime.peer_watch import PeerWatch

TAG = 0x66787374  # "fxst": a gather of another collective's tensors does not carry it
_created = [0]  # LockSteps made in this process: the same sequence on every rank, so one namespace each


class LockStep:
    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device
        self.step = 0
        self._pending = None  # a deferred step check: (work, gathered rows, stage)
        self._store = default_store()
        _created[0] += 1
        self._space = _created[0]
        self.peers = PeerWatch(rank, world, self._store, self._space)  # names a rank whose process dies

    def begin_step(self, stage: int, defer: bool = False, batch: tuple = ()) -> None:
        """Collective over the default group at the start of every train_step. With `defer` it is only
        posted here and checked in `end_step`: a blocking check is a barrier between iterations, and
        pipeline schedules whose later stages start the next iteration while the first still drains
        (zb-h2, zb-auto) lose their gain to it. The batch's checksum travels with the step: every rank
        must pass the same global batch."""
        self.end_step()
        self.step += 1
        self.peers.step = self.step
        self._store.set(self._key(self.rank), str(self.step))
        mine = torch.cat([torch.tensor([TAG, self.step, self.rank], dtype=torch.int64, device=self.device),
                          batch_digest(batch, self.device).reshape(1)])
        everyone = [torch.zeros_like(mine) for _ in range(self.world)]
        try:
            work = dist.all_gather(everyone, mine, async_op=defer)
        except Exception as exc:  # noqa: BLE001 - every way the check can fail gets the same message
            raise self._failed(stage, exc) from None
        self._pending = (work, everyone, stage) if defer else None
        if not defer:
            self._check(everyone)

    def end_step(self) -> None:
        """Finish a deferred step check (a no-op when the check already ran at the step's start)."""
        pending, self._pending = getattr(self, "_pending", None), None
        if pending is None:
            return
        work, everyone, stage = pending
        try:
            work.wait()
        except Exception as exc:  # noqa: BLE001 - every way the check can fail gets the same message
            raise self._failed(stage, exc) from None
        self._check(everyone)

    def _failed(self, stage: int, exc: Exception) -> DistributedSetupError:
        return DistributedSetupError(
            f"rank {self.rank} (stage {stage}) at step {self.step}: the ranks' step check failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); {self._laggards()}")

    def _check(self, everyone: list) -> None:
        rows = [t.tolist() for t in everyone]
        wrong = [r for r, row in enumerate(rows) if row[0] != TAG]
        if wrong:
            raise DistributedSetupError(
                f"rank {self.rank} at step {self.step}: ranks {wrong} are in another collective than train_step's "
                f"step check; every rank must call train_step the same number of times, in the same order as "
                f"its other collectives")
        steps = {r: row[1] for r, row in enumerate(rows)}
        if len(set(steps.values())) > 1:
            majority = max(set(steps.values()), key=list(steps.values()).count)
            off = {r: s for r, s in steps.items() if s != majority}
            raise DistributedSetupError(
                f"ranks out of step: {', '.join(f'rank {r} is at step {s}' for r, s in off.items())} while the "
                f"others are at step {majority}; every rank must call train_step once per iteration")
        differ = [r for r, row in enumerate(rows) if row[3] != rows[0][3]]
        if differ:
            raise DistributedSetupError(
                f"ranks {differ} passed another batch to train_step than rank 0 at step {self.step} (the batches' "
                f"checksums differ); every rank passes the same global batch: seed data loading and shuffling the "
                f"same on every rank, or broadcast the batch from rank 0")

    def _laggards(self) -> str:
        deadline = time.monotonic() + 2.0
        steps = {}
        for r in range(self.world):
            try:
                if self._store.check([self._key(r)]):
                    steps[r] = int(self._store.get(self._key(r)))
            except Exception:  # noqa: BLE001 - the store may be gone with the job
                break
            if time.monotonic() > deadline:
                break
        behind = {r: s for r, s in steps.items() if s < self.step}
        missing = [r for r in range(self.world) if r not in steps]
        if behind:
            return (f"{', '.join(f'rank {r} last started step {s}' for r, s in behind.items())}: it skipped a "
                    f"step, left, or hangs; every rank must call train_step once per iteration")
        if missing:
            return f"ranks {missing} never started a step"
        return "every rank started this step: a peer failed or is stuck inside it (see its own error)"

    def lost_peers(self, wait_s: float = 1.0) -> list[int]:
        """Ranks on this host whose process is gone without ending by itself (peer_watch.py)."""
        return self.peers.lost_peers(wait_s)

    def _key(self, rank: int) -> str:
        return f"fxplan/step/{self._space}/{rank}"


def batch_digest(batch, device) -> torch.Tensor:
    """An exact checksum of the batch's bits, an int64 on `device`: integer sums do not depend on the
    order of summation, so equal batches give equal digests on every rank and device (float sums need
    not), and rows are weighted by position, so a batch shuffled differently differs too. No host sync."""
    total = torch.zeros((), dtype=torch.int64, device=device)
    for i, t in enumerate(batch):
        if not isinstance(t, torch.Tensor) or t.numel() == 0 or t.is_meta:
            continue
        rows = _row_sums(_bits(t.detach()))
        weights = torch.arange(1, rows.numel() + 1, dtype=torch.int64, device=rows.device)
        total = total * 1_000_003 + (rows * weights).sum().to(device) + i
    return total


def _row_sums(bits: torch.Tensor) -> torch.Tensor:
    """Per row (dim 0) the sum of its bits as int64 words, wrapping modulo 2**64 (as integer adds do
    on every device, in any order). Read as 8-byte words where the row's bytes allow it: widening
    4-byte words to int64 element by element costs 70x more (25 ms on a 6144 x 512 float batch)."""
    flat = bits.reshape(bits.shape[0] if bits.dim() else 1, -1)
    if flat.element_size() < 8 and (flat.shape[1] * flat.element_size()) % 8 == 0:
        try:
            return flat.view(torch.int64).sum(1)
        except RuntimeError:  # a storage offset that is no multiple of 8 bytes: widen instead
            pass
    return flat.sum(1, dtype=torch.int64)


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.is_complex():
        t = torch.view_as_real(t)
    t = t.contiguous()
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
