"""Runtime changes measured together (the measurement plan's `runtime.together`): one bundle per target on the
fake transport, with the same contract as any change: journaled first with every member's exact previous state,
measured once, kept or rolled back together byte for byte, reconciled after a dead controller, a no-op when
every member is in place. Measurements answer with real cyclictest outputs recorded on the x86 lab guest."""

from __future__ import annotations

import pytest

from orchestrator.changes.registry import build_change
from orchestrator.checks.promises import promises
from orchestrator.config.playbook import load_measurement_plan
from orchestrator.core.errors import InputError
from orchestrator.run.engine import bundle_runtime
from orchestrator.stats.decide import RuntimePolicy
from tests.unit.test_engine_fake import DROPIN, MARKER, PLAYBOOK, TM, states, world  # noqa: F401  (fixture)

pytestmark = pytest.mark.unit
RT = "/proc/sys/kernel/sched_rt_runtime_us"


def together(engine, kinds=("sysctl",)):
    engine.plan = engine.plan.model_copy(update={"runtime": RuntimePolicy(together=list(kinds))})


def test_a_targets_sysctls_are_one_change_measured_once_kept_then_a_noop_then_rolled_back_byte_exact(world):
    unit, engine, profile, connections = world
    together(engine)
    original = dict(unit.files)
    result = engine.apply("u1", profile)
    assert [o.id for o in result.outcomes] == ["host.bundle"]
    o = result.outcomes[0]
    assert o.kind == "bundle" and o.status == "kept" and len(o.before) == 4 and len(o.after) == 4, o
    assert "2 changes together: sysctl kernel.timer_migration=0 | sysctl kernel.sched_rt_runtime_us=-1" in \
        o.description
    assert unit.files[TM] == b"0\n" and unit.files[RT] == b"-1\n" and DROPIN in unit.files
    rec = engine.journal.get(o.journal_id)
    assert set(rec.before) == {"host.sysctl.kernel.timer_migration", "host.sysctl.kernel.sched_rt_runtime_us"}
    assert rec.before["host.sysctl.kernel.timer_migration"] == {"value": "1", "dropin": None}
    assert states(engine) == {"host.bundle": "kept"}
    # the shipped checks promise each member
    p = promises(engine.journal.active_changes("u1"))["host"]
    assert p.sysctl == {"kernel.timer_migration": "0", "kernel.sched_rt_runtime_us": "-1"}
    assert p.change_ids == ["host.bundle"]
    assert all(c.closed for c in connections)

    sent = len(unit.log)
    assert [x.status for x in engine.apply("u1", profile).outcomes] == ["noop"]
    assert not any(argv[0] == "sysctl" for argv in unit.log[sent:])
    assert engine.verify("u1") == [{"change": "host.bundle", "target": "host", "in_place": True, "live": None}]

    assert engine.rollback("u1") == ["host.bundle"]
    assert {k: v for k, v in unit.files.items() if k != MARKER} == original


def test_a_member_whose_verify_fails_undoes_the_whole_bundle(world):
    unit, engine, profile, _ = world
    together(engine)
    original = dict(unit.files)
    unit.stuck_sysctls.add("kernel.sched_rt_runtime_us")
    (o,) = engine.apply("u1", profile).outcomes
    assert o.status == "failed" and "verify failed" in o.reason and "rolled back" in o.reason, o
    assert o.before == [] and o.after == []
    assert {k: v for k, v in unit.files.items() if k != MARKER} == original  # the other member undone too


def test_a_member_already_in_place_is_left_out_and_its_bytes_are_never_touched(world):
    unit, engine, profile, _ = world
    together(engine)
    unit.files[TM] = b"0\n"
    mine = b"# managed by rt-tune: sysctl.kernel.timer_migration\n-kernel.timer_migration = 0\n"
    unit.files[DROPIN] = mine
    (o,) = engine.apply("u1", profile).outcomes
    assert o.status == "kept" and "left out: host.sysctl.kernel.timer_migration already in place" in o.description
    assert o.members == ["sysctl kernel.timer_migration=0", "sysctl kernel.sched_rt_runtime_us=-1"]
    assert o.left_out == ["host.sysctl.kernel.timer_migration already in place"]  # what the report lists
    rec = engine.journal.get(o.journal_id)
    assert list(rec.desired["state"]) == ["host.sysctl.kernel.sched_rt_runtime_us"]  # the acting member only
    engine.rollback("u1")
    assert unit.files[TM] == b"0\n" and unit.files[DROPIN] == mine and unit.files[RT] == b"950000\n"


