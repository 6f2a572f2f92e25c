"""Reading the playbooks' measurement plans from YAML (the decision rule itself, orchestrator.stats.decide, reads no
files): errors name the file, line and key (InputError)."""

from __future__ import annotations

from pathlib import Path

from orchestrator.config.yamlio import load_model
from orchestrator.stats.decide import DecisionRule, MeasurementPlan


def load_measurement_plan(path: Path) -> MeasurementPlan:
    """Load a measurement plan; errors name file:line and key (InputError)."""
    return load_model(MeasurementPlan, Path(path), "measurement plan")


def load_decision_rule(path: Path) -> DecisionRule:
    """The `decision:` section of a measurement plan (the whole plan is validated, errors give file:line)."""
    return load_measurement_plan(path).decision
