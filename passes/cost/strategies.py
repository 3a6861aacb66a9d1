"""Every intra-layer strategy (dp, tp, fsdp, recompute, spec) of one layer on a stage of n devices."""

from __future__ import annotations

from fxplan.constraints import Constraints
from fxplan.passes.ir import StrategySpace
from fxplan.passes.sharding.sequence import is_sequence_parallel
from fxplan.plan import Strategy


def tp_degrees(space: StrategySpace, layer_index: int) -> tuple[int, ...]:
    """The tp degrees the strategy space has shardings for, ascending."""
    return tuple(sorted({tp for (u, tp), specs in space.specs.items() if u == layer_index and specs}))


def layer_strategies(layer_index: int, space: StrategySpace, stage_size: int,
                     constraints: Constraints | None = None) -> tuple[Strategy, ...]:
    """All strategies with dp * tp = stage_size, in a fixed order (tp, spec, fsdp, recompute).

    Respects the dp / tp / fsdp / reshard / recompute pins of `constraints`. FSDP needs dp > 1 and
    re-gathers in backward (ZeRO-3) unless reshard=False is pinned (kept gathered for the step). A layer without
    parameters gets no fsdp variants (they would cost exactly the same as without), unless fsdp is
    pinned True, in which case its fsdp=True twin stands in (so a pinned plan says fsdp everywhere).
    Empty when the pins leave nothing. With tp pinned above 1 only the specs that divide the layer
    are offered (`dividing_specs`): a user who pins tp wants its weights and compute divided, even
    where the cost model finds replicated compute cheaper (tiny layers on slow links).
    """
    pins = constraints or Constraints()
    out: list[Strategy] = []
    for tp in tp_degrees(space, layer_index):
        if stage_size % tp:
            continue
        dp = stage_size // tp
        if not pins.allows(tp=tp, dp=dp):
            continue
        specs = space.for_layer(layer_index, tp)
        specs = sequence_pinned(specs, pins.sp)
        if pins.tp is not None and pins.tp > 1:
            specs = dividing_specs(specs)
        has_params = any(spec.param_numel > 0 for spec in specs)
        fsdp_options = [False, True] if dp > 1 else [False]
        if pins.fsdp is None and not has_params:
            fsdp_options = [False]
        fsdp_options = [f for f in fsdp_options if pins.allows(fsdp=f)]
        rc_options = [r for r in (False, True) if pins.allows(recompute=r)]
        # (fsdp, reshard): FSDP re-gathers in backward (ZeRO-3) unless reshard=False is pinned (the
        # gathered layer kept for the step); the pin only concerns FSDP layers
        sharding = [(f, pins.reshard is not False) for f in fsdp_options]
        for spec in specs:
            for fsdp, reshard in sharding:
                for recompute in rc_options:
                    out.append(Strategy(dp=dp, tp=tp, fsdp=fsdp, recompute=recompute, spec=spec.label,
                                        reshard=reshard))
    return tuple(out)


def sequence_pinned(specs, sp: bool | None):
    """The specs a sequence-parallelism pin allows: sp=True keeps the sequence-parallel ones wherever a
    layer has them (a layer without a sequence dim keeps its own), sp=False drops them."""
    if sp is None:
        return specs
    sequence = tuple(s for s in specs if is_sequence_parallel(s.label))
    if sp:
        return sequence or specs
    return tuple(s for s in specs if not is_sequence_parallel(s.label))


DIVIDES_SLACK = 1.1  # within 10 % of the best division: elementwise ops and norms stay whole


def dividing_specs(specs):
    """The specs that divide a layer's work the most: FLOPs per device within DIVIDES_SLACK of the
    fewest, then parameters per device within it of the fewest among those (a table lookup divides
    no FLOPs but its table). The replicated spec survives only where nothing shards."""
    if not specs:
        return specs
    least = min(s.flops for s in specs)
    specs = [s for s in specs if s.flops <= least * DIVIDES_SLACK]
    least = min(s.param_numel for s in specs)
    return tuple(s for s in specs if s.param_numel <= least * DIVIDES_SLACK)
