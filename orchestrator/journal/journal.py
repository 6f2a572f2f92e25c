"""The journal's facade: `Journal`, over runs, change records, unit states, events, locks and rollouts, on SQLite or
PostgreSQL."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from orchestrator.core.events import Event
from orchestrator.journal.errors import (
    InvalidTransition,
    JournalError,
    UnreconciledError,
)
from orchestrator.journal.locks import LockOps
from orchestrator.journal.records import (
    CHANGE_STATES,
    INCOMPLETE_STATES,
    TRANSITIONS,
    UNIT_STATES,
    ChangeRecord,
    ChangeState,
    RunRecord,
    UnitState,
    UnitStateName,
    _row_change,
    _row_run,
)
from orchestrator.journal.rollouts import RolloutOps
from orchestrator.journal.scrub import _dump_strict, _load


class Journal(LockOps, RolloutOps):
    """The controller's journal: one SQLite file (e.g. `Paths.state / "journal.db"`), or a PostgreSQL database
    when `target` is a `postgresql://` (or `postgres://`) URL, shared by several controllers.

    `notify` receives the events the journal itself generates (for a progress display); it must not be this
    journal, nor forward to it (events the journal is given are stored once either way). `busy_timeout_s` is
    how long a writer waits for the others (SQLite's busy_timeout, PostgreSQL's lock_timeout);
    `connect_timeout_s` is PostgreSQL's connection timeout.

    `path` names the journal in messages: the SQLite file's Path, or the URL with its password redacted.

    `read_only=True` is for commands that only read (`tune status`, `rollout --status`, dry runs): nothing is
    created or written (see `_SQLiteDB`), and every write is refused. A damaged SQLite file is refused with
    `JournalDamaged` in either mode, never overwritten."""

    # ----------------------------------------------------------------------------------- runs

    def begin_run(self, unit: str, profile: str, controller: str) -> int:
        now = time.time()
        ev = Event("journal.run.begin", unit, f"run of profile {profile} by {controller}",
                   {"profile": profile, "controller": controller}, at=now)
        with self._tx() as conn:
            run_id = self._db.insert_id(conn, "INSERT INTO runs (unit, profile, controller, started_at) "
                                        "VALUES (?,?,?,?)", (unit, profile, controller, now))
            ev = Event(ev.kind, ev.subject, ev.message, {**ev.data, "run_id": run_id}, at=now)
            self._insert_event(conn, ev, run_id)
        self._open_runs[run_id] = unit
        self._forward([ev])
        return run_id

    def end_run(self, run_id: int, status: str) -> RunRecord:
        if not status or status == "running":
            raise JournalError(f"end_run: {status!r} is not a final run status")
        now = time.time()
        with self._tx() as conn:
            run = self._get_run(conn, run_id)
            if run.status != "running":
                raise JournalError(f"run {run_id} already ended ({run.status})")
            conn.execute("UPDATE runs SET status = ?, ended_at = ? WHERE id = ?", (status, now, run_id))
            ev = Event("journal.run.end", run.unit, f"run {run_id} ended: {status}",
                       {"run_id": run_id, "status": status}, at=now)
            self._insert_event(conn, ev, run_id)
        self._open_runs.pop(run_id, None)
        self._forward([ev])
        return self.get_run(run_id)

    @staticmethod
    def _get_run(conn: Any, run_id: int) -> RunRecord:
        row = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise JournalError(f"no run {run_id} in the journal")
        return _row_run(row)

    def get_run(self, run_id: int) -> RunRecord:
        rows = self._query("SELECT * FROM runs WHERE id = ?", (run_id,))
        if not rows:
            raise JournalError(f"no run {run_id} in the journal")
        return _row_run(rows[0])

    def runs(self, unit: str | None = None) -> list[RunRecord]:
        """Runs, newest first."""
        if unit is None:
            return [_row_run(r) for r in self._query("SELECT * FROM runs ORDER BY id DESC")]
        return [_row_run(r) for r in self._query("SELECT * FROM runs WHERE unit = ? ORDER BY id DESC", (unit,))]

    def open_runs(self, unit: str | None = None) -> list[RunRecord]:
        """Runs still 'running': in progress, or left by a controller that died (reconcile, then end them)."""
        return [r for r in self.runs(unit) if r.status == "running"]

    # ----------------------------------------------------------------------------------- change records

    def record_intent(self, run_id: int, unit: str, target: str, change_id: str, kind: str,
                      before: dict[str, Any], desired: dict[str, Any]) -> int:
        """Write (and fsync) the intent to change `unit`; returns the record id. Call BEFORE touching the unit.

        `before` is the exact prior state, enough to undo the change. Refused while the unit has incomplete
        records from another run (a crashed controller's): reconcile those first."""
        before_json = _dump_strict(before, "before")
        desired_json = _dump_strict(desired, "desired")
        now = time.time()
        with self._tx() as conn:
            run = self._get_run(conn, run_id)
            if run.unit != unit:
                raise JournalError(f"run {run_id} is a run of unit {run.unit}, not {unit}")
            if run.status != "running":
                raise JournalError(f"run {run_id} has ended ({run.status}): begin a new run")
            left = conn.execute(
                f"SELECT id, change_id, state, run_id FROM changes WHERE unit = ? AND run_id != ? "
                f"AND state IN ({','.join('?' * len(INCOMPLETE_STATES))}) ORDER BY id",
                (unit, run_id, *INCOMPLETE_STATES),
            ).fetchall()
            if left:
                listed = ", ".join(f"#{r['id']} {r['change_id']} ({r['state']}, run {r['run_id']})" for r in left)
                raise UnreconciledError(f"unit {unit} has changes left half done by an earlier run: {listed}; "
                                        "reconcile them (finish or undo) before making new changes")
            rec_id = self._db.insert_id(
                conn,
                "INSERT INTO changes (run_id, unit, target, change_id, kind, state, before, desired, times, "
                "created_at, updated_at) VALUES (?,?,?,?,?,'intent',?,?,?,?,?)",
                (run_id, unit, target, change_id, kind, before_json, desired_json, json.dumps({"intent": now}),
                 now, now),
            )
            ev = Event("journal.change.intent", f"{unit}.{target}", f"intent: {change_id} ({kind})",
                       {"rec_id": rec_id, "run_id": run_id, "change_id": change_id, "kind": kind,
                        "target": target, "desired": _load(desired_json)}, at=now)
            self._insert_event(conn, ev, run_id)
        self._forward([ev])
        return rec_id

    def mark(self, rec_id: int, state: ChangeState, *, after: dict[str, Any] | None = None,
             decision: dict[str, Any] | None = None, error: str | None = None, message: str = "") -> ChangeRecord:
        """Move a change record to `state` (see TRANSITIONS), recording when, and optionally the state seen
        `after`, the `decision` (JSON) and an `error`. Invalid transitions raise `InvalidTransition`."""
        if state not in CHANGE_STATES:
            raise InvalidTransition(f"unknown change state {state!r} (one of {', '.join(CHANGE_STATES)})")
        after_json = None if after is None else _dump_strict(after, "after")
        decision_json = None if decision is None else _dump_strict(decision, "decision")
        now = time.time()
        with self._tx() as conn:
            row = conn.execute("SELECT * FROM changes WHERE id = ?", (rec_id,)).fetchone()
            if row is None:
                raise JournalError(f"no change record {rec_id} in the journal")
            rec = _row_change(row)
            if state not in TRANSITIONS[rec.state]:
                allowed = ", ".join(sorted(TRANSITIONS[rec.state])) or "nothing (final)"
                raise InvalidTransition(f"change record {rec_id} ({rec.unit} {rec.change_id}) cannot go from "
                                        f"{rec.state} to {state}; from {rec.state} it can go to: {allowed}")
            times = {**rec.times, state: now}
            conn.execute(
                "UPDATE changes SET state = ?, times = ?, updated_at = ?, after = COALESCE(?, after), "
                "decision = COALESCE(?, decision), error = COALESCE(?, error) WHERE id = ?",
                (state, json.dumps(times), now, after_json, decision_json, error, rec_id),
            )
            data: dict[str, Any] = {"rec_id": rec_id, "run_id": rec.run_id, "change_id": rec.change_id,
                                    "kind": rec.kind, "target": rec.target, "from": rec.state, "to": state}
            if after_json is not None:
                data["after"] = _load(after_json)
            if decision_json is not None:
                data["decision"] = _load(decision_json)
            if error is not None:
                data["error"] = error
            text = message or f"{rec.change_id}: {rec.state} -> {state}" + (f": {error}" if error else "")
            ev = Event(f"journal.change.{state}", f"{rec.unit}.{rec.target}", text, data, at=now)
            self._insert_event(conn, ev, rec.run_id)
        self._forward([ev])
        return self.get(rec_id)

    def get(self, rec_id: int) -> ChangeRecord:
        rows = self._query("SELECT * FROM changes WHERE id = ?", (rec_id,))
        if not rows:
            raise JournalError(f"no change record {rec_id} in the journal")
        return _row_change(rows[0])

    def find(self, unit: str, change_id: str) -> ChangeRecord | None:
        """The newest record of `change_id` on `unit` (a change may have been made, undone and made again)."""
        rows = self._query("SELECT * FROM changes WHERE unit = ? AND change_id = ? ORDER BY id DESC LIMIT 1",
                           (unit, change_id))
        return _row_change(rows[0]) if rows else None

    def history(self, unit: str) -> list[ChangeRecord]:
        """Every change record of the unit, oldest first."""
        return [_row_change(r) for r in self._query("SELECT * FROM changes WHERE unit = ? ORDER BY id", (unit,))]

    def _in_states(self, unit: str, states: tuple[str, ...], order: str) -> list[ChangeRecord]:
        marks = ",".join("?" * len(states))
        rows = self._query(f"SELECT * FROM changes WHERE unit = ? AND state IN ({marks}) ORDER BY id {order}",
                           (unit, *states))
        return [_row_change(r) for r in rows]

    def incomplete(self, unit: str) -> list[ChangeRecord]:
        """Records in intent/applied/verified, oldest first: what a crashed controller left; reconcile them."""
        return self._in_states(unit, INCOMPLETE_STATES, "ASC")

    def active_changes(self, unit: str) -> list[ChangeRecord]:
        """Kept changes, newest first: the order `rollback --all` undoes them in."""
        return self._in_states(unit, ("kept",), "DESC")

    def needs_attention(self, unit: str) -> list[ChangeRecord]:
        """Changes whose rollback failed (the unit's state is not what the journal can vouch for), oldest first."""
        return self._in_states(unit, ("rollback_failed",), "ASC")

    def units(self) -> list[str]:
        """Every unit the journal knows of (runs, states or locks)."""
        rows = self._query("SELECT unit FROM runs UNION SELECT unit FROM unit_states UNION SELECT unit FROM locks "
                           "ORDER BY unit")
        return [r[0] for r in rows]

    # ----------------------------------------------------------------------------------- unit states

    def set_unit_state(self, unit: str, state: UnitStateName, detail: str = "") -> UnitState:
        if state not in UNIT_STATES:
            raise JournalError(f"unknown unit state {state!r} (one of {', '.join(UNIT_STATES)})")
        now = time.time()
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO unit_states (unit, state, detail, updated_at) VALUES (?,?,?,?) "
                "ON CONFLICT(unit) DO UPDATE SET state = excluded.state, detail = excluded.detail, "
                "updated_at = excluded.updated_at",
                (unit, state, detail, now),
            )
            ev = Event("journal.unit.state", unit, f"{state}" + (f": {detail}" if detail else ""),
                       {"state": state, "detail": detail}, at=now)
            self._insert_event(conn, ev, self._run_for_subject(unit))
        self._forward([ev])
        return UnitState(unit=unit, state=state, detail=detail, updated_at=now)

    def unit_states(self) -> dict[str, UnitState]:
        rows = self._query("SELECT * FROM unit_states ORDER BY unit")
        return {r["unit"]: UnitState(unit=r["unit"], state=r["state"], detail=r["detail"],
                                     updated_at=r["updated_at"]) for r in rows}

    def unit_state(self, unit: str) -> UnitState | None:
        return self.unit_states().get(unit)


def open_journal(target: str | Path, **kw: Any) -> Journal:
    """The journal at `target`: a SQLite file path, or a `postgresql://` / `postgres://` URL (see `Journal`)."""
    return Journal(target, **kw)