def test_reconcile_undoes_a_bundle_a_dead_controller_left_applied(world):
    unit, engine, profile, _ = world
    together(engine)
    spec = engine.specs("u1", profile)[0]
    run = engine.journal.begin_run("u1", str(profile), controller="tune apply")
    before = {"host.sysctl.kernel.timer_migration": {"value": "1", "dropin": None},
              "host.sysctl.kernel.sched_rt_runtime_us": {"value": "950000", "dropin": None}}
    change = build_change(spec.kind, spec.params)
    rec = engine.journal.record_intent(run, "u1", "host", spec.id, spec.kind, before=before,
                                       desired={"params": spec.params, "state": change.desired(before)})
    engine.journal.mark(rec, "applied")
    unit.files[TM], unit.files[RT] = b"0\n", b"-1\n"  # what it had done before it died
    unit.files[DROPIN] = b"kernel.timer_migration = 0\n"
    assert engine.reconcile("u1") == [rec]
    assert unit.files[TM] == b"1\n" and unit.files[RT] == b"950000\n" and DROPIN not in unit.files


def test_grouping_keeps_order_and_leaves_single_members_and_other_kinds_alone(world):
    _, engine, profile, _ = world
    specs = engine.specs("u1", profile)
    assert bundle_runtime(specs, []) == specs
    assert bundle_runtime(specs, ["sysfs"]) == specs  # no member of that kind
    assert bundle_runtime(specs[:1], ["sysctl"]) == specs[:1]  # one member: no bundle
    (b,) = bundle_runtime(specs, ["sysctl"])
    assert b.id == "host.bundle" and [m["id"] for m in b.params["members"]] == [s.id for s in specs]


def test_a_bundle_of_a_boot_kind_or_of_a_bundle_is_refused():
    with pytest.raises(InputError, match="runtime changes only"):
        build_change("bundle", {"id": "host.bundle", "members": [{"id": "x", "kind": "cmdline", "params": {}}]})
    with pytest.raises(InputError, match="runtime changes only"):
        build_change("bundle", {"id": "host.bundle", "members": [{"id": "x", "kind": "bundle", "params": {}}]})


@pytest.mark.parametrize(("together_yaml", "expected"), [
    ("[cmdline]", "runtime.together"),
    ("sysctl", "runtime.together"),
    ("[sysctls]", "runtime.together"),
    ("7", "runtime.together"),
    ("null", "runtime.together"),
    ('[""]', "runtime.together.0"),
])
def test_the_playbook_names_runtime_kinds_only(tmp_path, together_yaml, expected):
    text = PLAYBOOK.read_text().replace("  together: [sysctl, sysfs, kthreads, irqbalance]",
                                        f"  together: {together_yaml}")
    assert together_yaml in text
    path = tmp_path / "pb.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        load_measurement_plan(path)
    assert expected in str(err.value) and f"{path}:" in str(err.value), str(err.value)


