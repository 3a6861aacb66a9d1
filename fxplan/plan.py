"""The Plan: what the planner decided, immutable, printable, and versioned JSON."""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from fxplan.constraints import chunks_of
from fxplan.errors import PlanFileError
from fxplan.plan_schema import check_plan_dict, parse_plan_text

PLAN_FORMAT = "fxplan.plan"
PLAN_VERSION = 1


@dataclass(frozen=True)
class Strategy:
    """One layer's intra-layer strategy on its stage's devices (dp * tp = devices of the stage)."""

    dp: int
    tp: int
    fsdp: bool = False
    recompute: bool = False
    spec: str = "R"  # label of the tensor-parallel sharding (passes.ir.TPSpec.label); "R" when tp == 1
    reshard: bool = True  # FSDP frees the gathered weights after each forward (ZeRO-3) or keeps them for the step

    def __post_init__(self):
        if not self.fsdp and not self.reshard:  # without FSDP nothing is gathered: one canonical value
            object.__setattr__(self, "reshard", True)

    def __str__(self) -> str:
        text = f"dp{self.dp}"
        if self.tp > 1:
            text += f"·tp{self.tp}[{self.spec}]"
        if self.fsdp:
            text += "·fsdp" if self.reshard else "·fsdp·keep"
        if self.recompute:
            text += "·rc"
        return text

    def to_dict(self) -> dict:
        return dict(dp=self.dp, tp=self.tp, fsdp=self.fsdp, recompute=self.recompute, spec=self.spec,
                    reshard=self.reshard)

    @classmethod
    def from_dict(cls, data: dict) -> "Strategy":
        try:
            return cls(dp=int(data["dp"]), tp=int(data["tp"]), fsdp=bool(data.get("fsdp", False)),
                       recompute=bool(data.get("recompute", False)), spec=str(data.get("spec", "R")),
                       reshard=bool(data.get("reshard", True)))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanFileError(f"bad strategy {data!r}: {exc}; each needs dp, tp (and optional fsdp, recompute, spec, reshard)") from None


@dataclass(frozen=True)
class Stage:
    index: int
    layers: tuple[str, ...]
    devices: tuple[int, ...]
    strategies: Mapping[str, Strategy]
    estimated_memory_bytes: float = 0.0
    estimated_compute_s: float = 0.0  # one microbatch's forward+backward on this stage

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "devices", tuple(int(d) for d in self.devices))
        object.__setattr__(self, "strategies", MappingProxyType(dict(self.strategies)))


@dataclass(frozen=True)
class SolverInfo:
    status: str = "n/a"  # "optimal" | "time_limit" | "given" | ...
    objective: float = float("nan")
    gap: float = 0.0  # relative MIP gap of the chosen candidate (0 when proven optimal)
    seconds: float = 0.0
    planner: str = "miqp"
    candidates: int = 0  # (pp, microbatches, schedule) candidates considered
    pruned: int = 0  # candidates skipped by lower bounds (their own, or a dominating candidate's)
    solved: int = 0  # candidates whose MILP finished: optimal, or proven not to beat the incumbent
    cut: int = 0  # candidates the time limit stopped or never reached (their bounds stay in the gap)
    infeasible: int = 0  # candidates whose every assignment exceeds device memory
    bound: float = 0.0  # the global lower bound the gap is measured against, seconds (0: none proven)


