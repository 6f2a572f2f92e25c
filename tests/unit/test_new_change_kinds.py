"""The sysfs and service_enable change kinds (issue #20): the knobs' values read as kernels print them (recorded), the
`sysfs:` section resolved or refused with file and line, and the change through the engine on the fake unit:
applied, persisted in a tmpfiles.d entry, a knob the unit lacks skipped, rolled back byte for byte."""

from __future__ import annotations

import json

import pytest

from orchestrator.changes.base import ChangeError, unb64
from orchestrator.changes.irqbalance import IrqbalanceChange
from orchestrator.changes.kthreads import KthreadRule, KthreadsChange
from orchestrator.changes.sysctl import SysctlChange, parse_meminfo
from orchestrator.changes.sysfs import SysfsChange
from orchestrator.config.inventory import Inventory
from orchestrator.config.knobs import KNOBS, selected_choice
from orchestrator.config.playbook import load_measurement_plan
from orchestrator.config.profile import load_profile, resolve
from orchestrator.core.cpulist import cpumask_of, cpus_of_mask
from orchestrator.core.errors import InputError, ParseError
from orchestrator.facts.kthreads import parse_kthreads
from orchestrator.journal.journal import Journal
from orchestrator.remote.fake import FakeTransport, FakeUnit
from orchestrator.run.engine import Engine
from orchestrator.stats.decide import RuntimePolicy
from tests.conftest import REPO

pytestmark = pytest.mark.unit

RECORDED = REPO / "tests" / "recorded" / "sysfs" / "controller-6.18"
CYCLICTEST = sorted((REPO / "tests" / "recorded" / "cyclictest" / "lab").glob("guest-stress-h20000-run*.txt"))
LAB_X86 = REPO / "tests" / "recorded" / "lab-x86"
THP = KNOBS["transparent_hugepage"].path
WQ = KNOBS["workqueue_cpumask"].path


def recorded(name: str) -> str:
    return (RECORDED / name).read_text()


def test_values_read_as_the_kernel_prints_them():
    assert selected_choice(recorded("thp-enabled.txt")) == "madvise"
    assert selected_choice(recorded("thp-defrag.txt")) == "madvise"
    assert selected_choice(recorded("ksm-run.txt")) == "0"
    assert cpus_of_mask(recorded("workqueue-cpumask.txt")) == [0, 1]
    assert cpus_of_mask(recorded("writeback-cpumask.txt")) == [0, 1]


@pytest.mark.parametrize("cpus, mask", [([0], "1"), ([0, 1], "3"), ([1, 3], "a"), ([31], "80000000"),
                                        ([0, 32], "1,00000001"), ([35, 64], "1,00000008,00000000")])
def test_cpumask_written_as_the_kernel_prints_it_and_read_back(cpus, mask):
    assert cpumask_of(cpus) == mask
    assert cpus_of_mask(mask) == cpus


@pytest.mark.parametrize("text", ["", "x", "3 4", "0x3"])
def test_a_cpumask_that_is_not_one_is_none(text):
    assert cpus_of_mask(text) is None


@pytest.mark.parametrize("knob, value, kw, message", [
    ("transparent_hugepage", "off", {}, "one of always, madvise, never"),
    ("workqueue_cpumask", "1-", {}, "a non-empty CPU list"),
    ("cpufreq_governor", "Perf ormance", {"cpus": [1]}, "lowercase letters"),
    ("cpufreq_governor", "performance", {}, "needs its CPUs"),
    ("cpuidle_disable", "1", {"cpus": [1]}, "idle states"),
    ("no_such_knob", "1", {}, "not a knob rt-tune knows"),
])
def test_a_knob_with_a_wrong_value_is_refused(knob, value, kw, message):
    with pytest.raises(InputError, match=message):
        SysfsChange(knob, value, **kw)


def _unit(cpus: int):
    return Inventory.model_validate({"units": {"u": {"host": {"address": "x.invalid"},
                                                     "vars": {"cpus": cpus}}}}).unit("u")


def _profile(tmp_path, body: str):
    path = tmp_path / "p.yaml"
    path.write_text("name: p\n" + body)
    return path


