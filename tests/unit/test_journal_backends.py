"""The journal's behaviours on both backends: a SQLite file and a real PostgreSQL server (tests/postgres.py).

Every test taking `target` runs twice: on a SQLite path, and on a fresh PostgreSQL database of its own. The
PostgreSQL-only tests cover what SQLite has no counterpart for: the writers' advisory lock, the URL's password
kept out of every message, a connection the server dropped."""

from __future__ import annotations

import gc
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
import traceback
import urllib.parse
from pathlib import Path

import psycopg
import pytest

from orchestrator.core.events import Event, EventLog
from orchestrator.journal import schema as journal_mod
from orchestrator.journal.errors import InvalidTransition, JournalError, LockedError, LockLostError, UnreconciledError
from orchestrator.journal.journal import Journal, open_journal
from orchestrator.journal.postgres import PG_ADVISORY_LOCK_KEY
from orchestrator.journal.schema import SCHEMA_VERSION
from orchestrator.journal.urls import redact_url
from tests.unit.journal_helpers import in_thread, is_pg, j, target  # noqa: F401 (fixtures)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
BEFORE = {"path": "/etc/sysctl.d/90-rt.conf", "exists": False, "value": "1"}
DESIRED = {"value": "0"}
TABLES = {"schema_version", "runs", "changes", "unit_states", "locks", "events", "rollouts", "rollout_units"}




def password_of(url: str) -> str:
    return url.partition("://")[2].rpartition("@")[0].partition(":")[2]


def tables(target: str) -> set[str]:
    if is_pg(target):
        with psycopg.connect(target) as conn:
            return {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    with sqlite3.connect(target) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def spawn(snippet: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(snippet)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def race(snippet: str, n: int, tmp_path: Path, timeout: float = 60) -> list[str]:
    """Run `snippet` in n processes that start together (each waits for the file `go`); their stdouts.
    The snippet gets READY (touch when ready) and GO (wait for it) as Path objects."""
    go = tmp_path / "go"
    prelude = f"""
        import os, sys, time
        from pathlib import Path
        READY, GO = Path({str(tmp_path)!r}, f"ready-{{os.getpid()}}"), Path({str(go)!r})
        def barrier():
            READY.touch()
            deadline = time.time() + 30
            while not GO.exists():
                if time.time() > deadline:
                    sys.exit(3)
                time.sleep(0.001)
    """
    procs = [spawn(textwrap.dedent(prelude) + textwrap.dedent(snippet)) for _ in range(n)]
    try:
        deadline = time.time() + 30
        while len(list(tmp_path.glob("ready-*"))) < n:
            assert time.time() < deadline, "the processes did not get ready"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.01)
        go.touch()
        results = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), results
    return [out for out, _err in results]


def intent(j: Journal, run: int, change_id: str = "sysctl.timer_migration", unit: str = "lab1") -> int:
    return j.record_intent(run, unit, "host", change_id, "sysctl", BEFORE, DESIRED)


# ----------------------------------------------------------------------------------------- schema


def test_open_creates_the_schema_and_reopening_does_not_migrate_again(target):
    with open_journal(target) as j:
        assert j.schema_version == SCHEMA_VERSION == 2
        assert j.backend == ("postgresql" if is_pg(target) else "sqlite")
        run = j.begin_run("lab1", "p", "ctl")
    with Journal(target) as j:  # a second open: nothing migrated again, nothing lost
        assert j.schema_version == SCHEMA_VERSION and j.get_run(run).unit == "lab1"
    assert TABLES <= tables(target)
    if is_pg(target):
        with psycopg.connect(target) as conn:
            assert conn.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 1
            types = dict(conn.execute("SELECT table_name || '.' || column_name, data_type FROM "
                                      "information_schema.columns WHERE table_schema = 'public'").fetchall())
            identity = {r[0] for r in conn.execute("SELECT table_name FROM information_schema.columns WHERE "
                                                   "is_identity = 'YES'")}
        assert types["events.at"] == types["rollout_units.claimed_at"] == "double precision"
        assert types["runs.id"] == types["rollout_units.wave"] == "bigint"
        assert identity == {"runs", "changes", "events", "rollouts"}


