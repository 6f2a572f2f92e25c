"""The journal's rollout store on both backends (SQLite file, real PostgreSQL server): rollouts, waves, unit
claims by several controller processes at once, and, on PostgreSQL, the row locks a claim relies on
(the rollout's row: the in-flight cap; SKIP LOCKED: a unit row another transaction holds is skipped)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from orchestrator.journal.errors import ClaimLostError, JournalError
from orchestrator.journal.journal import Journal
from orchestrator.journal.owners import this_host
from orchestrator.journal.postgres import PG_ADVISORY_LOCK_KEY
from orchestrator.journal.records import RolloutUnit
from tests.unit.journal_helpers import in_thread, is_pg, j, target  # noqa: F401 (fixtures)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
POLICY = {"canary": 1, "batch": 2, "max_failed": 0}




def raw_sql(target: str, sql: str, params: tuple = ()) -> None:
    """Change the database behind the journal's back (to fake what the API cannot, e.g. a reused pid)."""
    if is_pg(target):
        with psycopg.connect(target) as conn:
            conn.execute(sql.replace("?", "%s"), params)
    else:
        with sqlite3.connect(target) as conn:
            conn.execute(sql, params)


def python(snippet: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(snippet)], cwd=REPO, env=env, check=False,
                          capture_output=True, text=True, timeout=60)


def dead_pid() -> int:
    pid = int(python("import os; print(os.getpid())").stdout)
    assert not os.path.exists(f"/proc/{pid}")
    return pid


