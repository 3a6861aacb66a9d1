"""The plan file's schema: every field of Plan.to_json() checked by name and type before a Plan is
built, so a hand-edited file is either a consistent plan or a PlanFileError naming the field.

JSON only (never pickle); the text is bounded in size and nesting depth before it is parsed, so an
oversized or deeply nested file fails with a message instead of a MemoryError or RecursionError.
Types are strict: `"false"` is not a boolean, `2.0` or `true` is not an int, and floats must be
finite. Internal consistency (device cover, dp*tp per stage) is Plan.check_shape's job; whether
the strategies exist for a model is planner.check_given_plan's.
"""

from __future__ import annotations

import json
import math

from fxplan.constraints import CHUNKED_SCHEDULES as CHUNKED, SCHEDULES
from fxplan.errors import PlanFileError

MAX_PLAN_BYTES = 16 * 2**20  # a 10,000-layer plan is about 3 MiB
MAX_DEPTH = 8  # Plan.to_json() nests 5 deep (plan > stages > [i] > strategies > layer)
MAX_WORLD = 1 << 20
MAX_MICROBATCHES = 1 << 40
FIX = "write plans with Plan.to_json() and edit values, not their types"

_STRATEGY_FIELDS = {"dp": "int", "tp": "int", "fsdp": "bool", "recompute": "bool", "spec": "str", "reshard": "bool"}
_STAGE_FIELDS = {"index": "int", "layers": "list", "devices": "list", "strategies": "dict",
                 "estimated_memory_bytes": "number", "estimated_compute_s": "number"}
_PLAN_FIELDS = {"format": "str", "version": "int", "pp": "int", "microbatches": "int", "schedule": "str",
                "chunks": "int", "batch_size": "int", "world_size": "int", "estimated_iteration_s": "number",
                "solver": "dict", "assumptions": "dict", "model": "dict", "stages": "list",
                "warnings": "list"}
_SOLVER_FIELDS = {"status": "str", "objective": "number?", "gap": "number?", "seconds": "number",
                  "planner": "str", "candidates": "int", "pruned": "int",
                  "solved": "int", "cut": "int", "infeasible": "int", "bound": "number?"}
_REQUIRED_PLAN = ("pp", "microbatches", "schedule", "stages", "estimated_iteration_s")
_REQUIRED_STAGE = ("index", "layers", "devices", "strategies")
_REQUIRED_STRATEGY = ("dp", "tp")


def parse_plan_text(text) -> object:
    """json.loads with a size and a depth limit (checked on the text, before parsing)."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise PlanFileError("plan is not UTF-8 text; pass the text of Plan.to_json()") from None
    if not isinstance(text, str):
        raise PlanFileError(f"Plan.from_json takes the JSON text (str), got {type(text).__name__}; "
                            f"read the file first, e.g. Plan.from_json(open(path).read())")
    if len(text) > MAX_PLAN_BYTES:
        raise PlanFileError(f"plan text is {len(text):,} characters, over the {MAX_PLAN_BYTES:,} a plan may have; "
                            f"pass the text of Plan.to_json() (not another file)")
    depth = _nesting_depth(text)
    if depth > MAX_DEPTH:
        raise PlanFileError(f"plan JSON nests {depth} levels deep, a plan has at most {MAX_DEPTH}; {FIX}")
    try:
        # NaN/Infinity parse; the schema admits them only where a plan writes them
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise PlanFileError(f"plan JSON nests too deep; {FIX}") from None
    except (TypeError, ValueError) as exc:
        raise PlanFileError(f"plan is not valid JSON ({exc}); pass the text of Plan.to_json()") from None


def _no_duplicate_keys(pairs) -> dict:
    """json would keep the last of two equal keys: a hand edit that added a field instead of changing it."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise PlanFileError(f"plan JSON gives field {key!r} twice (the second would silently win); keep one "
                                f"{key!r} with the value you mean")
        seen[key] = value
    return seen


