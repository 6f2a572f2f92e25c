"""Issue #15 items 15-18 through the real `tune` command: damaged and read-only journals, unknown units, dry
runs without an inventory, one profile lookup for every command and every unit's profile errors at once.

The inventory's units point at 127.0.0.1 port 1, where nothing listens: a command that tried to connect would
fail with a connection error (exit 5) after its retries, not with the input error (exit 2) these tests expect.
Each test has its own state directory (RT_TUNE_STATE), home and working directory."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.journal.journal import Journal
from tests.conftest import REPO
from tests.unit.cli_inputs import VARS, unit_yaml
from tests.unit.readonly import run_read_only

pytestmark = pytest.mark.unit

INVENTORY = "units:\n" + unit_yaml("lab1") + unit_yaml("lab2")


class World:
    """A temp home, working directory, state directory and inventory; `tune(...)` runs the real command."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / "state"
        self.cwd = root / "work"
        self.cwd.mkdir()
        self.inventory = root / "inventory.yaml"
        self.inventory.write_text(INVENTORY)
        self.journal = self.state / "journal.sqlite"

    def env(self, **extra: str) -> dict[str, str]:
        return {"RT_TUNE_STATE": str(self.state), "HOME": str(self.root), "PATH": "/usr/bin:/bin", **extra}

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "orchestrator", *args]

    def tune(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.argv(*args), env={**self.env(**env), "PYTHONPATH": str(REPO)}, cwd=self.cwd,
                              capture_output=True, text=True, timeout=120)
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
        return proc

    def kept_change(self) -> None:
        """A journal where lab1 has a kept change, as `tune apply` leaves it."""
        with Journal(self.journal) as j:
            run = j.begin_run("lab1", "rt-profile", "tune apply")
            rec = j.record_intent(run, "lab1", "host", "host.sysctl.kernel.timer_migration", "sysctl",
                                  {"name": "kernel.timer_migration", "value": "1"},
                                  {"params": {"name": "kernel.timer_migration", "value": "0"}, "state": {}})
            for state in ("applied", "verified", "kept"):
                j.mark(rec, state)
            j.end_run(run, "done")
            j.set_unit_state("lab1", "done", "1 kept")

    def snapshot(self) -> dict[str, str]:
        """Every file of the state directory and a hash of its bytes."""
        if not self.state.exists():
            return {}
        return {str(p.relative_to(self.state)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(self.state.rglob("*")) if p.is_file()}


@pytest.fixture()
def world(tmp_path) -> World:
    return World(tmp_path)


# ---- item 16: unknown units ------------------------------------------------------------------------------

UNKNOWN_UNIT = [
    ["status", "--unit", "nope"],
    ["status", "--unit", "lab1", "--unit", "nope"],
    ["rollback", "nope", "--all"],
    ["rollback", "nope", "--change", "host.sysctl.kernel.timer_migration"],
    ["verify", "nope"],
    ["apply", "rt-profile", "--unit", "nope"],
    ["apply", "rt-profile", "--dry-run", "--unit", "nope"],
    ["plan", "rt-profile", "--unit", "nope"],
    ["rollout", "rt-profile", "--unit", "lab1", "--unit", "nope"],
    ["ab", "rt-profile", "rt-profile", "--unit", "nope"],
    ["profile", "validate", "rt-profile", "--unit", "nope"],
    ["facts", "nope.host"],
    ["facts", "nope.guest"],
    ["measure", "nope.guest", "--duration", "10s"],
    ["diagnose", "nope"],
]


@pytest.mark.parametrize("args", UNKNOWN_UNIT, ids=[" ".join(a) for a in UNKNOWN_UNIT])
def test_an_unknown_unit_is_an_input_error_and_nothing_is_written(world, args):
    world.kept_change()
    before = world.snapshot()
    t0 = time.monotonic()
    proc = world.tune(*args, "-i", str(world.inventory))
    assert proc.returncode == 2, proc.stderr
    assert "no unit 'nope' in the inventory" in proc.stderr and "lab1, lab2" in proc.stderr, proc.stderr
    assert time.monotonic() - t0 < 30  # refused on input, not after connection retries
    assert world.snapshot() == before  # the journal's bytes: no state row, no event, no lock
    with Journal(world.journal, read_only=True) as j:
        assert j.units() == ["lab1"] and set(j.unit_states()) == {"lab1"} and j.events_for("nope") == []


def test_several_unknown_units_are_named_at_once(world):
    proc = world.tune("status", "--unit", "nope", "--unit", "lab2", "--unit", "gone", "-i", str(world.inventory))
    assert proc.returncode == 2 and "no unit 'nope', 'gone' in the inventory; its units: lab1, lab2" in proc.stderr


# ---- item 17: a dry run never boots anything --------------------------------------------------------------

@pytest.mark.parametrize("args", [["plan", "rt-profile"], ["apply", "rt-profile", "--dry-run"]])
def test_a_dry_run_without_an_inventory_says_how_to_get_one_and_boots_nothing(world, args):
    t0 = time.monotonic()
    proc = world.tune(*args)
    assert proc.returncode == 2, proc.stderr
    assert "no inventory found" in proc.stderr and str(world.cwd) in proc.stderr
    assert "`tune lab up`" in proc.stderr and "--inventory FILE" in proc.stderr
    assert time.monotonic() - t0 < 30  # booting the lab takes minutes
    assert world.snapshot() == {} and not (world.state / "lab").exists()  # no lab state, no VM directory


@pytest.mark.parametrize("args", [["plan", "rt-profile"], ["apply", "rt-profile", "--dry-run"]])
def test_a_dry_run_against_the_labs_inventory_with_the_lab_down_boots_nothing(world, args):
    lab = world.state / "lab"
    lab.mkdir(parents=True)
    (lab / "inventory.yaml").write_text(INVENTORY)  # a lab that was built once and is not running
    before = world.snapshot()
    proc = world.tune(*args)
    assert proc.returncode == 2, proc.stderr
    assert "the local lab is not running" in proc.stderr and "`tune lab up`" in proc.stderr
    assert world.snapshot() == before


def test_an_inventory_named_by_the_environment_and_missing_is_named(world):
    proc = world.tune("plan", "rt-profile", RT_TUNE_INVENTORY=str(world.root / "fleet.yaml"))
    assert proc.returncode == 2 and f"inventory {world.root / 'fleet.yaml'} (from $RT_TUNE_INVENTORY) does " \
                                   "not exist" in proc.stderr, proc.stderr


# ---- item 18: one profile lookup; every unit's errors ------------------------------------------------------

def test_profile_validate_takes_the_profile_as_apply_does(world):
    for name in ("rt-profile", "rt-profile.yaml", str(REPO / "profiles" / "rt-profile.yaml")):
        proc = world.tune("profile", "validate", name)
        assert proc.returncode == 0, proc.stderr
        assert "valid profile 'rt-profile'" in proc.stdout
    proc = world.tune("profile", "validate", "rt-profile", "-i", str(world.inventory), "--json")
    assert proc.returncode == 0, proc.stderr
    assert sorted(json.loads(proc.stdout)["units"]) == ["lab1", "lab2"]
    for args in (["profile", "validate", "no-such-profile"], ["apply", "no-such-profile", "--dry-run"]):
        proc = world.tune(*args, "-i", str(world.inventory))
        assert proc.returncode == 2 and "no profile 'no-such-profile'" in proc.stderr, proc.stderr


BAD_UNITS = """units:
  good:
    host: {address: 127.0.0.1, port: 1}
    guest: {address: 127.0.0.1, port: 1, via_host: true}
    vars: VARS
  noguest:
    host: {address: 127.0.0.1, port: 1}
    vars: VARS
  novars:
    host: {address: 127.0.0.1, port: 1}
    guest: {address: 127.0.0.1, port: 1, via_host: true}
    vars: {rt_cpus: "1", cpus: 2}
""".replace("VARS", VARS)


@pytest.mark.parametrize("args", [["profile", "validate", "rt-profile"], ["plan", "rt-profile"],
                                  ["apply", "rt-profile", "--dry-run"], ["apply", "rt-profile"],
                                  ["rollout", "rt-profile"]])
def test_every_units_profile_errors_are_reported_together(world, args):
    inv = world.root / "bad-units.yaml"
    inv.write_text(BAD_UNITS)
    world.kept_change()
    before = world.snapshot()
    proc = world.tune(*args, "-i", str(inv))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == "error: 2 of 3 units cannot take the profile:"
    noguest = [i for i, line in enumerate(lines) if line.startswith("noguest: ")]
    novars = [i for i, line in enumerate(lines) if line.startswith("novars: ")]
    assert len(noguest) == len(novars) == 1 and noguest[0] < novars[0]
    assert "no guest endpoint" in "\n".join(lines[noguest[0]:novars[0]])
    assert "undefined variable ${housekeeping_cpus}" in "\n".join(lines[novars[0]:])
    assert not any(line.startswith("good: ") for line in lines)
    assert world.snapshot() == before


# ---- item 15: damaged and read-only journals ---------------------------------------------------------------

@pytest.mark.parametrize("args", [["status"], ["rollback", "lab1", "--all"], ["verify", "lab1"],
                                  ["rollout", "--status", "0"], ["apply", "rt-profile"]])
@pytest.mark.parametrize("damage", ["garbage pages", "empty"])
def test_a_damaged_journal_is_a_clear_error_and_left_as_it_is(world, args, damage):
    world.kept_change()
    good = world.journal.read_bytes()
    bad = good[:4096] + bytes(range(256)) * ((len(good) - 4096) // 256) if damage == "garbage pages" else b""
    world.journal.write_bytes(bad)
    proc = world.tune(*args, "-i", str(world.inventory))
    assert proc.returncode == 1, proc.stderr
    assert f"the journal {world.journal} is damaged" in proc.stderr and "sqlite3" in proc.stderr
    assert world.journal.read_bytes() == bad


def test_status_works_on_a_read_only_state_directory(world):
    world.kept_change()
    before = world.snapshot()
    env = {**world.env(), "PYTHONPATH": str(REPO)}
    proc = run_read_only(world.state, world.argv("status", "-i", str(world.inventory), "--json"), env=env,
                         cwd=world.cwd)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["lab1"]["kept"] == ["host.sysctl.kernel.timer_migration"] and status["lab1"]["state"] == "done"
    assert status["lab2"]["kept"] == []
    proc = run_read_only(world.state, world.argv("rollout", "--status", "0", "--json"), env=env, cwd=world.cwd)
    assert proc.returncode == 0 and json.loads(proc.stdout) == [], proc.stderr
    assert world.snapshot() == before


def test_status_before_anything_was_done_creates_nothing(world):
    proc = world.tune("status", "-i", str(world.inventory), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["lab1"] == {"state": None, "detail": None, "kept": [], "in_flight": [],
                                               "lock": None}
    assert not world.state.exists()
    proc = world.tune("status", "-i", str(world.inventory), "--db", str(world.root / "typo.sqlite"))
    assert proc.returncode == 2 and "typo.sqlite (--db) does not exist" in proc.stderr


def test_every_error_class_exits_with_a_status_from_the_one_table():
    """Exit statuses live in one enum (orchestrator.core.errors.ExitStatus): every TuneError subclass in the package
    names one of its members, and the CLI's mapping returns only members."""
    import importlib
    import pkgutil

    import orchestrator
    from orchestrator.cli.main import exit_status
    from orchestrator.core.errors import ExitStatus, TuneError

    for mod in pkgutil.walk_packages(orchestrator.__path__, "orchestrator."):
        if ".lab.files" not in mod.name and not mod.name.endswith("__main__"):
            importlib.import_module(mod.name)
    seen, todo = set(), [TuneError]
    while todo:
        cls = todo.pop()
        seen.add(cls)
        todo += [c for c in cls.__subclasses__() if c not in seen]
    assert len(seen) >= 25  # the package's error classes were found, not just the root
    for cls in seen:
        assert isinstance(cls.exit_code, ExitStatus), (cls, cls.exit_code)
    for exc in (KeyboardInterrupt(), BrokenPipeError(), OSError(2, "x"), RuntimeError("bug"), TuneError("x")):
        assert isinstance(exit_status(exc), ExitStatus), exc


def test_tune_as_a_function_returns_its_exit_status_and_raises_nothing(tmp_path, monkeypatch, capsys):
    """cli.run(argv) is `tune ARGV...` without a process: the status from the one table, the message on
    stderr, no exception (the same argv through `tune` itself gives the same status)."""
    from orchestrator.cli.main import run
    from orchestrator.core.errors import ExitStatus

    monkeypatch.setenv("RT_TUNE_STATE", str(tmp_path / "state"))
    assert run(["profile", "validate", "rt-profile", "--json"]) == ExitStatus.OK
    assert '"profile": "rt-profile"' in capsys.readouterr().out
    assert run(["profile", "validate", str(tmp_path / "missing.yaml")]) == ExitStatus.USAGE
    err = capsys.readouterr().err
    assert "no profile" in err
    monkeypatch.chdir(REPO)  # from the checkout, ./profiles is rt-tune's own: named once
    assert run(["profile", "validate", "no-such-profile"]) == ExitStatus.USAGE
    err = " ".join(capsys.readouterr().err.split())
    assert err.count(str(REPO / "profiles")) == 1, err
    assert run(["diagnose", "lab1", "--duration", "500ms"]) == ExitStatus.USAGE  # ms read, then bounded
    assert "--duration '500ms': expected 2s to 3600s" in " ".join(capsys.readouterr().err.split())
    assert run(["no-such-command"]) == ExitStatus.USAGE
    assert run(["--help"]) == ExitStatus.OK
    assert "Usage: tune" in capsys.readouterr().out
