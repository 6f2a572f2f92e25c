"""The apply loop (Engine) on the in-memory fake transport, without VMs: a fresh apply, the second apply as
no-ops, rollback to the original bytes, a failed verify rolled back at once, and the reconcile of an intent a
dead controller left. The unit answers measurements with real cyclictest outputs recorded on the x86 lab guest
(tests/recorded/cyclictest/lab/README.md)."""

from __future__ import annotations

import pytest

from orchestrator.config.inventory import Inventory
from orchestrator.config.playbook import load_measurement_plan
from orchestrator.journal.journal import Journal
from orchestrator.remote.fake import FakeTransport, FakeUnit
from orchestrator.run.engine import Engine
from orchestrator.stats.decide import RuntimePolicy
from tests.conftest import REPO

pytestmark = pytest.mark.unit

RECORDED = sorted((REPO / "tests" / "recorded" / "cyclictest" / "lab").glob("guest-stress-h20000-run*.txt"))
LAB_X86 = REPO / "tests" / "recorded" / "lab-x86"  # what the x86 lab's host answered (its README)
PLAYBOOK = REPO / "tests" / "lab" / "playbook-fast.yaml"
TM = "/proc/sys/kernel/timer_migration"
DROPIN = "/etc/sysctl.d/90-rt-tune-kernel.timer_migration.conf"
MARKER = "/var/lib/rt-tune/changes.json"


@pytest.fixture
def world(tmp_path):
    unit = FakeUnit(files={TM: b"1\n", "/proc/sys/kernel/sched_rt_runtime_us": b"950000\n"},
                    cyclictest_outputs=[p.read_text() for p in RECORDED],
                    boot_id=(LAB_X86 / "host-boot_id.txt").read_text().strip(),
                    cmdline=(LAB_X86 / "host-proc-cmdline.txt").read_text().strip())
    connections: list[FakeTransport] = []

    def connect(inv, name, target):
        connections.append(FakeTransport(unit, f"{name}.{target}"))
        return connections[-1]

    inv = Inventory.model_validate({"units": {"u1": {"host": {"address": "fake.invalid"},
                                                     "vars": {"cpus": 2}}}})
    journal = Journal(tmp_path / "journal.sqlite")
    plan = load_measurement_plan(PLAYBOOK)  # each runtime change alone, as playbooks/measurement.yaml
    plan = plan.model_copy(update={"runtime": RuntimePolicy()})
    engine = Engine(inventory=inv, journal=journal, plan=plan, artifacts=tmp_path / "artifacts", connect=connect)
    profile = tmp_path / "profile.yaml"
    profile.write_text('name: t\nhost:\n  acknowledge: [rt_throttling_off]\n  sysctl:\n'
                       '    kernel.timer_migration: "0"\n    kernel.sched_rt_runtime_us: "-1"\n')
    yield unit, engine, profile, connections
    journal.close()


def states(engine: Engine) -> dict[str, str]:
    """Each change's latest journal state (history is oldest first)."""
    return {r.change_id: r.state for r in engine.journal.history("u1")}


def test_fresh_apply_then_a_second_apply_of_no_ops_then_rollback_to_the_original_bytes(world):
    unit, engine, profile, connections = world
    original = dict(unit.files)

    result = engine.apply("u1", profile)
    by_id = {o.id: o for o in result.outcomes}
    assert set(by_id) == {"host.sysctl.kernel.timer_migration", "host.sysctl.kernel.sched_rt_runtime_us"}
    for o in by_id.values():  # the lab playbook keeps an inconclusive change, after 4 runs a side
        assert o.status == "kept" and len(o.before) == 4 and len(o.after) == 4, o
        assert o.decision and o.decision["runs_before"] == 4
        assert {r.boot_id for r in o.before + o.after} == {unit.boot_id}  # each run read the unit's boot
    assert unit.files[TM] == b"0\n" and unit.files["/proc/sys/kernel/sched_rt_runtime_us"] == b"-1\n"
    assert unit.files[DROPIN] == (b"# managed by rt-tune: sysctl.kernel.timer_migration\n"
                                  b"-kernel.timer_migration = 0\n")
    assert b'"managed_by": "rt-tune"' in unit.files[MARKER]
    assert set(states(engine).values()) == {"kept"}
    assert all(c.closed for c in connections)  # every connection the loop opened was closed

    sent = len(unit.log)
    again = engine.apply("u1", profile)
    assert [o.status for o in again.outcomes] == ["noop", "noop"]
    assert not any(argv[0] == "sysctl" for argv in unit.log[sent:])  # nothing written on a no-op

    assert sorted(engine.rollback("u1")) == sorted(by_id)
    assert {p: c for p, c in unit.files.items() if p != MARKER} == original  # byte for byte, drop-ins gone
    assert set(states(engine).values()) == {"rolled_back"}