def test_migration_hook_runs_once_and_newer_schema_is_refused(target, monkeypatch):
    Journal(target).close()
    calls = []

    def migrate_next(conn):
        calls.append(1)
        conn.execute("ALTER TABLE runs ADD COLUMN note TEXT")

    nxt = SCHEMA_VERSION + 1
    monkeypatch.setattr(journal_mod, "MIGRATIONS", [*journal_mod.MIGRATIONS, migrate_next])
    monkeypatch.setattr(journal_mod, "SCHEMA_VERSION", nxt)
    for _ in range(2):
        with Journal(target) as j:
            assert j.schema_version == nxt
    assert calls == [1]
    monkeypatch.setattr(journal_mod, "MIGRATIONS", journal_mod.MIGRATIONS[:SCHEMA_VERSION])
    monkeypatch.setattr(journal_mod, "SCHEMA_VERSION", SCHEMA_VERSION)
    with pytest.raises(JournalError, match="newer"):
        Journal(target)


def test_a_schema_1_journal_is_upgraded_with_its_data_kept(target, monkeypatch):
    with monkeypatch.context() as m:  # a journal written by rt-tune before the rollout store
        m.setattr(journal_mod, "MIGRATIONS", journal_mod.MIGRATIONS[:1])
        m.setattr(journal_mod, "SCHEMA_VERSION", 1)
        with Journal(target) as old:
            assert old.schema_version == 1
            run = old.begin_run("lab1", "p", "ctl")
            rec = intent(old, run)
        assert "rollouts" not in tables(target)
    with Journal(target) as j:
        assert j.schema_version == 2 and j.get(rec).state == "intent" and j.incomplete("lab1")[0].id == rec
        assert j.create_rollout("p", "inv", {}, [["lab1"]]).status == "running"
    assert TABLES <= tables(target)


def test_processes_opening_a_new_journal_at_once_migrate_it_once(target, tmp_path):
    outs = race(f"""
        from orchestrator.journal.journal import Journal
        barrier()
        with Journal({target!r}) as j:
            print(j.schema_version, flush=True)
    """, 3, tmp_path)
    assert [o.split() for o in outs] == [[str(SCHEMA_VERSION)]] * 3
    with Journal(target) as j:
        assert j.runs() == [] and j.schema_version == SCHEMA_VERSION
    if is_pg(target):
        with psycopg.connect(target) as conn:
            assert conn.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 1


def test_pragma_is_sqlite_only(j, target):
    if is_pg(target):
        with pytest.raises(JournalError, match="SQLite"):
            j.pragma("journal_mode")
    else:
        assert j.pragma("journal_mode") == "wal" and j.pragma("synchronous") == 2


# ----------------------------------------------------------------------------------------- change records


def test_full_lifecycle(j):
    run = j.begin_run("lab1", "rt-profile", "ctl")
    rec = intent(j, run)
    assert j.incomplete("lab1")[0].id == rec
    j.mark(rec, "applied", after={"value": "0"})
    j.mark(rec, "verified")
    kept = j.mark(rec, "kept", decision={"verdict": "keep", "p999_ratio": 0.8})
    assert (kept.state, kept.after, kept.decision["verdict"]) == ("kept", {"value": "0"}, "keep")
    assert list(kept.times) == ["intent", "applied", "verified", "kept"]
    assert isinstance(kept.times["kept"], float) and kept.created_at <= kept.updated_at
    assert j.incomplete("lab1") == [] and j.active_changes("lab1") == [kept]
    failed = j.mark(rec, "rollback_failed", error="sysctl: permission denied")
    assert j.needs_attention("lab1") == [failed]
    assert j.find("lab1", "sysctl.timer_migration").state == "rollback_failed"
    assert j.end_run(run, "done").status == "done"
    assert j.units() == ["lab1"]


