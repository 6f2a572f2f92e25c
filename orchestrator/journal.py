"""The journal: what the controller did to each unit, durably, in SQLite on the controller (or in PostgreSQL,
shared by several controllers).

Every remote change goes through a **change record**. The caller writes the intent (with the exact prior state,
`before`) and the journal commits it to disk (WAL, `synchronous=FULL`) *before* the caller touches the unit;
after each step the caller marks the record:

    intent -> applied -> verified -> kept            (the evidence says it helps)
                 |           |          |
                 +-----------+----------+--> rolled_back | rollback_failed
    intent -> failed | rolled_back                   (never applied, or found untouched when reconciling)
    applied | verified -> failed                     (could not apply or verify it; the caller then undoes it:
                                                       failed -> rolled_back | rollback_failed)
    rollback_failed -> rolled_back | rollback_failed  (a later rollback attempt)

Any other transition raises `InvalidTransition` (e.g. kept -> applied). A controller killed in the middle of a
change (SIGKILL, power loss) leaves records in intent/applied/verified: `incomplete(unit)` returns them, and
the next run must reconcile them (finish or undo, from `before`) before it may record new intents for that
unit (`record_intent` refuses otherwise, with `UnreconciledError`).

Locks: one row per unit under a UNIQUE constraint, taken inside `BEGIN IMMEDIATE`, so two controllers racing
for one unit cannot both win. A lock that looks stale (its owner process is gone) is never taken silently:
the caller must name its id (`force_unlock=LOCK_ID`, the CLI's `--force-unlock LOCK_ID`).

Events: a `Journal` is an `EventSink`; every event it receives is stored in the `events` table, and the
journal's own operations (runs, change transitions, unit states, locks) add rows in the same transaction as
the change they describe, so `events_for(unit)` tells the whole story.

Secrets: the journal stores what it is given. Callers must not put secrets (SSH keys, passwords, sudo
passwords, command stdin) in event data, `before`/`desired`/`after` or `decision`. As a safety net, event
data keys that name secrets (stdin, password, passphrase, secret, token, private_key, ...) and values that
look like PEM private keys are replaced by "<redacted>", and raw bytes are never stored.

Several processes may use one journal file at once: each `Journal` opens its own connection, every write is
one `BEGIN IMMEDIATE` transaction, and `busy_timeout` makes writers wait for each other. One `Journal` may be
shared between threads (calls are serialised); after `fork()` the child opens its own connection.

PostgreSQL: `Journal("postgresql://user:password@host:port/db")` (or `open_journal(...)`; `postgres://` works
too) keeps the journal in a PostgreSQL database, through psycopg 3, so controllers on several machines can share
it. The semantics are SQLite's: every write is one transaction (READ COMMITTED, which takes a fresh snapshot per
statement), and writers are serialised by a transaction-scoped advisory lock,
`SELECT pg_advisory_xact_lock(PG_ADVISORY_LOCK_KEY)`, taken first in every write transaction: the stand-in for
SQLite's BEGIN IMMEDIATE, so the locks, the transition checks and the unreconciled-changes refusal hold exactly
as with SQLite (a writer sees every write committed before it got the lock). Migrations run under the same lock,
so two processes opening a new database cannot both migrate. `busy_timeout_s` becomes `lock_timeout`. The
rollout claim path alone (`claim_unit`, `finish_unit`) does not take that lock: see `claim_unit`. A connection
is never used across `fork()` (the child opens its own, as with SQLite). The URL's password never appears in a
message, a `repr` or an event: `journal.path` is the URL with `user:***@` (`redact_url` is the one
redaction function; a URL libpq would misread, e.g. an unencoded "@" or "/" in the password, is refused by
`check_db_url` before libpq sees it, since libpq's own errors would quote parts of the password).

Damage: a journal file that is empty, not SQLite, or has bad pages raises `JournalDamaged` (naming the file
and how to recover it), in every mode; it is never overwritten nor started afresh. Read-only commands open
the journal with `read_only=True` (see `_SQLiteDB`): they work in a read-only state directory.

Rollouts (schema version 2): a rollout is a row in `rollouts` (profile, inventory, policy, status running /
pausing / paused / halted / done) with one row per unit in `rollout_units`, grouped in waves (0 = the canary,
then the batches) and ordered by `position`. Controllers claim units (`claim_unit`), one transaction per claim,
and report each one (`finish_unit`); a claim whose controller died on this host is put back by
`reclaim_dead_claims`. Every rollout write stores an event (`rollout.*`) in the same transaction.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shlex
import socket
import sqlite3
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Self, get_args

from pydantic import BaseModel, ConfigDict

from orchestrator.core.errors import ExitStatus, TuneError
from orchestrator.core.events import Event, EventSink, discard

# --------------------------------------------------------------------------------------------------- errors


class JournalError(TuneError):
    """The journal refused an operation or could not be read or written (unknown record, bad state, I/O)."""

    exit_code = ExitStatus.ERROR


class InvalidTransition(JournalError):
    """A change record was asked to move to a state its current state does not lead to (e.g. kept -> applied)."""


class UnreconciledError(JournalError):
    """A unit still has changes a crashed controller left half done; they must be reconciled first."""


class JournalDamaged(JournalError):
    """The journal file is not a sound SQLite database (truncated, emptied, pages overwritten): never
    overwritten nor re-initialised; the message names the file and how to recover what it holds."""


class JournalURLError(JournalError):
    """A `--db` URL that is no usable PostgreSQL URL: refused before libpq sees it, its password redacted."""

    exit_code = ExitStatus.USAGE


class LockedError(TuneError):
    """Another controller holds the unit's lock (or `--force-unlock` named the wrong lock)."""

    exit_code = ExitStatus.LOCKED

    def __init__(self, message: str, *, unit: str = "", lock_id: str = "", owner: str = "",
                 since: float | None = None, stale: bool | None = None):
        super().__init__(message)
        self.unit = unit
        self.lock_id = lock_id
        self.owner = owner
        self.since = since
        self.stale = stale  # True: looks stale; False: holder alive on this host; None: cannot tell


