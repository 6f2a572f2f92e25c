"""Fleet rollout: one profile over many units, canary first, then batches, halting before it harms many robots.

The policy comes from a playbook (`playbooks/rollout.yaml`, `RolloutPolicy`). A rollout is a row in the journal
with one row per unit (pending / working / done / degraded / failed / rolled_back) grouped in waves: wave 0 is
the canary, then the batches. Controllers *claim* units from the journal (`Journal.claim_unit`: one
transaction, at most `max_in_flight` working units over all controllers, `SKIP LOCKED` on PostgreSQL), so:

- a controller killed mid-rollout leaves its units `working` under its name; `--resume` finds that owner dead,
  returns those units to pending, takes over their stale unit locks (the rollout journaled whose they were),
  and the engine's reconcile undoes the changes left in flight before applying again. Finished units are
  never redone;
- several controllers (`--db postgresql://...`) share one rollout: each claims what no other holds;
- a wave starts only when the previous wave has no unit pending or working (whoever works on them).

Each unit is tuned by the ordinary `Engine.apply` (every change measured before and after, kept on evidence).
After each unit the halt rules are checked over the whole rollout: failed units above `max_fail_percent` of
the units finished so far (an unreachable unit is a failed one), or a unit whose latency after the rollout is
worse than before by more than the playbook's bound. A halt stops all claiming (for every controller); units
in flight finish; then, per `on_halt`, the units this rollout changed keep their changes (`leave`) or get
exactly the changes this rollout kept rolled back (`rollback`), never older ones.
"""

from __future__ import annotations

import json
import math
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from orchestrator.config.playbook import METRICS, RolloutPolicy, Size
from orchestrator.core.errors import ExitStatus, InputError, TuneError
from orchestrator.core.events import CHANGE_ENDED, Event, EventSink, discard
from orchestrator.journal.errors import JournalError
from orchestrator.journal.journal import Journal
from orchestrator.journal.owners import default_owner
from orchestrator.journal.records import RolloutRecord, RolloutUnit
from orchestrator.run.engine import ApplyResult, Engine
from orchestrator.stats.decide import median_is_bound, run_values

FINISHED = ("done", "degraded", "failed")
TERMINAL_CHANGE_EVENTS = CHANGE_ENDED


class FleetError(TuneError):
    """A rollout could not go on (unknown rollout, nothing to do, a rollout that is not resumable)."""

    exit_code = ExitStatus.ROLLOUT


class RolloutHalted(FleetError):
    """The rollout stopped itself: too many failures or a latency regression (the message says which unit)."""

    exit_code = ExitStatus.ROLLOUT_HALTED


def _count(size: Size, n: int) -> int:
    if isinstance(size, int):
        return size
    return math.ceil(float(size[:-1]) / 100.0 * n)


def plan_waves(units: list[str], policy: RolloutPolicy) -> list[list[str]]:
    """Canary units first (in inventory order), then batches; every unit exactly once."""
    if not units:
        raise InputError("no units to roll out to")
    if len(set(units)) != len(units):
        raise InputError(f"a unit is named twice: {', '.join(units)}")
    canary = min(_count(policy.canary, len(units)), len(units))
    batch = max(1, _count(policy.batch, len(units)))
    waves = [units[:canary]] if canary else []
    rest = units[canary:]
    waves += [rest[i:i + batch] for i in range(0, len(rest), batch)]
    return waves


# ------------------------------------------------------------------------------------------------ outcomes


class UnitOutcome(BaseModel):
    """What the rollout did to one unit, as stored in the journal's rollout row (`result`)."""

    unit: str
    state: Literal["done", "degraded", "failed"]
    detail: str = ""
    kept: list[str] = []
    rolled_back: list[str] = []
    noop: list[str] = []
    failed: list[str] = []
    #: medians over runs: the unit's first measured state, and its final state
    before: dict[str, float | None] = {}
    after: dict[str, float | None] = {}
    #: "before.p999_us" etc.: medians that are only lower bounds (percentiles beyond the histogram)
    bounds: list[str] = []
    regression: str | None = None
    seconds: float = 0.0
    report: str | None = None


