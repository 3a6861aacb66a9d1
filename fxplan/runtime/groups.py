"""Process groups by key: graphs name groups with short strings, never hold ProcessGroup objects.

A key reads `role:r0,r1,...` (e.g. 'tp:0,1', 'dp:0,2', 'stage:0,1,2,3'); the role is only for people
reading `gm.code` — the group is the sorted rank set, so 'tp:0,1' and 'dp:0,1' share one group.
Every rank must create the same groups in the same order (`dist.new_group` is collective over the
whole world), hence `required_group_keys` returns a deterministic, de-duplicated list and
`create_groups` makes them all.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from fxplan.errors import DistributedSetupError

_GROUPS: dict[tuple[int, ...], object] = {}


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


def _canonical(key: str) -> tuple[int, ...]:
    return tuple(sorted(ranks_of(key)))


def register(key: str, pg) -> None:
    _GROUPS[_canonical(key)] = pg


def clear() -> None:
    """Forget every registered group (tests that tear the default group down)."""
    _GROUPS.clear()


def get(key: str):
    """The ProcessGroup for `key`; the whole world falls back to the default group."""
    ranks = _canonical(key)
    pg = _GROUPS.get(ranks)
    if pg is not None:
        return pg
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and ranks == tuple(range(dist.get_world_size())):
        return dist.group.WORLD
    raise DistributedSetupError(
        f"no process group for {key!r}: create the plan's groups first "
        f"(fxplan.codegen.groups.create_groups(required_group_keys(plan, layer_graph, space))) on every rank"
    )


def position_in(key: str, rank: int) -> int:
    """Index of `rank` among the key's members (the piece of a gathered tensor that is its own)."""
    members = ranks_of(key)
    if rank not in members:
        raise DistributedSetupError(f"rank {rank} is not a member of group {key!r}")
    return members.index(rank)


def create_groups(keys: Sequence[str]) -> None:
    """dist.new_group for every key not yet registered; call with the same list on every rank."""
    import torch.distributed as dist

    world = tuple(range(dist.get_world_size()))
    for key in keys:
        ranks = _canonical(key)
        if len(ranks) < 2 or ranks in _GROUPS:
            continue
        _GROUPS[ranks] = dist.group.WORLD if ranks == world else dist.new_group(list(ranks))


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


def stage_layouts(plan) -> list[tuple[int, int]]:
    """Every (dp, tp) mesh any layer uses, plus (1, n) for replicated stage inputs."""
    n = len(plan.stages[0].devices)
    meshes = {(1, n)}
    for stage in plan.stages:
        for strat in stage.strategies.values():
            meshes.add((strat.dp, strat.tp))
    return sorted(meshes)


def required_group_keys(plan, layer_graph=None, space=None) -> list[str]:
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
        found.add(tuple(stage.devices[q] for stage in plan.stages))
    keep = sorted((g for g in found if len(g) > 1), key=lambda g: (len(g), g))
    return [group_key(g) for g in keep]
