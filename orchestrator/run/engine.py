"""The apply loop: for each change of a profile, plan -> journal the intent -> apply -> verify -> measure before
and after (interleaved) -> decide -> keep or roll back -> journal. Also reconcile, rollback, verify and status.

Every remote change is journaled (with the exact previous state) before it is made, so a controller that dies
mid-change is followed by a run that finds the record and undoes it (`reconcile`). A lock in the journal keeps
two controllers off one unit.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from orchestrator.changes.base import Change, Plan, State, plan_all
from orchestrator.changes.mechanism import mechanisms_for
from orchestrator.changes.registry import BUNDLE, build_change, is_boot_kind
from orchestrator.config.playbook import check_keep_on
from orchestrator.config.profile import ChangeSpec, load_profile, resolve
from orchestrator.core.errors import InputError, TuneError
from orchestrator.journal.records import ChangeRecord, UnitStateName
from orchestrator.remote.transport import Transport
from orchestrator.run.boot import BootChangeRunner
from orchestrator.run.checks import preflight_check_files, user_check_files
from orchestrator.run.context import ChangeOutcome, RunContext, SharedConnections, Status
from orchestrator.run.transaction import JournaledChange, Planned, run_change


def split_cmdline(spec: ChangeSpec) -> list[ChangeSpec]:
    """A cmdline ChangeSpec as one spec per argument (`guest.cmdline.nohz_full`); other specs unchanged."""
    if spec.kind != "cmdline":
        return [spec]
    return [spec.model_copy(update={"id": f"{spec.id}.{key}", "params": {"add": {key: value}}})
            for key, value in spec.params["add"].items()]


def bundle_runtime(specs: list[ChangeSpec], kinds: Sequence[str]) -> list[ChangeSpec]:
    """Each target's runtime specs of `kinds` as one bundle spec (`host.bundle`), where the first of them was;
    a target with one such spec keeps it as it is (the playbook's `runtime.together`)."""
    if not kinds:
        return specs
    groups: dict[str, list[ChangeSpec]] = {}
    for s in specs:
        if s.kind in kinds:
            groups.setdefault(s.target, []).append(s)
    out: list[ChangeSpec] = []
    for s in specs:
        group = groups.get(s.target, [])
        if s.kind not in kinds or len(group) < 2:
            out.append(s)
        elif s is group[0]:
            bid = f"{s.target}.{BUNDLE}"
            out.append(ChangeSpec(id=bid, target=s.target, kind=BUNDLE, params={"id": bid, "members": [
                {"id": m.id, "kind": m.kind, "params": m.params} for m in group]}))
    return out


class RuntimeActive:
    """A runtime change's side of the transaction (orchestrator.run.transaction): apply and verify at once, switch
    on and off between runs in the rule's order, keep by verifying, undo by its byte-exact rollback."""

    eager = True
    order = None
    evidence = None

    def __init__(self, ctx: RunContext, unit: str, spec: ChangeSpec, change: Change) -> None:
        self.ctx, self.unit, self.spec, self.change = ctx, unit, spec, change
        self.shared = SharedConnections(lambda u, target: ctx.connect(ctx.inventory, u, target))
        self._plan: Plan | None = None
        self._read_after_apply: State | None = None  # what apply() read back, for the verify() that follows

    def __enter__(self) -> RuntimeActive:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shared.drop()

    @property
    def t(self) -> Transport:
        return self.shared.get(self.unit, self.spec.target)

    @property
    def planned(self) -> Plan:
        assert self._plan is not None, "plan() first"
        return self._plan

    def plan(self) -> Planned:
        self._plan = p = self.change.plan(self.t)
        return Planned(summary=self.change.describe() if p.noop else p.summary, noop_message=p.summary,
                       before=p.before, state=p.desired,
                       noop=p.noop, skip_reason=self.change.not_applicable(p.before) or "",
                       members=p.members, left_out=p.left_out)

    def prepare(self) -> None:
        pass

    def apply(self) -> str | None:
        self._read_after_apply = self.change.apply_and_read(self.t, self.planned.before)
        return None

    def verify(self) -> dict | None:
        live, self._read_after_apply = self._read_after_apply, None
        return self.change.verify(self.t, self.planned, live)

    def switch(self, on: bool) -> None:
        self.change.switch(self.t, self.planned.before, on)
        if on:
            self.change.verify(self.t, self.planned)

    def keep(self, on: bool) -> None:
        if not on:
            self.change.switch(self.t, self.planned.before, True)
        self.change.verify(self.t, self.planned)

    def undo(self, on: bool | None) -> None:
        if on is None or on or self.change.switch_keeps_persistence:
            self.change.rollback(self.t, self.planned.before)
        self.change.verify_rolled_back(self.t, self.planned.before)

    def measure_on(self) -> Transport:
        return self.shared.get(self.unit, self.ctx.measure_target(self.unit))

    def connection(self, target: str) -> Transport:
        return self.shared.get(self.unit, target)

    def mark(self) -> None:
        self.ctx.write_marker(self.t, self.unit, self.spec.target)


class ApplyResult(BaseModel):
    unit: str
    profile: str
    dry_run: bool
    reconciled: list[int] = []
    outcomes: list[ChangeOutcome]


@dataclass
class Engine(RunContext):
    """The apply loop and its reconcile, rollback and verify, over one RunContext (the engine is its context)."""

    # ---- apply ---------------------------------------------------------------------------------------
    def specs(self, unit: str, profile_path: Path) -> list[ChangeSpec]:
        spec = self.inventory.unit(unit)  # an unknown unit: InputError listing the known ones
        profile = load_profile(profile_path, spec.vars)  # checks the `cpus` var itself (no int() traceback)
        specs = resolve(profile, unit, spec)
        preflight_check_files(profile)  # the user's checks load and define tests, before anything is touched
        specs = [s.model_copy(update={"checks": [str(f) for f in user_check_files(profile, s.target)]})
                 if s.needs_reboot else s for s in specs]
        if self.plan.boot.cmdline == "per_key":  # one trial boot per argument (playbook `boot.cmdline`)
            specs = [part for s in specs for part in split_cmdline(s)]
        specs = bundle_runtime(specs, self.plan.runtime.together)
        check_keep_on(self.plan, self.plan_path,
                      [(s.id, s.kind, bool(mechanisms_for(s.kind, s.params, s.target))) for s in specs])
        return specs

    def apply(self, unit: str, profile_path: Path, *, dry_run: bool = False,
              force_unlock: str | None = None) -> ApplyResult:
        specs = self.specs(unit, profile_path)  # all input errors before any SSH
        if dry_run:
            return ApplyResult(unit=unit, profile=str(profile_path), dry_run=True,
                               outcomes=self._plan_only(unit, specs))
        with self.journal.acquire_lock(unit, force_unlock=force_unlock):
            reconciled = self.reconcile(unit)
            run_id = self.journal.begin_run(unit, str(profile_path), controller="tune apply")
            outcomes: list[ChangeOutcome] = []
            status: UnitStateName = "done"
            try:
                for spec in specs:
                    outcome = self._one(unit, run_id, spec)
                    outcomes.append(outcome)
                    if outcome.status == "failed":
                        status = "degraded"
            except BaseException:
                self.journal.end_run(run_id, "interrupted")
                raise
            self.journal.end_run(run_id, status)
            self.journal.set_unit_state(unit, status, f"{sum(o.status == 'kept' for o in outcomes)} kept")
        return ApplyResult(unit=unit, profile=str(profile_path), dry_run=False, reconciled=reconciled,
                           outcomes=outcomes)

    def _plan_only(self, unit: str, specs: list[ChangeSpec]) -> list[ChangeOutcome]:
        """Every change planned, nothing applied; a target's runtime changes read in one round trip (they are
        planned against the state before any of them, as a dry run shows it)."""
        out: dict[int, ChangeOutcome] = {}
        runtime: dict[str, list[tuple[int, ChangeSpec]]] = {}
        for i, spec in enumerate(specs):
            if is_boot_kind(spec.kind):
                out[i] = self._plan_boot(unit, spec)
            else:
                runtime.setdefault(spec.target, []).append((i, spec))
        shared = SharedConnections(lambda u, target: self.connect(self.inventory, u, target))
        try:
            for target, group in runtime.items():
                changes = [build_change(s.kind, s.params) for _, s in group]
                _, plans = plan_all(shared.get(unit, target), changes)
                for (i, spec), change, plan in zip(group, changes, plans, strict=True):
                    skip = change.not_applicable(plan.before)
                    out[i] = ChangeOutcome(id=spec.id, target=spec.target, kind=spec.kind, description=plan.summary,
                                           members=list(plan.members), left_out=list(plan.left_out),
                                           status="skipped" if skip else "noop" if plan.noop else "planned",
                                           reason=skip or json.dumps({"before": plan.before,
                                                                      "desired": plan.desired})[:500])
        finally:
            shared.drop()
        return [out[i] for i in range(len(specs))]

    def _plan_boot(self, unit: str, spec: ChangeSpec) -> ChangeOutcome:
        base = dict(id=spec.id, target=spec.target, kind=spec.kind)
        with BootChangeRunner(self) as runner:
            try:
                plan = runner.plan(unit, spec)
            except TuneError as exc:
                return ChangeOutcome(**base, description=spec.id, status="failed", reason=f"cannot plan: {exc}")
            if plan.skip_reason:
                return ChangeOutcome(**base, description=spec.id, status="skipped", reason=plan.skip_reason)
            if plan.noop:
                return ChangeOutcome(**base, description=plan.summary, status="noop", reason="already in place")
            problems = runner.preflight(unit, plan)
        status: Status = "refused" if problems and not self.accept_boot_risk else "planned"
        return ChangeOutcome(**base, description=plan.summary + " (trial boot)", status=status,
                             reason="; ".join(problems) or json.dumps({"default_args": plan.default_args,
                                                                       "add": plan.target.add,
                                                                       "kernel": plan.target.kernel}))

    def _one(self, unit: str, run_id: int, spec: ChangeSpec) -> ChangeOutcome:
        if is_boot_kind(spec.kind):
            with BootChangeRunner(self) as runner:
                return runner.run(unit, run_id, spec)
        with RuntimeActive(self, unit, spec, build_change(spec.kind, spec.params)) as active:
            return run_change(self, unit, run_id, spec, active)

    # ---- reconcile / rollback / verify -------------------------------------------------------------------
    def _undo(self, unit: str, rec: ChangeRecord, note: str) -> None:
        if is_boot_kind(rec.kind):  # restore the journaled boot files, boot the old default if needed
            with BootChangeRunner(self) as runner:
                runner.undo(unit, rec.target, rec.before, None, on_trial=None)
            JournaledChange.resume(self, unit, rec.target, rec.id).rolled_back(message=note)
            with self.connect(self.inventory, unit, rec.target) as t:
                self.write_marker(t, unit, rec.target)
            self.emit("change.rolled_back", f"{unit}.{rec.target}", f"{rec.change_id}: {note}", journal_id=rec.id)
            return
        change = build_change(rec.kind, rec.desired["params"])
        with self.connect(self.inventory, unit, rec.target) as t:
            change.rollback(t, rec.before)
            change.verify_rolled_back(t, rec.before)
            JournaledChange.resume(self, unit, rec.target, rec.id).rolled_back(message=note)
            self.write_marker(t, unit, rec.target)
        self.emit("change.rolled_back", f"{unit}.{rec.target}", f"{rec.change_id}: {note}", journal_id=rec.id)

    def reconcile(self, unit: str) -> list[int]:
        """Changes a dead controller left in flight (intent/applied/verified) are undone to their journaled
        previous state; the run that left them is closed."""
        done = []
        for rec in self.journal.incomplete(unit):
            self._undo(unit, rec, "undone by reconcile: the controller stopped in the middle of this change")
            done.append(rec.id)
        for run in self.journal.open_runs(unit):
            self.journal.end_run(run.id, "crashed")
        return done

    def rollback(self, unit: str, change_id: str | None = None, *, force_unlock: str | None = None) -> list[str]:
        """Undo kept changes, newest first (all of them, or one by id)."""
        self.inventory.unit(unit)  # an unknown unit is an InputError before the journal is written
        undone = []
        with self.journal.acquire_lock(unit, force_unlock=force_unlock):
            self.reconcile(unit)
            active = self.journal.active_changes(unit)
            if change_id is not None:
                active = [r for r in active if r.change_id == change_id]
                if not active:
                    raise InputError(f"no kept change {change_id!r} on unit {unit}; `tune status` lists them")
            for rec in active:
                self._undo(unit, rec, "rolled back on request")
                undone.append(rec.change_id)
            self.journal.set_unit_state(unit, "done", f"rolled back {len(undone)}")
        return undone

    def verify(self, unit: str) -> list[dict[str, Any]]:
        """Compare the live state of every kept change with what the journal says; drift -> degraded, and
        nothing is overwritten."""
        self.inventory.unit(unit)  # an unknown unit is an InputError before the journal is written
        report = []
        drifted = 0
        for rec in self.journal.active_changes(unit):
            if is_boot_kind(rec.kind):
                with BootChangeRunner(self) as runner:
                    res = runner.verify(unit, rec)
                ok, live = res["in_place"], res["live"]
            else:
                change = build_change(rec.kind, rec.desired["params"])
                with self.connect(self.inventory, unit, rec.target) as t:
                    live = change.read(t)
                ok = change.in_place(live, rec.desired["state"])
            drifted += not ok
            report.append({"change": rec.change_id, "target": rec.target, "in_place": ok,
                           "live": live if not ok else None})
        state: UnitStateName = "degraded" if drifted else "done"
        self.journal.set_unit_state(unit, state, f"{drifted} change(s) drifted" if drifted else "verified")
        if drifted:
            self.emit("unit.degraded", unit, f"{drifted} kept change(s) drifted from the journal")
        return report