@pytest.mark.parametrize("path, bad", [
    (["applied", "verified", "kept"], "applied"),
    (["rolled_back"], "kept"),
    ([], "verified"),
    (["failed"], "applied"),
    (["applied"], "bogus"),
])
def test_invalid_transitions_raise_and_change_nothing(j, path, bad):
    rec = intent(j, j.begin_run("lab1", "p", "ctl"))
    for state in path:
        j.mark(rec, state)
    before = j.get(rec)
    n_events = len(j.events_for("lab1"))
    with pytest.raises(InvalidTransition):
        j.mark(rec, bad)
    assert j.get(rec) == before
    assert len(j.events_for("lab1")) == n_events  # the refused transaction was rolled back


def test_unreconciled_changes_refuse_new_intents_from_another_connection(target):
    with Journal(target) as crashed:  # a controller that died mid-change
        old_run = crashed.begin_run("lab1", "rt-profile", "ctl1")
        left = intent(crashed, old_run)
        crashed.mark(left, "applied")
    with Journal(target) as j:
        run = j.begin_run("lab1", "rt-profile", "ctl2")
        with pytest.raises(UnreconciledError, match="sysctl.timer_migration"):
            intent(j, run, "sysctl.sched_rt_runtime_us")
        assert [r.id for r in j.history("lab1")] == [left]  # nothing was written
        intent(j, j.begin_run("lab2", "rt-profile", "ctl2"), unit="lab2")  # other units are not held up
        j.mark(left, "rolled_back", after={"value": "1"})
        j.end_run(old_run, "interrupted")
        assert j.get(intent(j, run, "sysctl.sched_rt_runtime_us")).state == "intent"


# ----------------------------------------------------------------------------------------- locks


def test_lock_is_exclusive_across_connections(target):
    host = socket.gethostname()
    with Journal(target) as a, Journal(target) as b:  # two connections, as two controllers
        held = a.acquire_lock("lab1", f"{host}:{os.getpid()}")
        with pytest.raises(LockedError) as info:
            b.acquire_lock("lab1", f"{host}:{os.getpid()}")
        assert info.value.lock_id == held.lock_id and info.value.stale is False
        assert held.lock_id in str(info.value) and "still running" in str(info.value)
        assert b.lock_info("lab1").lock_id == held.lock_id
        taken = b.acquire_lock("lab1", force_unlock=held.lock_id)
        with pytest.raises(LockLostError):
            a.heartbeat(held)
        assert a.release_lock(held) is False and a.lock_info("lab1").lock_id == taken.lock_id
        assert b.release_lock(taken) is True and a.locks() == []
        kinds = [e.kind for e in a.events_for("lab1")]
        assert kinds == ["journal.lock.acquired", "journal.lock.refused", "journal.lock.forced",
                         "journal.lock.acquired", "journal.lock.lost", "journal.lock.released"]


def test_processes_racing_for_one_lock_exactly_one_wins(target, tmp_path):
    Journal(target).close()
    outs = race(f"""
        from orchestrator.journal.journal import Journal
        from orchestrator.journal.errors import LockedError
        j = Journal({target!r})
        barrier()
        try:
            lock = j.acquire_lock("lab1")
        except LockedError as exc:
            print("locked", exc.lock_id, flush=True)
        else:
            print("won", lock.lock_id, flush=True)
    """, 4, tmp_path)
    outcomes = [o.split() for o in outs]
    winners = [o for o in outcomes if o[0] == "won"]
    assert len(winners) == 1, outcomes
    assert all(o == ["locked", winners[0][1]] for o in outcomes if o[0] != "won")
    with Journal(target) as j:
        assert j.lock_info("lab1").lock_id == winners[0][1]


# ----------------------------------------------------------------------------------------- events


