"""FSDP's two policies as a Strategy field: printed, JSON round-trip, old files, pins."""

from __future__ import annotations

import pytest

from fxplan import ConstraintError, Constraints
from fxplan.passes.cost.strategies import layer_strategies
from fxplan.plan import Strategy
from test_cost import mlp_chain


def test_reshard_is_printed_round_trips_and_old_files_read_as_zero3():
    zero3, keep = Strategy(4, 1, fsdp=True), Strategy(4, 1, fsdp=True, reshard=False)
    assert (str(zero3), str(keep)) == ("dp4·fsdp", "dp4·fsdp·keep")
    assert Strategy.from_dict(keep.to_dict()) == keep and Strategy.from_dict(zero3.to_dict()) == zero3
    old = {"dp": 4, "tp": 1, "fsdp": True}  # a plan file written before the field existed
    assert Strategy.from_dict(old).reshard is True
    assert Strategy(4, 1, reshard=False) == Strategy(4, 1)  # nothing is gathered without fsdp


def test_reshard_pin_parses_and_chooses_the_fsdp_policy():
    assert Constraints.parse("fsdp=true,reshard=false") == Constraints(fsdp=True, reshard=False)
    with pytest.raises(ConstraintError):
        Constraints(reshard="no")
    _, space = mlp_chain(blocks=1)
    kept = layer_strategies(0, space, 4, Constraints(tp=1, fsdp=True, reshard=False))
    assert kept and all(s.fsdp and not s.reshard for s in kept)
    default = layer_strategies(0, space, 4, Constraints(tp=1))
    assert {(s.fsdp, s.reshard) for s in default} == {(False, True), (True, True)}
