"""Health checks as testinfra tests (issue #19), against a REAL sshd on this machine (tests/sshd.py): the shipped
checks read back what a promise says, a user's check file gets the testinfra `host` and the variables, a check
cannot write (a read-only mount namespace), a hanging check is stopped and counts as failed, and bad check files
are input errors before anything connects."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.checks.backend import _ENTER, RtTuneBackend
from orchestrator.checks.promises import IrqPromise, SysfsPromise, TargetPromise, promises
from orchestrator.checks.runner import PROCESS_GRACE_S, check_files, run_checks
from orchestrator.config.inventory import Inventory
from orchestrator.core.cpulist import cpus_of_mask
from orchestrator.core.cpulist import parse_kernel_cpulist as parse_cpulist
from orchestrator.core.errors import InputError
from orchestrator.journal.journal import Journal
from orchestrator.remote.ssh import SSHTransport
from orchestrator.run.checks import check_units
from tests.sshd import Sshd, sshd_server

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def sshd(tmp_path_factory) -> Iterator[Sshd]:
    with sshd_server(tmp_path_factory.mktemp("checks-sshd")) as server:
        yield server


def outcomes(report) -> dict[str, str]:
    return {o.nodeid.split("::", 1)[1]: o.outcome for o in report.outcomes}


def test_shipped_checks_read_back_the_promise_and_name_what_drifted(sshd, tmp_path):
    arg = Path("/proc/cmdline").read_text().split()[0]
    value = Path("/proc/sys/kernel/timer_migration").read_text().strip()
    promise = TargetPromise(target="host", cmdline={arg.split("=", 1)[0]: arg.split("=", 1)[1] if "=" in arg else None,
                                                    "rt_tune_not_booted": "1"},
                            sysctl={"kernel.timer_migration": value, "vm.swappiness": "-7"})
    junit = tmp_path / "junit.xml"
    report = run_checks("u1", "host", sshd.endpoint(), promise, junit=junit, check_timeout_s=30)
    seen = outcomes(report)
    assert seen[f"test_cmdline_argument[{arg}]"] == "passed", report
    assert seen["test_cmdline_argument[rt_tune_not_booted=1]"] == "failed"
    assert seen["test_sysctl[kernel.timer_migration]"] == "passed"
    assert seen["test_sysctl[vm.swappiness]"] == "failed"
    [swap] = [o for o in report.outcomes if "vm.swappiness" in o.nodeid]
    assert "not '-7'" in swap.message and swap.shipped
    assert not report.ok and report.error == "" and report.counts()["failed"] == 2
    xml = junit.read_text()
    assert 'failures="2"' in xml and "rt_tune_not_booted" in xml


def _irq_and_cpus() -> tuple[str, str]:
    for d in sorted(Path("/proc/irq").glob("[0-9]*"), key=lambda p: int(p.name)):
        try:
            return d.name, (d / "smp_affinity_list").read_text().strip()
        except OSError:
            continue
    pytest.skip("no readable /proc/irq/N/smp_affinity_list on this machine")


def test_the_irq_check_passes_on_housekeeping_or_earlier_cpus_and_names_an_irq_moved_elsewhere(sshd):
    irq, cpus = _irq_and_cpus()  # this machine's, read back over SSH by the check
    live = parse_cpulist(cpus)
    other = sorted(set(range(max(live) + 2)) - set(live))[:1]  # a CPU list the IRQ is not on
    cases = {"housekeeping": IrqPromise(housekeeping=live, moved={irq: "0"}),
             "earlier": IrqPromise(housekeeping=other, moved={irq: cpus}),
             "elsewhere": IrqPromise(housekeeping=other, moved={irq: ",".join(map(str, other))})}
    results = {}
    for name, promise in cases.items():
        report = run_checks("u1", "host", sshd.endpoint(), TargetPromise(target="host", irq_affinity=promise),
                            check_timeout_s=30)
        results[name] = outcomes(report)["test_irqs_on_the_housekeeping_cpus"], report
    assert results["housekeeping"][0] == "passed" and results["earlier"][0] == "passed", results
    assert results["elsewhere"][0] == "failed"
    [msg] = [o.message for o in results["elsewhere"][1].outcomes if "housekeeping_cpus" in o.nodeid]
    assert f"IRQ {irq} on {cpus}" in msg and "by someone else" in msg
    # this machine has no rt-tune boot unit: the other IRQ check fails, naming it
    [unit] = [o for o in results["housekeeping"][1].outcomes if "boot_unit_enabled" in o.nodeid]
    assert unit.outcome == "failed" and "rt-tune-irq-affinity.service" in unit.message


def test_the_sysfs_check_reads_each_knob_in_its_own_terms(sshd):
    thp, wq = "/sys/kernel/mm/transparent_hugepage/enabled", "/sys/devices/virtual/workqueue/cpumask"
    if not (Path(thp).exists() and Path(wq).exists()):
        pytest.skip("this machine's kernel has no THP or workqueue cpumask")
    selected = Path(thp).read_text().split("[")[1].split("]")[0]  # "always [madvise] never" -> madvise
    mask = Path(wq).read_text().strip()
    other = "never" if selected != "never" else "always"
    promise = TargetPromise(target="host", sysfs=[
        SysfsPromise(knob="transparent_hugepage", values={thp: selected}),
        SysfsPromise(knob="workqueue_cpumask", values={wq: "0" * 7 + mask}),  # leading zeros: the same CPUs
        SysfsPromise(knob="transparent_hugepage_defrag", values={"/sys/kernel/mm/transparent_hugepage/defrag":
                                                                 "no-such-word"})])
    seen = outcomes(run_checks("u1", "host", sshd.endpoint(), promise, check_timeout_s=30))
    assert seen["test_sysfs_knob[transparent_hugepage]"] == "passed"
    assert seen["test_sysfs_knob[workqueue_cpumask]"] == "passed"
    assert seen["test_sysfs_knob[transparent_hugepage_defrag]"] == "failed"
    report = run_checks("u1", "host", sshd.endpoint(), TargetPromise(target="host", sysfs=[
        SysfsPromise(knob="transparent_hugepage", values={thp: other})]), check_timeout_s=30)
    [o] = [o for o in report.outcomes if "test_sysfs_knob" in o.nodeid]
    assert o.outcome == "failed" and thp in o.message and repr(other) in o.message


def test_the_kthreads_check_reads_this_machines_kernel_threads_by_name(sshd):
    holds = TargetPromise(target="host", kthreads=[{"match": "ksoftirqd/*", "policy": "other", "priority": None,
                                                    "cpus": None}])
    seen = outcomes(run_checks("u1", "host", sshd.endpoint(), holds, check_timeout_s=30))
    assert seen["test_kernel_threads_as_the_rules_say"] == "passed"
    broken = TargetPromise(target="host", kthreads=[{"match": "ksoftirqd/*", "policy": "fifo", "priority": 2,
                                                     "cpus": None}])
    report = run_checks("u1", "host", sshd.endpoint(), broken, check_timeout_s=30)
    [o] = [o for o in report.outcomes if "kernel_threads" in o.nodeid]
    assert o.outcome == "failed" and "ksoftirqd/0" in o.message and "not fifo 2" in o.message


def test_promises_are_what_the_kept_records_say(tmp_path):
    journal = Journal(tmp_path / "journal.sqlite")
    try:
        run = journal.begin_run("u1", "p.yaml", controller="test")
        for target, kind, cid, before, desired in (
                ("host", "irq_affinity", "host.irq_affinity",
                 {"irqs": {"24": "0-1", "25": "1", "26": "0-1"}, "fixed": ["25"], "unit": None, "enabled": False},
                 {"params": {"housekeeping": [0]}, "state": {"irqs": {"24": "0", "26": "0"}}}),
                ("guest", "sysctl", "guest.sysctl.kernel.timer_migration", {"value": "1"},
                 {"params": {"name": "kernel.timer_migration", "value": "0"}, "state": {}}),
                ("guest", "cmdline", "guest.cmdline", {}, {"params": {"add": {"nohz_full": "1", "quiet": None}}}),
                ("host", "sysfs", "host.sysfs.workqueue_cpumask", {"values": {"/sys/x/cpumask": "3\n"}},
                 {"params": {"knob": "workqueue_cpumask", "value": "0"},
                  "state": {"values": {"/sys/x/cpumask": "1"}}})):
            rec = journal.record_intent(run, "u1", target, cid, kind, before=before, desired=desired)
            for state in ("applied", "verified", "kept"):
                journal.mark(rec, state)
        got = promises(journal.active_changes("u1"))
    finally:
        journal.close()
    assert got["host"].irq_affinity == IrqPromise(housekeeping=[0], moved={"24": "0-1", "26": "0-1"})
    assert got["guest"].sysctl == {"kernel.timer_migration": "0"}
    assert got["host"].sysfs == [SysfsPromise(knob="workqueue_cpumask", values={"/sys/x/cpumask": "1"})]
    assert got["guest"].cmdline == {"nohz_full": "1", "quiet": None} and got["guest"].irq_affinity is None


def test_a_users_check_gets_host_and_vars_cannot_write_and_is_stopped_when_it_hangs(sshd, tmp_path):
    user = tmp_path / "test_robot.py"
    user.write_text(
        "import pytest\n"
        "def test_hostname_file(host, rt_vars, rt_target):\n"
        "    assert host.file('/proc/sys/kernel/hostname').exists and rt_vars['robot'] == 'r2d2'\n"
        "    assert rt_target == 'host' and host.backend.get_connection_type() == 'paramiko'\n"
        "def test_write_is_refused(host):\n"
        "    r = host.run('touch /etc/rt-tune-check-wrote-this')\n"
        "    assert r.rc == 0, r.stderr\n"
        "def test_sysctl_write_is_refused(host):\n"
        "    r = host.run('echo 0 > /proc/sys/kernel/timer_migration')\n"
        "    assert r.rc == 0, r.stderr\n"
        "def test_hangs(host):\n"
        "    host.run('sleep 600')\n")
    check_files([user], "profile.yaml")
    report = run_checks("u1", "host", sshd.endpoint(), TargetPromise(target="host"), user_files=[user],
                        variables={"robot": "r2d2"}, check_timeout_s=8, shipped=False)
    seen = outcomes(report)
    assert seen["test_hostname_file"] == "passed", report
    assert report.read_only is True and "NOT read-only" not in report.summary()
    assert seen["test_write_is_refused"] == "failed" and not Path("/etc/rt-tune-check-wrote-this").exists()
    assert "Read-only file system" in next(o.message for o in report.outcomes if "write_is" in o.nodeid)
    assert seen["test_sysctl_write_is_refused"] == "failed"
    assert seen["test_hangs"] == "failed"
    assert "Timeout" in next(o.message for o in report.outcomes if "hangs" in o.nodeid)
    assert _sleepers(f"{8 * 50 + PROCESS_GRACE_S:.0f}") == []  # the read-only namespace's holder is gone


def _sleepers(seconds: str) -> list[int]:
    """PIDs of `sleep SECONDS` processes on this machine."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", seconds.encode()]:
                found.append(int(pid))
        except OSError:
            pass
    return found