def test_events_stored_with_secrets_redacted(j):
    log = EventLog(j)
    log(Event("apply.facts", "lab1.host", "facts gathered", {"kernel": "6.1.0-rt", "path": Path("/x")}))
    log(Event("apply.step", "lab1", "copying", {"stdin": "sudo-password", "private_key": "x",
                                               "blob": "-----BEGIN OPENSSH PRIVATE KEY-----\nabc",
                                               "raw": b"\x00\x01", "note": "50% done"}, done=1, total=4))
    log(Event("apply.facts", "lab10.host", "another unit"))
    run = j.begin_run("lab1", "rt-profile", "ctl")
    log(Event("apply.step", "lab1.guest", "in the run"))
    events = j.events_for("lab1")
    assert [e.kind for e in events] == ["apply.facts", "apply.step", "journal.run.begin", "apply.step"]
    assert events[0].data == {"kernel": "6.1.0-rt", "path": "/x"} and events[0].at == log.events[0].at
    step = events[1]
    assert (step.done, step.total, step.data["note"]) == (1, 4, "50% done")
    assert step.data["stdin"] == step.data["private_key"] == step.data["blob"] == "<redacted>"
    assert "bytes not stored" in step.data["raw"]
    assert events[3].run_id == run and events[0].run_id is None
    assert [e.subject for e in j.events(since_id=events[2].id)] == ["lab1.guest"]


# ----------------------------------------------------------------------------------------- fork


@pytest.mark.parametrize("child_uses_it", [True, False])
def test_a_forked_child_opens_its_own_connection_and_leaves_the_parents_alone(j, target, child_uses_it):
    j.set_unit_state("lab1", "working")
    if is_pg(target):
        backend_pid = j._query("SELECT pg_backend_pid()")[0][0]
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            if child_uses_it:
                j.set_unit_state("lab2", "done", "from the child")
            j.close()  # must not close the parent's connection
            gc.collect()  # the inherited connection object is finalised here (not at os._exit)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    j.set_unit_state("lab3", "done")  # the parent's connection still works
    states = {u: s.state for u, s in j.unit_states().items()}
    assert states == {"lab1": "working", "lab3": "done", **({"lab2": "done"} if child_uses_it else {})}
    if is_pg(target):
        assert j._query("SELECT pg_backend_pid()")[0][0] == backend_pid  # the same session, not a new one


# ----------------------------------------------------------------------------------------- PostgreSQL only


def test_general_writes_are_serialised_by_the_advisory_lock(pg_journal_url):
    with Journal(pg_journal_url) as j, Journal(pg_journal_url) as reader, psycopg.connect(pg_journal_url) as raw:
        # another writer, in the middle of its transaction
        raw.execute("SELECT pg_advisory_xact_lock(%s)", (PG_ADVISORY_LOCK_KEY,))
        thread, box = in_thread(j.set_unit_state, "lab1", "working")
        thread.join(0.5)
        assert thread.is_alive(), "a write went ahead while another writer held the journal's lock"
        assert reader.unit_state("lab1") is None  # reads do not wait
        raw.commit()
        thread.join(10)
        assert not thread.is_alive() and "error" not in box and j.unit_state("lab1").state == "working"


def test_a_writer_that_waits_longer_than_busy_timeout_gets_a_journal_error_without_the_password(pg_journal_url):
    secret = password_of(pg_journal_url)
    with Journal(pg_journal_url, busy_timeout_s=0.3) as j, psycopg.connect(pg_journal_url) as raw:
        raw.execute("SELECT pg_advisory_xact_lock(%s)", (PG_ADVISORY_LOCK_KEY,))
        t0 = time.monotonic()
        with pytest.raises(JournalError, match="lock timeout") as info:
            j.set_unit_state("lab1", "working")
        assert time.monotonic() - t0 < 5
        raw.rollback()
        j.set_unit_state("lab1", "done")  # usable again
    text = "".join(traceback.format_exception(info.value))
    assert secret not in text and "postgres:***@" in text