def test_a_change_whose_verify_fails_is_rolled_back_at_once_and_the_rest_goes_on(world):
    unit, engine, profile, _ = world
    unit.stuck_sysctls.add("kernel.timer_migration")  # the write is accepted and does not take
    result = engine.apply("u1", profile)
    by_id = {o.id: o for o in result.outcomes}
    failed = by_id["host.sysctl.kernel.timer_migration"]
    assert failed.status == "failed" and "verify failed" in failed.reason and "rolled back" in failed.reason
    assert failed.before == [] and failed.after == []  # never measured
    assert DROPIN not in unit.files and unit.files[TM] == b"1\n"  # the drop-in it wrote is gone again
    assert by_id["host.sysctl.kernel.sched_rt_runtime_us"].status == "kept"
    assert states(engine)["host.sysctl.kernel.timer_migration"] == "rolled_back"  # failed, then undone


def test_reconcile_undoes_the_change_a_dead_controller_left_in_flight(world):
    unit, engine, profile, _ = world
    run = engine.journal.begin_run("u1", str(profile), controller="tune apply")
    rec = engine.journal.record_intent(run, "u1", "host", "host.sysctl.kernel.timer_migration", "sysctl",
                                       before={"value": "1", "dropin": None},
                                       desired={"params": {"name": "kernel.timer_migration", "value": "0"},
                                                "state": {}})
    engine.journal.mark(rec, "applied")
    unit.files[TM] = b"0\n"  # what it had done before it died
    unit.files[DROPIN] = b"kernel.timer_migration = 0\n"

    assert engine.reconcile("u1") == [rec]
    assert unit.files[TM] == b"1\n" and DROPIN not in unit.files
    assert engine.journal.get(rec).state == "rolled_back"
    assert [r.id for r in engine.journal.open_runs("u1")] == []  # the dead run is closed


def test_a_command_the_fake_does_not_know_fails_loudly(tmp_path):
    t = FakeTransport(FakeUnit(), "u1.host")
    res = t.run(["reboot"], check=False)
    assert res.exit_status == 127 and "no handler for `reboot`" in res.stderr
    with pytest.raises(Exception, match="no file /nonexistent"):
        t.read_file("/nonexistent")


def test_an_unreachable_unit_ends_the_apply_and_a_change_that_cannot_be_planned_is_not_started(world):
    """A unit that cannot be reached raises out of the apply (a rollout counts the unit failed); a change
    that cannot be planned on a reachable unit is failed, not started, and the next change still runs."""
    from orchestrator.core.errors import ConnectError

    unit, engine, profile, _ = world
    engine.connect = lambda inv, name, target: (_ for _ in ()).throw(ConnectError("no route to host"))
    with pytest.raises(ConnectError):
        engine.apply("u1", profile)
    assert [r.status for r in engine.journal.runs("u1")] == ["interrupted"]

    engine.connect = lambda inv, name, target: FakeTransport(unit, f"{name}.{target}")
    del unit.files[TM]  # a kernel without this sysctl, which rt-tune knows (SYSCTL_TYPES): skipped, saying why
    profile.write_text(profile.read_text() + '    kernel.sched_autogroup_enabled: "0"\n')  # unknown, absent
    by_id = {o.id: o for o in engine.apply("u1", profile).outcomes}
    missing = by_id["host.sysctl.kernel.sched_autogroup_enabled"]  # perhaps a typo: an error, never a skip
    assert missing.status == "failed" and missing.reason.startswith("not started:")
    assert "no sysctl" in missing.reason
    assert missing.journal_id is None  # refused before anything was journaled
    skipped = by_id["host.sysctl.kernel.timer_migration"]
    assert skipped.status == "skipped" and "this kernel has no sysctl kernel.timer_migration" in skipped.reason
    assert skipped.journal_id is None and TM not in unit.files
    assert by_id["host.sysctl.kernel.sched_rt_runtime_us"].status == "kept"


def test_a_dry_run_reads_all_of_a_targets_runtime_changes_in_one_command_and_changes_nothing(world):
    unit, engine, profile, _ = world
    before = dict(unit.files)
    result = engine.apply("u1", profile, dry_run=True)
    assert [(o.id, o.status) for o in result.outcomes] == [("host.sysctl.kernel.timer_migration", "planned"),
                                                           ("host.sysctl.kernel.sched_rt_runtime_us", "planned")]
    assert '"value": "1"' in result.outcomes[0].reason and '"dropin": null' in result.outcomes[0].reason
    assert len(unit.log) == 1 and unit.log[0][:2] == ("sh", "-c")  # both states in one round trip
    assert unit.files == before
