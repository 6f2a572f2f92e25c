"""`tune rollout` over three real lab units: two controllers share one rollout on a real PostgreSQL server
without taking a unit twice; a controller SIGKILLed mid-batch is resumed without redoing finished units; a unit
powered off during the canary halts the rollout and the units already changed are rolled back (last: the
powered-off unit stays off)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from orchestrator.config.inventory import load_inventory
from orchestrator.journal.journal import Journal
from orchestrator.remote.ssh import SSHTransport
from tests.conftest import REPO, tune_env

pytestmark = pytest.mark.lab

HERE = Path(__file__).resolve().parent
PROFILE = str(HERE / "profile-fleet.yaml")
POLICY = str(HERE / "rollout-lab.yaml")
UNITS = ["lab1", "lab2", "lab3"]
DROPIN = "/etc/sysctl.d/90-rt-tune-kernel.timer_migration.conf"


def tune(paths, *args: str, timeout: float = 1200, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], env={**tune_env(paths), **(env or {})},
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def tune_bg(paths, *args: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator", *args], env={**tune_env(paths), **(env or {})},
                            cwd=REPO,
                            stdout=open(log, "w"), stderr=open(log.with_suffix(".err"), "w"), stdin=subprocess.DEVNULL,
                            start_new_session=True)


def live(paths, unit: str) -> tuple[str, bool]:
    """timer_migration and whether rt-tune's drop-in exists, read with plain shell (not rt-tune's change code)."""
    inv = load_inventory(paths.lab_inventory)
    with SSHTransport(inv.endpoint(unit, "host")) as t:
        out = t.run(["sh", "-c", f"cat /proc/sys/kernel/timer_migration; test -e {DROPIN} && echo dropin || true"])
    lines = out.stdout.split()
    return lines[0], "dropin" in lines


def expected_live(unit_row) -> tuple[str, bool]:
    """What the unit must show after a finished rollout: the change in place if the evidence kept it, else
    the pristine state (the decision rule may roll it back on the lab's noisy runs)."""
    outcome = unit_row["outcome"] if isinstance(unit_row, dict) else unit_row.result
    return ("0", True) if outcome["kept"] else ("1", False)


def wait_for(what, predicate, timeout: float, step: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def next_rollout_id(db: Path) -> int:
    if not db.exists():
        return 1
    with Journal(db) as j:
        return max((r.id for r in j.rollouts()), default=0) + 1


def units_of(db, rollout_id: int) -> dict:
    with Journal(db) as j:
        return {u.unit: u for u in j.rollout_units(rollout_id)}


def claims(db, rollout_id: int) -> dict[str, list[str]]:
    """unit -> owners of every claim event the journal holds for this rollout."""
    out: dict[str, list[str]] = {}
    with Journal(db) as j:
        for ev in j.events():
            if ev.kind == "rollout.unit.claimed" and ev.data.get("rollout_id") == rollout_id:
                out.setdefault(ev.subject, []).append(ev.data.get("owner"))
    return out


@pytest.fixture()
def pristine(fleet_lab, fleet_paths):
    """Every unit up, and nothing of rt-tune's on it, before and after each test."""
    for unit in UNITS:
        if not any(s.running and s.unit == unit for s in fleet_lab.status()):
            fleet_lab.start(f"{unit}-host")
        tune(fleet_paths, "rollback", unit, "--all")
        assert live(fleet_paths, unit) == ("1", False)
    yield
    for unit in UNITS:  # a unit left powered off stays off (the next test's setup starts it)
        if any(s.running and s.unit == unit for s in fleet_lab.status()):
            tune(fleet_paths, "rollback", unit, "--all")


def test_two_controllers_share_a_rollout_on_postgresql_without_taking_a_unit_twice(fleet_lab, fleet_paths,
                                                                                   pristine, postgres, tmp_path):
    url = postgres.create_database("fleet")
    parts = urllib.parse.urlsplit(url)  # the password goes by PGPASSWORD, never on a command line
    env = {"PGPASSWORD": urllib.parse.unquote(parts.password or "")}
    db = parts._replace(netloc=f"{parts.username}@{parts.hostname}:{parts.port}").geturl()
    first = tune_bg(fleet_paths, "rollout", PROFILE, "--playbook", POLICY, "--db", db, "--workers", "1", "--json",
                    log=tmp_path / "a.log", env=env)
    try:
        def created():
            with Journal(url) as j:
                return [r.id for r in j.rollouts()]

        rid = wait_for("the rollout in PostgreSQL", created, 120, 0.5)[0]
        second = tune_bg(fleet_paths, "rollout", "--resume", str(rid), "--db", db, "--workers", "1", "--json",
                         log=tmp_path / "b.log", env=env)
        rcs = first.wait(timeout=900), second.wait(timeout=900)
        assert rcs == (0, 0), (tmp_path / "a.err").read_text()[-2000:] + (tmp_path / "b.err").read_text()[-2000:]
        taken = claims(url, rid)
        assert {u: len(o) for u, o in taken.items()} == {u: 1 for u in UNITS}  # no unit taken twice
        owners = {o[0] for o in taken.values()}
        assert len(owners) == 2, taken  # both controllers worked on the rollout
        final = units_of(url, rid)
        assert {u.unit: u.state for u in final.values()} == {u: "done" for u in UNITS}
        with Journal(url) as j:
            assert j.get_rollout(rid).status == "done"
            assert {r.unit for r in j.runs()} == set(UNITS)  # the units' change records are in PostgreSQL too
        for unit in UNITS:
            assert live(fleet_paths, unit) == expected_live(final[unit]), unit
        for out in ("a.log", "b.log", "a.err", "b.err"):
            assert urllib.parse.unquote(parts.password) not in (tmp_path / out).read_text()
    finally:
        for proc in (first, locals().get("second")):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for unit in UNITS:  # PostgreSQL holds these changes: roll them back from there
            r = tune(fleet_paths, "rollback", unit, "--all", "--db", db, env=env)
            assert r.returncode == 0, r.stderr[-2000:]


def test_resume_after_sigkill_finishes_without_redoing_finished_units(fleet_lab, fleet_paths, pristine,
                                                                      tmp_path):
    db = fleet_paths.state / "journal.sqlite"
    rid = next_rollout_id(db)
    proc = tune_bg(fleet_paths, "rollout", PROFILE, "--playbook", POLICY, log=tmp_path / "first.log")

    def batch_mid_change():  # the canary done, and a batch unit with a change journaled but not finished
        us = units_of(db, rid) if db.exists() else {}
        if not us or us["lab1"].state != "done":
            return False
        with Journal(db) as j:
            return [u for u in ("lab2", "lab3") if us[u].state == "working" and j.incomplete(u)]

    mid = wait_for("a batch unit in the middle of its change", batch_mid_change, 600, 0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the controller dies: no cleanup at all
    proc.wait()
    with Journal(db) as j:
        assert j.incomplete(mid[0]), "the killed controller left a change in flight"
    resumed = tune(fleet_paths, "rollout", "--resume", str(rid), "--json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout)
    assert summary["status"] == "done"
    assert {u["unit"]: u["state"] for u in summary["units"]} == {u: "done" for u in UNITS}
    taken = claims(db, rid)
    assert len(taken["lab1"]) == 1  # the canary was not redone
    assert len(taken[mid[0]]) == 2  # the killed one: claimed again after its controller was found dead
    with Journal(db) as j:
        assert not j.incomplete(mid[0])
        assert any("reconcile" in (e.message or "") for e in j.events_for(mid[0]))  # half-done change undone
    rows = {u["unit"]: u for u in summary["units"]}
    for unit in UNITS:
        assert live(fleet_paths, unit) == expected_live(rows[unit]), unit


def test_unit_powered_off_during_canary_halts_and_changed_units_roll_back(fleet_lab, fleet_paths, pristine,
                                                                          tmp_path):
    db = fleet_paths.state / "journal.sqlite"
    rid = next_rollout_id(db)
    log = tmp_path / "rollout.log"
    proc = tune_bg(fleet_paths, "rollout", PROFILE, "--playbook", POLICY, "--json", log=log)
    # pull lab3's power while the canary (lab1) is being tuned
    wait_for("the canary to be working", lambda: db.exists() and any(
        u.state == "working" for u in units_of(db, rid).values()), 120, 0.5)
    assert units_of(db, rid)["lab1"].state == "working"
    fleet_lab.kill("lab3-host")
    rc = proc.wait(timeout=900)
    assert rc == 10, log.with_suffix(".err").read_text()[-3000:]  # RolloutHalted
    summary = json.loads(log.read_text())
    states = {u["unit"]: u["state"] for u in summary["units"]}
    assert summary["status"] == "halted"
    assert "lab3" in summary["reason"] and "max_fail_percent" in summary["reason"]
    assert states == {"lab1": "rolled_back", "lab2": "rolled_back", "lab3": "failed"}
    lab1 = next(u for u in summary["units"] if u["unit"] == "lab1")
    assert lab1["outcome"]["kept"] == ["host.sysctl.kernel.timer_migration"] or \
        lab1["outcome"]["rolled_back"] == ["host.sysctl.kernel.timer_migration"]
    assert lab1["outcome"]["before"]["p999_us"] > 0  # measured before/after on the unit
    for unit in ("lab1", "lab2"):
        assert live(fleet_paths, unit) == ("1", False), unit  # this rollout's changes undone
    html = Path(summary["report_html"]).read_text()
    assert "halted" in html and "lab3" in html and "data:image/png;base64," in html
    with Journal(db) as j:  # lab3 is still off: the journal shows nothing was ever attempted on it
        assert not [r for r in j.history("lab3") if r.run_id in {run.id for run in j.runs("lab3")}
                    and r.created_at > j.get_rollout(rid).created_at]
    status = tune(fleet_paths, "rollout", "--status", str(rid), "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "halted"