def test_the_password_is_never_shown(pg_journal_url, postgres):
    secret = password_of(pg_journal_url)
    assert len(secret) >= 16
    with Journal(pg_journal_url) as j:
        assert secret not in repr(j) and secret not in str(j.path)
        assert str(j.path) == pg_journal_url.replace(f":{secret}@", ":***@")
        with pytest.raises(JournalError) as info:
            j.get(999)
        assert secret not in str(info.value)
        j.acquire_lock("lab1")
        assert all(secret not in f"{e.message} {e.data}" for e in j.events())
    wrong = pg_journal_url.replace(f":{secret}@", ":Wrong-Pass-123@")
    closed_port = f"postgresql://postgres:Closed-Pass-456@127.0.0.1:{_closed_port()}/x"
    malformed = "postgresql://postgres:Bad-Pass-789@127.0.0.1:notaport/x"
    messages = []
    for url, password in [(wrong, "Wrong-Pass-123"), (closed_port, "Closed-Pass-456"),
                          (malformed, "Bad-Pass-789")]:
        with pytest.raises(JournalError) as info:
            Journal(url, connect_timeout_s=5)
        text = "".join(traceback.format_exception(info.value))
        assert password not in text and "postgres:***@" in str(info.value), text
        messages.append(str(info.value))
    assert "password authentication failed" in messages[0]
    assert "refused" in messages[1] and "notaport" in messages[2]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("text, expected", [
    ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("see postgres://rt:p@ss:w@rd@db.lan/j for details", "see postgres://rt:***@db.lan/j for details"),
    ("postgresql://u@h/db", "postgresql://u@h/db"),  # no password: nothing to hide
    ("host=h password=s3cret dbname=j", "host=h password=*** dbname=j"),
    ("postgresql://h/db?user=u&password=s3cret", "postgresql://h/db?user=u&password=***"),
])
def test_redact_url(text, expected):
    assert redact_url(text) == expected


def test_a_password_with_url_characters_never_shows_in_the_servers_errors(pg_journal_url):
    """Issue #15 item 5 against a real server: a wrong password holding "@", "/", ":" and "%" (percent-encoded,
    as the refusal of the unencoded URL asks) is rejected by the server, and no spelling of it shows."""
    secret = password_of(pg_journal_url)
    wrong = "QX7@ZJ9:KW/2%VY8"
    url = pg_journal_url.replace(f":{secret}@", ":" + urllib.parse.quote(wrong, safe="") + "@")
    with pytest.raises(JournalError) as info:
        Journal(url, connect_timeout_s=5)
    text = "".join(traceback.format_exception(info.value))
    assert "password authentication failed" in text and "postgres:***@" in text
    for spelling in (wrong, urllib.parse.quote(wrong, safe="")):
        assert not [spelling[i:i + 3] for i in range(len(spelling) - 2) if spelling[i:i + 3] in text], text
    raw = pg_journal_url.replace(f":{secret}@", f":{wrong}@")  # unencoded: refused before the server sees it
    with pytest.raises(JournalError) as info:
        Journal(raw, connect_timeout_s=5)
    assert info.value.exit_code == 2 and "QX7" not in str(info.value) and "VY8" not in str(info.value)


def test_read_only_reads_and_refuses_writes(target):
    with open_journal(target) as rw:
        rw.set_unit_state("lab1", "done", "1 kept")
        with open_journal(target, read_only=True) as ro:
            assert ro.unit_state("lab1").detail == "1 kept"
            with pytest.raises(JournalError, match="read-only"):
                ro.set_unit_state("lab1", "failed")
            with pytest.raises(JournalError, match="read-only"):
                ro.create_rollout("p", "inv", {}, [["lab1"]])
        assert rw.unit_state("lab1").state == "done" and rw.rollouts() == []


def test_a_connection_the_server_dropped_is_replaced(pg_journal_url):
    secret = password_of(pg_journal_url)
    with Journal(pg_journal_url) as j, psycopg.connect(pg_journal_url, autocommit=True) as admin:
        j.set_unit_state("lab1", "working")
        pid = j._query("SELECT pg_backend_pid()")[0][0]
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(JournalError) as info:  # the call that finds out
            j.set_unit_state("lab1", "done")
        assert secret not in str(info.value)
        j.set_unit_state("lab1", "done")  # a new connection
        assert j.unit_state("lab1").state == "done"
        assert j._query("SELECT pg_backend_pid()")[0][0] != pid
