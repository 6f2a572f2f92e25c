"""Unit locks: one row per unit under a UNIQUE constraint, taken inside the writers' transaction, so two
controllers racing for one unit cannot both win; a stale lock is never taken silently."""

from __future__ import annotations

import secrets
import time
from typing import Any

from orchestrator.core.events import Event
from orchestrator.journal.base import JournalBase
from orchestrator.journal.errors import JournalError, LockedError, LockLostError
from orchestrator.journal.owners import (
    _ago,
    _judge_owner,
    _owner_start,
    _when,
    default_owner,
)
from orchestrator.journal.records import Lock, LockInfo


class LockOps(JournalBase):
    """The journal's lock operations (mixed into `Journal`)."""

    @staticmethod
    def _lock_info(row: Any) -> LockInfo:
        stale, why = _judge_owner(row["owner"], row["owner_start"])
        return LockInfo(unit=row["unit"], lock_id=row["lock_id"], owner=row["owner"],
                        acquired_at=row["acquired_at"], heartbeat_at=row["heartbeat_at"], stale=stale, why=why)

    def locks(self) -> list[LockInfo]:
        return [self._lock_info(r) for r in self._query("SELECT * FROM locks ORDER BY unit")]

    def lock_info(self, unit: str) -> LockInfo | None:
        rows = self._query("SELECT * FROM locks WHERE unit = ?", (unit,))
        return self._lock_info(rows[0]) if rows else None

    @staticmethod
    def _locked_error(info: LockInfo, now: float) -> LockedError:
        msg = (f"unit {info.unit} is locked by {info.owner} (lock ID {info.lock_id}, since {_when(info.acquired_at)}, "
               f"last heartbeat {_ago(now - info.heartbeat_at)}); {info.why}. If no other controller is tuning "
               f"{info.unit}, rerun with --force-unlock {info.lock_id} to take it over.")
        return LockedError(msg, unit=info.unit, lock_id=info.lock_id, owner=info.owner, since=info.acquired_at,
                           stale=info.stale)

    def acquire_lock(self, unit: str, owner: str | None = None, *, force_unlock: str | None = None) -> Lock:
        """Take the unit's lock for `owner` ("host:pid", default: this process).

        Raises `LockedError` when another lock is held (its message names holder, lock id, since when and
        whether it looks stale). With `force_unlock=LOCK_ID` the current lock is taken over, but only if
        LOCK_ID is its id; when the unit is not locked at all, the lock is simply taken."""
        owner = owner or default_owner()
        owner_start = _owner_start(owner)
        lock_id = secrets.token_hex(4)
        now = time.time()
        refused: LockedError | None = None
        events: list[Event] = []
        try:
            with self._tx() as conn:
                row = conn.execute("SELECT * FROM locks WHERE unit = ?", (unit,)).fetchone()
                if row is not None:
                    info = self._lock_info(row)
                    if force_unlock is None:
                        refused = self._locked_error(info, now)
                        raise refused
                    if force_unlock != info.lock_id:
                        refused = LockedError(
                            f"--force-unlock {force_unlock} does not match the lock on unit {unit}: it is lock "
                            f"ID {info.lock_id}, held by {info.owner} since {_when(info.acquired_at)}; "
                            f"{info.why}. Check the holder, then rerun with --force-unlock {info.lock_id}.",
                            unit=unit, lock_id=info.lock_id, owner=info.owner, since=info.acquired_at,
                            stale=info.stale)
                        raise refused
                    conn.execute("DELETE FROM locks WHERE unit = ? AND lock_id = ?", (unit, info.lock_id))
                    ev = Event("journal.lock.forced", unit,
                               f"lock {info.lock_id} of {info.owner} taken over by {owner} (--force-unlock)",
                               {"old_lock_id": info.lock_id, "old_owner": info.owner, "old_stale": info.stale,
                                "lock_id": lock_id, "owner": owner}, at=now)
                    self._insert_event(conn, ev, self._run_for_subject(unit))
                    events.append(ev)
                conn.execute("INSERT INTO locks (unit, lock_id, owner, owner_start, acquired_at, heartbeat_at) "
                             "VALUES (?,?,?,?,?,?)", (unit, lock_id, owner, owner_start, now, now))
                ev = Event("journal.lock.acquired", unit, f"locked by {owner} (lock ID {lock_id})",
                           {"lock_id": lock_id, "owner": owner}, at=now)
                self._insert_event(conn, ev, self._run_for_subject(unit))
                events.append(ev)
        except self._db.integrity_error as exc:  # the UNIQUE constraint: someone else won (defence in depth)
            held = self.lock_info(unit)
            if held is None:
                raise JournalError(f"locking unit {unit}: {exc}") from exc
            raise self._locked_error(held, now) from exc
        finally:
            if refused is not None:
                self._record_refusal(unit, owner, refused)
        self._forward(events)
        return Lock(unit=unit, lock_id=lock_id, owner=owner, acquired_at=now, heartbeat_at=now, _journal=self)

    def _record_refusal(self, unit: str, owner: str, error: LockedError) -> None:
        ev = Event("journal.lock.refused", unit, f"{owner} could not lock {unit}: held by {error.owner}",
                   {"lock_id": error.lock_id, "holder": error.owner, "owner": owner, "stale": error.stale})
        try:
            with self._tx() as conn:
                self._insert_event(conn, ev, self._run_for_subject(unit))
        except JournalError:
            return  # the refusal itself is what matters; do not mask it
        self._forward([ev])

    def heartbeat(self, lock: Lock) -> None:
        """Refresh the lock's heartbeat; raises `LockLostError` if it is no longer this lock (taken over)."""
        now = time.time()
        with self._tx() as conn:
            cur = conn.execute("UPDATE locks SET heartbeat_at = ? WHERE unit = ? AND lock_id = ?",
                               (now, lock.unit, lock.lock_id))
            lost = cur.rowcount == 0
        if lost:
            info = self.lock_info(lock.unit)
            holder = f"now held by {info.owner} (lock ID {info.lock_id})" if info else "now unlocked"
            raise LockLostError(f"lock {lock.lock_id} on unit {lock.unit} was lost: {holder}; stop changing "
                                f"{lock.unit}", unit=lock.unit, lock_id=lock.lock_id, owner=lock.owner)
        lock.heartbeat_at = now

    def release_lock(self, lock: Lock) -> bool:
        """Release the lock if it is still this lock (never someone else's); True when it was released."""
        now = time.time()
        with self._tx() as conn:
            cur = conn.execute("DELETE FROM locks WHERE unit = ? AND lock_id = ?", (lock.unit, lock.lock_id))
            released = cur.rowcount == 1
            ev = Event("journal.lock.released" if released else "journal.lock.lost", lock.unit,
                       f"lock {lock.lock_id} released by {lock.owner}" if released
                       else f"lock {lock.lock_id} of {lock.owner} was already gone (taken over?)",
                       {"lock_id": lock.lock_id, "owner": lock.owner}, at=now)
            self._insert_event(conn, ev, self._run_for_subject(lock.unit))
        self._forward([ev])
        return bool(released)