def _metric(runs, metric: str) -> tuple[float | None, bool]:
    """Median over runs, and whether it is only a lower bound (runs whose percentile fell in the overflows
    count at the histogram's size, as the decision rule counts them; a dropped run would bias it down)."""
    try:
        vals, cens = run_values(list(runs), metric, "")
    except InputError:
        return None, False
    if not len(vals):
        return None, False
    return float(statistics.median(vals.tolist())), median_is_bound(vals, cens)


def summarize(result: ApplyResult, policy: RolloutPolicy, seconds: float = 0.0) -> UnitOutcome:
    """A unit's outcome from its apply result. Its latency *before* is the first measured change's before
    runs; *after* is the last measured change's after runs if it was kept, else its before runs (the state the
    unit was left in)."""
    by: dict[str, list[str]] = {"kept": [], "rolled_back": [], "noop": [], "failed": []}
    for o in result.outcomes:
        if o.status in by:
            by[o.status].append(o.id)
        elif o.status in ("refused", "skipped"):
            by["noop" if o.status == "skipped" else "failed"].append(o.id)
    measured = [o for o in result.outcomes if o.before]
    before: dict[str, float | None] = {}
    after: dict[str, float | None] = {}
    bounds: list[str] = []
    regression = None
    if measured:
        first, last = measured[0], measured[-1]
        final_runs = last.after if last.status == "kept" and last.after else last.before
        for m in METRICS:
            before[m], b_bound = _metric(first.before, m)
            after[m], a_bound = _metric(final_runs, m)
            if b_bound:
                bounds.append(f"before.{m}")
            if a_bound:
                bounds.append(f"after.{m}")
        for metric, bound in policy.regression.items():
            b, a = before.get(metric), after.get(metric)
            # a lower-bound "before" cannot show a regression; a lower-bound "after" can (it is at least that)
            if b and a is not None and a > b * (1.0 + bound) and f"before.{metric}" not in bounds:
                regression = (f"{metric} {b:.0f} -> {'>=' if f'after.{metric}' in bounds else ''}{a:.0f} us "
                              f"(+{(a / b - 1) * 100:.0f}%, bound +{bound * 100:.0f}%)")
                break
    state: Literal["done", "degraded", "failed"] = "degraded" if by["failed"] else "done"
    detail = ", ".join(f"{len(v)} {k.replace('_', ' ')}" for k, v in by.items() if v) or "nothing to do"
    return UnitOutcome(unit=result.unit, state=state, detail=detail, before=before, after=after, bounds=bounds,
                       regression=regression, seconds=round(seconds, 1), **by)


def wave_name(wave: int, has_canary: bool) -> str:
    return "canary" if wave == 0 and has_canary else f"batch {wave if has_canary else wave + 1}"


def halt_reason(units: list[RolloutUnit], policy: RolloutPolicy) -> str | None:
    """Why the rollout must stop now, from every finished unit (whichever controller finished it); None: go on."""
    finished = [u for u in units if u.state in FINISHED]
    failed = [u for u in finished if u.state == "failed"]
    if finished and failed and len(failed) * 100.0 / len(finished) > policy.max_fail_percent:
        names = ", ".join(f"{u.unit} ({u.detail[:160]})" for u in failed)
        return (f"{len(failed)} of {len(finished)} finished unit(s) failed "
                f"({len(failed) * 100.0 / len(finished):.0f}% > max_fail_percent {policy.max_fail_percent:g}%): "
                f"{names}")
    for u in finished:
        reg = (u.result or {}).get("regression")
        if reg:
            return f"unit {u.unit} regressed beyond the playbook's bound: {reg}"
    return None


# ------------------------------------------------------------------------------------------------ runner


