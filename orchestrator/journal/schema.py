"""The journal's schema and its migrations, one function per version, run under the writers' lock."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from orchestrator.journal.errors import JournalError
from orchestrator.journal.records import (
    CHANGE_STATES,
    ROLLOUT_STATUSES,
    ROLLOUT_UNIT_STATES,
    UNIT_STATES,
)


def _migrate_1(conn: sqlite3.Connection) -> None:
    states = ", ".join(f"'{s}'" for s in CHANGE_STATES)
    unit_states = ", ".join(f"'{s}'" for s in UNIT_STATES)
    script = f"""
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            unit TEXT NOT NULL,
            profile TEXT NOT NULL,
            controller TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'running',
            started_at REAL NOT NULL,
            ended_at REAL
        );
        CREATE INDEX runs_unit ON runs(unit, id);
        CREATE TABLE changes (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id INTEGER NOT NULL REFERENCES runs(id),
            unit TEXT NOT NULL,
            target TEXT NOT NULL,
            change_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ({states})),
            before TEXT NOT NULL,
            desired TEXT NOT NULL,
            after TEXT,
            decision TEXT,
            error TEXT,
            times TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE INDEX changes_unit_state ON changes(unit, state, id);
        CREATE INDEX changes_unit_change ON changes(unit, change_id, id);
        CREATE TABLE unit_states (
            unit TEXT PRIMARY KEY,
            state TEXT NOT NULL CHECK (state IN ({unit_states})),
            detail TEXT NOT NULL DEFAULT '',
            updated_at REAL NOT NULL
        );
        CREATE TABLE locks (
            unit TEXT NOT NULL UNIQUE,
            lock_id TEXT NOT NULL UNIQUE,
            owner TEXT NOT NULL,
            owner_start TEXT,
            acquired_at REAL NOT NULL,
            heartbeat_at REAL NOT NULL
        );
        CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id INTEGER,
            kind TEXT NOT NULL,
            subject TEXT NOT NULL,
            message TEXT NOT NULL DEFAULT '',
            data TEXT NOT NULL DEFAULT '{{}}',
            done REAL,
            total REAL,
            at REAL NOT NULL
        );
        CREATE INDEX events_subject ON events(subject, id);
        CREATE INDEX events_run ON events(run_id, id);
    """
    # statement by statement: executescript() would COMMIT the caller's transaction first
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _migrate_2(conn: Any) -> None:
    """The rollout store: rollouts and their units (see the module doc)."""
    statuses = ", ".join(f"'{s}'" for s in ROLLOUT_STATUSES)
    unit_states = ", ".join(f"'{s}'" for s in ROLLOUT_UNIT_STATES)
    script = f"""
        CREATE TABLE rollouts (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            profile TEXT NOT NULL,
            inventory TEXT NOT NULL,
            policy TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ({statuses})),
            reason TEXT NOT NULL DEFAULT '',
            owner TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE TABLE rollout_units (
            rollout_id INTEGER NOT NULL REFERENCES rollouts(id),
            unit TEXT NOT NULL,
            wave INTEGER NOT NULL,
            position INTEGER NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ({unit_states})),
            claimed_by TEXT,
            claim_start TEXT,
            claimed_at REAL,
            attempts INTEGER NOT NULL DEFAULT 0,
            detail TEXT NOT NULL DEFAULT '',
            result TEXT,
            updated_at REAL NOT NULL,
            PRIMARY KEY (rollout_id, unit)
        );
        CREATE INDEX rollout_units_claim ON rollout_units(rollout_id, wave, state, position);
        CREATE INDEX rollout_units_position ON rollout_units(rollout_id, position);
    """
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


# The migration hook: MIGRATIONS[i] takes a database at schema version i to version i + 1. It runs inside the
# opening connection's write transaction (SQLite: BEGIN IMMEDIATE; PostgreSQL: under the writers' advisory
# lock), so two processes opening a new database cannot both migrate. A migration gets a connection whose
# `execute(sql, params)` takes SQLite's dialect (`?` placeholders, INTEGER PRIMARY KEY AUTOINCREMENT, REAL): on
# PostgreSQL it is translated (see `_pg_sql`). Add a function at the end to change the schema; never edit one
# that has shipped.
Migration = Callable[[Any], None]
MIGRATIONS: list[Migration] = [_migrate_1, _migrate_2]
SCHEMA_VERSION = len(MIGRATIONS)


def _run_migrations(conn: Any, where: object) -> None:
    """Bring the schema to SCHEMA_VERSION inside the caller's transaction (see MIGRATIONS)."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    version = 0 if row is None else row[0]
    if version > SCHEMA_VERSION:
        raise JournalError(f"journal {where} has schema version {version}, newer than this "
                           f"rt-tune understands ({SCHEMA_VERSION}): upgrade rt-tune")
    for step in range(version, SCHEMA_VERSION):
        MIGRATIONS[step](conn)
    if row is None:
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
    elif version != SCHEMA_VERSION:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
