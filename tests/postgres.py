"""A throwaway PostgreSQL server for tests: the Debian `postgresql` package's binaries (install.sh installs it),
a fresh cluster in a temporary directory, on 127.0.0.1 and a free port, stopped and deleted afterwards.

PostgreSQL refuses to run as root: as root, the cluster's directory belongs to the `postgres` system user and
its binaries run through `runuser -u postgres --`. TCP connections need a password (scram-sha-256), generated
here and never printed; `PostgresServer.url()` carries it, so the tests exercise the journal's redaction too.
The server runs with fsync off: it is thrown away, never crash-tested."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg import sql

SUPERUSER = "postgres"


class PostgresError(RuntimeError):
    """The test server could not be set up."""


def find_bindir() -> Path:
    """The newest installed PostgreSQL's bin directory (/usr/lib/postgresql/<major>/bin)."""
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    if not found:
        raise PostgresError("no /usr/lib/postgresql/*/bin/initdb: install the Debian package postgresql "
                            "(install.sh does)")
    return max(found, key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A running throwaway cluster. `url(db)` connects as the superuser over TCP with the password."""

    def __init__(self, base: Path, bindir: Path, port: int, password: str) -> None:
        self.base = base
        self.bindir = bindir
        self.data = base / "data"
        self.sockdir = base / "sock"
        self.log = base / "server.log"
        self.port = port
        self._password = password
        self._as_postgres = os.geteuid() == 0
        self._n = 0

    # ---- plumbing
    def _run(self, tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / tool), *args]
        if self._as_postgres:
            cmd = ["runuser", "-u", SUPERUSER, "--", *cmd]
        try:
            return subprocess.run(cmd, cwd=self.base, capture_output=True, text=True, timeout=timeout,
                                  check=False, env={**os.environ, "LC_ALL": "C.UTF-8", "PGTZ": "UTC"})
        except subprocess.TimeoutExpired as exc:
            raise PostgresError(f"{tool} took more than {timeout:.0f} s") from exc

    def _check(self, proc: subprocess.CompletedProcess, what: str) -> None:
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            text = f"{proc.stdout}\n{proc.stderr}\n{log}".replace(self._password, "***")
            raise PostgresError(f"{what} failed (exit {proc.returncode}):\n{text.strip()}")

    def _chown(self, path: Path) -> None:
        if self._as_postgres:
            pw = pwd.getpwnam(SUPERUSER)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    # ---- lifecycle
    def init_and_start(self) -> None:
        self._chown(self.base)
        self.base.chmod(0o700)
        self.sockdir.mkdir()
        self._chown(self.sockdir)
        pwfile = self.base / "pw"
        pwfile.write_text(self._password + "\n")
        pwfile.chmod(0o600)
        self._chown(pwfile)
        try:
            self._check(self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, f"--pwfile={pwfile}",
                                  "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                                  "--no-locale", "--no-sync"), "initdb")
        finally:
            pwfile.unlink()
        opts = (f"-k {self.sockdir} -p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._check(self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60",
                              "start"), "pg_ctl start")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)

    # ---- use
    def url(self, db: str = "postgres") -> str:
        password = urllib.parse.quote(self._password, safe="")
        return f"postgresql://{SUPERUSER}:{password}@127.0.0.1:{self.port}/{db}"

    def create_database(self, prefix: str = "journal") -> str:
        """A new empty database; returns its URL."""
        self._n += 1
        name = f"{prefix}_{os.getpid()}_{self._n}_{secrets.token_hex(3)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} STRATEGY file_copy").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = urllib.parse.urlsplit(url).path.lstrip("/")
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Start a throwaway PostgreSQL server; stop it (immediate mode) and delete its files afterwards.
    Raises PostgresError (with the server's log, password redacted) when it cannot start."""
    bindir = find_bindir()
    base = Path(tempfile.mkdtemp(prefix="rt-tune-pg-"))
    server = None
    try:
        for attempt in range(3):  # the free port may be taken between free_port() and the server binding it
            server = PostgresServer(base, bindir, free_port(), secrets.token_urlsafe(18))
            try:
                if attempt:
                    shutil.rmtree(server.data, ignore_errors=True)
                    shutil.rmtree(server.sockdir, ignore_errors=True)
                    server.log.unlink(missing_ok=True)
                server.init_and_start()
                break
            except PostgresError:
                server.stop()
                if attempt == 2:
                    raise
        assert server is not None
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)