class RolloutSummary(BaseModel):
    """The rollout as it stands (what `tune rollout` prints and reports): per-unit state and outcome."""

    rollout_id: int
    profile: str
    status: str
    reason: str = ""
    waves: list[list[str]]
    units: list[dict[str, Any]]
    controller: str
    #: units this controller worked on in this invocation
    worked: list[str] = []
    report_json: str | None = None
    report_html: str | None = None


EngineFactory = Callable[[str, EventSink], Engine]


@dataclass
class FleetRunner:
    """Runs (or resumes, or joins) one rollout from this controller process."""

    journal: Journal
    policy: RolloutPolicy
    engine_for: EngineFactory  # (unit, events) -> an Engine sharing `journal`
    events: EventSink = discard
    owner: str = field(default_factory=default_owner)
    #: units this process works on at once (<= policy.max_in_flight, which holds over all controllers)
    workers: int | None = None
    poll_s: float = 1.0
    #: called with each unit's apply result and its engine; returns where it saved the unit's report. The runner
    #: keeps only the small UnitOutcome: a fleet's raw runs stay on disk, not in the controller's memory.
    on_result: Callable[[ApplyResult, Engine], str | None] | None = None
    _outcomes: dict[str, UnitOutcome] = field(default_factory=dict)
    _mutex: threading.Lock = field(default_factory=threading.Lock)

    def _emit(self, kind: str, subject: str, message: str, **kw: Any) -> None:
        self.events(Event(kind, subject, message, **kw))

    # ---- creation ------------------------------------------------------------------------------------
    def create(self, profile: Path, inventory: Path, units: list[str]) -> RolloutRecord:
        waves = plan_waves(units, self.policy)
        rec = self.journal.create_rollout(str(profile), str(inventory), self.policy.model_dump(mode="json"),
                                          waves, owner=self.owner)
        self._emit("rollout.created", f"rollout:{rec.id}",
                   f"rollout {rec.id}: {len(units)} unit(s) in {len(waves)} wave(s): "
                   + " | ".join(", ".join(w) for w in waves))
        return rec

    # ---- running -------------------------------------------------------------------------------------
    def run(self, rollout_id: int, *, retry_failed: bool = False) -> RolloutSummary:
        rec = self.journal.get_rollout(rollout_id)
        if rec.status == "done":
            raise FleetError(f"rollout {rollout_id} is already done; `tune rollout --status {rollout_id}` shows it")
        stale_locks = self._take_over_dead_claims(rollout_id)
        if retry_failed:
            for u in self.journal.rollout_units(rollout_id):
                if u.state == "failed":
                    self.journal.set_rollout_unit_state(rollout_id, u.unit, "pending", "retry (--retry-failed)",
                                                        expect=("failed",))
        if rec.status in ("paused", "pausing", "halted"):
            self.journal.set_rollout_status(rollout_id, "running", f"resumed by {self.owner}",
                                            expect=(rec.status,))
        profile = Path(rec.profile)
        workers = min(self.workers or self.policy.max_in_flight, self.policy.max_in_flight)
        futures: dict[Future, str] = {}
        interrupted = False
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rollout") as pool:
            try:
                for wave in sorted({u.wave for u in self.journal.rollout_units(rollout_id)}):
                    if not self._run_wave(rollout_id, wave, pool, futures, workers, profile, stale_locks):
                        break
            except KeyboardInterrupt:
                interrupted = True
                self.journal.set_rollout_status(rollout_id, "pausing", "interrupted (Ctrl-C) on "
                                                f"{self.owner}", expect=("running",))
                self._emit("rollout.interrupted", f"rollout:{rollout_id}",
                           f"Ctrl-C: finishing {len(futures)} unit(s) in flight, then pausing; resume with "
                           f"`tune rollout --resume {rollout_id}`")
            for fut in list(futures):
                fut.result()  # errors are caught inside _work; this waits for in-flight units
                futures.pop(fut, None)
        return self._finish(rollout_id, interrupted)

    def _take_over_dead_claims(self, rollout_id: int) -> dict[str, str]:
        """Units a dead controller left `working`: back to pending; their unit locks, if still held by that
        dead owner, are named here so the engine may take them over (the claim proves whose they were)."""
        before = {u.unit: u.claimed_by for u in self.journal.rollout_units(rollout_id) if u.state == "working"}
        stale: dict[str, str] = {}
        for unit in self.journal.reclaim_dead_claims(rollout_id):
            info = self.journal.lock_info(unit)
            if info is not None and info.owner == before.get(unit) and info.stale:
                stale[unit] = info.lock_id
            self._emit("rollout.unit.reclaimed", unit, f"{unit}: its controller {before.get(unit)} is gone; "
                       "the unit goes back to pending (its half-done changes are reconciled first)")
        return stale

    def _status(self, rollout_id: int) -> str:
        return self.journal.get_rollout(rollout_id).status

    def _run_wave(self, rollout_id: int, wave: int, pool: ThreadPoolExecutor, futures: dict[Future, str],
                  workers: int, profile: Path, stale_locks: dict[str, str]) -> bool:
        """Work on the wave until none of its units is pending or working. False: stop the rollout."""
        announced = False
        while True:
            status = self._status(rollout_id)
            if status == "running":
                while len(futures) < workers:
                    claim = self.journal.claim_unit(rollout_id, self.owner, wave=wave,
                                                    max_in_flight=self.policy.max_in_flight)
                    if claim is None:
                        break
                    if not announced:
                        announced = True
                        name = wave_name(wave, _count(self.policy.canary, 1) > 0)  # the rollout's own policy
                        self._emit("rollout.wave", f"rollout:{rollout_id}", f"{name} started")
                    futures[pool.submit(self._work, rollout_id, claim.unit, profile,
                                        stale_locks.pop(claim.unit, None))] = claim.unit
            if not futures:
                if status != "running":
                    return False
                if not any(u.state in ("pending", "working") for u in self.journal.rollout_units(rollout_id)
                           if u.wave == wave):
                    return True
                time.sleep(self.poll_s)  # other controllers' units of this wave are in flight (or the cap)
                continue
            done, _ = wait(list(futures), timeout=self.poll_s, return_when=FIRST_COMPLETED)
            for fut in done:
                futures.pop(fut)
                fut.result()


    def _work(self, rollout_id: int, unit: str, profile: Path, force_unlock: str | None) -> None:
        """One unit: apply the profile through the engine, record its outcome, then check the halt rules."""
        start = time.time()
        counted = {"n": 0}
        total = None

        def unit_events(event: Event) -> None:
            self.events(event)
            if event.kind in TERMINAL_CHANGE_EVENTS:
                counted["n"] += 1
                if total:
                    self._emit("rollout.unit.progress", unit, f"{counted['n']}/{total} changes",
                               done=min(counted["n"], total), total=total)

        try:
            engine = self.engine_for(unit, unit_events)
            total = len(engine.specs(unit, profile))
            self._emit("rollout.unit.progress", unit, f"0/{total} changes", done=0, total=max(total, 1))
            result = engine.apply(unit, profile, force_unlock=force_unlock)
            outcome = summarize(result, self.policy, time.time() - start)
            if self.on_result is not None:
                outcome.report = self.on_result(result, engine)
            del result
        except Exception as exc:  # noqa: BLE001 - a per-unit failure is a result, never a silent early stop
            outcome = UnitOutcome(unit=unit, state="failed", detail=f"{type(exc).__name__}: {exc}"[:1000],
                                  seconds=round(time.time() - start, 1))
        if total:
            self._emit("rollout.unit.progress", unit, outcome.state, done=total, total=total)
        with self._mutex:
            self._outcomes[unit] = outcome
        try:
            self.journal.finish_unit(rollout_id, unit, self.owner, outcome.state, outcome.detail,
                                     json.loads(outcome.model_dump_json()))
        except JournalError as exc:
            self._emit("rollout.unit.lost", unit, f"{unit}: could not record the outcome: {exc}")
            return
        verdict = outcome.regression and f"; REGRESSED: {outcome.regression}" or ""
        self._emit("rollout.unit.finished", unit, f"{unit}: {outcome.state} ({outcome.detail}){verdict}",
                   data={"state": outcome.state})
        reason = halt_reason(self.journal.rollout_units(rollout_id), self.policy)
        if reason and self.journal.set_rollout_status(rollout_id, "halted", reason, expect=("running", "pausing")):
            self._emit("rollout.halted", f"rollout:{rollout_id}", f"HALTED: {reason}")

    # ---- the end ---------------------------------------------------------------------------------------
    def _finish(self, rollout_id: int, interrupted: bool) -> RolloutSummary:
        rec = self.journal.get_rollout(rollout_id)
        units = self.journal.rollout_units(rollout_id)
        if rec.status == "halted" and self.policy.on_halt == "rollback":
            # each controller undoes the units it finished: the halt reaches every controller of the rollout
            self._roll_back_changed(rollout_id, [u for u in units if u.claimed_by == self.owner])
        elif rec.status == "pausing":
            if not any(u.state == "working" for u in units):
                self.journal.set_rollout_status(rollout_id, "paused", rec.reason, expect=("pausing",))
        elif rec.status == "running" and all(u.state in FINISHED for u in units):
            self.journal.set_rollout_status(rollout_id, "done", "", expect=("running",))
        if interrupted:
            raise KeyboardInterrupt
        return self.summary(rollout_id)

    def _roll_back_changed(self, rollout_id: int, units: list[RolloutUnit]) -> None:
        """on_halt: rollback: undo exactly what this rollout kept on each finished unit, newest first."""
        for u in units:
            if u.state not in ("done", "degraded"):
                continue
            kept = list((u.result or {}).get("kept") or [])
            try:
                engine = self.engine_for(u.unit, self.events)
                for change_id in reversed(kept):
                    engine.rollback(u.unit, change_id)
            except Exception as exc:  # noqa: BLE001 - report, go on with the other units
                self._emit("rollout.unit.rollback_failed", u.unit, f"{u.unit}: rolling back failed: {exc}")
                continue
            self.journal.set_rollout_unit_state(rollout_id, u.unit, "rolled_back",
                                                f"halt: rolled back {', '.join(kept) or 'nothing (none kept)'}",
                                                expect=(u.state,))
            self._emit("rollout.unit.rolled_back", u.unit, f"{u.unit}: rolled back {len(kept)} change(s) "
                       "(the rollout halted)")

    def summary(self, rollout_id: int) -> RolloutSummary:
        return rollout_summary(self.journal, rollout_id, self.owner, sorted(self._outcomes))


def rollout_summary(journal: Journal, rollout_id: int, controller: str = "", worked: list[str] | None = None
                    ) -> RolloutSummary:
    """The rollout as the journal has it (any controller's units), for `--status` and the reports."""
    rec = journal.get_rollout(rollout_id)
    units = journal.rollout_units(rollout_id)
    waves: dict[int, list[str]] = {}
    for u in units:
        waves.setdefault(u.wave, []).append(u.unit)
    has_canary = _count(RolloutPolicy.model_validate(rec.policy).canary, 1) > 0
    rows = [{"unit": u.unit, "wave": u.wave, "wave_name": wave_name(u.wave, has_canary), "state": u.state,
             "detail": u.detail, "claimed_by": u.claimed_by, "attempts": u.attempts,
             **({"outcome": u.result} if u.result else {})} for u in units]
    return RolloutSummary(rollout_id=rec.id, profile=rec.profile, status=rec.status, reason=rec.reason,
                          waves=[waves[k] for k in sorted(waves)], units=rows, controller=controller,
                          worked=worked or [])