def test_the_profile_section_resolves_one_change_per_knob(tmp_path):
    path = _profile(tmp_path, "host:\n  sysfs:\n    transparent_hugepage: never\n    workqueue_cpumask: \"0\"\n"
                               "    cpufreq_governor: {cpus: \"1-3\", value: performance}\n"
                               "    cpuidle_disable: {cpus: \"1\", states: \"1-2\"}\n    ksm_run: 0\n")
    specs = resolve(load_profile(path), "u", _unit(4))
    got = {s.id: (s.kind, s.params) for s in specs}
    assert got == {
        "host.sysfs.transparent_hugepage": ("sysfs", {"knob": "transparent_hugepage", "value": "never"}),
        "host.sysfs.workqueue_cpumask": ("sysfs", {"knob": "workqueue_cpumask", "value": "0"}),
        "host.sysfs.ksm_run": ("sysfs", {"knob": "ksm_run", "value": "0"}),
        "host.sysfs.cpufreq_governor": ("sysfs", {"knob": "cpufreq_governor", "cpus": [1, 2, 3],
                                                  "value": "performance"}),
        "host.sysfs.cpuidle_disable": ("sysfs", {"knob": "cpuidle_disable", "cpus": [1], "states": [1, 2],
                                                 "value": "1"}),
    }
    assert all(not s.needs_reboot for s in specs)


@pytest.mark.parametrize("body, message", [
    ("host:\n  sysfs:\n    transparent_hugepage: off\n", "p.yaml:4: host.sysfs.transparent_hugepage: expected "
                                                          "one of always, madvise, never (got 'off')"),
    ("host:\n  sysfs:\n    numa_balancing: 0\n", "p.yaml:4: host.sysfs.numa_balancing"),
    ("host:\n  sysfs:\n    transparent_hugepage: true\n", "cannot be a boolean"),
    ("host:\n  sysfs:\n    workqueue_cpumask: \"0-9\"\n", "outside the unit's host CPUs 0-3"),
    ("host:\n  sysfs:\n    cpuidle_disable: {cpus: \"1\", states: \"x\"}\n", "idle state numbers"),
])
def test_bad_sysfs_input_is_refused_with_file_line_and_key(tmp_path, body, message):
    path = _profile(tmp_path, body)
    with pytest.raises(InputError) as exc:
        resolve(load_profile(path), "u", _unit(4))
    assert message in str(exc.value), str(exc.value)


@pytest.fixture
def world(tmp_path):
    unit = FakeUnit(files={THP: recorded("thp-enabled.txt").encode(), WQ: recorded("workqueue-cpumask.txt").encode()},
                    cyclictest_outputs=[p.read_text() for p in CYCLICTEST],
                    boot_id=(LAB_X86 / "host-boot_id.txt").read_text().strip(),
                    cmdline=(LAB_X86 / "host-proc-cmdline.txt").read_text().strip())
    inv = Inventory.model_validate({"units": {"u1": {"host": {"address": "fake.invalid"}, "vars": {"cpus": 2}}}})
    journal = Journal(tmp_path / "journal.sqlite")
    plan = load_measurement_plan(REPO / "tests" / "lab" / "playbook-fast.yaml")
    plan = plan.model_copy(update={"runtime": RuntimePolicy()})  # each change alone: this test is about each kind
    engine = Engine(inventory=inv, journal=journal, plan=plan, artifacts=tmp_path / "artifacts",
                    connect=lambda inv, name, target: FakeTransport(unit, name))
    yield unit, engine
    journal.close()


def test_applied_persisted_skipped_where_absent_and_rolled_back_byte_for_byte(world, tmp_path):
    unit, engine = world
    original = dict(unit.files)
    profile = _profile(tmp_path, "host:\n  sysfs:\n    transparent_hugepage: never\n    workqueue_cpumask: \"0\"\n"
                                 "    cpufreq_governor: {cpus: \"1\", value: performance}\n")
    plan = {o.id: o for o in engine.apply("u1", profile, dry_run=True).outcomes}
    assert plan["host.sysfs.cpufreq_governor"].status == "skipped"
    assert "no /sys/devices/system/cpu/cpu1/cpufreq/scaling_governor" in plan["host.sysfs.cpufreq_governor"].reason
    assert plan["host.sysfs.transparent_hugepage"].status == "planned"

    result = {o.id: o for o in engine.apply("u1", profile).outcomes}
    assert result["host.sysfs.cpufreq_governor"].status == "skipped"
    for cid, path, written, entry in (
            ("host.sysfs.transparent_hugepage", THP, b"never\n", f"w {THP} - - - - never\n"),
            ("host.sysfs.workqueue_cpumask", WQ, b"1\n", f"w {WQ} - - - - 1\n")):
        o = result[cid]
        assert o.status in ("kept", "rolled_back"), o
        tmpfiles = f"/etc/tmpfiles.d/90-rt-tune-sysfs-{cid.split('.')[-1]}.conf"
        if o.status == "kept":
            assert unit.files[path] == written
            assert unit.files[tmpfiles].decode().endswith(entry)
        else:
            assert unit.files[path] == original[path] and tmpfiles not in unit.files
    kept = [cid for cid, o in result.items() if o.status == "kept"]
    assert sorted(engine.rollback("u1")) == sorted(kept)
    # the values before written back (a choice file's selected word; the fake keeps what is written), the
    # tmpfiles.d entries gone
    left = {p: c for p, c in unit.files.items() if not p.startswith("/var/lib/rt-tune")}
    assert left == {THP: b"madvise\n" if "host.sysfs.transparent_hugepage" in kept else original[THP],
                    WQ: b"3\n" if "host.sysfs.workqueue_cpumask" in kept else original[WQ]}