def spawn(snippet: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(snippet)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_together(snippet: str, n: int, tmp_path: Path) -> list[subprocess.Popen]:
    """n processes running `snippet` after a common start signal (the snippet calls barrier() when ready)."""
    go = tmp_path / "go"
    prelude = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        def barrier():
            Path({str(tmp_path)!r}, f"ready-{{os.getpid()}}").touch()
            deadline = time.time() + 30
            while not Path({str(go)!r}).exists():
                if time.time() > deadline:
                    sys.exit(3)
                time.sleep(0.001)
    """)
    procs = [spawn(prelude + textwrap.dedent(snippet)) for _ in range(n)]
    deadline = time.time() + 30
    while len(list(tmp_path.glob("ready-*"))) < n:
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            pytest.fail(f"the processes did not get ready: {[p.communicate() for p in procs]}")
        time.sleep(0.01)
    go.touch()
    return procs


def finish_all(procs: list[subprocess.Popen], timeout: float = 90) -> list[str]:
    try:
        results = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), results
    return [out for out, _err in results]


def claimed_events(j: Journal, rollout_id: int) -> Counter:
    return Counter(e.subject for e in j.events() if e.kind == "rollout.unit.claimed"
                   and e.data["rollout_id"] == rollout_id)


# ----------------------------------------------------------------------------------------- create, get, list


def test_create_get_and_list_rollouts(j):
    first = j.create_rollout("profiles/rt.yaml", "inv.yaml", POLICY, [["lab1"], ["lab2", "lab3"], []],
                             owner="ctl:1")
    assert (first.profile, first.inventory, first.policy, first.status, first.reason, first.owner) == \
        ("profiles/rt.yaml", "inv.yaml", POLICY, "running", "", "ctl:1")
    assert j.get_rollout(first.id) == first
    second = j.create_rollout("p2", "inv2", {}, [[], ["x"], ["y"]])  # an empty wave adds no unit
    assert second.owner == f"{this_host()}:{os.getpid()}"
    assert [r.id for r in j.rollouts()] == [second.id, first.id]  # newest first

    units = j.rollout_units(first.id)
    assert [(u.unit, u.wave, u.position, u.state, u.attempts, u.claimed_by) for u in units] == [
        ("lab1", 0, 0, "pending", 0, None), ("lab2", 1, 1, "pending", 0, None),
        ("lab3", 1, 2, "pending", 0, None)]
    assert [(u.unit, u.wave) for u in j.rollout_units(second.id)] == [("x", 1), ("y", 2)]
    assert j.wave_progress(first.id) == {
        0: {"pending": 1, "working": 0, "done": 0, "degraded": 0, "failed": 0, "rolled_back": 0},
        1: {"pending": 2, "working": 0, "done": 0, "degraded": 0, "failed": 0, "rolled_back": 0}}
    [created] = [e for e in j.events() if e.kind == "rollout.created" and e.subject == f"rollout:{first.id}"]
    assert created.data["waves"] == [["lab1"], ["lab2", "lab3"]]

    with pytest.raises(JournalError, match="lab2"):
        j.create_rollout("p", "inv", {}, [["lab1", "lab2"], ["lab2"]])
    assert len(j.rollouts()) == 2  # nothing written
    with pytest.raises(JournalError):
        j.get_rollout(9999)
    with pytest.raises(JournalError, match="JSON"):
        j.create_rollout("p", "inv", {"when": b"bytes"}, [["a"]])


# ----------------------------------------------------------------------------------------- claims


def test_claims_follow_position_within_the_wave(j):
    rec = j.create_rollout("p", "inv", POLICY, [["c"], ["b3", "b1", "b2"]], owner="ctl:1")
    claims = [j.claim_unit(rec.id, "ctl:1", wave=1, max_in_flight=10) for _ in range(3)]
    assert [c.unit for c in claims] == ["b3", "b1", "b2"]  # rollout order, not alphabetical
    assert j.claim_unit(rec.id, "ctl:1", wave=1, max_in_flight=10) is None  # wave 1 has nothing pending
    canary = j.claim_unit(rec.id, "ctl:1", wave=0, max_in_flight=10)
    assert isinstance(canary, RolloutUnit) and canary.unit == "c"
    assert (canary.state, canary.claimed_by, canary.attempts) == ("working", "ctl:1", 1)
    assert canary.claimed_at is not None
    assert j.wave_progress(rec.id)[1]["working"] == 3
    assert claimed_events(j, rec.id) == {"c": 1, "b1": 1, "b2": 1, "b3": 1}
    [ev] = [e for e in j.events_for("c") if e.kind == "rollout.unit.claimed"]
    assert ev.data["owner"] == "ctl:1" and ev.data["wave"] == 0


def test_no_claim_unless_running_nor_beyond_max_in_flight(j):
    rec = j.create_rollout("p", "inv", POLICY, [["a", "b", "c"]])
    me = f"{this_host()}:{os.getpid()}"
    first = j.claim_unit(rec.id, wave=0, max_in_flight=2)
    assert first.claimed_by == me
    assert j.claim_unit(rec.id, wave=0, max_in_flight=2).unit == "b"
    assert j.claim_unit(rec.id, wave=0, max_in_flight=2) is None  # two in flight already
    j.finish_unit(rec.id, "a", me, "done")
    for status in ("pausing", "paused", "halted", "done"):
        assert j.set_rollout_status(rec.id, status, f"test {status}") is True
        assert j.claim_unit(rec.id, wave=0, max_in_flight=2) is None
    assert j.rollout_units(rec.id)[2].state == "pending"
    j.set_rollout_status(rec.id, "running")
    assert j.claim_unit(rec.id, wave=0, max_in_flight=2).unit == "c"
    with pytest.raises(JournalError):
        j.claim_unit(rec.id, wave=0, max_in_flight=0)
    with pytest.raises(JournalError):
        j.claim_unit(9999, wave=0, max_in_flight=1)


def test_finish_by_its_owner_only(j):
    rec = j.create_rollout("p", "inv", POLICY, [["a", "b"]])
    a = j.claim_unit(rec.id, "ctl:1", wave=0, max_in_flight=5)
    with pytest.raises(ClaimLostError, match="ctl:1") as info:
        j.finish_unit(rec.id, "a", "ctl:2", "done")
    assert info.value.holder == "ctl:1" and info.value.state == "working"
    assert isinstance(info.value, JournalError)
    with pytest.raises(ClaimLostError, match="nobody"):  # never claimed
        j.finish_unit(rec.id, "b", "ctl:1", "done")
    with pytest.raises(JournalError):
        j.finish_unit(rec.id, "a", "ctl:1", "pending")  # not an outcome
    done = j.finish_unit(rec.id, "a", a.claimed_by, "degraded", "p99.9 worse by 3 %", {"p999_us": 41.5})
    assert (done.state, done.detail, done.result, done.claimed_by) == \
        ("degraded", "p99.9 worse by 3 %", {"p999_us": 41.5}, "ctl:1")
    assert j.rollout_units(rec.id)[0] == done
    with pytest.raises(ClaimLostError):  # finished already
        j.finish_unit(rec.id, "a", "ctl:1", "done")
    with pytest.raises(JournalError, match="not part"):
        j.finish_unit(rec.id, "zz", "ctl:1", "done")
    [ev] = [e for e in j.events_for("a") if e.kind == "rollout.unit.finished"]
    assert ev.data["state"] == "degraded" and ev.data["result"] == {"p999_us": 41.5}


def test_reclaim_dead_claims_only(j, target):
    rec = j.create_rollout("p", "inv", POLICY, [["dead", "alive", "remote", "reused"]])
    dead = f"{this_host()}:{dead_pid()}"
    alive = f"{this_host()}:{os.getpid()}"
    for owner in (dead, alive, "robot-controller-7:4242", alive):
        j.claim_unit(rec.id, owner, wave=0, max_in_flight=10)
    # "reused": its owner's pid now runs another process (another start time than at the claim)
    raw_sql(target, "UPDATE rollout_units SET claim_start = ? WHERE unit = ?", ("boot:1", "reused"))

    assert j.reclaim_dead_claims(rec.id) == ["dead", "reused"]
    units = {u.unit: u for u in j.rollout_units(rec.id)}
    assert (units["dead"].state, units["dead"].claimed_by, units["dead"].claimed_at) == ("pending", None, None)
    assert units["reused"].state == "pending"
    assert (units["alive"].state, units["alive"].claimed_by) == ("working", alive)
    assert (units["remote"].state, units["remote"].claimed_by) == ("working", "robot-controller-7:4242")
    [ev] = [e for e in j.events_for("dead") if e.kind == "rollout.unit.reclaimed"]
    assert ev.data["old_owner"] == dead and "no longer running" in ev.message
    with pytest.raises(ClaimLostError):  # the dead controller, were it to come back, has lost it
        j.finish_unit(rec.id, "dead", dead, "done")
    again = j.claim_unit(rec.id, alive, wave=0, max_in_flight=10)
    assert (again.unit, again.attempts) == ("dead", 2)
    assert j.reclaim_dead_claims(rec.id) == []


def test_rollout_status_compare_and_set(j):
    rec = j.create_rollout("p", "inv", POLICY, [["a"]])
    assert j.set_rollout_status(rec.id, "halted", "canary failed", expect=("paused",)) is False
    assert j.get_rollout(rec.id).status == "running"
    assert j.set_rollout_status(rec.id, "halted", "canary failed", expect=("running", "pausing")) is True
    got = j.get_rollout(rec.id)
    assert (got.status, got.reason) == ("halted", "canary failed") and got.updated_at >= rec.updated_at
    assert j.set_rollout_status(rec.id, "done", expect=("running",)) is False
    assert j.get_rollout(rec.id).status == "halted"
    statuses = [e.data["to"] for e in j.events() if e.kind == "rollout.status"]
    assert statuses == ["halted"]  # refused compare-and-sets write nothing
    with pytest.raises(JournalError):
        j.set_rollout_status(rec.id, "exploded")  # type: ignore[arg-type]
    with pytest.raises(JournalError):
        j.set_rollout_status(9999, "paused")


def test_unit_state_compare_and_set_and_retry(j):
    rec = j.create_rollout("p", "inv", POLICY, [["a", "b"]])
    j.claim_unit(rec.id, "ctl:1", wave=0, max_in_flight=5)
    j.finish_unit(rec.id, "a", "ctl:1", "failed", "boot timeout")
    assert j.set_rollout_unit_state(rec.id, "a", "pending", "retry", expect=("done",)) is False
    assert j.set_rollout_unit_state(rec.id, "a", "pending", "retry", expect=("failed",)) is True
    a = j.rollout_units(rec.id)[0]
    assert (a.state, a.claimed_by, a.claimed_at, a.detail, a.attempts) == ("pending", None, None, "retry", 1)
    assert j.claim_unit(rec.id, "ctl:2", wave=0, max_in_flight=5).attempts == 2
    assert j.set_rollout_unit_state(rec.id, "b", "rolled_back", "halted before it ran") is True
    assert j.wave_progress(rec.id)[0] == {"pending": 0, "working": 1, "done": 0, "degraded": 0, "failed": 0,
                                          "rolled_back": 1}
    with pytest.raises(JournalError, match="claim_unit"):
        j.set_rollout_unit_state(rec.id, "b", "working")
    with pytest.raises(JournalError):
        j.set_rollout_unit_state(rec.id, "nope", "pending")
    kinds = [e.kind for e in j.events_for("a")]
    assert kinds == ["rollout.unit.claimed", "rollout.unit.finished", "rollout.unit.state",
                     "rollout.unit.claimed"]


# ----------------------------------------------------------------------------------------- many controllers


N_UNITS = 40
N_PROCS = 6


def test_many_processes_claim_every_unit_exactly_once(target, tmp_path):
    """The key concurrency property: controllers in separate processes, each with its own connection,
    claiming from one rollout at once, never claim a unit twice and leave none unclaimed."""
    units = [f"u{i:02d}" for i in range(N_UNITS)]
    with Journal(target) as j:
        rec = j.create_rollout("p", "inv", POLICY, [units])
    procs = start_together(f"""
        import json
        from orchestrator.journal.journal import Journal
        j = Journal({target!r})
        mine = []
        barrier()
        while True:
            claim = j.claim_unit({rec.id}, wave=0, max_in_flight=1000)
            if claim is None:
                break
            mine.append(claim.unit)
            time.sleep(0.002)  # some work
            j.finish_unit({rec.id}, claim.unit, claim.claimed_by, "done", result={{"pid": os.getpid()}})
        print(json.dumps({{"pid": os.getpid(), "units": mine}}), flush=True)
    """, N_PROCS, tmp_path)
    reports = [json.loads(out) for out in finish_all(procs)]
    claimed = [u for r in reports for u in r["units"]]
    assert sorted(claimed) == units  # every unit, none twice
    with Journal(target) as j:
        assert claimed_events(j, rec.id) == dict.fromkeys(units, 1)
        final = j.rollout_units(rec.id)
        assert {u.state for u in final} == {"done"} and {u.attempts for u in final} == {1}
        by_pid = {r["pid"]: set(r["units"]) for r in reports}
        for u in final:  # the stored claim is the process that reported it
            pid = int(u.claimed_by.rpartition(":")[2])
            assert u.unit in by_pid[pid] and u.result == {"pid": pid}
        assert len({u.claimed_by for u in final}) > 1, "one process claimed everything: no concurrency shown"
        assert j.wave_progress(rec.id) == {0: {"pending": 0, "working": 0, "done": N_UNITS, "degraded": 0,
                                               "failed": 0, "rolled_back": 0}}


def test_many_processes_never_exceed_max_in_flight(target, tmp_path):
    cap = 2
    units = [f"u{i:02d}" for i in range(16)]
    with Journal(target) as j:
        rec = j.create_rollout("p", "inv", POLICY, [units])
    procs = start_together(f"""
        from orchestrator.journal.journal import Journal
        j = Journal({target!r})
        barrier()
        deadline = time.time() + 60
        while time.time() < deadline:
            claim = j.claim_unit({rec.id}, wave=0, max_in_flight={cap})
            if claim is None:
                if all(u.state == "done" for u in j.rollout_units({rec.id})):
                    break
                time.sleep(0.01)
                continue
            time.sleep(0.03)
            j.finish_unit({rec.id}, claim.unit, claim.claimed_by, "done")
    """, 4, tmp_path)
    seen = Counter()
    with Journal(target) as watcher:
        while any(p.poll() is None for p in procs):
            seen[sum(u.state == "working" for u in watcher.rollout_units(rec.id))] += 1
            time.sleep(0.002)
        finish_all(procs)
        assert {u.state for u in watcher.rollout_units(rec.id)} == {"done"}
        assert max(e.data["in_flight"] for e in watcher.events() if e.kind == "rollout.unit.claimed") <= cap
    assert max(seen) <= cap, seen
    assert seen[cap] > 0, seen  # the cap was reached: the processes did overlap


# ----------------------------------------------------------------------------------------- PostgreSQL row locks


def test_claim_skips_a_unit_row_another_transaction_holds(pg_journal_url):
    with Journal(pg_journal_url) as j:
        rec = j.create_rollout("p", "inv", POLICY, [["u0", "u1", "u2"]])
        with psycopg.connect(pg_journal_url) as holder, psycopg.connect(pg_journal_url) as prober:
            holder.execute("SELECT * FROM rollout_units WHERE rollout_id = %s AND unit = 'u0' FOR UPDATE",
                           (rec.id,))  # BEGIN (implicit) ... FOR UPDATE: u0's row is held until rollback
            prober.execute("SET lock_timeout = '200ms'")
            with pytest.raises(psycopg.errors.LockNotAvailable):  # the row really is locked
                prober.execute("SELECT * FROM rollout_units WHERE rollout_id = %s AND unit = 'u0' FOR UPDATE",
                               (rec.id,))
            prober.rollback()

            thread, box = in_thread(j.claim_unit, rec.id, "ctl:1", wave=0, max_in_flight=10)
            thread.join(5)
            assert not thread.is_alive(), "claim_unit waited for the held row instead of skipping it"
            assert "error" not in box and box["value"].unit == "u1" and box["seconds"] < 2
            holder.rollback()
        assert j.claim_unit(rec.id, "ctl:1", wave=0, max_in_flight=10).unit == "u0"  # free again
        assert [u.state for u in j.rollout_units(rec.id)] == ["working", "working", "pending"]


def test_claims_take_the_rollout_row_not_the_writers_lock(pg_journal_url):
    with Journal(pg_journal_url) as j, Journal(pg_journal_url) as other:
        rec = j.create_rollout("p", "inv", POLICY, [["u0", "u1", "u2"]])
        with psycopg.connect(pg_journal_url) as raw:
            # another process in the middle of a general write: claims go on regardless
            raw.execute("SELECT pg_advisory_xact_lock(%s)", (PG_ADVISORY_LOCK_KEY,))
            thread, box = in_thread(j.claim_unit, rec.id, "ctl:1", wave=0, max_in_flight=10)
            thread.join(5)
            assert not thread.is_alive() and box["value"].unit == "u0" and box["seconds"] < 2
            blocked, blocked_box = in_thread(other.set_rollout_status, rec.id, "paused")  # a general write waits
            blocked.join(0.5)
            assert blocked.is_alive()
            raw.rollback()
            blocked.join(10)
            assert blocked_box.get("value") is True
            j.set_rollout_status(rec.id, "running")

            # another claim of the same rollout in progress (the rollout's row held): a claim waits its turn
            raw.execute("SELECT * FROM rollouts WHERE id = %s FOR UPDATE", (rec.id,))
            thread, box = in_thread(j.claim_unit, rec.id, "ctl:1", wave=0, max_in_flight=10)
            thread.join(0.5)
            assert thread.is_alive(), "claim_unit did not take the rollout's row lock"
            raw.execute("UPDATE rollouts SET status = 'paused' WHERE id = %s", (rec.id,))
            raw.commit()  # the status it sees is the one committed before its turn
            thread.join(10)
            assert not thread.is_alive() and "error" not in box and box["value"] is None
        assert [u.state for u in j.rollout_units(rec.id)] == ["working", "pending", "pending"]


def test_unit_compare_and_set_sees_a_claim_that_commits_meanwhile(pg_journal_url):
    with Journal(pg_journal_url) as j:
        rec = j.create_rollout("p", "inv", POLICY, [["u0", "u1"]])
        with psycopg.connect(pg_journal_url) as raw:  # a claim of u0, in progress (not committed yet)
            raw.execute("UPDATE rollout_units SET state = 'working', claimed_by = 'ctl:9' "
                        "WHERE rollout_id = %s AND unit = 'u0'", (rec.id,))
            thread, box = in_thread(j.set_rollout_unit_state, rec.id, "u0", "rolled_back", "halted",
                                    expect=("pending",))
            thread.join(0.5)
            assert thread.is_alive(), "the compare-and-set did not wait for the unit's row"
            raw.commit()
            thread.join(10)
        assert box.get("value") is False  # it saw 'working', not the 'pending' of before the claim
        u0 = j.rollout_units(rec.id)[0]
        assert (u0.state, u0.claimed_by) == ("working", "ctl:9")
