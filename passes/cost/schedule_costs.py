"""The schedule-specific terms of a candidate's Problem: its bubble share and a split backward's cost.

- bubble share: passes/solve/schedule_terms.py reads it off the schedule's own action lists, for
  the proportions of F, I and W of the layers at their fastest strategies.
- split backward: a zero-bubble schedule runs every layer's weight gradient as a pass of its own
  (torch's stage_backward_weight after stage_backward_input), so each layer pays one more pass
  dispatch per microbatch; with no kernel-launch figure in the cluster description it is priced
  at the cluster's per-operation latency (`intra_latency`). On big layers this is noise beside the
  bubble a split saves; on tiny layers with many microbatches it is what makes 1F1B the better plan.
"""

from __future__ import annotations

import numpy as np

from fxplan.cluster import Cluster
from fxplan.constraints import chunks_of
from fxplan.passes.solve.schedule_terms import bubble_share, chunked_fields, splits_backward

PASSES_PER_SPLIT_LAYER = 1  # the extra W pass a split backward adds per layer and microbatch


GREEDY_SHARE = ("zb-auto",)
"""Schedules whose share comes from the automatic scheduler's runs (a second each): a bound needs
none, since an iteration's time only grows with the share (0 stands in, a share is never below)."""


def schedule_fields(schedule: str, pp: int, microbatches: int, fwd, bwd, wgt, cluster: Cluster,
                    share_floor: bool = False) -> dict:
    """{bubble_share, split} for Problem(...): fwd/bwd/wgt are per layer [K_u] arrays. `share_floor`:
    the share may be a lower bound of the schedule's (for the search's bounds)."""
    f = b = w = 0.0
    for tf, tb, tw in zip(fwd, bwd, wgt):
        k = int(np.argmin(np.asarray(tf) + tb + tw))
        f, b, w = f + float(tf[k]), b + float(tb[k]), w + float(tw[k])
    chunked = {}
    if chunks_of(schedule) > 1:
        chunked = chunked_fields(schedule, pp, microbatches, f, b, w)
        share = chunked.pop("bubble_share")
    elif share_floor and schedule in GREEDY_SHARE and pp > 1:
        share = 0.0
    else:
        share = bubble_share(schedule, pp, microbatches, f, b, w)
    split = ()
    if splits_backward(schedule) and pp > 1:
        extra = PASSES_PER_SPLIT_LAYER * cluster.intra_latency
        split = tuple(np.full(len(tf), extra) for tf in fwd)
    return {"bubble_share": share, "split": split, **chunked}