def test_services_enable_resolves_and_a_unit_both_enabled_and_disabled_is_refused(tmp_path):
    path = _profile(tmp_path, "host:\n  services:\n    enable: [stalld]\n    start: false\n")
    [spec] = resolve(load_profile(path), "u", _unit(4))
    assert (spec.id, spec.kind, spec.params) == ("host.service.stalld.service", "service_enable",
                                                 {"unit": "stalld.service", "start": False})
    both = _profile(tmp_path, "host:\n  services:\n    disable: [stalld]\n    enable: [stalld.service]\n")
    with pytest.raises(InputError, match=r"p.yaml:5: host.services.enable.0: change host.service.stalld.service "
                                         r"is listed twice"):
        resolve(load_profile(both), "u", _unit(4))
    bad = _profile(tmp_path, "host:\n  services:\n    enable: [dev-sda.swap]\n")
    with pytest.raises(InputError, match="p.yaml:4: host.services.enable.0"):
        resolve(load_profile(bad), "u", _unit(4))


@pytest.mark.parametrize("body, message", [
    ("host:\n  sysctl:\n    kernel.sched_rt_runtime_us: -1\n",
     "p.yaml:4: host.sysctl.kernel.sched_rt_runtime_us: -1 turns RT throttling off"),
    ("host:\n  sysctl:\n    kernel.nmi_watchdog: 2\n", "p.yaml:4: host.sysctl.kernel.nmi_watchdog: expected 0 or 1"),
    ("host:\n  sysctl:\n    vm.stat_interval: 0\n", "expected an integer in 1..3600 (got '0')"),
    ("host:\n  sysctl:\n    kernel.sched_rt_runtime_us: 95%\n", "expected an integer (got '95%')"),
    ("host:\n  sysctl:\n    kernel.watchdog_cpumask: \"0-5\"\n", "outside the unit's host CPUs 0-3"),
    ("host:\n  acknowledge: [yolo]\n", "p.yaml:3: host.acknowledge.0: not an acknowledgement rt-tune knows"),
])
def test_typed_sysctls_refuse_costly_mistakes_with_file_line_and_key(tmp_path, body, message):
    with pytest.raises(InputError) as exc:
        resolve(load_profile(_profile(tmp_path, body)), "u", _unit(4))
    assert message in str(exc.value), str(exc.value)


@pytest.mark.parametrize("extra", ["  acknowledge: [rt_throttling_off]\n", "  services: {enable: [stalld]}\n"])
def test_rt_throttling_off_with_stalld_or_an_acknowledgement(tmp_path, extra):
    body = "host:\n" + extra + "  sysctl:\n    kernel.sched_rt_runtime_us: -1\n    kernel.watchdog_cpumask: 0\n"
    specs = {s.id: s.params for s in resolve(load_profile(_profile(tmp_path, body)), "u", _unit(4))}
    assert specs["host.sysctl.kernel.sched_rt_runtime_us"] == {"name": "kernel.sched_rt_runtime_us", "value": "-1"}
    assert specs["host.sysctl.kernel.watchdog_cpumask"]["value"] == "0"


# ---- kthreads ---------------------------------------------------------------------------------------------------
KTHREADS_RECORDED = REPO / "tests" / "recorded" / "kthreads" / "controller-6.18.txt"