def test_one_read_only_namespace_per_run_entered_by_each_command_and_ended_by_close(sshd):
    with SSHTransport(sshd.endpoint()) as t:
        backend = RtTuneBackend(t, lifetime_s=777)
        assert backend.read_only and backend.holder is not None
        assert _sleepers("777") == [backend.holder]
        ns = os.readlink(f"/proc/{backend.holder}/ns/mnt")
        assert ns != os.readlink("/proc/self/ns/mnt")
        first = backend.run("readlink /proc/self/ns/mnt")
        assert first.stdout.strip() == ns == backend.run("readlink /proc/self/ns/mnt").stdout.strip()
        wrote = backend.run("touch /etc/rt-tune-check-wrote-this")
        assert wrote.rc != 0 and "Read-only file system" in wrote.stderr
        holder = backend.holder
        backend.close()
        assert backend.holder is None and _sleepers("777") == []
        for _ in range(100):  # killed; its parent (init or a subreaper) reaps it
            if not Path(f"/proc/{holder}").exists():
                break
            time.sleep(0.02)
        assert not Path(f"/proc/{holder}").exists()


def test_a_command_is_never_run_in_a_namespace_that_can_be_written():
    """What each command checks after entering: the holder's PID, reused by a process of the normal (writable)
    mount namespace, is refused."""
    proc = subprocess.run(["nsenter", "-t", str(os.getpid()), "-m", "sh", "-c", _ENTER, "echo ran"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 125 and proc.stdout == "" and "read-only namespace is gone" in proc.stderr


def test_check_units_reports_every_target_in_order_while_runs_overlap(sshd, tmp_path):
    inv = Inventory.model_validate({"units": {
        name: {"host": {"address": "127.0.0.1", "port": port, "key": str(sshd.client_key),
                        "known_hosts": str(sshd.known_hosts)}}
        for name, port in (("down", 1), ("up", sshd.port), ("up2", sshd.port))}})
    journal = Journal(tmp_path / "journal.sqlite")
    try:
        seen: list[str] = []
        reports = check_units(inv, journal, ["down", "up", "up2"], None, check_timeout_s=20,
                              on_report=lambda r: seen.append(r.unit))
    finally:
        journal.close()
    assert [r.unit for r in reports] == ["down", "up", "up2"] and sorted(seen) == ["down", "up", "up2"]
    assert not reports[0].ok and (reports[0].error or reports[0].failed)  # the unreachable one, in its place
    assert reports[1].ok and reports[2].ok and reports[1].read_only is True


@pytest.mark.parametrize("body, message", [
    (None, "does not exist"),
    ("import no_such_module_rt_tune\ndef test_x():\n    pass\n", "do not load"),
    ("def helper():\n    pass\n", "defines no test"),
    ("def test_x(:\n", "do not load"),
])
def test_bad_check_files_are_input_errors_before_anything_connects(tmp_path, body, message):
    f = tmp_path / "test_bad.py"
    if body is not None:
        f.write_text(body)
    with pytest.raises(InputError) as exc:
        check_files([f], "profile.yaml:7")
    assert str(exc.value).startswith("profile.yaml:7: ") and message in str(exc.value), str(exc.value)


def test_a_target_that_cannot_be_reached_is_a_run_error_not_a_pass(sshd, tmp_path):
    bad = sshd.endpoint(port=1)
    report = run_checks("u1", "host", bad, TargetPromise(target="host", sysctl={"kernel.timer_migration": "1"}),
                        check_timeout_s=20)
    assert not report.ok and (report.failed or report.error)


def _cli_setup(sshd: Sshd, d: Path, check_body: str) -> tuple[dict, Path]:
    import os

    (d / "inventory.yaml").write_text(
        f"units:\n  u1:\n    host: {{address: 127.0.0.1, port: {sshd.port}, key: {sshd.client_key}, "
        f"known_hosts: {sshd.known_hosts}}}\n    vars: {{robot: r2d2}}\n")
    (d / "checks").mkdir()
    (d / "checks" / "test_robot.py").write_text(check_body)
    (d / "profile.yaml").write_text("name: with-checks\nhost:\n  checks:\n    - checks/test_robot.py\n")
    env = {"HOME": str(d), "RT_TUNE_STATE": str(d / "state"), "PATH": os.environ["PATH"],
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return env, d / "inventory.yaml"


def _tune(env: dict, d: Path, *args: str):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "orchestrator", *args], env=env, cwd=d, capture_output=True,
                          text=True, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_tune_check_runs_the_profiles_checks_writes_junit_and_exits_12_on_a_failure(sshd, tmp_path):
    import json

    env, inv = _cli_setup(sshd, tmp_path, "def test_robot_named(host, rt_vars):\n"
                                          "    assert rt_vars['robot'] == 'r2d2'\n"
                                          "    assert host.file('/proc/self/status').exists\n")
    ok = _tune(env, tmp_path, "check", "u1", "-i", str(inv), "--profile", "profile.yaml", "--json",
               "--junit", "out/junit.xml")
    assert ok.returncode == 0, ok.stderr
    [report] = json.loads(ok.stdout)["reports"]
    assert report["ok"] and report["counts"]["passed"] >= 1
    assert any(o["nodeid"].endswith("test_robot_named") and o["outcome"] == "passed" for o in report["outcomes"])
    assert "<testsuites" in (tmp_path / "out" / "junit.xml").read_text()

    (tmp_path / "checks" / "test_robot.py").write_text("def test_robot_named(rt_vars):\n"
                                                       "    assert rt_vars['robot'] == 'c3po'\n")
    bad = _tune(env, tmp_path, "check", "--all", "-i", str(inv), "--profile", "profile.yaml",
                "--junit", "out/junit.xml")
    assert bad.returncode == 12, bad.stderr
    assert "test_robot_named" in bad.stdout and "failed" in bad.stdout
    assert 'failures="1"' in (tmp_path / "out" / "junit.xml").read_text()

    (tmp_path / "profile.yaml").write_text("name: with-checks\nhost:\n  checks:\n    - checks/test_missing.py\n")
    missing = _tune(env, tmp_path, "check", "u1", "-i", str(inv), "--profile", "profile.yaml")
    assert missing.returncode == 2 and "profile.yaml:4" in missing.stderr and "does not exist" in missing.stderr
    usage = _tune(env, tmp_path, "check", "-i", str(inv))
    assert usage.returncode == 2 and "name one UNIT or --all" in usage.stderr


@pytest.mark.parametrize("entry, message", [
    ('""', "a check file is the path of a Python file"),
    ('"test_a\\u0000b.py"', "without control characters"),
    ("notes.txt", "a check file is the path of a Python file"),
    ("[test_a.py]", "Input should be a valid string"),
    ("checks_dir.py", "does not exist"),
])
def test_bad_check_entries_in_a_profile_name_file_and_line(tmp_path, entry, message):
    from orchestrator.config.profile import load_profile

    (tmp_path / "checks_dir.py").mkdir()
    p = tmp_path / "profile.yaml"
    p.write_text(f"name: x\nguest:\n  checks:\n    - {entry}\n")
    with pytest.raises(InputError) as exc:
        load_profile(p)
    assert f"{p}:4" in str(exc.value) and message in str(exc.value), str(exc.value)


def test_an_unwritable_junit_path_is_refused_before_anything_runs(tmp_path):
    env = {"HOME": str(tmp_path), "RT_TUNE_STATE": str(tmp_path / "state"), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    (tmp_path / "a-dir").mkdir()
    for junit, message in ((str(tmp_path / "a-dir"), "is a directory"), ("/proc/rt-tune.xml", "cannot write it")):
        proc = _tune(env, tmp_path, "check", "u1", "--junit", junit)
        assert proc.returncode == 2 and message in proc.stderr and junit in proc.stderr, proc.stderr


def test_the_irqbalance_check_reads_the_default_affinity_of_this_machine(sshd):
    mask = Path("/proc/irq/default_smp_affinity").read_text().strip()
    cpus = cpus_of_mask(mask) or []
    good = TargetPromise(target="host", irqbalance={"housekeeping": cpus, "rt": [], "stop": False})
    assert outcomes(run_checks("u1", "host", sshd.endpoint(), good, check_timeout_s=30))[
        "test_irqbalance_off_the_rt_cpus_and_new_irqs_on_housekeeping"] == "passed"
    bad = TargetPromise(target="host", irqbalance={"housekeeping": [max(cpus) + 1], "rt": [], "stop": False})
    report = run_checks("u1", "host", sshd.endpoint(), bad, check_timeout_s=30)
    [o] = [o for o in report.outcomes if "irqbalance" in o.nodeid]
    assert o.outcome == "failed" and f"is {mask}" in o.message
