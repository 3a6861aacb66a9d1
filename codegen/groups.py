"""Process-group KEYS: graphs name groups with short strings, never hold ProcessGroup objects.

A key reads `role:r0,r1,...` (e.g. 'tp:0,1', 'dp:0,2', 'stage:0,1,2,3'); the role is only for people
reading `gm.code` — the group is the sorted rank set, so 'tp:0,1' and 'dp:0,1' share one group.
Every rank must create the same groups in the same order (`dist.new_group` is collective over the
whole world), hence `required_group_keys` returns a deterministic, de-duplicated list. Making the
groups is the runtime's business (fxplan/runtime/groups.py); here is only arithmetic on ranks.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from fxplan.errors import DistributedSetupError
from fxplan.plan import Plan


def group_key(ranks: Iterable[int], role: str = "") -> str:
    ranks = tuple(int(r) for r in ranks)
    body = ",".join(str(r) for r in ranks)
    return f"{role}:{body}" if role else body


def ranks_of(key: str) -> tuple[int, ...]:
    """'tp:0,1' -> (0, 1) (members in key order: collectives stack pieces in this order)."""
    body = key.rsplit(":", 1)[-1]
    try:
        return tuple(int(r) for r in body.split(",") if r != "")
    except ValueError:
        raise DistributedSetupError(f"bad process-group key {key!r}; expected 'role:r0,r1,...'") from None


def canonical_ranks(key: str) -> tuple[int, ...]:
    """The rank set a key names, whatever its role and member order (one process group per set)."""
    return tuple(sorted(ranks_of(key)))


def position_in(key: str, rank: int) -> int:
    """Index of `rank` among the key's members (the piece of a gathered tensor that is its own)."""
    members = ranks_of(key)
    if rank not in members:
        raise DistributedSetupError(f"rank {rank} is not a member of group {key!r}")
    return members.index(rank)


# ---------------------------------------------------------------- which groups a plan needs


def mesh_groups(devices: Sequence[int], dp: int, tp: int) -> list[tuple[int, ...]]:
    """tp groups (consecutive local positions) and dp groups (stride tp) of one (dp, tp) mesh."""
    devices = tuple(devices)
    out = [devices[d * tp:(d + 1) * tp] for d in range(dp)]
    out += [devices[t::tp] for t in range(tp)]
    return out


def sub_row_groups(devices: Sequence[int], tp_src: int, tp_dst: int) -> list[tuple[int, ...]]:
    """Groups of a dp split refined inside a tp group (dp_dst = k * dp_src, tp_src = k * tp_dst).

    Inside each source tp group, the members holding the k different row sub-blocks with the same
    destination tp position: their all-gather is the backward of the local row slice.
    """
    devices = tuple(devices)
    if tp_src % tp_dst or tp_src == tp_dst:
        return []
    k = tp_src // tp_dst
    out = []
    for base in range(0, len(devices), tp_src):
        for r in range(tp_dst):
            out.append(tuple(devices[base + r + i * tp_dst] for i in range(k)))
    return out


def stage_layouts(plan: Plan) -> list[tuple[int, int]]:
    """Every (dp, tp) mesh any layer uses, plus (1, n) for replicated stage inputs."""
    n = len(plan.stages[0].devices)
    meshes = {(1, n)}
    for stage in plan.stages:
        for strat in stage.strategies.values():
            meshes.add((strat.dp, strat.tp))
    return sorted(meshes)


def required_group_keys(plan: Plan) -> list[str]:
    """Every process group any rank of `plan` may use, in one deterministic order.

    A superset by construction: for every stage, the tp/dp groups of every (dp, tp) mesh used
    anywhere in the plan (later stages receive tensors in an earlier stage's layout, at the same
    local positions), the row sub-groups between any two meshes, the stage itself, and the
    pipeline lanes {q, q + n, q + 2n, ...} (the ranks at one local position across stages).
    """
    meshes = stage_layouts(plan)
    found: set[tuple[int, ...]] = set()
    for stage in plan.stages:
        devices = stage.devices
        found.add(tuple(sorted(devices)))
        for dp, tp in meshes:
            found.update(tuple(sorted(g)) for g in mesh_groups(devices, dp, tp))
            for _, tp_dst in meshes:
                found.update(tuple(sorted(g)) for g in sub_row_groups(devices, tp, tp_dst))
    n = len(plan.stages[0].devices)
    for q in range(n):
        found.add(tuple(sorted({stage.devices[q] for stage in plan.stages})))  # chunks: a rank holds several
    keep = sorted((g for g in found if len(g) > 1), key=lambda g: (len(g), g))
    return [group_key(g) for g in keep]