def test_a_knob_the_kernel_will_not_write_is_kept_where_it_already_has_the_value_and_undone_cleanly_where_not(
        world):
    """kernel.nmi_watchdog on a VM without a hard-lockup detector refuses every write, 0 included (the x86 lab,
    2026-12-07: the bases' bundle failed there, and its rollback with it). Already 0: only the drop-in is
    written (`-` prefix: systemd-sysctl logs a refusal at boot, no failed unit), nothing written to the kernel.
    Wanting 1: the bundle fails and is rolled back whole, the refused member included, and no rollback fails."""
    unit, engine, profile, _ = world
    together(engine)
    nmi = "/proc/sys/kernel/nmi_watchdog"
    unit.files[nmi] = b"0\n"
    unit.refused_sysctls.add("kernel.nmi_watchdog")
    original = dict(unit.files)
    profile.write_text(profile.read_text() + '    kernel.nmi_watchdog: "0"\n')
    (o,) = engine.apply("u1", profile).outcomes
    assert o.status == "kept", o
    assert not any("kernel.nmi_watchdog=" in a for argv in unit.log for a in argv)  # nor in a batched command
    assert any("kernel.timer_migration=0" in a for argv in unit.log for a in argv)
    assert unit.files["/etc/sysctl.d/90-rt-tune-kernel.nmi_watchdog.conf"].endswith(b"\n-kernel.nmi_watchdog = 0\n")
    engine.rollback("u1")
    assert {k: v for k, v in unit.files.items() if k != MARKER} == original

    profile.write_text(profile.read_text().replace('kernel.nmi_watchdog: "0"', 'kernel.nmi_watchdog: "1"'))
    (o,) = engine.apply("u1", profile).outcomes
    assert o.status == "failed" and "refuses writes to kernel.nmi_watchdog" in o.reason, o
    assert "ROLLBACK FAILED" not in o.reason and "rolled back" in o.reason
    assert {k: v for k, v in unit.files.items() if k != MARKER} == original


def test_a_member_whose_rollback_fails_does_not_stop_the_others():
    """The x86 lab, 2026-12-07 (before sysctls skipped writing a value in place): one member's rollback failed
    on a refused write and the members after it in rollback order kept their drop-ins."""
    from orchestrator.changes.bundle import BundleChange
    from orchestrator.changes.sysctl import SysctlChange
    from orchestrator.remote.fake import FakeTransport, FakeUnit

    tm, nmi = SysctlChange("kernel.timer_migration", "0"), SysctlChange("kernel.nmi_watchdog", "0")
    unit = FakeUnit(files={TM: b"0\n", "/proc/sys/kernel/nmi_watchdog": b"0\n", DROPIN: b"x\n",
                           "/etc/sysctl.d/90-rt-tune-kernel.nmi_watchdog.conf": b"y\n"},
                    refused_sysctls={"kernel.nmi_watchdog"})
    bundle = BundleChange("host.bundle", [("tm", tm), ("nmi", nmi)])
    before = {"tm": {"value": "1", "dropin": None}, "nmi": {"value": "1", "dropin": None}}
    with pytest.raises(Exception, match=r"(?s)1 member\(s\) not rolled back; first: .*refuses writes to kernel.nmi"):
        bundle.rollback(FakeTransport(unit, "u1.host"), before)
    assert unit.files[TM] == b"1\n" and DROPIN not in unit.files  # rolled back after the one that failed


def test_a_known_sysctl_the_kernel_lacks_is_left_out_of_the_bundle_saying_why(world):
    """A base profile applies across kernels: kernel.numa_balancing needs CONFIG_NUMA_BALANCING."""
    unit, engine, profile, _ = world
    together(engine)
    profile.write_text(profile.read_text() + '    kernel.numa_balancing: "0"\n')
    (o,) = engine.apply("u1", profile).outcomes
    assert o.status == "kept", o
    assert ("left out: host.sysctl.kernel.numa_balancing not applicable: this kernel has no sysctl "
            "kernel.numa_balancing") in o.description
    assert "/etc/sysctl.d/90-rt-tune-kernel.numa_balancing.conf" not in unit.files
    assert set(engine.journal.get(o.journal_id).desired["state"]) == {
        "host.sysctl.kernel.timer_migration", "host.sysctl.kernel.sched_rt_runtime_us"}


def test_a_bundle_switches_its_sysctls_in_one_round_trip_and_a_failure_names_the_command():
    from orchestrator.changes.bundle import BundleChange
    from orchestrator.changes.sysctl import SysctlChange
    from orchestrator.core.errors import CommandFailed
    from orchestrator.remote.fake import FakeTransport, FakeUnit

    unit = FakeUnit(files={TM: b"1\n", RT: b"950000\n"})
    t = FakeTransport(unit, "u1.host")
    bundle = BundleChange("host.bundle", [("tm", SysctlChange("kernel.timer_migration", "0")),
                                          ("rt", SysctlChange("kernel.sched_rt_runtime_us", "900000"))])
    before = bundle.read(t)
    sent = len(unit.log)
    bundle.switch(t, before, True)
    assert len(unit.log) == sent + 1 and unit.files[TM] == b"0\n" and unit.files[RT] == b"900000\n"
    bundle.switch(t, before, False)
    assert len(unit.log) == sent + 2 and unit.files[TM] == b"1\n" and unit.files[RT] == b"950000\n"
    unit.refused_sysctls.add("kernel.sched_rt_runtime_us")
    with pytest.raises(CommandFailed, match="refuses writes to kernel.sched_rt_runtime_us"):
        bundle.switch(t, before, True)


