"""The journal: SQLite settings, durable intents, crash leftovers, transitions, unit locks, events.

Crashes and races use real processes (a child killing itself with SIGKILL, children racing for a lock)."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from orchestrator.core.errors import TuneError
from orchestrator.core.events import Event, EventLog
from orchestrator.journal import schema as journal_mod
from orchestrator.journal.errors import (
    InvalidTransition,
    JournalDamaged,
    JournalError,
    LockedError,
    LockLostError,
    UnreconciledError,
)
from orchestrator.journal.journal import Journal
from orchestrator.journal.sqlite import _SQLiteDB
from tests.unit.readonly import run_read_only

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
BEFORE = {"path": "/etc/sysctl.d/90-rt.conf", "exists": False, "content_b64": None, "value": "1"}
DESIRED = {"value": "0"}


@pytest.fixture()
def db(tmp_path) -> Path:
    return tmp_path / "state" / "journal.db"


@pytest.fixture()
def j(db):
    with Journal(db) as journal:
        yield journal


def python(snippet: str, *, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(snippet)], check=False, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    out = python("import os; print(os.getpid())")
    pid = int(out.stdout)
    assert not os.path.exists(f"/proc/{pid}")
    return pid


def intent(j: Journal, run: int, change_id: str = "sysctl.timer_migration", unit: str = "lab1") -> int:
    return j.record_intent(run, unit, "host", change_id, "sysctl", BEFORE, DESIRED)


# ----------------------------------------------------------------------------------------- SQLite settings


def test_wal_full_sync_busy_timeout_and_schema(j, db):
    assert db.parent.is_dir()  # parent directories created
    assert j.pragma("journal_mode") == "wal"
    assert j.pragma("synchronous") == 2  # FULL
    assert j.pragma("busy_timeout") > 0
    assert j.schema_version == journal_mod.SCHEMA_VERSION
    raw = sqlite3.connect(db)  # WAL is a property of the file: a plain connection sees it too
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"schema_version", "runs", "changes", "unit_states", "locks", "events"} <= tables
    finally:
        raw.close()


def test_migration_hook_runs_once_and_newer_schema_is_refused(db, monkeypatch):
    Journal(db).close()
    calls = []

    def migrate_2(conn):
        calls.append(1)
        conn.execute("ALTER TABLE runs ADD COLUMN note TEXT")

    nxt = journal_mod.SCHEMA_VERSION + 1  # a migration added at the end
    monkeypatch.setattr(journal_mod, "MIGRATIONS", [*journal_mod.MIGRATIONS, migrate_2])
    monkeypatch.setattr(journal_mod, "SCHEMA_VERSION", nxt)
    with Journal(db) as j:
        assert j.schema_version == nxt
    with Journal(db) as j:
        assert j.schema_version == nxt
    assert calls == [1]

    monkeypatch.setattr(journal_mod, "MIGRATIONS", journal_mod.MIGRATIONS[:1])
    monkeypatch.setattr(journal_mod, "SCHEMA_VERSION", 1)
    with pytest.raises(JournalError, match="newer"):
        Journal(db)


def test_not_a_database_is_a_journal_error(tmp_path):
    bad = tmp_path / "journal.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(JournalDamaged, match=str(bad)):
        Journal(bad)
    assert bad.read_bytes() == b"this is not sqlite" * 100


# ----------------------------------------------------------------------------------------- damage (issue #15)


PAGE = 4096  # SQLite's default page size, the journal's


def filled_journal(db: Path) -> bytes:
    """A real journal with a run, a kept change and 300 unit states (about 50 pages), closed; its bytes."""
    with Journal(db) as j:
        run = j.begin_run("lab1", "rt-profile", "ctl:1")
        rec = intent(j, run)
        for state in ("applied", "verified", "kept"):
            j.mark(rec, state)
        for i in range(300):
            j.set_unit_state(f"unit{i}", "done", "x" * 100)
    assert not Path(f"{db}-wal").exists()  # checkpointed on close: the file holds everything
    return db.read_bytes()


def damaged(good: bytes, how: str) -> bytes:
    pages = len(good) // PAGE
    rnd = random.Random(how)  # the same garbage every run
    if how == "garbage after the header page":
        return good[:PAGE] + rnd.randbytes(len(good) - PAGE)
    if how.startswith("page "):
        k = int(how.split()[1]) % pages
        return good[:k * PAGE] + rnd.randbytes(PAGE) + good[(k + 1) * PAGE:]
    if how == "truncated":
        return good[:len(good) * 6 // 10]
    if how == "empty":
        return b""
    if how == "shorter than a header":
        return good[:50]
    raise AssertionError(how)


DAMAGE = ["garbage after the header page", "page 1", "page 2", "page 7", "page 20", "page 40", "page -1",
          "truncated", "empty", "shorter than a header"]


@pytest.mark.parametrize("read_only", [False, True], ids=["read-write", "read-only"])
@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_journal_is_refused_naming_the_file_and_never_overwritten(db, how, read_only):
    bad = damaged(filled_journal(db), how)
    db.write_bytes(bad)
    with pytest.raises(JournalDamaged) as info:
        with Journal(db, read_only=read_only) as j:  # refused when opened, before anything reads or writes
            j.units()
    message = str(info.value)
    assert str(db) in message and "damaged" in message and ".dump" in message and "aside" in message
    assert info.value.exit_code == 1 and isinstance(info.value, JournalError)
    assert db.read_bytes() == bad  # never re-initialised, never written
    assert not Path(f"{db}-wal").exists() or Path(f"{db}-wal").stat().st_size == 0


def test_an_empty_journal_is_not_started_afresh(db):
    db.parent.mkdir(parents=True)
    db.write_bytes(b"")
    for _ in range(2):
        with pytest.raises(JournalDamaged, match="empty"):
            Journal(db)
    assert db.read_bytes() == b""


def test_damage_met_by_a_query_is_a_journal_damaged_error_too(db, monkeypatch):
    """Damage the open-time check does not see (simulated by skipping it) is reported by the query that meets
    it, as JournalDamaged, on reads and in write transactions alike."""
    db.write_bytes(damaged(filled_journal(db), "page 40"))
    monkeypatch.setattr(_SQLiteDB, "_quick_check", lambda self, conn: None)
    with Journal(db) as j:
        with pytest.raises(JournalDamaged, match=str(db)):
            for i in range(300):
                j.unit_state(f"unit{i}")
        with pytest.raises(JournalDamaged, match=str(db)):
            for i in range(300):
                j.set_unit_state(f"unit{i}", "failed")


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="the sqlite3 command (Debian package sqlite3)")
def test_the_recovery_the_message_gives_works(db, tmp_path):
    db.write_bytes(damaged(filled_journal(db), "page 40"))
    with pytest.raises(JournalDamaged) as info:
        Journal(db)
    commands = re.findall(r"`([^`]+)`", str(info.value))
    assert len(commands) == 3 and ".dump" in commands[0] and ".recover" in commands[1]
    subprocess.run(commands[0], shell=True, check=True, cwd=tmp_path)  # noqa: S602 - the message's own
    db.rename(tmp_path / "journal.db.damaged")  # "move it aside"
    subprocess.run(commands[2], shell=True, check=True, cwd=tmp_path)  # noqa: S602
    with Journal(db) as j:  # what survived: the kept change on the undamaged pages
        assert [r.change_id for r in j.active_changes("lab1")] == ["sysctl.timer_migration"]
        assert j.schema_version == journal_mod.SCHEMA_VERSION


# ----------------------------------------------------------------------------------------- read-only (#15)


def test_read_only_reads_what_is_committed_and_refuses_writes(j, db):
    j.set_unit_state("lab1", "done", "1 kept")
    with Journal(db, read_only=True) as ro:  # while a writer has the journal open (its -wal exists)
        assert ro.unit_state("lab1").detail == "1 kept"
        with pytest.raises(JournalError, match="read-only"):
            ro.set_unit_state("lab1", "failed")
        with pytest.raises(JournalError, match="read-only"):
            ro.acquire_lock("lab1")
    assert j.unit_state("lab1").state == "done"


def test_read_only_on_a_missing_journal_reads_empty_and_creates_nothing(tmp_path):
    db = tmp_path / "state" / "journal.db"
    with Journal(db, read_only=True) as ro:
        assert ro.units() == [] and ro.rollouts() == [] and ro.unit_states() == {}
        assert ro.schema_version == journal_mod.SCHEMA_VERSION
    assert list(tmp_path.iterdir()) == []  # not even the state directory


def test_read_only_on_an_older_schema_reads_it_at_the_current_one_without_writing(db, monkeypatch):
    with monkeypatch.context() as m:  # a journal written by an rt-tune with the first migration only
        m.setattr(journal_mod, "MIGRATIONS", journal_mod.MIGRATIONS[:1])
        m.setattr(journal_mod, "SCHEMA_VERSION", 1)
        with Journal(db) as old:
            old.set_unit_state("lab1", "done")
    before = db.read_bytes()
    with Journal(db, read_only=True) as ro:
        assert ro.unit_state("lab1").state == "done"
        assert ro.rollouts() == []  # the table the second migration adds, in the in-memory copy
        assert ro.schema_version == journal_mod.SCHEMA_VERSION
    assert db.read_bytes() == before
    with Journal(db) as rw:  # a writing command migrates the file itself
        assert rw.schema_version == journal_mod.SCHEMA_VERSION


def test_read_only_works_in_a_read_only_state_directory(db):
    filled_journal(db)
    before = sorted(p.name for p in db.parent.iterdir())
    snippet = f"""
        from orchestrator.journal.journal import Journal
        from orchestrator.journal.errors import JournalError
        with Journal({str(db)!r}, read_only=True) as j:
            print("kept", [r.change_id for r in j.active_changes("lab1")], len(j.unit_states()))
        with Journal({str(db.parent / "other.db")!r}, read_only=True) as j:
            print("missing", j.units())
        try:
            Journal({str(db)!r})
        except JournalError as exc:
            print("read-write refused:", exc)
    """
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = run_read_only(db.parent, [sys.executable, "-c", textwrap.dedent(snippet)], env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "kept ['sysctl.timer_migration'] 300"
    assert lines[1] == "missing []"
    assert lines[2].startswith("read-write refused: ") and str(db) in lines[2]
    assert sorted(p.name for p in db.parent.iterdir()) == before


def test_a_new_journal_is_complete_before_it_has_its_name(db, monkeypatch):
    """Created beside its name and linked into place: no other process ever sees an empty file there."""
    seen: list[int] = []
    real_link = os.link

    def link(src, dst, *a, **kw):
        seen.append(Path(src).stat().st_size)
        assert not Path(dst).exists()
        return real_link(src, dst, *a, **kw)

    monkeypatch.setattr(os, "link", link)
    with Journal(db) as j:
        j.set_unit_state("lab1", "done")
    assert seen and seen[0] >= PAGE
    assert sorted(p.name for p in db.parent.iterdir()) == ["journal.db"]  # the temporary file is gone


# ----------------------------------------------------------------------------------------- durability


def test_intent_is_visible_to_a_second_journal_before_any_mark(j, db):
    run = j.begin_run("lab1", "rt-profile", "ctl:1")
    rec = intent(j, run)
    with Journal(db) as other:  # a second connection, as another process would open it
        [seen] = other.incomplete("lab1")
        assert (seen.id, seen.state, seen.before, seen.desired) == (rec, "intent", BEFORE, DESIRED)
        assert other.open_runs("lab1")[0].id == run


@pytest.mark.parametrize("last_step", ["intent", "applied", "verified"])
def test_sigkill_mid_change_leaves_a_record_the_next_run_must_reconcile(db, last_step):
    marks = {"intent": [], "applied": ["applied"], "verified": ["applied", "verified"]}[last_step]
    proc = python(f"""
        import os, signal
        from orchestrator.journal.journal import Journal
        j = Journal({str(db)!r})
        run = j.begin_run("lab1", "rt-profile", "ctl")
        rec = j.record_intent(run, "lab1", "host", "sysctl.timer_migration", "sysctl", {BEFORE!r}, {DESIRED!r})
        for state in {marks!r}:
            j.mark(rec, state, after={{"value": "0"}})
        print(rec, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    rec_id = int(proc.stdout)

    with Journal(db) as j:
        [left] = j.incomplete("lab1")
        assert (left.id, left.state, left.before) == (rec_id, last_step, BEFORE)
        assert list(left.times) == ["intent", *marks]
        [crashed_run] = j.open_runs("lab1")
        # a new run may not make new changes before reconciling what the dead controller left
        run = j.begin_run("lab1", "rt-profile", "ctl2")
        with pytest.raises(UnreconciledError, match="sysctl.timer_migration"):
            intent(j, run, "sysctl.sched_rt_runtime_us")
        # reconcile: undo it from `before`, then the old run is closed and new changes may be recorded
        j.mark(rec_id, "rolled_back", after={"value": "1"}, message="reconciled after a crash: undone")
        j.end_run(crashed_run.id, "interrupted")
        assert j.incomplete("lab1") == []
        assert j.get(intent(j, run, "sysctl.sched_rt_runtime_us")).state == "intent"


# ----------------------------------------------------------------------------------------- change records


def test_full_lifecycle_records_fields_and_timestamps(j):
    run = j.begin_run("lab1", "rt-profile", "ctl")
    rec = intent(j, run)
    j.mark(rec, "applied", after={"value": "0"})
    j.mark(rec, "verified")
    kept = j.mark(rec, "kept", decision={"verdict": "keep", "p999_ratio": 0.8})
    assert kept.state == "kept" and kept.after == {"value": "0"} and kept.decision["verdict"] == "keep"
    assert list(kept.times) == ["intent", "applied", "verified", "kept"]
    assert kept.times["intent"] <= kept.times["applied"] <= kept.times["verified"] <= kept.times["kept"]
    assert j.incomplete("lab1") == []
    done = j.mark(rec, "rollback_failed", error="sysctl: permission denied")
    assert done.error == "sysctl: permission denied" and j.needs_attention("lab1") == [done]
    assert j.mark(rec, "rolled_back", after={"value": "1"}).state == "rolled_back"
    assert j.end_run(run, "done").status == "done"


@pytest.mark.parametrize("path, bad", [
    (["applied", "verified", "kept"], "applied"),  # kept -> applied
    (["applied", "verified", "kept"], "verified"),
    (["rolled_back"], "kept"),  # rolled_back is final
    (["rolled_back"], "rolled_back"),
    ([], "verified"),  # intent -> verified skips applied
    ([], "kept"),
    (["applied"], "intent"),
    (["failed"], "applied"),
    (["applied"], "bogus"),
])
def test_invalid_transitions_raise_and_change_nothing(j, path, bad):
    rec = intent(j, j.begin_run("lab1", "p", "ctl"))
    for state in path:
        j.mark(rec, state)
    before = j.get(rec)
    with pytest.raises(InvalidTransition):
        j.mark(rec, bad)
    assert j.get(rec) == before


def test_active_changes_newest_first_excluding_rolled_back(j):
    run = j.begin_run("lab1", "rt-profile", "ctl")
    ids = {}
    for name in ["a", "b", "c", "d"]:
        ids[name] = intent(j, run, name)
        for state in ["applied", "verified", "kept"]:
            j.mark(ids[name], state)
    j.mark(ids["b"], "rolled_back")
    other = intent(j, run, "e")  # still in progress: not active
    j.mark(other, "applied")
    j.record_intent(j.begin_run("lab2", "p", "ctl"), "lab2", "host", "x", "sysctl", BEFORE, DESIRED)
    assert [r.change_id for r in j.active_changes("lab1")] == ["d", "c", "a"]
    assert [r.change_id for r in j.incomplete("lab1")] == ["e"]
    assert [r.change_id for r in j.history("lab1")] == ["a", "b", "c", "d", "e"]


def test_find_get_and_bad_input(j):
    run = j.begin_run("lab1", "rt-profile", "ctl")
    first = intent(j, run)
    j.mark(first, "failed", error="boom")
    second = intent(j, run)
    assert j.find("lab1", "sysctl.timer_migration").id == second  # the newest record of that change
    assert j.find("lab1", "nope") is None
    assert j.get(first).error == "boom"
    with pytest.raises(JournalError):
        j.get(9999)
    with pytest.raises(JournalError, match="JSON"):
        j.record_intent(run, "lab1", "host", "f", "file", {"content": b"raw bytes"}, DESIRED)
    with pytest.raises(JournalError, match="lab1"):
        j.record_intent(run, "lab2", "host", "f", "file", BEFORE, DESIRED)  # another unit's run
    j.end_run(run, "failed")
    with pytest.raises(JournalError, match="ended"):
        intent(j, run)
    with pytest.raises(JournalError):
        j.end_run(run, "done")


def test_unit_states(j):
    j.set_unit_state("lab1", "working")
    j.set_unit_state("lab2", "done")
    j.set_unit_state("lab1", "degraded", "sysctl kernel.timer_migration is 1, journal says 0")
    states = j.unit_states()
    assert {u: s.state for u, s in states.items()} == {"lab1": "degraded", "lab2": "done"}
    assert "timer_migration" in states["lab1"].detail
    with pytest.raises(JournalError):
        j.set_unit_state("lab1", "broken")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- locks


def test_locked_error_names_holder_id_and_staleness(j):
    host = socket.gethostname()
    dead = f"{host}:{dead_pid()}"
    held = j.acquire_lock("lab1", dead)
    with pytest.raises(LockedError) as info:
        j.acquire_lock("lab1", f"{host}:{os.getpid()}")
    err = info.value
    msg = str(err)
    assert held.lock_id in msg and dead in msg and "looks stale" in msg
    assert f"--force-unlock {held.lock_id}" in msg
    assert err.exit_code == 7 and isinstance(err, TuneError) and err.stale is True
    assert j.lock_info("lab1").lock_id == held.lock_id  # a stale lock is never taken silently

    alive = j.acquire_lock("lab2", f"{host}:{os.getpid()}")
    with pytest.raises(LockedError) as info:
        j.acquire_lock("lab2", f"{host}:{os.getpid()}")
    assert "looks stale" not in str(info.value) and "still running" in str(info.value)
    assert info.value.stale is False and alive.lock_id in str(info.value)

    j.acquire_lock("lab3", "robot-controller-7:4242")
    with pytest.raises(LockedError) as info:
        j.acquire_lock("lab3")
    assert info.value.stale is None and "another host" in str(info.value)


def test_force_unlock_needs_the_right_lock_id(j):
    old = j.acquire_lock("lab1", f"{socket.gethostname()}:{dead_pid()}")
    with pytest.raises(LockedError, match=old.lock_id):
        j.acquire_lock("lab1", force_unlock="deadbeef")
    assert j.lock_info("lab1").lock_id == old.lock_id
    new = j.acquire_lock("lab1", force_unlock=old.lock_id)
    assert new.lock_id != old.lock_id and j.lock_info("lab1").owner == new.owner
    with pytest.raises(LockLostError):  # the old holder, if it still ran, finds out at its next heartbeat
        j.heartbeat(old)
    assert j.release_lock(old) is False  # and cannot release the new holder's lock
    assert j.lock_info("lab1").lock_id == new.lock_id
    kinds = [e.kind for e in j.events_for("lab1")]
    assert "journal.lock.refused" in kinds and "journal.lock.forced" in kinds


def test_lock_context_manager_releases_and_heartbeat(j):
    with j.acquire_lock("lab1") as lock:
        time.sleep(0.01)
        j.heartbeat(lock)
        assert lock.heartbeat_at > lock.acquired_at
        assert j.lock_info("lab1").lock_id == lock.lock_id
    assert j.lock_info("lab1") is None
    j.acquire_lock("lab1").__exit__(None, None, None)
    assert j.locks() == []


def test_two_processes_racing_for_one_unit_lock_exactly_one_wins(db, tmp_path):
    Journal(db).close()
    go = tmp_path / "go"
    n = 4
    snippet = f"""
        import os, sys, time
        from pathlib import Path
        from orchestrator.journal.journal import Journal
        from orchestrator.journal.errors import LockedError
        j = Journal({str(db)!r})
        Path({str(tmp_path)!r}, f"ready-{{os.getpid()}}").touch()
        deadline = time.time() + 30
        while not Path({str(go)!r}).exists():
            if time.time() > deadline:
                sys.exit(3)
            time.sleep(0.001)
        try:
            lock = j.acquire_lock("lab1")
        except LockedError as exc:
            print("locked", exc.lock_id, flush=True)
        else:
            print("won", lock.lock_id, flush=True)
    """
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(snippet)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    try:
        deadline = time.time() + 30
        while len(list(tmp_path.glob("ready-*"))) < n:
            assert time.time() < deadline, "racers did not get ready"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.01)
        go.touch()
        results = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), results
    outcomes = [out.split() for out, _err in results]
    winners = [o for o in outcomes if o[0] == "won"]
    assert len(winners) == 1, outcomes
    winner_id = winners[0][1]
    assert all(o == ["locked", winner_id] for o in outcomes if o[0] != "won")
    with Journal(db) as j:
        info = j.lock_info("lab1")
        assert info.lock_id == winner_id and info.stale is True  # the winner exited holding it


