"""`tune ab`: run an A/B latency experiment on a real unit (the statistics: orchestrator.stats.ab; the report:
orchestrator.report.ab).

Each arm is the unit as it stands plus that profile's runtime changes. The sides alternate in ABBA order (drift
in the unit, thermal or background, hits both arms alike), every block of runs under the measurement plan's
cyclictest settings and load. Switching sides undoes one profile's changes to the exact journaled previous
state and applies the other's; every change is journaled before it is made (a controller killed mid-experiment
is reconciled by the next run, like `tune apply`), and the unit ends as it started.

Boot changes (cmdline, kernel, WFI/WFE) are refused: each side switch would cost a reboot (two trial boots per
round); compare them with `tune apply`, which measures a trial boot's before and after.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.changes.base import Change, Plan
from orchestrator.changes.registry import build_change, is_boot_kind
from orchestrator.config.profile import ChangeSpec
from orchestrator.core.errors import InputError, TuneError
from orchestrator.core.events import Event
from orchestrator.measure.model import LatencyResult
from orchestrator.measure.runner import measure
from orchestrator.remote.transport import Transport
from orchestrator.report.ab import render_ab_html
from orchestrator.run.context import SharedConnections
from orchestrator.run.engine import Engine
from orchestrator.run.transaction import JournaledChange
from orchestrator.stats.ab import ABArm, ABResult, ab_schedule, analyse, save_ab


@dataclass
class _Applied:
    record: JournaledChange
    change: Change
    plan: Plan
    target: str


@dataclass
class ABExperiment:
    """One A/B experiment on one unit, run through an Engine's inventory, journal, plan and connections."""

    engine: Engine
    unit: str
    profile_a: Path
    profile_b: Path
    rounds: int = 4
    runs_per_block: int = 2
    order: str = "ABBA"
    _applied: list[_Applied] = field(default_factory=list)

    def _emit(self, kind: str, message: str, **kw: Any) -> None:
        self.engine.publish(Event(kind, self.unit, message, **kw))

    def _specs(self, profile: Path) -> list[tuple[ChangeSpec, Change]]:
        out = []
        for spec in self.engine.specs(self.unit, profile):
            if is_boot_kind(spec.kind):
                raise InputError(f"{profile}: {spec.id}: `tune ab` compares runtime changes only; a {spec.kind} "
                                 "change needs a reboot at every side switch (use `tune apply`, which trial-boots "
                                 "it and measures before and after)")
            out.append((spec, build_change(spec.kind, spec.params)))
        return out

    def __post_init__(self) -> None:
        self._shared = SharedConnections(lambda unit, target: self.engine.connect(self.engine.inventory, unit,
                                                                                  target))

    def _t(self, target: str) -> Transport:
        return self._shared.get(self.unit, target)

    def _enter(self, side: str, changes: list[tuple[ChangeSpec, Change]], run_id: int) -> None:
        for spec, change in changes:
            t = self._t(spec.target)
            plan = change.plan(t)
            if plan.noop:
                continue
            record = JournaledChange.begin(self.engine, run_id, self.unit, spec,
                                           change_id=f"ab.{side}.{spec.id}", before=plan.before,
                                           state=plan.desired, summary=None)
            self._applied.append(_Applied(record, change, plan, spec.target))
            change.apply(t, plan.before)
            record.applied()
            record.verified(change.verify(t, plan))

    def _leave(self) -> None:
        """Undo the current side's changes, newest first, to their journaled previous state."""
        while self._applied:
            a = self._applied[-1]
            t = self._t(a.target)
            a.change.rollback(t, a.plan.before)
            a.change.verify_rolled_back(t, a.plan.before)
            a.record.rolled_back(message="A/B: side switch or end of experiment")
            self._applied.pop()

    def run(self, *, confidence: float = 0.95, seed: int = 0) -> ABResult:
        if self.runs_per_block < 1:
            raise InputError(f"--runs must be >= 1 (got {self.runs_per_block})")
        schedule = ab_schedule(self.rounds, self.order)  # type: ignore[arg-type]
        sides = {"A": self._specs(self.profile_a), "B": self._specs(self.profile_b)}  # input errors first
        engine = self.engine
        mtarget = engine.measure_target(self.unit)
        runs: dict[str, list[LatencyResult]] = {"A": [], "B": []}
        sequence: list[str] = []
        total = len(schedule) * self.runs_per_block
        started = time.time()
        with engine.journal.acquire_lock(self.unit):
            engine.reconcile(self.unit)
            run_id = engine.journal.begin_run(self.unit, f"A={self.profile_a} B={self.profile_b}", "tune ab")
            status = "done"
            current: str | None = None
            try:
                mt = self._t(mtarget)
                for side in schedule:
                    if side != current:
                        self._leave()
                        self._enter(side, sides[side], run_id)
                        current = side
                    for _ in range(self.runs_per_block):
                        result = measure(mt, engine.plan.cyclictest, engine.plan.load,
                                         target=f"{self.unit}.{mtarget}", artifacts=engine.artifacts,
                                         events=engine.events)
                        runs[side].append(result)
                        sequence.append(side)
                        self._emit("ab.run", f"{side} ({len(sequence)}/{total}): p99.9 {result.all.p999_us} us, "
                                   f"max {result.all.max_us} us", done=len(sequence), total=total,
                                   data={"side": side, "p999_us": result.all.p999_us, "max_us": result.all.max_us})
            except BaseException:
                status = "interrupted"
                raise
            finally:
                try:
                    self._leave()
                except TuneError:
                    status = "failed"
                    raise
                finally:
                    engine.journal.end_run(run_id, status)
                    self._shared.drop()
        effects = analyse(runs["A"], runs["B"], confidence=confidence, seed=seed)
        return ABResult(
            unit=self.unit, target=mtarget, profiles={"A": str(self.profile_a), "B": str(self.profile_b)},
            rounds=self.rounds, order=sequence,
            arms=[ABArm(name="A", profile=str(self.profile_a), runs=runs["A"]),
                  ABArm(name="B", profile=str(self.profile_b), runs=runs["B"])],
            effects=effects,
            settings={"cyclictest": engine.plan.cyclictest.model_dump(mode="json"),
                      "load": engine.plan.load.model_dump(mode="json"), "runs_per_block": self.runs_per_block},
            started=started, ended=time.time())


def write_ab_reports(result: ABResult, artifacts: Path) -> tuple[Path, Path]:
    artifacts.mkdir(parents=True, exist_ok=True)
    json_path = save_ab(result, artifacts / "ab.json")
    html_path = render_ab_html(result, artifacts / "ab.html")
    return json_path, html_path
