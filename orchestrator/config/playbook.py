"""The playbooks: measurement plans (the decision rule itself, orchestrator.stats.decide, reads no files) and the
rollout policy, read from YAML; errors name the file, line and key (InputError)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestrator.config.yamlio import load_model
from orchestrator.core.errors import InputError
from orchestrator.measure.model import Int, Number
from orchestrator.stats.decide import DecisionRule, MeasurementPlan


def load_measurement_plan(path: Path) -> MeasurementPlan:
    """Load a measurement plan; errors name file:line and key (InputError)."""
    return load_model(MeasurementPlan, Path(path), "measurement plan")


def load_decision_rule(path: Path) -> DecisionRule:
    """The `decision:` section of a measurement plan (the whole plan is validated, errors give file:line)."""
    return load_measurement_plan(path).decision


def check_keep_on(plan: MeasurementPlan, path: Path | None, changes: list[tuple[str, str, bool]]) -> None:
    """A playbook that asks, in so many words, for `keep_on: latency_or_mechanism` cannot be used with a change
    whose kind declares no mechanism (a mechanism keep is impossible for it): an InputError naming the file, line
    and key, before anything is touched. `changes`: (change id, kind, declares a mechanism). Left at its default,
    the rule keeps such a change on latency alone and its outcome says so."""
    rule = plan.decision
    if rule.keep_on != "latency_or_mechanism" or "keep_on" not in rule.model_fields_set:
        return
    none = [f"{cid} ({kind})" for cid, kind, declares in changes if not declares]
    if not none:
        return
    where = "measurement plan"
    if path is not None:
        from orchestrator.config.yamlio import line_of, read_yaml

        line = line_of(read_yaml(path), ("decision", "keep_on"))
        where = f"{path}:{line}" if line else str(path)
    raise InputError(f"{where}: decision.keep_on: a mechanism keep is asked for (got 'latency_or_mechanism'), but "
                     f"{', '.join(none)} declare{'s' if len(none) == 1 else ''} no mechanism to keep on; expected "
                     f"`keep_on: latency` for a profile with such changes, or leave keep_on out (then those are "
                     f"kept on latency alone)")


#: The metrics a rollout's regression rule may name.
METRICS = ("p99_us", "p999_us", "max_us", "avg_us")


Size = int | str  # a unit count (3) or a share of the fleet ("25%")


MAX_UNITS = 100_000  # a canary or batch count beyond any fleet


def _check_size(v: Any, what: str, allow_zero: bool) -> Size:
    """Run before pydantic's own int/str coercion (which would make `true` a 1 and 2.5 a 2): a plain integer,
    or a string of ASCII digits with at most two decimals and a % sign."""
    if isinstance(v, bool) or type(v).__name__ == "ScalarBoolean" or not isinstance(v, (int, str)):
        raise ValueError(f"{what} must be a count or a percentage like '25%'")
    if isinstance(v, int):
        if not (0 if allow_zero else 1) <= v <= MAX_UNITS:
            raise ValueError(f"{what} must be {'0' if allow_zero else '1'}..{MAX_UNITS}")
        return int(v)
    text = str(v)
    if not re.fullmatch(r"[0-9]{1,3}(\.[0-9]{1,6})?%", text):
        raise ValueError(f"{what} must be a count or a percentage like '25%'")
    pct = float(text[:-1])
    if not (0 < pct <= 100 or (allow_zero and pct == 0)):
        raise ValueError(f"{what} percentage must be in {'[0' if allow_zero else '(0'}, 100]")
    return text


class RolloutPolicy(BaseModel):
    """`playbooks/rollout.yaml`: how a profile goes over a fleet, and when the rollout stops itself."""

    model_config = ConfigDict(extra="forbid")

    #: Units tuned first, alone; the rest waits until they are done. A count or "N%" (rounded up).
    canary: Size = 1
    #: Units per batch after the canary. A count or "N%" of the fleet (rounded up).
    batch: Size = "50%"
    #: Units worked on at once, over all controllers sharing the rollout.
    max_in_flight: Int = Field(2, ge=1, le=1024)
    #: Halt when failed units are more than this share (%) of the units finished so far. 0: the first failure.
    max_fail_percent: Number = Field(0.0, ge=0, le=100)
    #: Halt when a unit's latency after the rollout is worse than before by more than this share, per metric
    #: (0.25: 25% worse). Before = the unit's first measured runs, after = its runs in the final state.
    regression: dict[str, Annotated[Number, Field(ge=0, le=1000)]] = Field(
        default_factory=lambda: {"p999_us": 0.25})
    #: What happens to the units already changed when the rollout halts.
    on_halt: Literal["leave", "rollback"] = "rollback"
    #: The measurement plan for each change (relative to this file); None: playbooks/measurement.yaml.
    measurement: str | None = None

    @field_validator("canary", mode="before")
    @classmethod
    def _canary(cls, v: Any) -> Size:
        return _check_size(v, "canary", allow_zero=True)

    @field_validator("batch", mode="before")
    @classmethod
    def _batch(cls, v: Any) -> Size:
        return _check_size(v, "batch", allow_zero=False)

    @field_validator("regression")
    @classmethod
    def _regression(cls, v: dict[str, float]) -> dict[str, float]:
        for metric in v:
            if metric not in METRICS:
                raise ValueError(f"regression metric {metric!r}: expected one of {', '.join(METRICS)}")
        return v


@dataclass(frozen=True)
class LoadedPolicy:
    policy: RolloutPolicy
    path: Path

    @property
    def measurement_path(self) -> Path | None:
        if self.policy.measurement is None:
            return None
        p = Path(self.policy.measurement)
        return p if p.is_absolute() else (self.path.parent / p)


def load_rollout_policy(path: Path) -> LoadedPolicy:
    """Load a rollout playbook; errors name file:line and key (InputError), before any unit is touched."""
    loaded = LoadedPolicy(load_model(RolloutPolicy, Path(path), "rollout playbook"), Path(path))
    mp = loaded.measurement_path
    if mp is not None and not mp.is_file():
        raise InputError(f"{path}: measurement: {loaded.policy.measurement!r} does not exist (looked for {mp})")
    if mp is not None:
        load_measurement_plan(mp)  # its errors too before any unit (or the lab) is touched
    return loaded
