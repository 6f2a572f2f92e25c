"""Fleet rollout logic: waves, policy errors, per-unit outcomes, halt rules, and the runner over a real journal.

The runner tests drive `FleetRunner` with a stand-in engine (the engine itself is tested elsewhere and in the
lab rollout tests): they check what the rollout decides to do with units, not how a unit is tuned. Latency
figures come from real cyclictest runs recorded on the lab guest (tests/recorded/cyclictest/lab/README.md).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from orchestrator.config.playbook import RolloutPolicy, load_rollout_policy
from orchestrator.core.errors import InputError, TransportError
from orchestrator.journal.journal import Journal
from orchestrator.journal.owners import this_host
from orchestrator.measure.parse import parse_cyclictest_file
from orchestrator.report.fleet import render_fleet_html
from orchestrator.run.context import ChangeOutcome
from orchestrator.run.engine import ApplyResult
from orchestrator.run.fleet import (
    FleetRunner,
    halt_reason,
    plan_waves,
    summarize,
)

pytestmark = pytest.mark.unit

REC = Path(__file__).resolve().parents[1] / "recorded" / "cyclictest" / "lab"
IDLE = [parse_cyclictest_file(REC / f"guest-idle-h20000-run{i}.json") for i in range(1, 5)]
STRESS = [parse_cyclictest_file(REC / f"guest-stress-h20000-run{i}.json") for i in range(1, 9)]
UNITS = ["u1", "u2", "u3", "u4", "u5", "u6"]


# ---- waves and policy ----------------------------------------------------------------------------------
def test_waves_canary_then_batches_by_count_and_percent():
    assert plan_waves(UNITS, RolloutPolicy(canary=1, batch=2)) == [["u1"], ["u2", "u3"], ["u4", "u5"], ["u6"]]
    # 34% of 6 = 2.04 -> 3 per batch (rounded up: never more batches than the share implies)
    assert plan_waves(UNITS, RolloutPolicy(canary="20%", batch="34%")) == [["u1", "u2"], ["u3", "u4", "u5"],
                                                                          ["u6"]]
    assert plan_waves(UNITS, RolloutPolicy(canary=0, batch="100%")) == [UNITS]
    with pytest.raises(InputError, match="named twice"):
        plan_waves(["a", "a"], RolloutPolicy())


def test_policy_errors_name_file_line_key_and_value(tmp_path):
    bad = tmp_path / "rollout.yaml"
    bad.write_text("canary: 1\nbatch: 'half'\nmax_in_flight: 0\nregression:\n  p95_us: 0.2\non_halt: undo\n")
    with pytest.raises(InputError) as exc:
        load_rollout_policy(bad)
    text = str(exc.value)
    assert f"{bad}:2: batch" in text and "'half'" in text
    assert f"{bad}:3: max_in_flight" in text
    assert f"{bad}:4: regression" in text and "p95_us" in text
    assert f"{bad}:6: on_halt" in text and "'undo'" in text
    missing = tmp_path / "r2.yaml"
    missing.write_text("measurement: nowhere.yaml\n")
    with pytest.raises(InputError, match="nowhere.yaml.*does not exist"):
        load_rollout_policy(missing)


def test_shipped_playbook_loads_with_its_measurement_plan():
    loaded = load_rollout_policy(Path(__file__).resolve().parents[2] / "playbooks" / "rollout.yaml")
    assert loaded.measurement_path is not None and loaded.measurement_path.is_file()
    assert loaded.policy.on_halt == "rollback" and loaded.policy.canary == 1


# ---- outcomes and halt rules ---------------------------------------------------------------------------
def _outcome(cid: str, status: str, before=(), after=()) -> ChangeOutcome:
    return ChangeOutcome(id=cid, target="host", kind="sysctl", description=cid, status=status,
                         before=list(before), after=list(after))


def test_summarize_takes_first_before_and_the_final_state():
    policy = RolloutPolicy(regression={"p999_us": 0.25})
    # kept last change: final state = its after runs (stress) -> a regression against the idle baseline
    res = ApplyResult(unit="u1", profile="p", dry_run=False, outcomes=[
        _outcome("a", "kept", IDLE, IDLE), _outcome("b", "kept", IDLE, STRESS)])
    out = summarize(res, policy)
    assert out.kept == ["a", "b"] and out.state == "done"
    assert out.regression and out.regression.startswith("p999_us")
    assert out.after["p999_us"] > out.before["p999_us"] * 1.25
    # the same change rolled back: the unit was left in its before state (idle) -> no regression
    res2 = ApplyResult(unit="u1", profile="p", dry_run=False, outcomes=[
        _outcome("a", "kept", IDLE, IDLE), _outcome("b", "rolled_back", IDLE, STRESS), _outcome("c", "noop")])
    out2 = summarize(res2, policy)
    assert out2.regression is None and out2.rolled_back == ["b"] and out2.noop == ["c"]
    failed = summarize(ApplyResult(unit="u1", profile="p", dry_run=False,
                                   outcomes=[_outcome("a", "failed")]), policy)
    assert failed.state == "degraded" and failed.failed == ["a"] and failed.before == {}


class _Row:
    def __init__(self, unit, state, detail="", result=None):
        self.unit, self.state, self.detail, self.result = unit, state, detail, result


def test_halt_reason_counts_failures_over_finished_units():
    pol = RolloutPolicy(max_fail_percent=30)
    rows = [_Row("u1", "done"), _Row("u2", "done"), _Row("u3", "failed", "unreachable"), _Row("u4", "pending")]
    assert halt_reason(rows, pol) is not None  # 1 of 3 = 33% > 30%
    assert "u3 (unreachable)" in halt_reason(rows, pol)
    rows.append(_Row("u5", "done"))
    assert halt_reason(rows, pol) is None  # 1 of 4 = 25%
    rows.append(_Row("u6", "done", result={"regression": "p999_us 20 -> 90 us"}))
    assert "u6 regressed" in halt_reason(rows, pol)
    assert halt_reason([_Row("u1", "failed")], RolloutPolicy(max_fail_percent=0)) is not None


# ---- the runner over a real journal, with a stand-in engine ------------------------------------------
class FakeEngine:
    """Stands in for Engine: records applies/rollbacks, fails on command, can block until released."""

    def __init__(self, unit: str, world: dict):
        self.unit, self.world = unit, world
        self.artifacts = Path("/nonexistent")

    def specs(self, unit, profile):
        return ["one-change"]

    def apply(self, unit, profile, *, force_unlock=None):
        w = self.world
        with w["lock"]:
            w["applied"].append(unit)
            w["force"][unit] = force_unlock
            w["in_flight"] += 1
            w["max_seen"] = max(w["max_seen"], w["in_flight"])
        try:
            gate = w["gates"].get(unit)
            if gate is not None:
                gate.wait(10)
            time.sleep(w.get("delay", 0.02))
            if unit in w["unreachable"]:
                raise TransportError(f"{unit}: connection refused")
            after = STRESS if unit in w["regress"] else IDLE
            return ApplyResult(unit=unit, profile=str(profile), dry_run=False,
                               outcomes=[_outcome("sysctl.x", "kept", IDLE, after)])
        finally:
            with w["lock"]:
                w["in_flight"] -= 1

    def rollback(self, unit, change_id=None, **_):
        self.world["rolled_back"].append((unit, change_id))
        return [change_id]


def _world(**kw):
    w = {"lock": threading.Lock(), "applied": [], "in_flight": 0, "max_seen": 0, "gates": {}, "unreachable": set(),
         "regress": set(), "rolled_back": [], "force": {}}
    w.update(kw)
    return w


def _runner(journal, policy, world, **kw) -> FleetRunner:
    return FleetRunner(journal=journal, policy=policy, engine_for=lambda u, ev: FakeEngine(u, world),
                       poll_s=0.05, **kw)


@pytest.fixture()
def journal(tmp_path):
    with Journal(tmp_path / "journal.sqlite") as j:
        yield j


def test_rollout_runs_waves_in_order_within_the_in_flight_cap(journal, tmp_path):
    world = _world(delay=0.1)
    policy = RolloutPolicy(canary=1, batch=3, max_in_flight=2)
    runner = _runner(journal, policy, world)
    rid = runner.create(tmp_path / "p.yaml", tmp_path / "inv.yaml", UNITS).id
    summary = runner.run(rid)
    assert summary.status == "done"
    assert world["applied"][0] == "u1"  # the canary alone, first
    assert world["max_seen"] == 2  # never more than max_in_flight at once
    order = world["applied"]
    assert set(order[1:4]) == {"u2", "u3", "u4"} and set(order[4:]) == {"u5", "u6"}  # batches in order
    assert [u["state"] for u in summary.units] == ["done"] * 6
    assert summary.units[0]["wave_name"] == "canary" and summary.units[1]["wave_name"] == "batch 1"


def test_unreachable_unit_halts_and_changed_units_are_rolled_back(journal, tmp_path):
    world = _world(unreachable={"u3"})
    policy = RolloutPolicy(canary=1, batch=2, max_in_flight=2, max_fail_percent=0, on_halt="rollback")
    runner = _runner(journal, policy, world)
    rid = runner.create(tmp_path / "p.yaml", tmp_path / "inv.yaml", UNITS).id
    summary = runner.run(rid)
    assert summary.status == "halted"
    assert "u3" in summary.reason and "connection refused" in summary.reason
    states = {u["unit"]: u["state"] for u in summary.units}
    assert states["u3"] == "failed"
    assert states["u1"] == "rolled_back" and states["u2"] == "rolled_back"  # exactly this rollout's changes
    assert sorted(world["rolled_back"]) == [("u1", "sysctl.x"), ("u2", "sysctl.x")]
    assert {states[u] for u in ("u4", "u5", "u6")} == {"pending"}  # never touched
    assert not set(world["applied"]) & {"u4", "u5", "u6"}


def test_leave_on_halt_keeps_changes_and_a_regression_halts(journal, tmp_path):
    world = _world(regress={"u1"})
    policy = RolloutPolicy(canary=1, batch=2, on_halt="leave", regression={"p999_us": 0.25})
    runner = _runner(journal, policy, world)
    rid = runner.create(tmp_path / "p.yaml", tmp_path / "inv.yaml", UNITS).id
    summary = runner.run(rid)
    assert summary.status == "halted" and "u1 regressed" in summary.reason
    assert world["applied"] == ["u1"] and world["rolled_back"] == []
    assert summary.units[0]["state"] == "done"


def test_pause_then_resume_does_not_redo_finished_units(journal, tmp_path):
    gate = threading.Event()
    world = _world(gates={"u2": gate})
    policy = RolloutPolicy(canary=1, batch=2, max_in_flight=2)
    runner = _runner(journal, policy, world)
    rid = runner.create(tmp_path / "p.yaml", tmp_path / "inv.yaml", UNITS).id
    t = threading.Thread(target=lambda: runner.run(rid))
    t.start()
    deadline = time.time() + 10
    while "u2" not in world["applied"] and time.time() < deadline:
        time.sleep(0.02)
    assert journal.set_rollout_status(rid, "pausing", "test", expect=("running",))
    gate.set()
    t.join(10)
    assert journal.get_rollout(rid).status == "paused"
    first = list(world["applied"])
    assert set(first) == {"u1", "u2", "u3"}  # the batch in flight finished; nothing new was claimed
    summary = _runner(journal, policy, world).run(rid)
    assert summary.status == "done"
    assert sorted(world["applied"]) == sorted(UNITS)  # each unit applied exactly once over both runs


def test_resume_reclaims_a_dead_controllers_unit(journal, tmp_path):
    policy = RolloutPolicy(canary=1, batch=5)
    world = _world()
    runner = _runner(journal, policy, world)
    rid = runner.create(tmp_path / "p.yaml", tmp_path / "inv.yaml", UNITS).id
    dead = subprocess.Popen(["true"])
    dead.wait()
    ghost = f"{this_host()}:{dead.pid}"
    claim = journal.claim_unit(rid, ghost, wave=0, max_in_flight=2)
    assert claim is not None and claim.unit == "u1"
    lock = journal.acquire_lock("u1", ghost)  # the dead controller also held the unit's lock
    summary = runner.run(rid)
    assert summary.status == "done"
    u1 = next(u for u in summary.units if u["unit"] == "u1")
    assert u1["attempts"] == 2 and u1["claimed_by"] == runner.owner
    assert world["applied"].count("u1") == 1
    assert world["force"]["u1"] == lock.lock_id  # the dead owner's lock is taken over by its id
    assert world["force"]["u2"] is None  # nobody else's lock is ever forced


def test_fleet_html_has_the_units_and_a_plot(journal, tmp_path):
    world = _world(unreachable={"u2"})
    runner = _runner(journal, RolloutPolicy(canary=1, batch=5, max_fail_percent=50), world)
    rid = runner.create(tmp_path / "p.yaml", tmp_path / "inv.yaml", UNITS[:3]).id
    summary = runner.run(rid)
    out = render_fleet_html(summary, tmp_path / "fleet.html")
    text = out.read_text()
    assert "data:image/png;base64," in text and "u2" in text and "connection refused" in text
    assert "http://" not in text and "https://" not in text
    assert os.path.getsize(out) > 5000


def test_summarize_counts_overflowed_percentiles_as_lower_bounds():
    """A run whose p99.9 fell beyond the histogram (recorded with -h 20 under load) counts at the histogram's
    size and the median is marked as a bound, instead of being dropped (which would bias the median down)."""
    capped = parse_cyclictest_file(REC.parent / "controller" / "histogram-h20-2threads-load.txt")
    assert capped.all.p999_us is None and capped.all.overflows > 0
    res = ApplyResult(unit="u1", profile="p", dry_run=False, outcomes=[
        _outcome("a", "kept", IDLE, [capped, capped, capped])])
    out = summarize(res, RolloutPolicy(regression={"p999_us": 100.0}))
    assert out.after["p999_us"] == 20.0 and "after.p999_us" in out.bounds
    assert "before.p999_us" not in out.bounds and out.before["p999_us"] > 20


def test_cli_refuses_bad_input_before_touching_any_unit(tmp_path, monkeypatch):
    """No lab, no SSH: these errors come before any inventory or unit is touched (exit 2, InputError)."""
    from orchestrator.cli.main import run as tune

    env = {**os.environ, "RT_TUNE_STATE": str(tmp_path / "state")}
    bad = tmp_path / "rollout.yaml"
    bad.write_text("canary: 1\nmax_fail_percent: 150\n")

    def run(*args):
        return tune(list(args), env)  # `tune ARGS` as a function: its exit status, the environment given

    assert run("rollout") == 2
    assert run("rollout", "rt-profile", "--resume", "1") == 2
    assert run("rollout", "rt-profile", "--playbook", str(bad), "--inventory", str(tmp_path / "none.yaml")) == 2
    assert not (tmp_path / "state" / "lab").exists()  # nothing booted, nothing touched


def test_rollout_table_shows_each_unit_with_its_figures(journal, tmp_path):
    from rich.console import Console

    from orchestrator.cli.rollout import _rollout_table

    world = _world(unreachable={"u3"})
    runner = _runner(journal, RolloutPolicy(canary=1, batch=5, max_fail_percent=50, on_halt="leave"), world)
    rid = runner.create(tmp_path / "p.yaml", tmp_path / "inv.yaml", UNITS[:3]).id
    summary = runner.run(rid)
    console = Console(width=250, record=True)
    console.print(_rollout_table(summary))
    text = console.export_text()
    assert "canary" in text and "batch 1" in text and "sysctl.x" in text
    assert "u3" in text and "failed" in text and "connection refused" in text
    p999 = f"{summary.units[0]['outcome']['before']['p999_us']:.0f}"
    assert p999 in text  # the before p99.9 of the canary, from the recorded runs


def test_ab_refuses_a_boot_change_before_touching_the_unit(journal, tmp_path):
    """`tune ab` with a profile holding a cmdline change: InputError naming the file and the change; the
    refusal comes before any connection (connect would raise) and before the unit is locked."""
    from orchestrator.config.inventory import Inventory
    from orchestrator.measure.model import CyclictestSettings, LoadSpec
    from orchestrator.run.ab import ABExperiment
    from orchestrator.run.engine import Engine
    from orchestrator.stats.decide import DecisionRule, MeasurementPlan

    boot = tmp_path / "boot.yaml"
    boot.write_text("name: boot\nhost:\n  cmdline:\n    nohz_full: \"1\"\n")
    runtime = Path(__file__).resolve().parents[1] / "fleet" / "profile-fleet.yaml"
    inv = Inventory.model_validate({"units": {"u1": {"host": {"address": "u1.invalid"}, "vars": {"cpus": 2}}}})
    plan = MeasurementPlan(cyclictest=CyclictestSettings(cpus=[1], duration_s=2),
                           load=LoadSpec(kind="none"), decision=DecisionRule(run_duration_s=2))

    def no_connect(*_):
        raise AssertionError("connected to the unit")

    engine = Engine(inventory=inv, journal=journal, plan=plan, artifacts=tmp_path, connect=no_connect)
    with pytest.raises(InputError) as exc:
        ABExperiment(engine, "u1", runtime, boot, rounds=2).run()
    assert str(boot) in str(exc.value) and "cmdline" in str(exc.value) and "tune apply" in str(exc.value)
    assert journal.lock_info("u1") is None and journal.runs("u1") == []
