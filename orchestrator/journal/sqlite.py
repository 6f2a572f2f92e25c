"""The SQLite backend: one file, WAL, synchronous=FULL, BEGIN IMMEDIATE for every write; damage is refused, never
overwritten."""

from __future__ import annotations

import os
import secrets
import shlex
import sqlite3
import stat
import time
import urllib.parse
from pathlib import Path
from typing import Any

from orchestrator.journal import schema
from orchestrator.journal.errors import JournalDamaged, JournalError
from orchestrator.journal.schema import _run_migrations


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
            if version > schema.SCHEMA_VERSION:
                raise JournalError(f"journal {self.path} has schema version {version}, newer than this "
                                   f"rt-tune understands ({schema.SCHEMA_VERSION}): upgrade rt-tune")
            if version < schema.SCHEMA_VERSION:
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
                return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
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
