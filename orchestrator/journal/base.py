"""The journal's core, which every part of it stands on: the backend connection, one transaction per write,
queries, migrations at open, and the events stored with the writes they describe."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from orchestrator.core.events import Event, EventSink, discard
from orchestrator.journal import schema
from orchestrator.journal.errors import (
    JournalError,
)
from orchestrator.journal.postgres import _Backend, _PostgresDB
from orchestrator.journal.records import (
    EventRecord,
)
from orchestrator.journal.schema import _run_migrations
from orchestrator.journal.scrub import _load, _scrub
from orchestrator.journal.sqlite import _SQLiteDB
from orchestrator.journal.urls import _URL_SCHEME, check_db_url


class JournalBase:
    """The connection to the backend, transactions, queries and events: what `Journal`'s parts share."""

    def __init__(self, target: Path | str, *, notify: EventSink = discard, busy_timeout_s: float = 30.0,
                 connect_timeout_s: float = 10.0, read_only: bool = False) -> None:
        self._db: _Backend
        self.read_only = read_only
        if isinstance(target, str) and (_URL_SCHEME.match(target) or "://" in target):
            # another scheme is refused, and so is a URL after a space or a quote: a typo must not become a
            # file (and directories) named after a URL and its password
            check_db_url(target)
            self._db = _PostgresDB(str(target), busy_timeout_s, connect_timeout_s)
            self.path: Path | str = self._db.display
        else:
            self._db = _SQLiteDB(Path(target), busy_timeout_s, read_only)
            self.path = self._db.path
        self.backend = self._db.kind  # "sqlite" / "postgresql"
        self._notify = notify
        self._busy_timeout_s = busy_timeout_s
        self._mutex = threading.RLock()
        self._open_runs: dict[int, str] = {}  # runs begun by this instance and not ended: run_id -> unit
        self._emitting: set[int] = set()  # ids of events being forwarded to `notify` (loop guard)
        self._abandoned: list[Any] = []  # connections inherited across fork(): never used (nor closed) again
        self._db.prepare()
        self._conn: Any = None
        self._closed = False
        self._pid = os.getpid()
        self._conn = self._db.connect()
        try:
            self._migrate()
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"Journal({str(self.path)!r})"

    # ----------------------------------------------------------------------------------- connection plumbing

    def _connection(self) -> Any:
        if self._closed:
            raise JournalError(f"journal {self.path} is closed")
        if os.getpid() != self._pid:  # forked: a connection must not cross fork() (nor be closed by the child)
            if self._conn is not None:
                self._abandoned.append(self._conn)
            self._pid = os.getpid()
            self._open_runs = {}
            self._conn = None
        if self._conn is None or not self._db.usable(self._conn):  # PostgreSQL: the server dropped it
            self._conn = None
            self._conn = self._db.connect()  # if this fails, the next call tries again
        return self._conn

    @contextmanager
    def _tx(self, *, serialise: bool = True, migrating: bool = False) -> Iterator[Any]:
        """One write transaction, rolled back on any exception. SQLite: BEGIN IMMEDIATE ... COMMIT (every writer
        is serialised). PostgreSQL: BEGIN ISOLATION LEVEL READ COMMITTED, then (unless `serialise` is False:
        the rollout claim path only) the writers' advisory lock, held until COMMIT/ROLLBACK. A read-only
        journal refuses, except to bring a PostgreSQL schema up to date (`migrating`)."""
        if self.read_only and not migrating:
            raise JournalError(f"journal {self.path} was opened read-only: this command must not write to it")
        with self._mutex:
            conn = self._connection()
            self._db.begin(conn, serialise=serialise)
            try:
                yield conn
                self._db.commit(conn)
            except BaseException as exc:
                self._db.rollback(conn)
                mapped = self._db.error(exc)
                if mapped is not None:
                    raise mapped from self._db.cause(exc)
                raise

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with self._mutex:
            try:
                rows: list[Any] = self._connection().execute(sql, params).fetchall()
                return rows
            except Exception as exc:
                mapped = self._db.error(exc)
                if mapped is not None:
                    raise mapped from self._db.cause(exc)
                raise

    def _migrate(self) -> None:
        if self.read_only:
            if self.backend == "sqlite" or self._pg_schema_current():
                return  # SQLite read-only: the backend brought an older schema up to date in memory
        with self._tx(migrating=True) as conn:
            _run_migrations(conn, self.path)

    def _pg_schema_current(self) -> bool:
        rows = self._query("SELECT to_regclass('schema_version') IS NOT NULL")
        return bool(rows[0][0]) and self._query("SELECT version FROM schema_version")[0][0] == schema.SCHEMA_VERSION

    @property
    def schema_version(self) -> int:
        return int(self._query("SELECT version FROM schema_version")[0][0])

    def pragma(self, name: str) -> Any:
        """The connection's value of a PRAGMA (journal_mode, synchronous, busy_timeout, ...); SQLite only."""
        if not name.isidentifier():
            raise ValueError(f"not a pragma name: {name!r}")
        if self.backend != "sqlite":
            raise JournalError(f"journal {self.path}: PRAGMA is SQLite's; this journal is in PostgreSQL")
        return self._query(f"PRAGMA {name}")[0][0]

    def close(self) -> None:
        with self._mutex:
            if self._conn is not None and os.getpid() == self._pid:
                self._db.close(self._conn)
            self._conn = None
            self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------- events

    def _insert_event(self, conn: Any, event: Event, run_id: int | None) -> None:
        data = json.dumps(_scrub(event.data), sort_keys=True, separators=(",", ":"))
        conn.execute(
            "INSERT INTO events (run_id, kind, subject, message, data, done, total, at) VALUES (?,?,?,?,?,?,?,?)",
            (run_id, event.kind, event.subject, event.message, data, event.done, event.total, event.at),
        )

    def _run_for_subject(self, subject: str) -> int | None:
        for run_id, unit in self._open_runs.items():
            if subject == unit or subject.startswith(unit + "."):
                return run_id
        return None

    def _forward(self, events: list[Event]) -> None:
        for event in events:
            self._emitting.add(id(event))
            try:
                self._notify(event)
            finally:
                self._emitting.discard(id(event))

    def __call__(self, event: Event) -> None:
        """EventSink: store the event (callers must keep secrets out of `event.data`; see the module doc)."""
        if id(event) in self._emitting:  # our own event coming back through a forwarding sink: stored already
            return
        with self._tx() as conn:
            self._insert_event(conn, event, self._run_for_subject(event.subject))

    def events_for(self, unit: str, *, run_id: int | None = None) -> list[EventRecord]:
        """Events about a unit (subject `unit` or `unit.<target>`), oldest first; optionally of one run."""
        sql = "SELECT * FROM events WHERE (subject = ? OR substr(subject, 1, ?) = ?)"
        params: tuple[Any, ...] = (unit, len(unit) + 1, unit + ".")
        if run_id is not None:
            sql += " AND run_id = ?"
            params += (run_id,)
        return [self._row_event(r) for r in self._query(sql + " ORDER BY id", params)]

    def events(self, *, run_id: int | None = None, since_id: int = 0) -> list[EventRecord]:
        """Events, oldest first (by id). On PostgreSQL, ids come from a sequence and the claim path writes
        concurrently with other writers, so an event may commit after one with a higher id: do not poll with
        `since_id` expecting to see every rollout claim/finish event exactly once."""
        sql, params = "SELECT * FROM events WHERE id > ?", [since_id]
        if run_id is not None:
            sql, params = sql + " AND run_id = ?", [since_id, run_id]
        return [self._row_event(r) for r in self._query(sql + " ORDER BY id", tuple(params))]

    @staticmethod
    def _row_event(row: Any) -> EventRecord:
        return EventRecord(id=row["id"], run_id=row["run_id"], kind=row["kind"], subject=row["subject"],
                           message=row["message"], data=_load(row["data"]), done=row["done"],
                           total=row["total"], at=row["at"])
