"""Rollouts: a rollout's row, its units in waves, claims by controllers and their progress."""

from __future__ import annotations

import time
from typing import Any

from orchestrator.core.events import Event
from orchestrator.journal.base import JournalBase
from orchestrator.journal.errors import ClaimLostError, JournalError
from orchestrator.journal.owners import _judge_owner, _owner_start, default_owner
from orchestrator.journal.records import (
    FINISHED_UNIT_STATES,
    ROLLOUT_STATUSES,
    ROLLOUT_UNIT_STATES,
    RolloutRecord,
    RolloutStatus,
    RolloutUnit,
    RolloutUnitState,
    _row_rollout,
    _row_rollout_unit,
)
from orchestrator.journal.scrub import _dump_strict, _load


class RolloutOps(JournalBase):
    """The journal's rollout operations (mixed into `Journal`)."""

    @staticmethod
    def _rollout_row(conn: Any, rollout_id: int, lock: str = "") -> Any:
        row = conn.execute(f"SELECT * FROM rollouts WHERE id = ?{lock}", (rollout_id,)).fetchone()
        if row is None:
            raise JournalError(f"no rollout {rollout_id} in the journal")
        return row

    @staticmethod
    def _rollout_unit_row(conn: Any, rollout_id: int, unit: str, lock: str = "") -> Any:
        row = conn.execute(f"SELECT * FROM rollout_units WHERE rollout_id = ? AND unit = ?{lock}",
                           (rollout_id, unit)).fetchone()
        if row is None:
            raise JournalError(f"unit {unit} is not part of rollout {rollout_id}")
        return row

    def create_rollout(self, profile: str, inventory: str, policy: dict[str, Any], waves: list[list[str]],
                       owner: str | None = None) -> RolloutRecord:
        """A new rollout, 'running', with every unit 'pending'. A unit's wave is the index of its list in
        `waves` (0 = the canary); an empty wave adds no unit. `position` follows the order given. A unit may
        appear only once (JournalError otherwise)."""
        owner = owner or default_owner()
        policy_json = _dump_strict(policy, "policy")
        units: list[tuple[str, int, int]] = []  # (unit, wave, position)
        seen: set[str] = set()
        duplicates: list[str] = []
        for wave, names in enumerate(waves):
            for name in names:
                if not isinstance(name, str) or not name:
                    raise JournalError(f"rollout unit names must be non-empty strings, not {name!r}")
                if name in seen:
                    duplicates.append(name)
                seen.add(name)
                units.append((name, wave, len(units)))
        if duplicates:
            raise JournalError(f"a unit may appear once in a rollout: {', '.join(sorted(set(duplicates)))} "
                               "appear(s) more than once")
        now = time.time()
        with self._tx() as conn:
            rollout_id = self._db.insert_id(
                conn, "INSERT INTO rollouts (profile, inventory, policy, status, reason, owner, created_at, "
                "updated_at) VALUES (?,?,?,'running','',?,?,?)",
                (profile, inventory, policy_json, owner, now, now))
            for name, wave, position in units:
                conn.execute("INSERT INTO rollout_units (rollout_id, unit, wave, position, state, updated_at) "
                             "VALUES (?,?,?,?,'pending',?)", (rollout_id, name, wave, position, now))
            ev = Event("rollout.created", f"rollout:{rollout_id}",
                       f"rollout {rollout_id} of {profile}: {len(units)} unit(s) in "
                       f"{len({w for _n, w, _p in units})} wave(s), by {owner}",
                       {"rollout_id": rollout_id, "profile": profile, "inventory": inventory, "owner": owner,
                        "waves": [list(w) for w in waves if w]}, at=now)
            self._insert_event(conn, ev, None)
            rec = _row_rollout(self._rollout_row(conn, rollout_id))
        self._forward([ev])
        return rec

    def get_rollout(self, rollout_id: int) -> RolloutRecord:
        rows = self._query("SELECT * FROM rollouts WHERE id = ?", (rollout_id,))
        if not rows:
            raise JournalError(f"no rollout {rollout_id} in the journal")
        return _row_rollout(rows[0])

    def rollouts(self) -> list[RolloutRecord]:
        """Every rollout, newest first."""
        return [_row_rollout(r) for r in self._query("SELECT * FROM rollouts ORDER BY id DESC")]

    def rollout_units(self, rollout_id: int) -> list[RolloutUnit]:
        """The rollout's units in rollout order (`position`)."""
        rows = self._query("SELECT * FROM rollout_units WHERE rollout_id = ? ORDER BY position", (rollout_id,))
        return [_row_rollout_unit(r) for r in rows]

    def set_rollout_status(self, rollout_id: int, status: RolloutStatus, reason: str = "", *,
                           expect: tuple[str, ...] | None = None) -> bool:
        """Set the rollout's status (and reason). With `expect`, compare-and-set: nothing changes, and False is
        returned, unless the current status is one of `expect`."""
        if status not in ROLLOUT_STATUSES:
            raise JournalError(f"unknown rollout status {status!r} (one of {', '.join(ROLLOUT_STATUSES)})")
        now = time.time()
        ev: Event | None = None
        with self._tx() as conn:
            row = self._rollout_row(conn, rollout_id, self._db.for_update)  # waits for a claim in progress
            if expect is None or row["status"] in expect:
                conn.execute("UPDATE rollouts SET status = ?, reason = ?, updated_at = ? WHERE id = ?",
                             (status, reason, now, rollout_id))
                text = f"rollout {rollout_id}: {row['status']} -> {status}" + (f": {reason}" if reason else "")
                ev = Event("rollout.status", f"rollout:{rollout_id}", text,
                           {"rollout_id": rollout_id, "from": row["status"], "to": status, "reason": reason},
                           at=now)
                self._insert_event(conn, ev, None)
        if ev is None:
            return False
        self._forward([ev])
        return True

    def claim_unit(self, rollout_id: int, owner: str | None = None, *, wave: int,
                   max_in_flight: int) -> RolloutUnit | None:
        """Claim the next unit of `wave` for `owner` ("host:pid", default: this process), in one transaction:
        the first 'pending' unit of the wave by position becomes 'working', claimed by `owner` (with its
        process start time, to tell a reused pid later), `attempts` + 1. None when there is nothing to claim:
        the rollout is not 'running' (pausing, paused, halted, done), `max_in_flight` of its units are already
        'working' (whoever claimed them), or no unit of the wave is pending (or claimable right now).

        Several controllers (processes, machines) may claim from one rollout at once; each unit is claimed by
        one of them only. On PostgreSQL this path does NOT take the writers' advisory lock that every other
        write takes (`_tx`): claiming must not queue behind unrelated journal writes. Two row locks do the work:

        - the rollout's row, `SELECT ... FROM rollouts WHERE id = %s FOR UPDATE`: claims of one rollout take
          turns on it, so the count of 'working' units each claim checks against `max_in_flight` includes every
          claim committed before it (only a claim turns a unit 'working'): the in-flight cap is never exceeded,
          and a status change (pause, halt: an UPDATE of that row) takes effect between two claims, never in
          the middle of one;
        - the unit's row, `... FOR UPDATE SKIP LOCKED`: a pending unit's row another transaction holds
          (`set_rollout_unit_state` rolling it back after a halt, an operator's session, ...) is skipped, never
          waited on and never taken: the claim gets the next pending unit instead, so one held row cannot stall
          every controller, and a unit is never claimed from under a transaction that is changing it (which
          then finds it still pending, as it expects). Under READ COMMITTED a row is re-checked once locked,
          so a unit that stopped being 'pending' meanwhile is not taken.

        On SQLite, BEGIN IMMEDIATE serialises the whole claim; both clauses are left out."""
        if max_in_flight < 1:
            raise JournalError(f"max_in_flight must be at least 1, not {max_in_flight}")
        owner = owner or default_owner()
        claim_start = _owner_start(owner)
        with self._tx(serialise=False) as conn:
            rollout = self._rollout_row(conn, rollout_id, self._db.for_update)
            now = time.time()  # once it is this claim's turn
            if rollout["status"] != "running":
                return None
            working = conn.execute("SELECT COUNT(*) FROM rollout_units WHERE rollout_id = ? "
                                   "AND state = 'working'", (rollout_id,)).fetchone()[0]
            if working >= max_in_flight:
                return None
            row = conn.execute(
                "SELECT unit FROM rollout_units WHERE rollout_id = ? AND wave = ? AND state = 'pending' "
                f"ORDER BY position LIMIT 1{self._db.for_update_skip_locked}", (rollout_id, wave)).fetchone()
            if row is None:
                return None
            unit = row["unit"]
            conn.execute(
                "UPDATE rollout_units SET state = 'working', claimed_by = ?, claim_start = ?, claimed_at = ?, "
                "attempts = attempts + 1, detail = '', result = NULL, updated_at = ? "
                "WHERE rollout_id = ? AND unit = ?",
                (owner, claim_start, now, now, rollout_id, unit))
            claimed = _row_rollout_unit(self._rollout_unit_row(conn, rollout_id, unit))
            ev = Event("rollout.unit.claimed", unit, f"claimed by {owner} (rollout {rollout_id}, wave {wave}, "
                       f"attempt {claimed.attempts})",
                       {"rollout_id": rollout_id, "owner": owner, "wave": wave, "attempts": claimed.attempts,
                        "in_flight": working + 1}, at=now)
            self._insert_event(conn, ev, self._run_for_subject(unit))
        self._forward([ev])
        return claimed

    def finish_unit(self, rollout_id: int, unit: str, owner: str, state: RolloutUnitState, detail: str = "",
                    result: dict[str, Any] | None = None) -> RolloutUnit:
        """Report a claimed unit's outcome: `state` is done, degraded or failed; `result` is opaque JSON.
        Only the claim's owner may, while the unit is still 'working': otherwise `ClaimLostError` says who
        holds it now (its claim was reclaimed, reset or taken by another controller). One conditional UPDATE,
        atomic by itself: on PostgreSQL it does not take the writers' advisory lock either (see `claim_unit`)."""
        if state not in FINISHED_UNIT_STATES:
            raise JournalError(f"finish_unit: {state!r} is not an outcome "
                               f"(one of {', '.join(FINISHED_UNIT_STATES)})")
        result_json = None if result is None else _dump_strict(result, "result")
        now = time.time()
        with self._tx(serialise=False) as conn:
            cur = conn.execute(
                "UPDATE rollout_units SET state = ?, detail = ?, result = ?, updated_at = ? "
                "WHERE rollout_id = ? AND unit = ? AND state = 'working' AND claimed_by = ?",
                (state, detail, result_json, now, rollout_id, unit, owner))
            row = self._rollout_unit_row(conn, rollout_id, unit)
            if cur.rowcount != 1:
                holder = row["claimed_by"] if row["state"] == "working" else None
                raise ClaimLostError(
                    f"unit {unit} of rollout {rollout_id} is no longer claimed by {owner}: it is {row['state']}"
                    + (f", claimed by {holder}" if holder else ", claimed by nobody")
                    + (f" (last claimed by {row['claimed_by']})" if not holder and row["claimed_by"] else ""),
                    unit=unit, holder=holder, state=row["state"])
            ev = Event("rollout.unit.finished", unit, f"{state}" + (f": {detail}" if detail else ""),
                       {"rollout_id": rollout_id, "owner": owner, "state": state, "detail": detail,
                        "result": _load(result_json)}, at=now)
            self._insert_event(conn, ev, self._run_for_subject(unit))
        self._forward([ev])
        return _row_rollout_unit(row)

    def set_rollout_unit_state(self, rollout_id: int, unit: str, state: RolloutUnitState, detail: str = "", *,
                               expect: tuple[str, ...] | None = None) -> bool:
        """Set a unit's state outside a claim (rolled back after a halt, back to pending to retry a failed
        unit). With `expect`, compare-and-set: False, and nothing changes, unless the current state is one of
        `expect`. Going to 'pending' clears the claim. 'working' is refused: only `claim_unit` makes a claim."""
        if state not in ROLLOUT_UNIT_STATES:
            raise JournalError(f"unknown rollout unit state {state!r} (one of {', '.join(ROLLOUT_UNIT_STATES)})")
        if state == "working":
            raise JournalError("a unit becomes 'working' only by claim_unit")
        now = time.time()
        ev: Event | None = None
        with self._tx() as conn:
            # the row locked (claims and finishes do not take the writers' lock): a claim or finish of this unit
            # in progress makes this wait, and `expect` is checked against its outcome; while this holds the
            # row, a claim skips it (SKIP LOCKED) and a finish waits
            row = self._rollout_unit_row(conn, rollout_id, unit, self._db.for_update)
            if expect is None or row["state"] in expect:
                if state == "pending":
                    conn.execute("UPDATE rollout_units SET state = ?, detail = ?, updated_at = ?, "
                                 "claimed_by = NULL, claim_start = NULL, claimed_at = NULL "
                                 "WHERE rollout_id = ? AND unit = ?",
                                 (state, detail, now, rollout_id, unit))
                else:
                    conn.execute("UPDATE rollout_units SET state = ?, detail = ?, updated_at = ? "
                                 "WHERE rollout_id = ? AND unit = ?", (state, detail, now, rollout_id, unit))
                text = f"{row['state']} -> {state}" + (f": {detail}" if detail else "")
                ev = Event("rollout.unit.state", unit, text,
                           {"rollout_id": rollout_id, "from": row["state"], "to": state, "detail": detail,
                            "claimed_by": row["claimed_by"]}, at=now)
                self._insert_event(conn, ev, self._run_for_subject(unit))
        if ev is None:
            return False
        self._forward([ev])
        return True

    def reclaim_dead_claims(self, rollout_id: int) -> list[str]:
        """Put back to 'pending' the rollout's 'working' units whose claim owner is dead on this host (its
        process is gone, or its pid now belongs to another process), clearing the claim; returns them in
        rollout order. Claims from other hosts, or whose owner still runs, are left alone."""
        now = time.time()
        events: list[Event] = []
        with self._tx() as conn:
            self._rollout_row(conn, rollout_id)
            rows = conn.execute("SELECT * FROM rollout_units WHERE rollout_id = ? AND state = 'working' "
                                "ORDER BY position", (rollout_id,)).fetchall()
            for row in rows:
                stale, why = _judge_owner(row["claimed_by"] or "", row["claim_start"])
                if stale is not True:
                    continue
                cur = conn.execute(
                    "UPDATE rollout_units SET state = 'pending', claimed_by = NULL, claim_start = NULL, "
                    "claimed_at = NULL, updated_at = ? WHERE rollout_id = ? AND unit = ? AND state = 'working' "
                    "AND claimed_by = ?", (now, rollout_id, row["unit"], row["claimed_by"]))
                if cur.rowcount != 1:
                    continue  # finished meanwhile
                ev = Event("rollout.unit.reclaimed", row["unit"],
                           f"claim of {row['claimed_by']} put back to pending: {why}",
                           {"rollout_id": rollout_id, "old_owner": row["claimed_by"], "why": why}, at=now)
                self._insert_event(conn, ev, self._run_for_subject(row["unit"]))
                events.append(ev)
        self._forward(events)
        return [ev.subject for ev in events]

    def wave_progress(self, rollout_id: int) -> dict[int, dict[str, int]]:
        """Per wave (ascending), how many units are in each state (every state is a key, 0 included)."""
        self.get_rollout(rollout_id)
        rows = self._query("SELECT wave, state, COUNT(*) AS n FROM rollout_units WHERE rollout_id = ? "
                           "GROUP BY wave, state ORDER BY wave", (rollout_id,))
        progress: dict[int, dict[str, int]] = {}
        for row in rows:
            progress.setdefault(row["wave"], dict.fromkeys(ROLLOUT_UNIT_STATES, 0))[row["state"]] = row["n"]
        return progress