def test_kernel_threads_parsed_from_a_real_read():
    threads = {k.comm: k for k in parse_kthreads(KTHREADS_RECORDED.read_text())}
    assert threads["kthreadd"].pid == 2 and threads["kthreadd"].movable
    assert threads["ksoftirqd/0"].cpus == "0" and not threads["ksoftirqd/0"].movable  # per-CPU: PF_NO_SETAFFINITY
    assert threads["rcu_preempt"].movable and threads["rcu_preempt"].policy == "other"
    assert all(k.comm not in ("systemd", "sshd", "init") for k in threads.values())  # user processes left out
    with pytest.raises(ParseError, match="@@ stat"):
        parse_kthreads("no separator\n")


def test_kthreads_rules_plan_per_thread_later_rules_win_and_per_cpu_threads_keep_their_cpu():
    before = {"threads": {str(k.pid): k.model_dump() for k in parse_kthreads(KTHREADS_RECORDED.read_text())},
              "unit": None, "script": None, "enabled": False}
    change = KthreadsChange([KthreadRule("ksoftirqd/*", "fifo", 2, (0,)), KthreadRule("rcu_preempt", cpus=(0,)),
                             KthreadRule("ksoftirqd/1", "fifo", 3), KthreadRule("rcuc/*", "fifo", 4)])
    want = change.desired(before)["threads"]
    by_comm = {before["threads"][pid]["comm"]: w for pid, w in want.items()}
    assert by_comm["ksoftirqd/0"] == {"policy": "fifo", "priority": 2}  # per-CPU: no "cpus"
    assert by_comm["ksoftirqd/1"] == {"policy": "fifo", "priority": 3}  # the later rule wins
    assert by_comm["rcu_preempt"] == {"cpus": "0"}
    assert change.unmatched(before) == ["rcuc/*"]  # reported in the plan, not an error
    assert not change.in_place(before, change.desired(before))
    script = change._script_bytes().decode()
    assert "apply 'ksoftirqd/*' fifo 2 0\n" in script and "apply 'rcu_preempt' - 0 0\n" in script


def test_kthreads_switch_between_runs_is_one_command_for_the_threads_read_before_each_checked_by_name():
    """On: each matched thread gets what its rules say; off: what it had before; every PID goes with its name (the
    script skips a PID another thread now holds). The boot unit stays (it acts at the next boot)."""
    threads = {str(k.pid): k.model_dump() for k in parse_kthreads(KTHREADS_RECORDED.read_text())}
    before = {"threads": threads, "unit": None, "script": None, "enabled": False}
    change = KthreadsChange([KthreadRule("ksoftirqd/*", "fifo", 2), KthreadRule("rcu_preempt", cpus=(0,))])
    assert change.switch_keeps_persistence

    def quintuples(command):
        assert command[:2] == ("sh", "-c") and command[3] == "-"
        args = command[4:]
        return {args[i + 1]: (args[i], *args[i + 2:i + 5]) for i in range(0, len(args), 5)}

    on, off = quintuples(change.switch_command(before, True)), quintuples(change.switch_command(before, False))
    soft0 = next(pid for pid, k in threads.items() if k["comm"] == "ksoftirqd/0")
    assert on["ksoftirqd/0"] == (soft0, "fifo", "2", "-") and on["rcu_preempt"][1:] == ("-", "0", "0")
    assert off["ksoftirqd/0"] == (soft0, threads[soft0]["policy"], str(threads[soft0]["priority"]), "-")
    assert set(on) == set(off) == {k["comm"] for k in threads.values()
                                   if k["comm"].startswith("ksoftirqd/") or k["comm"] == "rcu_preempt"}
    assert KthreadsChange([KthreadRule("rcuc/*", "fifo", 4)]).switch_command(before, True) == ()  # none here


@pytest.mark.parametrize("rule, message", [
    ({"match": "ksoftirqd/*", "policy": "fifo"}, "need a priority"),
    ({"match": "ksoftirqd/*", "policy": "fifo", "priority": 100}, "expected 1..99"),
    ({"match": "ksoftirqd/*", "policy": "deadline", "priority": 1}, "expected fifo, rr or other"),
    ({"match": "k'; rm -rf /", "policy": "other"}, "a thread name pattern"),
    ({"match": "ksoftirqd/*"}, "set a policy, CPUs or both"),
])
def test_a_bad_kthreads_rule_is_refused_with_file_line_and_key(tmp_path, rule, message):
    body = "host:\n  kthreads:\n    - " + json.dumps(rule) + "\n"
    with pytest.raises(InputError) as exc:
        resolve(load_profile(_profile(tmp_path, body)), "u", _unit(4))
    assert "p.yaml:4: host.kthreads.0: " in str(exc.value) and message in str(exc.value), str(exc.value)


