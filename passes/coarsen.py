"""Group the traced graph into layers: contiguous node ranges, the units of stage placement and strategy.

Default grouping: one layer per repeated block, i.e. per child of every stack of blocks (a module
list whose children share one module type: encoder and decoder stacks, CNN stages; found through
node.meta["nn_module_stack"], which both the fx and the export path record), plus "embed" (nodes
before the first stack), "between.k" and "head" (nodes after the last), each cut at cut points
into pieces no heavier than the heaviest block. Without such a list the graph is cut where exactly one batch-carrying
activation is live (and no Python value crosses), one cut before each matmul-like op where possible.
`granularity=n` merges adjacent layers (balancing FLOPs) or splits them at those cut points.

get_attr nodes belong to the layer of their first user; a parameter used by later layers too is
listed in `shared_params` and reaches them through an edge like any other tensor.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict

import torch
import torch.fx as fx

from fxplan.passes.cost.flops import ATTENTION, CONV, MATMUL, counts_as_op, is_dense, node_flops, node_saved
from fxplan.passes.ir import (Layer, LayerEdge, LayerGraph, Traced, batch_coupling_op, batch_stat_channels, frozen_map,
                              out_of_place_name)

_INDEX_PATH = re.compile(r"^(.*)\.(\d+)$")


def coarsen(traced: Traced, granularity: int | None = None) -> LayerGraph:
    """Split `traced.gm` into layers (see the module docstring); `granularity` = target layer count."""
    if granularity is not None and granularity < 1:
        raise ValueError(f"granularity must be a positive number of layers, not {granularity}")
    graph = traced.gm.graph
    body = [n for n in graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    pos = {n: i for i, n in enumerate(body)}
    flops = [node_flops(n) for n in body]
    ranges, names = _block_ranges(body)
    cuts = _cut_points(body, pos)
    if ranges is None:
        ranges, names = _fallback_ranges(body, cuts)
    else:
        blocks = {i for i, n in enumerate(names) if _INDEX_PATH.match(n)}
        ranges, names = _split_heavy(ranges, names, _weights(body, flops), cuts, blocks)
    if granularity is not None and granularity != len(ranges):
        weights = _weights(body, flops)
        if granularity < len(ranges):
            ranges, names = _merge(ranges, names, weights, granularity)
        else:
            ranges, names = _subdivide(ranges, names, weights, granularity,
                                       cuts)
    return _build(traced, body, flops, ranges, _unique(names))


# ---------------------------------------------------------------- module-list blocks


def _norm_path(path: str) -> str:
    # Older export versions write "L['self'].blocks[0]"; make it "blocks.0".
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    for prefix in ("L.self.", "L.self"):
        if path.startswith(prefix):
            path = path[len(prefix):]
    return path.lstrip(".")


def _stack_paths(node: fx.Node) -> list[tuple[str, str]]:
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path, mtype = value if isinstance(value, tuple) else (str(value), "")
        mtype = getattr(mtype, "__qualname__", None) or str(mtype)
        out.append((_norm_path(str(path)), mtype.rsplit(".", 1)[-1]))
    return out


# A module list counts as a stack of repeated blocks when it covers at least this share of the nodes.
_MIN_STACK_SHARE = 0.05


def _block_ranges(body: list[fx.Node]):
    """Ranges [start, end) over `body`: one per child of every stack of repeated blocks (encoder and
    decoder stacks, CNN stages), and the nodes before, between and after the stacks ("embed",
    "between", "head"). Stacks are the module lists whose children share one type, taken by node
    coverage, skipping any that overlaps (contains or sits inside) one already taken."""
    first: dict[str, dict[int, int]] = defaultdict(dict)  # container -> child index -> first position
    types: dict[str, set[str]] = defaultdict(set)
    covered: dict[str, int] = defaultdict(int)
    last: dict[str, int] = {}
    cache: dict[int, list] = {}
    for i, node in enumerate(body):
        stack = node.meta.get("nn_module_stack")
        key = id(stack)
        if key not in cache:  # fx shares one stack dict per module call: parse once
            cache[key] = [(m.group(1), int(m.group(2)), t) for p, t in _stack_paths(node)
                          if (m := _INDEX_PATH.match(p))]
        for container, index, mtype in cache[key]:
            first[container].setdefault(index, i)
            types[container].add(mtype)
            covered[container] += 1
            last[container] = i
    stacks = [c for c, children in first.items() if len(children) >= 2 and len(types[c]) == 1]
    if not stacks:
        return None, None
    best = max(covered[c] for c in stacks)
    stacks.sort(key=lambda c: (-covered[c], c.count(".")))
    chosen: list[tuple[int, int, str]] = []  # (first position, end, container)
    for c in stacks:
        a, b = min(first[c].values()), last[c] + 1
        if c != stacks[0] and covered[c] < max(_MIN_STACK_SHARE * len(body), 0.25 * best):
            continue
        if all(b <= a2 or a >= b2 for a2, b2, _ in chosen):
            chosen.append((a, b, c))
    chosen.sort()
    ranges, names, cursor = [], [], 0
    for k, (a, end, container) in enumerate(chosen):
        if a > cursor:
            ranges.append((cursor, a))
            names.append("embed" if k == 0 else f"between.{k}")
        children = sorted(first[container].items(), key=lambda kv: kv[1])
        starts = [p for _, p in children]
        for j, (index, start) in enumerate(children):
            stop = starts[j + 1] if j + 1 < len(children) else end
            ranges.append((start, stop))
            names.append(f"{container}.{index}" if container else str(index))
        cursor = end
    if cursor < len(body):
        ranges.append((cursor, len(body)))
        names.append("head")
    return ranges, names


def _split_heavy(ranges, names, weights, cuts, blocks: set[int]):
    """Cut every non-block range heavier than the heaviest block at its most balanced cut points until
    each piece is at most that heavy (or no cut point is left inside it)."""
    w = lambda a, b: sum(weights[a:b])  # noqa: E731
    bound = max((w(*ranges[i]) for i in blocks), default=0.0)
    out_r, out_n = [], []
    for i, ((a, b), name) in enumerate(zip(ranges, names)):
        pieces = [(a, b)]
        if i not in blocks:
            while True:
                k = max(range(len(pieces)), key=lambda j: w(*pieces[j]))
                pa, pb = pieces[k]
                inner = [c for c in cuts if pa < c < pb]
                if w(pa, pb) <= bound or not inner:
                    break
                c = min(inner, key=lambda c: abs(w(pa, c) - w(pa, pb) / 2))
                pieces[k:k + 1] = [(pa, c), (c, pb)]
        out_r += pieces
        out_n += [name] if len(pieces) == 1 else [f"{name}/{j}" for j in range(len(pieces))]
    return out_r, out_n


# ---------------------------------------------------------------- cut points


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _cut_points(body: list[fx.Node], pos: dict) -> list[int]:
    """Positions c (cut between body[c-1] and body[c]) where exactly one batch-carrying tensor and no
    Python value is live. Placeholders and parameters are available everywhere and do not count."""
    n = len(body)
    batch_live = [0] * (n + 2)
    value_live = [0] * (n + 2)
    for p, node in enumerate(body):
        users = [pos.get(u, n) for u in node.users]
        if not users:
            continue
        q = max(users)
        if q <= p:
            continue
        if _is_tensor(node):
            if node.meta.get("fxplan_batch_dim") is None:
                continue
            arr = batch_live
        else:
            arr = value_live
        arr[p + 1] += 1  # live for cuts c in p+1 .. q
        arr[q + 1] -= 1
    cuts, b, v = [], 0, 0
    for c in range(1, n):
        b += batch_live[c]
        v += value_live[c]
        if b == 1 and v == 0:
            cuts.append(c)
    return cuts


def _is_heavy(node: fx.Node) -> bool:
    name = out_of_place_name(node)
    return name in MATMUL or name in CONV or name in ATTENTION or node.op == "call_module"


def _fallback_ranges(body: list[fx.Node], cuts: list[int]):
    """One cut at the latest cut point before each matmul-like op (after the previous one)."""
    heavy = [i for i, n in enumerate(body) if _is_heavy(n)]
    chosen: list[int] = []
    j = 0
    for prev, cur in zip(heavy, heavy[1:]):
        best = None
        while j < len(cuts) and cuts[j] <= cur:
            if cuts[j] > prev:
                best = cuts[j]
            j += 1
        if best is not None:
            chosen.append(best)
    bounds = [0, *chosen, len(body)]
    ranges = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    names = []
    for a, b in ranges:
        name = next((paths[-1][0] for n in body[a:b] if _is_heavy(n) and (paths := _stack_paths(n))), None)
        names.append(name or f"layer{len(names)}")
    return ranges, names


# ---------------------------------------------------------------- granularity


def _weights(body, flops) -> list[float]:
    """Per-node weight for balancing: FLOPs share plus a little node-count share (zero-FLOP graphs)."""
    total = sum(flops) or 1.0
    return [f / total + 0.01 / max(len(body), 1) for f in flops]


def _merge(ranges, names, weights, target):
    """Contiguous groups of layers minimising the heaviest group (binary search on the bound)."""
    w = [sum(weights[a:b]) for a, b in ranges]

    def groups_for(bound):
        groups, cur, acc = [], [], 0.0
        for i, x in enumerate(w):
            if cur and acc + x > bound:
                groups.append(cur)
                cur, acc = [], 0.0
            cur.append(i)
            acc += x
        groups.append(cur)
        return groups

    lo, hi = max(w), sum(w)
    for _ in range(60):
        mid = (lo + hi) / 2
        if len(groups_for(mid)) <= target:
            hi = mid
        else:
            lo = mid
    groups = groups_for(hi)
    while len(groups) < target:  # the bound left fewer groups: split the largest (never raises the max)
        k = max((g for g in groups if len(g) > 1), key=lambda g: sum(w[i] for i in g))
        at = groups.index(k)
        groups[at:at + 1] = [k[: len(k) // 2], k[len(k) // 2:]]
    new_ranges = [(ranges[g[0]][0], ranges[g[-1]][1]) for g in groups]
    return new_ranges, [_merged_name([names[i] for i in g]) for g in groups]


def _merged_name(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    matches = [_INDEX_PATH.match(p) for p in parts]
    if all(matches) and len({m.group(1) for m in matches}) == 1:
        return f"{matches[0].group(1)}.{matches[0].group(2)}-{matches[-1].group(2)}"
    return f"{parts[0]}+{parts[-1]}" if len(parts) == 2 else f"{parts[0]}+..+{parts[-1]}"


def _subdivide(ranges, names, weights, target, cuts):
    """Split the heaviest layer that has a cut point inside, at its most balanced cut, until `target`
    layers (or no cut point is left: then fewer). Pieces of layer "x" are named "x/0", "x/1", ..."""
    ranges, bases = list(ranges), list(names)
    while len(ranges) < target:
        best = None
        for i, (a, b) in enumerate(ranges):
            inner = [c for c in cuts if a < c < b]
            if not inner:
                continue
            total = sum(weights[a:b])
            c = min(inner, key=lambda c: abs(sum(weights[a:c]) - total / 2))
            if best is None or total > best[0]:
                best = (total, i, c)
        if best is None:
            break
        _, i, c = best
        a, b = ranges[i]
        ranges[i:i + 1] = [(a, c), (c, b)]
        bases[i:i + 1] = [bases[i], bases[i]]
    counts = {base: bases.count(base) for base in bases}
    seen: dict[str, int] = defaultdict(int)
    out = []
    for base in bases:
        out.append(f"{base}/{seen[base]}" if counts[base] > 1 else base)
        seen[base] += 1
    return ranges, out


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        if name in seen:
            seen[name] += 1
            name = f"{name}#{seen[name]}"
        else:
            seen[name] = 0
        out.append(name)
    return out


# ---------------------------------------------------------------- layers


def _build(traced: Traced, body, flops, ranges, names) -> LayerGraph:
    gm = traced.gm
    graph = gm.graph
    layer_of: dict[fx.Node, int] = {}
    for li, (a, b) in enumerate(ranges):
        for node in body[a:b]:
            layer_of[node] = li
    order = {n: i for i, n in enumerate(graph.nodes)}
    last = len(ranges) - 1
    for node in graph.nodes:
        if node.op == "get_attr":
            users = [u for u in node.users if u in layer_of]
            layer_of[node] = layer_of[min(users, key=order.__getitem__)] if users else last
    node_flops_map = {n: f for n, f in zip(body, flops)}
    params = dict(gm.named_parameters(remove_duplicate=False))

    members: list[list[fx.Node]] = [[] for _ in ranges]
    for node in graph.nodes:
        if node in layer_of:
            members[layer_of[node]].append(node)

    users_of_target: dict[str, set[int]] = defaultdict(set)
    layers, edge_map = [], defaultdict(list)
    for li, nodes in enumerate(members):
        inside = set(nodes)
        inputs: list[fx.Node] = []
        seen_inputs: set[fx.Node] = set()
        for node in nodes:
            for a in node.all_input_nodes:
                if a not in inside and a not in seen_inputs and _is_tensor(a):
                    seen_inputs.add(a)
                    inputs.append(a)
        for a in inputs:
            src = -1 if a.op == "placeholder" else layer_of[a]
            edge_map[(src, li)].append(a.name)
            if a.op == "get_attr":
                users_of_target[str(a.target)].add(li)
        outputs = [n.name for n in nodes if _is_tensor(n) and any(
            u.op == "output" or (u in layer_of and layer_of[u] > li) for u in n.users)]
        owned = [str(n.target) for n in nodes if n.op == "get_attr" and str(n.target) in params]
        for target in owned:
            users_of_target[target].add(li)
        saved: dict[fx.Node, None] = {}
        extra = 0.0
        for node in nodes:
            s, e = node_saved(node)
            saved.update(dict.fromkeys(s))
            extra += e
        act = extra + sum(_nbytes(traced, n) for n in saved)
        layers.append(Layer(
            index=li, name=names[li], nodes=tuple(n.name for n in nodes), params=tuple(owned),
            param_numel=sum(params[t].numel() for t in owned),
            flops=float(sum(node_flops_map.get(n, 0.0) for n in nodes)), act_bytes=float(act),
            inputs=tuple(a.name for a in inputs), outputs=tuple(outputs),
            signature=_signature(nodes, inside),
            batch_coupled=next((name for name in map(batch_coupling_op, nodes) if name), ""),
            # per step: one float64 all-reduce of (sum, sum of squares) per channel forward, one of
            # (sum dy, sum dy * xhat) backward, when dp synchronises the statistics
            batch_stat_bytes=tuple(16.0 * c for c in (batch_stat_channels(n, traced.tensors) for n in nodes) if c),
            dense_flops=float(sum(node_flops_map.get(n, 0.0) for n in nodes if is_dense(n))),
            ops=sum(1 for n in nodes if counts_as_op(n)),
        ))
    edges = tuple(LayerEdge(src=s, dst=d, tensors=tuple(t)) for (s, d), t in sorted(edge_map.items()))
    shared = {t: tuple(sorted(ls)) for t, ls in users_of_target.items() if len(ls) > 1}
    return LayerGraph(
        layers=tuple(layers), edges=edges, tensors=traced.tensors, batch_size=traced.batch_size,
        placeholders=traced.placeholders, loss_node=traced.loss_node, shared_params=frozen_map(shared),
    )


def _nbytes(traced: Traced, node: fx.Node) -> float:
    meta = traced.tensors.get(node.name)
    return float(meta.nbytes) if meta is not None else 0.0


def _signature(nodes: list[fx.Node], inside: set) -> str:
    """Equal for structurally identical layers: same ops, wiring, shapes, dtypes and constants."""
    local = {n: i for i, n in enumerate(nodes)}
    external: dict[fx.Node, int] = {}

    def ref(a):
        if isinstance(a, fx.Node):
            if a in local:
                return f"%{local[a]}"
            return f"$" + str(external.setdefault(a, len(external)))
        if isinstance(a, (tuple, list)):
            return "(" + ",".join(ref(x) for x in a) + ")"
        if isinstance(a, dict):
            return "{" + ",".join(f"{k}={ref(v)}" for k, v in a.items()) + "}"
        return repr(a)[:40]

    parts = []
    for node in nodes:
        val = node.meta.get("val")
        shape = (tuple(val.shape), str(val.dtype)) if isinstance(val, torch.Tensor) else type(val).__name__
        if node.op == "get_attr":
            parts.append(f"attr{shape}")
        else:
            parts.append(f"{node.op}:{out_of_place_name(node)}{shape}{ref(node.args)}{ref(node.kwargs)}")
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]