class LockLostError(LockedError):
    """The lock this controller held is gone: released elsewhere or taken over with --force-unlock."""


class ClaimLostError(JournalError):
    """A rollout unit this controller claimed is no longer its claim (reclaimed, reset, or another's now)."""

    def __init__(self, message: str, *, unit: str = "", holder: str | None = None, state: str = ""):
        super().__init__(message)
        self.unit = unit
        self.holder = holder  # who holds the claim now (None: nobody)
        self.state = state  # the unit's state now


# --------------------------------------------------------------------------------------------------- models

ChangeState = Literal["intent", "applied", "verified", "kept", "rolled_back", "failed", "rollback_failed"]
UnitStateName = Literal["pending", "working", "done", "degraded", "failed"]

RolloutStatus = Literal["running", "pausing", "paused", "halted", "done"]
RolloutUnitState = Literal["pending", "working", "done", "degraded", "failed", "rolled_back"]

CHANGE_STATES: tuple[str, ...] = get_args(ChangeState)
UNIT_STATES: tuple[str, ...] = get_args(UnitStateName)
ROLLOUT_STATUSES: tuple[str, ...] = get_args(RolloutStatus)
ROLLOUT_UNIT_STATES: tuple[str, ...] = get_args(RolloutUnitState)
FINISHED_UNIT_STATES: tuple[str, ...] = ("done", "degraded", "failed")  # what finish_unit may report
INCOMPLETE_STATES: tuple[str, ...] = ("intent", "applied", "verified")

TRANSITIONS: dict[str, frozenset[str]] = {
    "intent": frozenset({"applied", "failed", "rolled_back"}),
    "applied": frozenset({"verified", "failed", "rolled_back", "rollback_failed"}),
    "verified": frozenset({"kept", "failed", "rolled_back", "rollback_failed"}),
    "kept": frozenset({"rolled_back", "rollback_failed"}),
    "failed": frozenset({"rolled_back", "rollback_failed"}),
    "rollback_failed": frozenset({"rolled_back", "rollback_failed"}),
    "rolled_back": frozenset(),
}


class ChangeRecord(BaseModel):
    """One remote change and everything known about it. `before`/`desired`/`after` are opaque JSON."""

    model_config = ConfigDict(frozen=True)

    id: int
    run_id: int
    unit: str
    target: str  # "host" / "guest"
    change_id: str  # the profile's name for the change
    kind: str  # "sysctl", "file", "service", "cmdline", ...
    state: ChangeState
    before: dict[str, Any]  # the exact prior state, enough to undo the change
    desired: dict[str, Any]
    after: dict[str, Any] | None = None  # the state seen after applying (or after a rollback)
    decision: dict[str, Any] | None = None  # the keep/rollback decision and its evidence
    error: str | None = None
    times: dict[str, float]  # state -> when the record (last) entered it (epoch seconds)
    created_at: float
    updated_at: float

    @property
    def incomplete(self) -> bool:
        return self.state in INCOMPLETE_STATES


class RunRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    unit: str
    profile: str
    controller: str
    status: str  # "running" until end_run
    started_at: float
    ended_at: float | None = None


class UnitState(BaseModel):
    model_config = ConfigDict(frozen=True)

    unit: str
    state: UnitStateName
    detail: str = ""
    updated_at: float