@dataclass(frozen=True)
class Plan:
    pp: int
    microbatches: int
    schedule: str
    stages: tuple[Stage, ...]
    estimated_iteration_s: float
    solver: SolverInfo = SolverInfo()
    batch_size: int = 0
    world_size: int = 0
    chunks: int = 1  # model chunks per rank (interleaved schedules)
    assumptions: Mapping[str, object] = field(default_factory=dict)  # dtype_bytes, optimizer bytes, cluster
    model: Mapping[str, object] = field(default_factory=dict)  # layer names and parameter count, to validate
    warnings: tuple[str, ...] = ()  # what the user should know, e.g. ops a strategy leaves replicated, and why

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple(self.stages))
        object.__setattr__(self, "assumptions", MappingProxyType(dict(self.assumptions)))
        object.__setattr__(self, "model", MappingProxyType(dict(self.model)))
        object.__setattr__(self, "warnings", tuple(str(w) for w in self.warnings))

    # ------------------------------------------------------------ views
    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(name for stage in self.stages for name in stage.layers)

    def strategy(self, layer: str) -> Strategy:
        for stage in self.stages:
            if layer in stage.strategies:
                return stage.strategies[layer]
        raise KeyError(layer)

    def stage_of(self, layer: str) -> int:
        for stage in self.stages:
            if layer in stage.strategies:
                return stage.index
        raise KeyError(layer)

    @property
    def placement(self) -> Placement:
        """Which place along the pipeline runs each stage (a loop, or zbv's V)."""
        return stage_placement(self.schedule, self.pp, self.chunks)

    def stages_of_rank(self, rank: int) -> tuple[int, ...]:
        """The indices of the stages `rank` holds, in pipeline order (one, or `chunks`)."""
        return tuple(s.index for s in self.stages if rank in s.devices)

    def _bubble_text(self) -> str:
        bubble = self.assumptions.get("schedule_bubble")
        return f" (bubble {float(bubble):.1%})" if bubble is not None and self.pp > 1 else ""

    def summary(self) -> str:
        solver = self.solver
        chunks = f", chunks={self.chunks} ({len(self.stages)} stages)" if self.chunks > 1 else ""
        head = (f"fxplan plan: {self.world_size} devices, global batch {self.batch_size}, pp={self.pp}{chunks}, "
                f"microbatches={self.microbatches}, schedule={self.schedule}{self._bubble_text()}\n"
                f"estimated iteration {self.estimated_iteration_s * 1e3:.3f} ms  "
                f"(planner {solver.planner}, {solver.status}, gap {solver.gap:.2%}, {solver.seconds:.2f} s)")
        if solver.candidates and solver.planner != "grid":
            head += (f"\ncandidates {solver.candidates} (pp, microbatches, schedule): {solver.solved} solved, "
                     f"{solver.pruned} pruned by bounds, {solver.cut} cut by the time limit, "
                     f"{solver.infeasible} out of memory")
        rows = [head, f"{'stage':>5} {'devices':<14} {'memory GiB':>10}  layers: strategy"]
        for stage in self.stages:
            devs = stage.devices
            dev_text = f"{devs[0]}-{devs[-1]}" if len(devs) > 1 else str(devs[0])
            runs: list[tuple[str, str, str]] = []  # group consecutive layers with one strategy
            for name in stage.layers:
                text = str(stage.strategies[name])
                if runs and runs[-1][2] == text:
                    runs[-1] = (runs[-1][0], name, text)
                else:
                    runs.append((name, name, text))
            body = ", ".join(f"{a}{'..' + b if b != a else ''}: {t}" for a, b, t in runs)
            rows.append(f"{stage.index:>5} {dev_text:<14} {stage.estimated_memory_bytes / 2**30:>10.2f}  {body}")
        rows.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.summary()

    # ------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "pp": self.pp,
            "microbatches": self.microbatches,
            "schedule": self.schedule,
            "chunks": self.chunks,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "estimated_iteration_s": self.estimated_iteration_s,
            "solver": _solver_dict(self.solver),
            "assumptions": dict(self.assumptions),
            "model": dict(self.model),
            "warnings": list(self.warnings),
            "stages": [
                {
                    "index": s.index,
                    "layers": list(s.layers),
                    "devices": list(s.devices),
                    "strategies": {name: s.strategies[name].to_dict() for name in s.layers},
                    "estimated_memory_bytes": s.estimated_memory_bytes,
                    "estimated_compute_s": s.estimated_compute_s,
                }
                for s in self.stages
            ],
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(parse_plan_text(text))

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanFileError("not an fxplan plan (missing \"format\": \"fxplan.plan\"); write it with Plan.to_json()")
        if data.get("version") != PLAN_VERSION:
            raise PlanFileError(f"plan version {data.get('version')!r} is not supported (this fxplan reads "
                                f"version {PLAN_VERSION}); re-plan with this version")
        check_plan_dict(data)  # every field by name and type: below, values are what they claim to be
        try:
            stages = tuple(
                Stage(
                    index=int(s["index"]),
                    layers=tuple(s["layers"]),
                    devices=tuple(s["devices"]),
                    strategies={k: Strategy.from_dict(v) for k, v in s["strategies"].items()},
                    estimated_memory_bytes=float(s.get("estimated_memory_bytes", 0.0)),
                    estimated_compute_s=float(s.get("estimated_compute_s", 0.0)),
                )
                for s in data["stages"]
            )
            solver = SolverInfo(**data.get("solver", {}))
            plan = cls(
                pp=int(data["pp"]), microbatches=int(data["microbatches"]), schedule=str(data["schedule"]),
                stages=stages, estimated_iteration_s=float(data["estimated_iteration_s"]), solver=solver,
                batch_size=int(data.get("batch_size", 0)), world_size=int(data.get("world_size", 0)),
                chunks=int(data.get("chunks", 1)), assumptions=data.get("assumptions", {}),
                model=data.get("model", {}), warnings=tuple(data.get("warnings", ())),
            )
        except PlanFileError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanFileError(f"malformed plan: {type(exc).__name__}: {exc}; write plans with Plan.to_json()") from None
        plan.check_shape()
        return plan

    def check_shape(self) -> None:
        """Structural checks that need no model: stage count, device cover, dp*tp per stage."""
        if self.pp < 1 or self.chunks < 1 or self.pp * self.chunks != len(self.stages):
            per = f" x chunks={self.chunks}" if self.chunks != 1 else ""
            raise PlanFileError(f"plan says pp={self.pp}{per} but has {len(self.stages)} stages; list pp * chunks stages")
        if self.microbatches < 1:
            raise PlanFileError(f"plan has microbatches={self.microbatches}; it must be >= 1")
        seen: list[int] = []
        for i, stage in enumerate(self.stages):
            if stage.index != i:
                raise PlanFileError(f"stage {i} has index {stage.index}; stages must be listed in pipeline order")
            if not stage.layers:
                raise PlanFileError(f"stage {i} has no layers; every stage needs at least one")
            if set(stage.layers) != set(stage.strategies):
                raise PlanFileError(f"stage {i}: every layer needs exactly one strategy")
            n = len(stage.devices)
            for name, strat in stage.strategies.items():
                if strat.dp * strat.tp != n:
                    raise PlanFileError(f"layer {name}: dp*tp = {strat.dp}*{strat.tp} but its stage has {n} devices; "
                                        f"set dp and tp so that dp*tp = {n}")
                if strat.fsdp and strat.dp == 1:
                    raise PlanFileError(f"layer {name}: fsdp needs dp > 1 (it shards over the dp axis); set fsdp false "
                                        f"or dp > 1")
        placement = self.placement
        for r in range(self.pp):  # a rank's chunks share its devices: every stage of place r has one set
            held = {tuple(self.stages[i].devices) for i in placement.stages_of(r)}
            if len(held) != 1:
                raise PlanFileError(f"stages {list(placement.stages_of(r))} run on one rank each under "
                                    f"{self.schedule} with {self.chunks} chunks per rank, but list different devices "
                                    f"{sorted(held)}; give them the same devices")
            seen.extend(held.pop())
        if len({len(s.devices) for s in self.stages}) != 1:
            raise PlanFileError(f"every stage must have the same number of devices, got "
                                f"{[len(s.devices) for s in self.stages]}; give each stage world_size/pp ranks")
        world = self.world_size or len(seen)
        if self.world_size and len(seen) != self.world_size:
            raise PlanFileError(f"plan says world_size={self.world_size} but its stages list {len(seen)} devices; "
                                f"every rank 0..{self.world_size - 1} belongs to exactly one stage")
        overlap = sorted(d for d, n in collections.Counter(seen).items() if n > 1)  # linear: worlds can be large
        if overlap:
            raise PlanFileError(f"devices {overlap[:8]} appear in more than one stage; every rank belongs to "
                                f"exactly one stage")
        skipped = sorted(set(range(world)) - set(seen))
        if skipped:
            raise PlanFileError(f"stages skip devices {skipped[:8]} (and list {sorted(set(seen) - set(range(world)))[:8]} "
                                f"instead); stages must cover ranks 0..{world - 1} exactly once")


