"""User pins on the search: pinned fields hold, unpinned ones are searched."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fxplan.errors import ConstraintError

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zbv", "zb-auto")
"""Every pipeline schedule name fxplan knows: what Constraints.schedule may name."""
CHUNKED_SCHEDULES = ("interleaved-1f1b", "zbv")  # more than one model chunk per rank
CHUNKS = {"interleaved-1f1b": 2, "zbv": 2}
"""Model chunks per rank that a plan of each chunked schedule uses (zbv: exactly two, a V)."""


def chunks_of(schedule: str | None) -> int:
    return CHUNKS.get(schedule, 1)


def stages_fit(schedule: str | None, pp: int, num_layers: int) -> bool:
    """Whether `schedule` on pp places has its pp * chunks stages, at least a layer each: a schedule
    with several chunks per rank also needs a pipeline of ranks (pp >= 2) to spread them over."""
    chunks = chunks_of(schedule)
    return pp * chunks <= num_layers and (chunks == 1 or pp > 1)


def enough_microbatches(schedule: str, pp: int, microbatches: int) -> bool:
    """1F1B and the zero-bubble schedules want a microbatch per stage in flight; with fewer they
    degenerate into GPipe (with or without a split backward) anyway. Interleaved 1F1B runs its
    microbatches in rounds of pp (its lists need microbatches divisible by pp)."""
    if schedule == "interleaved-1f1b" and microbatches % pp:
        return False
    return not (schedule != "gpipe" and microbatches < pp)


RUNNABLE_SCHEDULES = ("1f1b", "zb-h1", "zb-h2", "zb-auto", "gpipe")
"""The schedules this version plans and runs (the cost model's bubble and memory terms and the runtime
all handle them), best first: with one stage, where every schedule costs the same, 1F1B is planned
(fewer activations than GPipe, no split backward)."""
PINNED_ONLY_SCHEDULES = CHUNKED_SCHEDULES
"""Schedules planned and run when Constraints.schedule names one, but not tried by the unpinned
search: their candidates place pp * chunks stages under a per-stage share of memory (the cost
model's conservative reading of a rank holding several stages), so an unpinned search comparing
them with the one-chunk schedules would compare a stricter memory model with a looser one."""


@dataclass(frozen=True, kw_only=True)
class Constraints:
    pp: int | None = None
    """Pipeline degree (stages)."""
    dp: int | None = None
    """Data-parallel degree of every layer."""
    tp: int | None = None
    """Tensor-parallel degree of every layer."""
    fsdp: bool | None = None
    """Shard every layer's parameters/grads/optimizer state over its dp axis (True) or never (False)."""
    reshard: bool | None = None
    """FSDP layers free their gathered weights after each forward and re-gather in backward (True),
    or keep them gathered for the whole step (False); layers without FSDP are not affected."""
    sp: bool | None = None
    """Megatron sequence parallelism on the tp axis for every layer that has a sequence dim (True), or
    never (False): norms, dropouts and residuals run on 1/tp of the sequence, all-gather before the
    column-parallel matmuls and reduce-scatter after the row-parallel ones replace the all-reduces."""
    schedule: str | None = None
    """Pipeline schedule name (see fxplan.schedules)."""
    microbatches: int | None = None
    """Microbatches per iteration."""
    recompute: bool | None = None
    """Recompute every layer's forward in backward (True) or never (False)."""

    def __post_init__(self):
        for field in ("pp", "dp", "tp", "microbatches"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConstraintError(f"Constraints.{field} must be a positive integer or None, got {value!r}")
        for field in ("fsdp", "reshard", "recompute", "sp"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, bool):
                raise ConstraintError(f"Constraints.{field} must be True, False or None, got {value!r}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ConstraintError(f"unknown schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")

    def allows(self, **values) -> bool:
        """Whether each named field is unpinned or pinned to the given value (e.g. allows(dp=2, tp=4)).
        Every filter that honours a pin asks this, so a pin means the same thing everywhere."""
        for name, value in values.items():
            pin = getattr(self, name)
            if pin is not None and pin != value:
                return False
        return True

    @classmethod
    def parse(cls, text: str) -> "Constraints":
        """'pp=2,tp=4,fsdp=true' (the CLI's --pin)."""
        values: dict = {}
        for item in filter(None, (part.strip() for part in (text or "").split(","))):
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or key not in cls.__dataclass_fields__:
                raise ConstraintError(f"bad pin {item!r}: use key=value with key in {', '.join(cls.__dataclass_fields__)}")
            raw = raw.strip()
            if key in ("fsdp", "reshard", "recompute", "sp"):
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ConstraintError(f"bad pin {item!r}: {key} takes true or false")
                values[key] = raw.lower() in ("true", "1", "yes")
            elif key == "schedule":
                values[key] = raw
            else:
                try:
                    values[key] = int(raw)
                except ValueError:
                    raise ConstraintError(f"bad pin {item!r}: {key} takes an integer") from None
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


def _checked_init(init):
    """Constraints(...) with a misspelled field or positional values: a ConstraintError naming it, not a
    TypeError."""
    def __init__(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except TypeError:
            import dataclasses
            import difflib

            known = [f.name for f in dataclasses.fields(Constraints)]
            hints = [f"unknown field {k!r}" + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(
                k, known, 1)) else "") for k in kwargs if k not in known]
            if args:
                hints.append(f"{len(args)} positional value(s) {args!r:.60}")
            raise ConstraintError(f"bad Constraints(...): {'; '.join(hints)}; fields are keyword-only: "
                                  f"{', '.join(known)}, e.g. Constraints(pp=2, tp=4)") from None
    return __init__


Constraints.__init__ = _checked_init(Constraints.__init__)