class EventRecord(BaseModel):
    """A stored event. `run_id` is the run it happened in, when known."""

    model_config = ConfigDict(frozen=True)

    id: int
    run_id: int | None = None
    kind: str
    subject: str
    message: str = ""
    data: dict[str, Any] = {}
    done: float | None = None
    total: float | None = None
    at: float

    def to_event(self) -> Event:
        return Event(self.kind, self.subject, self.message, dict(self.data), self.done, self.total, self.at)


class RolloutRecord(BaseModel):
    """A rollout: a profile applied to an inventory's units, wave by wave, under a policy (opaque JSON)."""

    model_config = ConfigDict(frozen=True)

    id: int
    profile: str
    inventory: str
    policy: dict[str, Any]
    status: RolloutStatus
    reason: str = ""
    owner: str  # the controller that created it
    created_at: float
    updated_at: float


class RolloutUnit(BaseModel):
    """One unit of a rollout: its wave (0 = the canary), its place in the rollout's order, and its claim."""

    model_config = ConfigDict(frozen=True)

    rollout_id: int
    unit: str
    wave: int
    position: int
    state: RolloutUnitState
    claimed_by: str | None = None  # "host:pid" of the controller that claimed it last (kept once finished)
    claimed_at: float | None = None
    attempts: int = 0  # how many times it was claimed
    detail: str = ""
    result: dict[str, Any] | None = None
    updated_at: float


@dataclass
class Lock:
    """A held unit lock. A context manager: leaving the `with` block releases it."""

    unit: str
    lock_id: str
    owner: str  # "host:pid"
    acquired_at: float
    heartbeat_at: float
    _journal: Journal | None = field(default=None, repr=False, compare=False)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._journal is not None:
            self._journal.release_lock(self)


@dataclass(frozen=True)
class LockInfo:
    """A lock as stored, with the staleness verdict seen from this machine."""

    unit: str
    lock_id: str
    owner: str
    acquired_at: float
    heartbeat_at: float
    stale: bool | None  # True: looks stale; False: holder alive on this host; None: cannot tell
    why: str  # one sentence explaining `stale`


# --------------------------------------------------------------------------------------------------- schema


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


# --------------------------------------------------------------------------------------------------- helpers

_SECRET_KEY = re.compile(
    r"(^|[_\-.])(stdin|password|passwd|passphrase|secret|secrets|token|private_?key|pkey|key_?material|"
    r"credentials?|authorization)($|[_\-.])",
    re.IGNORECASE,
)
_PEM_PRIVATE = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
REDACTED = "<redacted>"


def _scrub(value: Any) -> Any:
    """Event data made safe to store: secret-named keys and private keys redacted, bytes never stored."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): (REDACTED if _SECRET_KEY.search(str(k)) else _scrub(v)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(bytes(value))} bytes not stored>"
    if isinstance(value, str) and _PEM_PRIVATE.search(value):
        return REDACTED
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)  # Path, enum, datetime, ...


def _dump_strict(value: Any, what: str) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if not isinstance(value, dict):
        raise JournalError(f"{what} must be a JSON object (dict), not {type(value).__name__}")
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise JournalError(f"{what} is not JSON-serialisable: {exc}") from exc


def _load(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def this_host() -> str:
    return socket.gethostname()


def default_owner() -> str:
    """This process as a lock owner: "host:pid"."""
    return f"{this_host()}:{os.getpid()}"


def _parse_owner(owner: str) -> tuple[str, int | None]:
    host, sep, pid = owner.rpartition(":")
    if not sep or not pid.isdigit():
        return owner, None
    return host, int(pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    # a zombie (killed, not yet reaped by its parent) is gone for our purposes
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


def _pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (with the boot id), to detect a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rpartition(")")[2].split()
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        return f"{boot}:{fields[19]}"  # field 22 of stat; fields[0] is field 3
    except (OSError, IndexError):
        return None


def _when(t: float) -> str:
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _judge_owner(owner: str, owner_start: str | None) -> tuple[bool | None, str]:
    host, pid = _parse_owner(owner)
    if pid is None:
        return None, f"its owner {owner!r} is not host:pid, so whether it is stale is unknown"
    if host != this_host():
        return None, f"it is held from another host ({host}): whether it is stale cannot be told from here"
    if not _pid_alive(pid):
        return True, f"it looks stale: process {pid} is no longer running on this host"
    if owner_start is not None and _pid_start(pid) not in (None, owner_start):
        return True, f"it looks stale: process {pid} on this host is a different process now (pid reused)"
    return False, f"process {pid} is still running on this host"


def _owner_start(owner: str) -> str | None:
    """The owner's process start time if it runs on this host (to tell a reused pid later), else None."""
    host, pid = _parse_owner(owner)
    return _pid_start(pid) if pid is not None and host == this_host() and _pid_alive(pid) else None