class _Recorder:
    """Records each command; `systemctl` commands succeed, others too (this test is about their order)."""

    label = "recorder"

    def __init__(self) -> None:
        self.sent: list[str] = []

    def run(self, argv, *, timeout_s=60.0, check=True, stdin=None, sudo=None):
        from orchestrator.remote.transport import CommandResult

        self.sent.append(" ".join(argv))
        return CommandResult(tuple(argv), 0, "", "", 0.0)

    def write_file(self, path, data, mode=0o644):
        self.sent.append(f"write {path}")

    def read_file(self, path):
        raise AssertionError("not read here")

    def close(self):
        pass


def test_a_bundle_step_reloads_systemd_once_where_its_members_each_asked():
    """The x86 host bundle's rollback as its members send it: irq_affinity (disable, rm, reload), irqbalance (rm
    its drop-in, reload), kthreads (disable, rm, reload), then sysctls. Through ReloadOnce: `disable` reloads
    itself, so only the last member's reload is left, run once at the end; a `systemctl restart` in between gets
    the reload it needs first."""
    from orchestrator.changes.bundle import ReloadOnce

    rec = _Recorder()
    with ReloadOnce(rec) as once:  # type: ignore[arg-type]
        once.run(["systemctl", "disable", "rt-tune-irq-affinity.service"])
        once.run(["rm", "-f", "--", "/etc/systemd/system/rt-tune-irq-affinity.service"])
        once.run(["systemctl", "daemon-reload"])
        once.run(["sh", "-c", 'for p in "$@"; do :; done', "-", "1=0-1"])  # IRQs back: no systemd in it
        once.run(["rm", "-f", "--", "/etc/systemd/system/irqbalance.service.d/90-rt-tune.conf"])
        once.run(["systemctl", "daemon-reload"])
        once.run(["systemctl", "disable", "--quiet", "rt-tune-kthreads.service"])
        once.run(["rm", "-f", "--", "/etc/systemd/system/rt-tune-kthreads.service"])
        once.run(["systemctl", "daemon-reload"])
        once.run(["sysctl", "-q", "-w", "kernel.timer_migration=1"])
    assert [c for c in rec.sent if c.startswith("systemctl")] == [
        "systemctl disable rt-tune-irq-affinity.service", "systemctl disable --quiet rt-tune-kthreads.service",
        "systemctl daemon-reload"]
    assert rec.sent[-1] == "systemctl daemon-reload" and once.reloads == 3  # two by `disable`, one held back

    rec = _Recorder()
    with ReloadOnce(rec) as once:  # type: ignore[arg-type]
        once.write_file("/etc/systemd/system/irqbalance.service.d/90-rt-tune.conf", b"[Service]\n")
        once.run(["systemctl", "daemon-reload"])
        once.run(["systemctl", "restart", "irqbalance.service"])  # needs the new drop-in loaded: reload first
        once.run(["systemctl", "daemon-reload"])
        once.run(["sh", "-c", "systemctl show -p ActiveState irqbalance.service"])  # systemd read: reload first
    assert rec.sent[1:] == ["systemctl daemon-reload", "systemctl restart irqbalance.service",
                            "systemctl daemon-reload", "sh -c systemctl show -p ActiveState irqbalance.service"]

    rec = _Recorder()
    with pytest.raises(RuntimeError), ReloadOnce(rec) as once:  # type: ignore[arg-type]
        once.run(["systemctl", "daemon-reload"])
        raise RuntimeError("a member failed")
    assert rec.sent == ["systemctl daemon-reload"]  # what its files changed is still loaded
