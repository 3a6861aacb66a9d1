"""The batch checksum every train_step's step check carries: equal batches give equal digests whatever
their layout, and another batch (other values, rows shuffled, another dtype) gives another."""

from __future__ import annotations

import torch

from fxplan.runtime.lockstep import batch_digest

CPU = torch.device("cpu")


def _digest(*batch) -> int:
    return int(batch_digest(batch, CPU))


def test_equal_batches_agree_and_other_batches_do_not():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 5, generator=g), torch.randint(0, 9, (8,), generator=g)
    assert _digest(x, y) == _digest(x.clone(), y.clone())
    assert _digest(x, y) == _digest(x.t().contiguous().t(), y)  # a strided copy of the same values
    assert _digest(x, y) != _digest(x[torch.tensor([1, 0, 2, 3, 4, 5, 6, 7])], y)  # two rows swapped
    assert _digest(x, y) != _digest(x, y + 1)
    assert _digest(x, y) != _digest(y, x)
    assert _digest(x) != _digest(x.double())
    assert _digest(torch.tensor([True, False])) != _digest(torch.tensor([False, True]))
    assert _digest(torch.randn(3, dtype=torch.complex64, generator=g)) != 0
    assert _digest() == _digest("not a tensor") == 0