def _row_change(row: Any) -> ChangeRecord:
    return ChangeRecord(
        id=row["id"], run_id=row["run_id"], unit=row["unit"], target=row["target"], change_id=row["change_id"],
        kind=row["kind"], state=row["state"], before=_load(row["before"]), desired=_load(row["desired"]),
        after=_load(row["after"]), decision=_load(row["decision"]), error=row["error"],
        times=_load(row["times"]), created_at=row["created_at"], updated_at=row["updated_at"],
    )


def _row_run(row: Any) -> RunRecord:
    return RunRecord(id=row["id"], unit=row["unit"], profile=row["profile"], controller=row["controller"],
                     status=row["status"], started_at=row["started_at"], ended_at=row["ended_at"])


def _row_rollout(row: Any) -> RolloutRecord:
    return RolloutRecord(id=row["id"], profile=row["profile"], inventory=row["inventory"],
                         policy=_load(row["policy"]), status=row["status"], reason=row["reason"],
                         owner=row["owner"], created_at=row["created_at"], updated_at=row["updated_at"])


def _row_rollout_unit(row: Any) -> RolloutUnit:
    return RolloutUnit(rollout_id=row["rollout_id"], unit=row["unit"], wave=row["wave"],
                       position=row["position"], state=row["state"], claimed_by=row["claimed_by"], claimed_at=row["claimed_at"],
                       attempts=row["attempts"], detail=row["detail"], result=_load(row["result"]),
                       updated_at=row["updated_at"])


# --------------------------------------------------------------------------------------------------- backends
#
# The dialect differences live here, in two small classes with one interface; the Journal's business logic is
# written once, in SQLite's dialect (`?` placeholders), and `_PostgresDB` translates it.

PG_SCHEMES = ("postgresql://", "postgres://")
PG_ADVISORY_LOCK_KEY = 0x72742D74756E65  # "rt-tune" in ASCII: the key of the writers' advisory lock

# A URL in free text: its scheme, then everything up to the next white space. The password may hold any
# character (an unencoded "@", "/", ":" or "%" included), so the user information runs to the LAST "@".
_URL = re.compile(r"(?i)(?<![a-z0-9+.\-])(?P<scheme>[a-z][a-z0-9+.\-]*://)(?P<rest>\S*)")
_URL_SCHEME = re.compile(r"(?i)^[a-z][a-z0-9+.\-]*://")
# password=... in a URL's query or a libpq conninfo string (sslpassword= too): to the next "&" or white space,
# or a whole quoted value
_PASSWORD_PARAM = re.compile(r"(?i)(?P<head>password\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|[^&\s]*)")
_PERCENT_BAD = re.compile(r"%(?![0-9A-Fa-f]{2})")
MASK = "***"


def is_postgres_url(target: object) -> bool:
    return isinstance(target, str) and target.lower().startswith(PG_SCHEMES)


def _redact_userinfo(m: re.Match[str]) -> str:
    rest = m["rest"]
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return m[0]
    user, colon, _password = userinfo.partition(":")
    if not colon and not re.search(r"[@/%]", userinfo):
        return m[0]  # a user name alone: nothing secret
    shown = f"{user}:{MASK}" if colon and not re.search(r"[@/%]", user) else MASK
    return f"{m['scheme']}{shown}@{host}"


