"""The sysfs and service_enable change kinds (issue #20): the knobs' values read as kernels print them (recorded), the
`sysfs:` section resolved or refused with file and line, and the change through the engine on the fake unit:
applied, persisted in a tmpfiles.d entry, a knob the unit lacks skipped, rolled back byte for byte."""

from __future__ import annotations

import pytest

from orchestrator.changes.sysfs import SysfsChange
from orchestrator.config.inventory import Inventory
from orchestrator.config.knobs import KNOBS, cpumask_of, cpus_of_mask, selected_choice
from orchestrator.config.playbook import load_measurement_plan
from orchestrator.config.profile import load_profile, resolve
from orchestrator.core.errors import InputError
from orchestrator.journal.journal import Journal
from orchestrator.remote.fake import FakeTransport, FakeUnit
from orchestrator.run.engine import Engine
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
    engine = Engine(inventory=inv, journal=journal, plan=load_measurement_plan(REPO / "tests" / "lab" /
                                                                               "playbook-fast.yaml"),
                    artifacts=tmp_path / "artifacts", connect=lambda inv, name, target: FakeTransport(unit, name))
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