def test_kthreads_rules_resolve_to_one_change_with_cpus_checked(tmp_path):
    body = ('host:\n  kthreads:\n    - {match: "ksoftirqd/*", policy: fifo, priority: 2}\n'
            '    - {match: "kcompactd*", cpus: "0"}\n')
    [spec] = resolve(load_profile(_profile(tmp_path, body)), "u", _unit(4))
    assert (spec.id, spec.kind) == ("host.kthreads", "kthreads")
    assert spec.params["rules"][1] == {"match": "kcompactd*", "policy": None, "priority": None, "cpus": [0]}
    wide = body.replace('cpus: "0"', 'cpus: "0-7"')
    with pytest.raises(InputError, match="host.kthreads.1.cpus: CPUs 4-7 outside"):
        resolve(load_profile(_profile(tmp_path, wide)), "u", _unit(4))


def test_kthreads_are_held_and_restored_by_name_because_pids_change_with_the_boot():
    threads = {str(k.pid): k.model_dump() for k in parse_kthreads(KTHREADS_RECORDED.read_text())}
    change = KthreadsChange([KthreadRule("ksoftirqd/*", "fifo", 2), KthreadRule("rcu_preempt", cpus=(0,))])
    before = {"threads": threads, "unit": None, "script": None, "enabled": False}
    desired = change.desired(before)
    # the next boot: the same threads under other PIDs, set by rt-tune's boot unit
    rebooted = {str(int(pid) + 1000): dict(k, pid=int(pid) + 1000) for pid, k in threads.items()}
    for k in rebooted.values():
        if k["comm"].startswith("ksoftirqd/"):
            k.update(policy="fifo", priority=2)
        if k["comm"] == "rcu_preempt":
            k["cpus"] = "0"
    live = {"threads": rebooted, **{key: desired[key] for key in ("unit", "script", "enabled")}}
    assert change.in_place(live, desired)
    back = change._as_before(rebooted, before)
    soft = next(pid for pid, k in rebooted.items() if k["comm"] == "ksoftirqd/0")
    rcu = next(pid for pid, k in rebooted.items() if k["comm"] == "rcu_preempt")
    assert back[soft] == {"policy": "other", "priority": 0} and back[rcu] == {"cpus": "0-1"}
    rebooted[soft]["priority"] = 1  # someone changed one thread: no longer in place
    assert not change.in_place(live, desired)


# ---- irqbalance ---------------------------------------------------------------------------------------------------
def test_irqbalance_resolves_and_refuses_what_would_leave_it_on_the_rt_cpus(tmp_path):
    ok = _profile(tmp_path, 'host:\n  irqbalance: {housekeeping: "0", banned: "1-3"}\n')
    [spec] = resolve(load_profile(ok), "u", _unit(4))
    assert (spec.id, spec.kind, spec.params) == ("host.irqbalance", "irqbalance",
                                                 {"housekeeping": [0], "rt": [1, 2, 3], "stop": False})
    for body, message in (('host:\n  irqbalance: {housekeeping: "0"}\n', "host.irqbalance: name the RT CPUs"),
                          ('host:\n  irqbalance: {housekeeping: "0-1", banned: "1-3"}\n',
                           "host.irqbalance.banned: CPUs 1 are both banned and housekeeping")):
        with pytest.raises(InputError, match=message):
            resolve(load_profile(_profile(tmp_path, body)), "u", _unit(4))
    stop = _profile(tmp_path, 'host:\n  irqbalance: {housekeeping: "0", stop: true}\n')
    assert resolve(load_profile(stop), "u", _unit(4))[0].params == {"housekeeping": [0], "rt": [], "stop": True}


def test_irqbalance_plans_the_default_affinity_and_the_ban_where_irqbalance_exists():
    change = IrqbalanceChange([0], [1, 2, 3])
    with_it = {"default_affinity": "f", "dropin": None, "tmpfiles": None,
               "service": {"load": "loaded", "file_state": "enabled", "active": "active"}}
    want = change.desired(with_it)
    assert want["default_affinity"] == "1" and "IRQBALANCE_BANNED_CPULIST=1-3" in unb64(want["dropin"]).decode()
    assert not change.in_place(with_it, want)
    without = dict(with_it, service={"load": "not-found", "file_state": "", "active": "inactive"})
    assert "dropin" not in change.desired(without)  # no irqbalance: only the default affinity
    assert change.in_place(dict(without, default_affinity="00000001",
                                tmpfiles=change.desired(without)["tmpfiles"]), change.desired(without))
    assert change.not_applicable(dict(without, default_affinity=None)) == "this unit has no " \
                                                                          "/proc/irq/default_smp_affinity"