def redact_url(text: str, passwords: Iterable[str] = ()) -> str:
    """THE redaction of rt-tune's messages, logs and artifacts: in every `scheme://...` URL of `text`,
    everything between the scheme and the last "@" (`user:***@`, or `***@` when the user name itself is
    unclear), every `password=` value, and each of `passwords` (known beforehand, see `url_secrets`) wherever
    it appears, become `***` (a password under 4 characters only inside URLs: elsewhere it would mask pieces
    of ordinary words)."""
    for secret in sorted({p for p in passwords if len(p) >= 4}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return _PASSWORD_PARAM.sub(rf"\g<head>{MASK}", _URL.sub(_redact_userinfo, text))


def url_secrets(url: str) -> list[str]:
    """The password of `url` in every spelling a message may show it in: as written (between the first ":"
    after the scheme and the last "@"), percent-decoded, and libpq's reading (also `?password=`)."""
    found: list[str] = []
    rest = url.partition("://")[2]
    userinfo = rest.rpartition("@")[0]
    if ":" in userinfo:
        raw = userinfo.partition(":")[2]
        found += [raw, urllib.parse.unquote(raw)]
    for m in _PASSWORD_PARAM.finditer(url):
        raw = m[0][len(m["head"]):].strip("'")
        found += [raw, urllib.parse.unquote(raw)]
    if is_postgres_url(url):
        try:
            from psycopg.conninfo import conninfo_to_dict

            found.append(str(conninfo_to_dict(url).get("password") or ""))
        except Exception:  # noqa: BLE001 - a URL libpq cannot parse: check_db_url refuses it, redacted
            pass
    return [s for s in dict.fromkeys(found) if s]


def check_db_url(url: str) -> None:
    """Refuse a journal URL that libpq would read differently from what its author meant, before libpq sees
    it: libpq cuts the user information at the FIRST "@" (or "/"), so an unencoded "@" or "/" in a password
    turns the rest of it into a host, port or database name, which its errors then print. Also a "%" that is
    not a %XX escape (libpq's error quotes the text around it) and a scheme other than PostgreSQL's."""
    shown = redact_url(url, url_secrets(url))
    if url != url.strip() or not url.isprintable():
        raise JournalURLError(f"journal URL {shown!r}: white space or a control character around or in it: "
                              "give the URL alone")
    if not is_postgres_url(url):
        raise JournalURLError(f"journal URL {shown}: not a journal; give a postgresql:// (or postgres://) "
                              "URL or the path of a SQLite file")
    userinfo = url.partition("://")[2].rpartition("@")[0]
    encode = "leave the password out of the URL (libpq reads PGPASSWORD or ~/.pgpass), or percent-encode it"
    if re.search(r"[@/]", userinfo):
        raise JournalURLError(f"journal URL {shown}: its user name or password holds an unencoded \"@\" or "
                              "\"/\", which would cut it short and show the rest as a host or database "
                              f"name: {encode} (\"@\" as %40, \"/\" as %2F, \"%\" as %25)")
    if _PERCENT_BAD.search(url):
        raise JournalURLError(f"journal URL {shown}: a \"%\" that does not start a %XX escape: {encode} "
                              "(\"%\" as %25)")


def _damaged(path: Path, why: str) -> JournalDamaged:
    """The error for a damaged journal file: what is wrong, and how to recover what it holds. `.dump` ends with
    ROLLBACK when it met damage, hence the sed (Debian 12's sqlite3 has no working `.recover`)."""
    q = shlex.quote(str(path))
    return JournalDamaged(
        f"the journal {path} is damaged ({why}). rt-tune leaves it as it is and never starts a new journal "
        "over it: it holds the state to roll the units back to. Recover what can be read (Debian package "
        f"sqlite3): `sqlite3 {q} .dump | sed '$s/^ROLLBACK;.*/COMMIT;/' > journal-recovered.sql` (or, where "
        f"sqlite3 has it, `sqlite3 {q} .recover > journal-recovered.sql`), move {path} aside (with its -wal "
        f"and -shm files, if any), then `sqlite3 {q} < journal-recovered.sql`; or move it aside to start an "
        "empty journal (rt-tune then no longer knows what it changed on the units).")


_CORRUPT_CODES = {getattr(sqlite3, "SQLITE_CORRUPT", 11), getattr(sqlite3, "SQLITE_NOTADB", 26)}


def _is_damage(exc: BaseException) -> bool:
    """A SQLite error that says the file itself is bad (not a lock, a full disk or a permission)."""
    if not isinstance(exc, sqlite3.DatabaseError) or isinstance(exc, sqlite3.IntegrityError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in _CORRUPT_CODES:
        return True
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text or "corrupt" in text


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


class _SQLiteDB:
    """SQLite: one file, WAL, synchronous=FULL; writers serialised by BEGIN IMMEDIATE and busy_timeout.

    A new journal file is built beside its final name and linked into place complete (`os.link` never replaces
    a file), so a journal that exists is never empty: an empty or unreadable file is damage, refused with
    `JournalDamaged`, never re-initialised. Every connection runs `PRAGMA quick_check` first (about 0.1 s for
    40 MB), so nothing acts on a journal with bad pages.

    Read-only (`read_only=True`, for commands that only read): the file is opened with `mode=ro` and nothing
    is created, so it works in a read-only state directory; when SQLite cannot open the WAL index there (no
    -wal/-shm files, none can be created: then no writer is active) it is opened `immutable=1`. A journal that
    does not exist yet reads as empty, and one at an older schema version is read through an in-memory copy
    brought up to date; the file is never written."""

    kind = "sqlite"
    for_update = ""  # BEGIN IMMEDIATE already serialises every writer
    for_update_skip_locked = ""
    integrity_error: type[Exception] = sqlite3.IntegrityError

    def __init__(self, path: Path, busy_timeout_s: float, read_only: bool = False) -> None:
        self.path = path
        self.display = str(path)
        self.read_only = read_only
        self._busy_timeout_s = busy_timeout_s

    def prepare(self) -> None:
        if self.read_only:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JournalError(f"cannot create the journal's directory {self.path.parent}: {exc}") from exc

    def _create(self) -> None:
        """A new journal file, complete (WAL mode, the schema_version table) before it takes its name."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.new")
        try:
            conn = sqlite3.connect(str(tmp), isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            finally:
                conn.close()
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                pass  # another process created it first: use theirs
        except (OSError, sqlite3.Error) as exc:
            raise JournalError(f"cannot create the journal {self.path}: {exc}") from exc
        finally:
            for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
                leftover.unlink(missing_ok=True)

    def _check_size(self) -> bool:
        """False when the journal does not exist; JournalDamaged when it is empty or shorter than a header."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise JournalError(f"cannot open the journal {self.path}: {exc}") from exc
        size = st.st_size
        if stat.S_ISDIR(st.st_mode):
            raise JournalError(f"the journal {self.path} is a directory: name a file (or nothing: the default)")
        if not stat.S_ISREG(st.st_mode):
            # a device, pipe or socket is no journal, and not damage to recover: never "move /dev/null aside"
            kind = ("a character device" if stat.S_ISCHR(st.st_mode) else "a block device"
                    if stat.S_ISBLK(st.st_mode) else "a named pipe" if stat.S_ISFIFO(st.st_mode) else "a socket"
                    if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise JournalError(f"the journal {self.path} is {kind}, not a SQLite file: name a file (or nothing: "
                               "the default)")
        if size == 0:
            raise _damaged(self.path, "it is empty (0 bytes): truncated, or not written by rt-tune")
        if size < 100:
            raise _damaged(self.path, f"it is {size} bytes long, shorter than a SQLite header")
        return True

    def _quick_check(self, conn: sqlite3.Connection) -> None:
        rows = [str(r[0]) for r in conn.execute("PRAGMA quick_check(5)").fetchall()]
        if rows != ["ok"]:
            raise _damaged(self.path, "; ".join(rows))

    def connect(self) -> sqlite3.Connection:
        if self.read_only:
            return self._connect_ro()
        if not self._check_size():
            self._create()
            self._check_size()
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(str(self.path), timeout=self._busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
            mode = self._wal(conn)
            if str(mode).lower() != "wal":
                raise JournalError(f"journal {self.path}: SQLite refused WAL mode (got {mode!r}); "
                                   "is it on a filesystem without shared memory (e.g. NFS)?")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._quick_check(conn)
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, sqlite3.Error):
                raise self._open_error(exc) from exc
            raise
        return conn

    def _open_error(self, exc: sqlite3.Error) -> JournalError:
        if _is_damage(exc):
            return _damaged(self.path, str(exc))
        return JournalError(f"cannot open the journal {self.path}: {exc}")

    def _connect_ro(self) -> sqlite3.Connection:
        if not self._check_size():  # nothing journaled yet: an empty journal, in memory
            return self._in_memory(None)
        uri = "file:" + urllib.parse.quote(str(self.path.absolute())) + "?mode=ro"
        conn: sqlite3.Connection | None = None
        try:
            try:
                conn = self._open_uri(uri)
            except sqlite3.OperationalError as exc:
                wal = Path(f"{self.path}-wal")
                if _is_damage(exc) or wal.exists():
                    raise
                conn = self._open_uri(uri + "&immutable=1")  # no writer can be active: see the class doc
            self._quick_check(conn)
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            version = 0 if row is None else row[0]
            if version > SCHEMA_VERSION:
                raise JournalError(f"journal {self.path} has schema version {version}, newer than this "
                                   f"rt-tune understands ({SCHEMA_VERSION}): upgrade rt-tune")
            if version < SCHEMA_VERSION:
                mem = self._in_memory(conn)
                conn.close()
                return mem
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, sqlite3.Error):
                raise self._open_error(exc) from exc
            raise
        return conn

    def _open_uri(self, uri: str) -> sqlite3.Connection:
        conn = sqlite3.connect(uri, uri=True, timeout=self._busy_timeout_s, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # opens the file (and WAL index)
        except BaseException:
            conn.close()
            raise
        return conn

    def _in_memory(self, source: sqlite3.Connection | None) -> sqlite3.Connection:
        """A read-only view at the current schema: a copy of `source` (None: empty) in memory, migrated."""
        mem = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        mem.row_factory = sqlite3.Row
        if source is not None:
            source.backup(mem)
        mem.execute("BEGIN")
        _run_migrations(mem, self.path)
        mem.execute("COMMIT")
        return mem

    def _wal(self, conn: sqlite3.Connection) -> str:
        """Switch to WAL (a property of the file). Processes opening a new file at once race to switch it,
        and SQLite answers the losers "database is locked" at once, without its busy handler: retry."""
        deadline = time.monotonic() + self._busy_timeout_s
        while True:
            try:
                return conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    @staticmethod
    def usable(conn: sqlite3.Connection) -> bool:
        return True

    def begin(self, conn: sqlite3.Connection, *, serialise: bool) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")  # serialises every writer, whatever `serialise` says
        except sqlite3.DatabaseError as exc:
            raise self.error(exc) or JournalError(f"journal {self.path}: {exc}") from exc

    @staticmethod
    def commit(conn: sqlite3.Connection) -> None:
        conn.execute("COMMIT")

    @staticmethod
    def rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def error(self, exc: BaseException) -> JournalError | None:
        """The JournalError to raise for a database error (None: let it through as it is: a UNIQUE violation
        is the lock race's signal)."""
        if _is_damage(exc):
            return _damaged(self.path, str(exc))
        if isinstance(exc, sqlite3.IntegrityError):
            return None
        if isinstance(exc, sqlite3.DatabaseError):
            return JournalError(f"journal {self.path}: {exc}")
        return None

    @staticmethod
    def insert_id(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> int:
        return int(conn.execute(sql, params).lastrowid)  # type: ignore[arg-type]

    @staticmethod
    def close(conn: sqlite3.Connection) -> None:
        conn.close()

    @staticmethod
    def redact(text: str) -> str:
        return text

    @staticmethod
    def cause(exc: BaseException) -> BaseException | None:
        return exc


@functools.lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    """A statement in the journal's SQLite dialect, in PostgreSQL's: `?` -> `%s` (`%` -> `%%`), and for DDL
    INTEGER PRIMARY KEY AUTOINCREMENT -> an identity column, INTEGER -> BIGINT (SQLite's integers are 64-bit),
    REAL -> DOUBLE PRECISION."""
    out = sql.replace("%", "%%").replace("?", "%s")
    if out.lstrip().upper().startswith(("CREATE", "ALTER")):
        out = re.sub(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b",
                     "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", out, flags=re.IGNORECASE)
        out = re.sub(r"\bINTEGER\b", "BIGINT", out, flags=re.IGNORECASE)
        out = re.sub(r"\bREAL\b", "DOUBLE PRECISION", out, flags=re.IGNORECASE)
    return out


class _PGRow:
    """A PostgreSQL row read by column name (`row["id"]`) or by index (`row[0]`), as sqlite3.Row is."""

    __slots__ = ("_index", "_values")

    def __init__(self, values: Any, index: dict[str, int]) -> None:
        self._values = values
        self._index = index

    def __getitem__(self, key: int | str) -> Any:
        return self._values[self._index[key] if isinstance(key, str) else key]

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list[str]:
        return list(self._index)


def _pg_row_factory(cursor: Any) -> Callable[[Any], _PGRow]:
    index = {col.name: i for i, col in enumerate(cursor.description or ())}
    return lambda values: _PGRow(values, index)


class _PGConn:
    """A psycopg connection that takes the journal's SQLite-dialect statements (see `_pg_sql`)."""

    __slots__ = ("raw",)

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def execute(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> Any:
        return self.raw.execute(_pg_sql(sql), tuple(params))  # a tuple, even empty: `%%` is then unescaped


class _PostgresDB:
    """PostgreSQL through psycopg 3: autocommit connection, explicit BEGIN ... COMMIT (READ COMMITTED); the
    writers' serialisation is the transaction-scoped advisory lock PG_ADVISORY_LOCK_KEY (see the module doc)."""

    kind = "postgresql"
    for_update = " FOR UPDATE"
    for_update_skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str, busy_timeout_s: float, connect_timeout_s: float) -> None:
        try:
            import psycopg
        except ImportError as exc:  # a dependency of rt-tune; only a broken install lacks it
            raise JournalError("the PostgreSQL journal needs psycopg 3 (pip install 'psycopg[binary]'): "
                               f"{exc}") from None
        self._psycopg = psycopg
        self.integrity_error: type[Exception] = psycopg.errors.UniqueViolation
        self._url = url
        self._busy_timeout_s = busy_timeout_s
        self._connect_timeout_s = connect_timeout_s
        check_db_url(url)  # before libpq sees it: a URL it would misread makes it print parts of the password
        self._secrets = url_secrets(url)
        self.display = self.redact(url)

    def redact(self, text: str) -> str:
        return redact_url(text, self._secrets)

    def cause(self, exc: BaseException) -> BaseException | None:
        """What a JournalError made of `exc` may chain to: `exc`, unless its text names the password."""
        return exc if self.redact(str(exc)) == str(exc) else None

    def prepare(self) -> None:
        return None

    def connect(self) -> _PGConn:
        psycopg = self._psycopg
        try:
            raw = psycopg.connect(self._url, autocommit=True, row_factory=_pg_row_factory,
                                  connect_timeout=max(1, round(self._connect_timeout_s)),
                                  application_name="rt-tune journal")
        except (psycopg.Error, ValueError, TypeError) as exc:  # ValueError, TypeError: a malformed URL
            raise self._journal_error(f"cannot open the journal {self.display}", exc) from self.cause(exc)
        try:
            raw.execute("SELECT set_config('lock_timeout', %s, false)",
                        (f"{int(self._busy_timeout_s * 1000)}ms",))
        except psycopg.Error as exc:
            raw.close()
            raise self._journal_error(f"cannot open the journal {self.display}", exc) from self.cause(exc)
        return _PGConn(raw)

    def usable(self, conn: _PGConn) -> bool:
        return not conn.raw.closed  # `closed` is True too once the server dropped the connection

    def begin(self, conn: _PGConn, *, serialise: bool) -> None:
        try:
            conn.raw.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
            if serialise:
                conn.raw.execute("SELECT pg_advisory_xact_lock(%s)", (PG_ADVISORY_LOCK_KEY,))
        except self._psycopg.Error as exc:
            self.rollback(conn)
            raise self._journal_error(f"journal {self.display}: cannot start a write transaction", exc) \
                from self.cause(exc)

    @staticmethod
    def commit(conn: _PGConn) -> None:
        conn.raw.execute("COMMIT")

    def rollback(self, conn: _PGConn) -> None:
        raw = conn.raw
        if raw.closed:
            return
        if raw.info.transaction_status != self._psycopg.pq.TransactionStatus.IDLE:
            try:
                raw.execute("ROLLBACK")
            except self._psycopg.Error:
                pass  # the connection went away: the server rolled the transaction back

    def _journal_error(self, what: str, exc: BaseException) -> JournalError:
        text = str(exc).strip() or type(exc).__name__
        return JournalError(f"{what}: {self.redact(text)}")

    def error(self, exc: BaseException) -> JournalError | None:
        if isinstance(exc, self._psycopg.Error) and not isinstance(exc, self.integrity_error):
            return self._journal_error(f"journal {self.display}", exc)
        return None

    @staticmethod
    def insert_id(conn: _PGConn, sql: str, params: tuple[Any, ...]) -> int:
        return int(conn.execute(sql + " RETURNING id", params).fetchone()[0])

    @staticmethod
    def close(conn: _PGConn) -> None:
        conn.raw.close()


_Backend = _SQLiteDB | _PostgresDB


# --------------------------------------------------------------------------------------------------- journal


class Journal:
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
                return self._connection().execute(sql, params).fetchall()
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
        return bool(rows[0][0]) and self._query("SELECT version FROM schema_version")[0][0] == SCHEMA_VERSION

    @property
    def schema_version(self) -> int:
        return self._query("SELECT version FROM schema_version")[0][0]

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
        sql, params = "SELECT * FROM events WHERE id > ?", (since_id,)
        if run_id is not None:
            sql, params = sql + " AND run_id = ?", (since_id, run_id)
        return [self._row_event(r) for r in self._query(sql + " ORDER BY id", params)]

    @staticmethod
    def _row_event(row: Any) -> EventRecord:
        return EventRecord(id=row["id"], run_id=row["run_id"], kind=row["kind"], subject=row["subject"],
                           message=row["message"], data=_load(row["data"]), done=row["done"],
                           total=row["total"], at=row["at"])

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

    # ----------------------------------------------------------------------------------- locks

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
            info = self.lock_info(unit)
            if info is None:
                raise JournalError(f"locking unit {unit}: {exc}") from exc
            raise self._locked_error(info, now) from exc
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
        return released


    # ----------------------------------------------------------------------------------- rollouts

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


def open_journal(target: str | Path, **kw: Any) -> Journal:
    """The journal at `target`: a SQLite file path, or a `postgresql://` / `postgres://` URL (see `Journal`)."""
    return Journal(target, **kw)


__all__ = [
    "CHANGE_STATES", "FINISHED_UNIT_STATES", "INCOMPLETE_STATES", "MASK", "MIGRATIONS",
    "PG_ADVISORY_LOCK_KEY", "ROLLOUT_STATUSES", "ROLLOUT_UNIT_STATES", "SCHEMA_VERSION", "TRANSITIONS",
    "UNIT_STATES",
    "ChangeRecord", "ChangeState", "ClaimLostError", "EventRecord", "InvalidTransition", "Journal",
    "JournalDamaged", "JournalError", "JournalURLError", "Lock", "LockInfo", "LockLostError", "LockedError",
    "RolloutRecord", "RolloutStatus", "RolloutUnit", "RolloutUnitState", "RunRecord", "UnitState",
    "UnitStateName", "UnreconciledError", "check_db_url", "default_owner", "is_postgres_url", "open_journal",
    "redact_url", "url_secrets",
]