def _nesting_depth(text: str) -> int:
    """Deepest [ / { nesting outside strings, stopping early once past the limit."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    return deepest
        elif ch in "]}":
            depth -= 1
    return deepest


def check_plan_dict(data) -> None:
    """Raise PlanFileError naming the first field whose name, type or range is wrong."""
    if not isinstance(data, dict):
        raise PlanFileError(f"a plan is a JSON object, got {_json_type(data)}; pass the text of Plan.to_json()")
    _fields(data, _PLAN_FIELDS, _REQUIRED_PLAN, "plan")
    for name in ("pp", "microbatches", "chunks"):
        if name in data:
            _positive(data[name], name, MAX_MICROBATCHES if name == "microbatches" else MAX_WORLD)
    if data["schedule"] not in SCHEDULES:
        raise PlanFileError(f"plan field schedule = {data['schedule']!r:.40} is not a schedule fxplan knows; use one "
                            f"of {', '.join(SCHEDULES)} (names are lower case)")
    chunks = data.get("chunks", 1)
    if chunks != 1 and data["schedule"] not in CHUNKED:
        raise PlanFileError(f"plan field chunks = {chunks} but schedule {data['schedule']!r} runs one chunk per rank; "
                            f"set chunks to 1 or use one of {', '.join(CHUNKED)}")
    for name in ("batch_size", "world_size"):
        if name in data and not 0 <= data[name] <= (MAX_WORLD if name == "world_size" else 1 << 62):
            raise PlanFileError(f"plan field {name} = {data[name]} is out of range; use 0 (unknown) or a positive "
                                f"count")
    _non_negative(data["estimated_iteration_s"], "estimated_iteration_s")
    if "solver" in data:
        _fields(data["solver"], _SOLVER_FIELDS, (), "solver")
    for name in ("assumptions", "model"):
        if name in data:
            for key, value in data[name].items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise PlanFileError(f"plan field {name}.{key} = {value} is not finite; {FIX}")
    for i, warning in enumerate(data.get("warnings", ())):
        if not isinstance(warning, str):
            raise PlanFileError(f"plan field warnings[{i}] is {type(warning).__name__}, a warning is a str; {FIX}")
    stages = data["stages"]
    if not stages:
        raise PlanFileError("plan field stages is empty; a plan has one entry per pipeline stage")
    for i, stage in enumerate(stages):
        _check_stage(stage, f"stages[{i}]")


def _check_stage(stage, where: str) -> None:
    if not isinstance(stage, dict):
        raise PlanFileError(f"plan field {where} must be an object, got {_json_type(stage)}; {FIX}")
    _fields(stage, _STAGE_FIELDS, _REQUIRED_STAGE, where)
    for j, name in enumerate(stage["layers"]):
        if not isinstance(name, str) or not name:
            raise PlanFileError(f"plan field {where}.layers[{j}] must be a layer name (string), got {name!r}; {FIX}")
    if len(set(stage["layers"])) != len(stage["layers"]):
        raise PlanFileError(f"plan field {where}.layers names a layer twice; list each layer once")
    devices = stage["devices"]
    if not devices:
        raise PlanFileError(f"plan field {where}.devices is empty; every stage runs on at least one device")
    for j, dev in enumerate(devices):
        if not _is_int(dev) or not 0 <= dev < MAX_WORLD:
            raise PlanFileError(f"plan field {where}.devices[{j}] = {dev!r} is not a device rank (an int >= 0); {FIX}")
    if len(set(devices)) != len(devices):
        raise PlanFileError(f"plan field {where}.devices lists a rank twice ({devices}); stages must cover every rank exactly once")
    for name in ("estimated_memory_bytes", "estimated_compute_s"):
        if name in stage:
            _non_negative(stage[name], f"{where}.{name}")
    for layer, strategy in stage["strategies"].items():
        at = f"{where}.strategies[{layer!r}]"
        if not isinstance(strategy, dict):
            raise PlanFileError(f"plan field {at} must be an object with dp, tp, ...; got {_json_type(strategy)}")
        _fields(strategy, _STRATEGY_FIELDS, _REQUIRED_STRATEGY, at)
        _positive(strategy["dp"], f"{at}.dp", MAX_WORLD)
        _positive(strategy["tp"], f"{at}.tp", MAX_WORLD)


def _fields(obj, schema: dict, required, where: str) -> None:
    if not isinstance(obj, dict):
        raise PlanFileError(f"plan field {where} must be an object, got {_json_type(obj)}; {FIX}")
    for name in required:
        if name not in obj:
            raise PlanFileError(f"plan field {where}.{name} is missing; {FIX}" if where != "plan" else
                                f"plan field {name} is missing; {FIX}")
    unknown = sorted(set(obj) - set(schema))
    if unknown:
        raise PlanFileError(f"{where} has unknown field(s) {unknown}; known: {', '.join(schema)} (a typo?)")
    for name, kind in schema.items():
        if name in obj and not _has_type(obj[name], kind):
            label = name if where == "plan" else f"{where}.{name}"
            raise PlanFileError(f"plan field {label} must be {_KIND_TEXT[kind]}, got {_json_type(obj[name])} "
                                f"{obj[name]!r:.60}; {FIX}")


_KIND_TEXT = {"int": "an integer", "bool": "true or false (a JSON boolean, not a string)", "str": "a string",
              "number": "a finite number", "number?": "a number (NaN allowed)", "list": "a list",
              "dict": "an object"}


def _has_type(value, kind: str) -> bool:
    if kind == "int":
        return _is_int(value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind in ("number", "number?"):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number and (kind == "number?" or math.isfinite(value))
    return isinstance(value, {"list": list, "dict": dict}[kind])


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(value, label: str, most: int) -> None:
    if value < 1:
        raise PlanFileError(f"plan field {label} = {value}; it must be a positive integer (degrees and counts "
                            f"are >= 1)")
    if value > most:
        raise PlanFileError(f"plan field {label} = {str(value)[:24]}{'...' if len(str(value)) > 24 else ''} is "
                            f"over the {most:,} a plan may have; {FIX}")


def _non_negative(value, label: str) -> None:
    if value < 0:
        raise PlanFileError(f"plan field {label} = {value} is negative; estimates are >= 0 ({FIX})")


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "null" if value is None else type(value).__name__