def test_irqbalance_switches_by_its_mask_alone_unless_irqbalance_runs_or_is_to_be_stopped():
    """Between measurement runs the default mask is what acts where irqbalance is not running: one write, no
    daemon-reload (3 s on the TCG lab guest, five times a change); a running one restarts with or without its ban."""
    from orchestrator.remote.fake import FakeTransport, FakeUnit

    change = IrqbalanceChange([0], [1])
    idle = {"default_affinity": "3", "dropin": None, "tmpfiles": None,
            "service": {"load": "loaded", "file_state": "disabled", "active": "inactive"}}
    assert change.switch_keeps_persistence  # the drop-in and tmpfiles entry stay until keep or undo
    assert change.switch_command(idle, True)[-2:] == ("/proc/irq/default_smp_affinity", "1")
    assert change.switch_command(idle, False)[-2:] == ("/proc/irq/default_smp_affinity", "3")
    running = dict(idle, service={"load": "loaded", "file_state": "enabled", "active": "active"})
    assert change.switch_command(running, True) is None and IrqbalanceChange([0], [1], stop=True) \
        .switch_command(idle, True) is None
    unit = FakeUnit(files={"/proc/irq/default_smp_affinity": b"3\n"})
    t = FakeTransport(unit, "u1.guest")
    change.switch(t, idle, True)
    assert len(unit.log) == 1 and unit.files["/proc/irq/default_smp_affinity"] == b"1\n"
    change.switch(t, idle, False)
    assert unit.files["/proc/irq/default_smp_affinity"] == b"3\n"


def test_a_kthreads_pattern_matching_nothing_is_named_in_the_plan_not_an_error():
    before = {"threads": {str(k.pid): k.model_dump() for k in parse_kthreads(KTHREADS_RECORDED.read_text())},
              "unit": None, "script": None, "enabled": False}
    plan = KthreadsChange([KthreadRule("rcuc/*", "fifo", 4), KthreadRule("ksoftirqd/*", "fifo", 2)]).plan_from(before)
    assert plan.summary.endswith("(no thread here matches rcuc/*)") and not plan.noop


# ---- hugepages ------------------------------------------------------------------------------------------------------
def test_hugepage_arguments_and_nr_hugepages_are_typed(tmp_path):
    good = _profile(tmp_path, "host:\n  cmdline: {default_hugepagesz: 2M, hugepagesz: 1G, hugepages: 4}\n"
                              "  sysctl: {vm.nr_hugepages: 16}\n")
    assert len(resolve(load_profile(good), "u", _unit(4))) == 2
    for body, message in (("host:\n  cmdline: {hugepagesz: 2MB}\n",
                           "host.cmdline.hugepagesz: expected a hugepage size"),
                          ("host:\n  cmdline: {hugepages: lots}\n", "expected a number of hugepages"),
                          ("host:\n  sysctl: {vm.nr_hugepages: -1}\n", "expected an integer in 0..")):
        with pytest.raises(InputError, match=message):
            resolve(load_profile(_profile(tmp_path, body)), "u", _unit(4))


def test_nr_hugepages_that_do_not_fit_in_available_memory_are_refused_before_anything_is_written():
    meminfo = (RECORDED / "meminfo.txt").read_text()
    info = parse_meminfo(meminfo)
    fits = info["MemAvailable"] // info["Hugepagesize"] // 2
    too_many = info["MemAvailable"] // info["Hugepagesize"] + 10
    unit = FakeUnit(files={"/proc/meminfo": meminfo.encode(), "/proc/sys/vm/nr_hugepages": b"0\n"})
    t = FakeTransport(unit)
    with pytest.raises(ChangeError, match=r"vm.nr_hugepages 0 -> \d+ needs \d+ MiB more; the unit has \d+ MiB"):
        big = SysctlChange("vm.nr_hugepages", str(too_many))
        big.apply_and_read(t, big.read(t))
    assert unit.files["/proc/sys/vm/nr_hugepages"] == b"0\n" and not any("sysctl.d" in p for p in unit.files)
    ok = SysctlChange("vm.nr_hugepages", str(fits))
    assert ok.apply_and_read(t, ok.read(t))["value"] == str(fits)