def _solver_dict(solver: SolverInfo) -> dict:
    return {f: getattr(solver, f) for f in SolverInfo.__dataclass_fields__}


@dataclass(frozen=True)
class Placement:
    """Which rank runs each stage: "loop" puts stage s on rank s % ranks (interleaved schedules),
    "v" puts stages r and 2*ranks-1-r on rank r (V schedules: the turn-around stays on one rank)."""

    ranks: int
    chunks: int = 1
    style: str = "loop"

    @property
    def num_stages(self) -> int:
        return self.ranks * self.chunks

    def rank_of(self, stage: int) -> int:
        if self.style == "v":
            return stage if stage < self.ranks else 2 * self.ranks - 1 - stage
        return stage % self.ranks

    def stages_of(self, rank: int) -> tuple[int, ...]:
        return tuple(s for s in range(self.num_stages) if self.rank_of(s) == rank)


def stage_placement(schedule: str, pp: int, chunks: int | None = None) -> Placement:
    """Which place along the pipeline (block of world/pp ranks) runs each stage of a `schedule` plan:
    one stage per place, or `chunks` of them (interleaved: stage s on place s % pp; zbv: a V)."""
    chunks = chunks_of(schedule) if chunks is None else chunks
    return Placement(pp, chunks, "v" if schedule == "zbv" else "loop")