# ----------------------------------------------------------------------------------------- events


def test_events_are_recorded_from_an_event_sink(j):
    log = EventLog(j)
    log(Event("apply.facts", "lab1.host", "facts gathered", {"kernel": "6.1.0-rt", "path": Path("/x")}))
    log(Event("lab.vm.booted", "lab1-host", "booted"))  # not about unit lab1 (a VM name)
    log(Event("apply.facts", "lab10.host", "other unit"))
    log(Event("apply.step", "lab1", "copying", {"stdin": "sudo-password", "private_key": "x",
                                               "blob": "-----BEGIN OPENSSH PRIVATE KEY-----\nabc",
                                               "raw": b"\x00\x01"}, done=1, total=4))
    run = j.begin_run("lab1", "rt-profile", "ctl")
    log(Event("apply.step", "lab1.guest", "in the run"))
    rec = intent(j, run)
    j.mark(rec, "applied")
    j.end_run(run, "aborted")

    events = j.events_for("lab1")
    assert [e.kind for e in events] == ["apply.facts", "apply.step", "journal.run.begin", "apply.step",
                                        "journal.change.intent", "journal.change.applied", "journal.run.end"]
    facts = events[0]
    assert (facts.subject, facts.message, facts.data) == ("lab1.host", "facts gathered",
                                                          {"kernel": "6.1.0-rt", "path": "/x"})
    assert facts.at == log.events[0].at and facts.run_id is None
    step = events[1]
    assert (step.done, step.total) == (1, 4)
    assert step.data["stdin"] == step.data["private_key"] == step.data["blob"] == "<redacted>"
    assert "bytes not stored" in step.data["raw"]
    assert events[3].run_id == run and events[4].data["rec_id"] == rec
    assert [e.kind for e in j.events_for("lab1", run_id=run)][-1] == "journal.run.end"
    assert events[0].to_event().kind == "apply.facts"


def test_notify_forwarding_does_not_store_twice(db):
    seen: list[Event] = []
    j = Journal(db, notify=lambda e: (seen.append(e), j(e)))  # a display that forwards back to the journal
    try:
        run = j.begin_run("lab1", "p", "ctl")
        intent(j, run)
        assert [e.kind for e in seen] == ["journal.run.begin", "journal.change.intent"]
        assert [e.kind for e in j.events_for("lab1")] == ["journal.run.begin", "journal.change.intent"]
    finally:
        j.close()
