"""Each runtime change on the real lab VMs: plan -> apply -> verify -> no-op when in place -> rollback restores
the exact previous state (files byte for byte)."""

from __future__ import annotations

import dataclasses
import time

import pytest

from orchestrator.changes.base import ChangeError
from orchestrator.changes.irq_affinity import IrqAffinityChange
from orchestrator.changes.irqbalance import IrqbalanceChange
from orchestrator.changes.kthreads import KthreadRule, KthreadsChange
from orchestrator.changes.service import ServiceDisableChange, ServiceEnableChange
from orchestrator.changes.sysctl import SysctlChange
from orchestrator.changes.sysfs import SysfsChange
from orchestrator.changes.vcpu_pinning import VcpuPinningChange
from orchestrator.config.knobs import KNOBS
from orchestrator.core.cpulist import format_cpulist, parse_kernel_cpulist
from orchestrator.remote.transport import read_optional
from tests.qemu_threads import assert_vcpu_map, qemu_threads

pytestmark = pytest.mark.lab


def _round_trip(t, change):
    plan = change.plan(t)
    assert not plan.noop, plan
    change.apply(t, plan.before)
    change.verify(t, plan)
    assert dataclasses.replace(change).plan(t).noop  # a new run (a fresh object) finds nothing to do
    change.rollback(t, plan.before)
    change.verify_rolled_back(t, plan.before)
    return plan


def test_sysctl_runtime_value_and_owned_dropin(guest):
    change = SysctlChange("kernel.timer_migration", "0")
    plan = change.plan(guest)
    assert plan.before["value"] == "1" and plan.before["dropin"] is None
    change.apply(guest, plan.before)
    change.verify(guest, plan)
    assert guest.read_file("/proc/sys/kernel/timer_migration").strip() == b"0"
    assert b"kernel.timer_migration = 0" in guest.read_file(change.dropin)
    # a measurement toggle switches the runtime value and leaves the drop-in to the decision
    change.switch(guest, plan.before, False)
    assert change.read(guest) == {"value": "1", "dropin": plan.desired["dropin"]}
    change.switch(guest, plan.before, True)
    change.verify(guest, plan)
    change.rollback(guest, plan.before)
    assert change.read(guest) == plan.before
    assert read_optional(guest, change.dropin) is None


def test_sysctl_rollback_restores_a_prior_file_byte_exact(guest):
    change = SysctlChange("kernel.timer_migration", "0")
    odd = b"# someone else's bytes\r\nkernel.timer_migration=1  \n\n"
    guest.write_file(change.dropin, odd)
    try:
        plan = _round_trip(guest, change)
        assert guest.read_file(change.dropin) == odd and plan.before["value"] == "1"
    finally:
        guest.run(["rm", "-f", change.dropin])


def _wait_active(t, change, want: str) -> dict:
    deadline = time.monotonic() + 30
    while (live := change.read(t))["active"] != want and time.monotonic() < deadline:
        time.sleep(1)
    return live


def test_disable_crash_looping_service_and_restore(guest):
    change = ServiceDisableChange("mirobot_teleoperate")
    plan = change.plan(guest)
    assert plan.before == {"load": "loaded", "file_state": "enabled", "active": "active"}
    change.apply(guest, plan.before)
    change.verify(guest, plan)
    assert dataclasses.replace(change).plan(guest).noop
    # a measurement toggle starts and stops the service; it stays disabled until the decision (no reloads)
    assert change.switch_keeps_persistence
    change.switch(guest, plan.before, False)
    assert _wait_active(guest, change, "active") == {"load": "loaded", "file_state": "disabled", "active": "active"}
    change.switch(guest, plan.before, True)
    change.verify(guest, plan)
    change.rollback(guest, plan.before)
    change.verify_rolled_back(guest, plan.before)
    assert _wait_active(guest, change, "active") == plan.before  # running (crash-looping) again, enabled again


def test_enable_and_start_a_service_then_restore(guest):
    """services.enable (e.g. stalld): a disabled unit enabled and started, a fresh plan a no-op, rolled back to
    disabled and stopped; a unit the guest lacks is an error at plan, before anything is touched."""
    unit = "rt-tune-test-enable.service"
    path = f"/etc/systemd/system/{unit}"
    guest.write_file(path, b"[Unit]\nDescription=rt-tune test\n[Service]\nExecStart=/bin/sleep infinity\n"
                           b"[Install]\nWantedBy=multi-user.target\n")
    guest.run(["systemctl", "daemon-reload"])
    try:
        change = ServiceEnableChange(unit)
        plan = change.plan(guest)
        assert plan.before == {"load": "loaded", "file_state": "disabled", "active": "inactive"} and not plan.noop
        change.apply(guest, plan.before)
        change.verify(guest, plan)
        assert guest.run(["systemctl", "is-active", unit]).stdout.strip() == "active"
        assert guest.run(["systemctl", "is-enabled", unit]).stdout.strip() == "enabled"
        assert dataclasses.replace(change).plan(guest).noop
        change.rollback(guest, plan.before)
        change.verify_rolled_back(guest, plan.before)
        assert guest.run(["systemctl", "is-active", unit], check=False).stdout.strip() == "inactive"
        with pytest.raises(ChangeError, match="rt-tune-no-such-unit.service does not exist"):
            ServiceEnableChange("rt-tune-no-such-unit").plan(guest)
    finally:
        guest.run(["sh", "-c", f"systemctl disable --now {unit}; rm -f {path}; systemctl daemon-reload"],
                  check=False)


def test_irqbalance_running_is_banned_from_the_rt_cpus_and_given_back_as_it_was(guest):
    """The lab images have irqbalance (1.9, Debian's), installed but not enabled. Started here, as on a unit
    that runs it: the change's drop-in bans RT CPU 1 (IRQBALANCE_BANNED_CPULIST in the restarted daemon's
    environment) and new IRQs start on CPU 0; rollback restarts it without the ban and removes every file."""
    svc = "irqbalance.service"
    before_mask = guest.read_file("/proc/irq/default_smp_affinity")

    def environ() -> str:
        pid = guest.run(["systemctl", "show", "-p", "MainPID", "--value", svc]).stdout.strip()
        assert pid not in ("", "0"), f"{svc} is not running"
        return guest.read_file(f"/proc/{pid}/environ").decode().replace("\0", "\n")

    guest.run(["systemctl", "start", svc])
    try:
        assert "IRQBALANCE_BANNED_CPULIST" not in environ()
        change = IrqbalanceChange([0], [1])
        plan = change.plan(guest)
        assert plan.before["service"] == {"load": "loaded", "file_state": "disabled", "active": "active"}, plan
        assert plan.before["dropin"] is None and "dropin" in plan.desired and not plan.noop
        change.apply(guest, plan.before)
        change.verify(guest, plan)
        assert "IRQBALANCE_BANNED_CPULIST=1" in environ().splitlines()
        assert guest.run(["cat", "/proc/irq/default_smp_affinity"]).stdout.strip().lstrip("0") == "1"
        assert b"w /proc/irq/default_smp_affinity - - - - 1\n" in guest.read_file(
            "/etc/tmpfiles.d/90-rt-tune-irq-default-affinity.conf")
        assert dataclasses.replace(change).plan(guest).noop
        change.rollback(guest, plan.before)
        change.verify_rolled_back(guest, plan.before)
        assert "IRQBALANCE_BANNED_CPULIST" not in environ()  # restarted without the ban, still running
        assert guest.read_file("/proc/irq/default_smp_affinity") == before_mask
        assert "rt-tune" not in guest.run(["ls", "/etc/tmpfiles.d"]).stdout
        assert guest.run(["ls", "/etc/systemd/system"]).stdout.split().count("irqbalance.service.d") == 0
    finally:
        guest.run(["systemctl", "stop", svc], check=False)


def test_mask_and_unmask(guest):
    change = ServiceDisableChange("mirobot_teleoperate.service", mask=True)
    plan = change.plan(guest)
    assert not change.switch_keeps_persistence  # a masked unit cannot be started: its toggles are whole
    try:
        change.apply(guest, plan.before)
        state = guest.run(["systemctl", "is-enabled", "mirobot_teleoperate.service"], check=False).stdout.strip()
        assert state == "masked"
    finally:
        change.rollback(guest, plan.before)
    assert guest.run(["systemctl", "is-enabled", "mirobot_teleoperate.service"]).stdout.strip() == "enabled"


def test_vcpu_map_now_and_after_qemu_restarts(host):
    """The guest's RT CPU 1 is vCPU 1: its thread alone on host CPU 1, vCPU 0 and QEMU's other threads on 0;
    re-applied when systemd restarts QEMU; rolled back to every thread's previous affinity."""
    change = VcpuPinningChange("rt-guest-vm.service", {1: 1}, [0])
    plan = change.plan(host)
    assert not plan.noop
    assert plan.before["threads"]["vcpus"]["1"]["cpus"] == "0-1"
    before_shell = qemu_threads(host, "rt-guest-vm.service")
    assert set(before_shell["CPU 1/TCG"]) == {"0-1"}
    change.apply(host, plan.before)
    change.verify(host, plan)
    assert_vcpu_map(qemu_threads(host, "rt-guest-vm.service"), "CPU 1/TCG", "1", "0")
    assert dataclasses.replace(change).plan(host).noop
    host.run(["systemctl", "restart", "rt-guest-vm.service"], timeout_s=60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if change.in_place(change.read(host), plan.desired):
                break
        except Exception:
            pass
        time.sleep(1)
    assert_vcpu_map(qemu_threads(host, "rt-guest-vm.service"), "CPU 1/TCG", "1", "0")  # pinned again by the drop-in
    change.rollback(host, plan.before)
    change.verify_rolled_back(host, plan.before)
    after_shell = qemu_threads(host, "rt-guest-vm.service")
    assert set(after_shell["CPU 1/TCG"]) == {"0-1"} and set(after_shell["CPU 0/TCG"]) == {"0-1"}


def test_vcpu_map_with_sched_fifo(host):
    """rt_priority: the RT vCPU thread runs SCHED_FIFO at that priority (read with chrt), and goes back to
    SCHED_OTHER on rollback."""
    change = VcpuPinningChange("rt-guest-vm.service", {1: 1}, [0], rt_priority=1)
    plan = change.plan(host)
    pid = host.run(["systemctl", "show", "-p", "MainPID", "--value", "rt-guest-vm.service"]).stdout.strip()
    tid = host.run(["sh", "-c", f"grep -l '^CPU 1/TCG$' /proc/{pid}/task/*/comm | cut -d/ -f5"]).stdout.strip()
    try:
        change.apply(host, plan.before)
        change.verify(host, plan)
        chrt = host.run(["chrt", "-p", tid]).stdout
        assert "SCHED_FIFO" in chrt and "priority: 1" in chrt, chrt
        tid0 = host.run(["sh", "-c", f"grep -l '^CPU 0/TCG$' /proc/{pid}/task/*/comm | cut -d/ -f5"]).stdout.strip()
        assert "SCHED_OTHER" in host.run(["chrt", "-p", tid0]).stdout  # only the RT vCPU
    finally:
        change.rollback(host, plan.before)
    change.verify_rolled_back(host, plan.before)
    assert "SCHED_OTHER" in host.run(["chrt", "-p", tid]).stdout


def test_irq_affinity_and_sysfs_knobs_survive_a_reboot_and_back(lab, host):
    """/proc/irq and /sys settings die with the boot; rt-tune's oneshot unit puts the IRQs back at every boot
    (trial boots of later boot changes reboot the unit), its tmpfiles.d entries the sysfs knobs. One reboot for
    both kinds."""
    from orchestrator.facts.base import BOOT_ID
    from tests.lab.test_lab import _reboot, _wait_new_boot

    thp, wq = KNOBS["transparent_hugepage"].path, KNOBS["workqueue_cpumask"].path
    knobs = [SysfsChange("transparent_hugepage", "never"), SysfsChange("workqueue_cpumask", "0")]
    original = {p: host.read_file(p) for p in (thp, wq)}  # as the kernel prints them
    assert b"[never]" not in original[thp] and original[wq].strip() != b"1", original  # so the change shows
    absent = SysfsChange("cpufreq_governor", "performance", cpus=[1])  # a QEMU VM has no cpufreq
    assert "no /sys/devices/system/cpu/cpu1/cpufreq/scaling_governor" in absent.not_applicable(absent.read(host))
    kthreads = KthreadsChange([KthreadRule("ksoftirqd/*", "fifo", 2), KthreadRule("kcompactd*", cpus=(0,))])
    knobs.append(kthreads)  # the same round trip: plan, apply, verify, reboot, rollback
    knob_plans = [k.plan(host) for k in knobs]
    change = IrqAffinityChange([0])
    plan = change.plan(host)
    try:
        for k, kp in zip(knobs, knob_plans, strict=True):
            assert not kp.noop
            k.verify(host, kp, k.apply_and_read(host, kp.before))
        assert host.run(["cat", thp, wq]).stdout.split("\n")[:2] == ["always madvise [never]", "1"]
        assert host.read_file("/etc/tmpfiles.d/90-rt-tune-sysfs-transparent_hugepage.conf").endswith(
            f"w {thp} - - - - never\n".encode())
        assert _kthreads(host) == {"ksoftirqd": {("FF", "2")}, "kcompactd": {("0",)}}
        change.apply(host, plan.before)
        change.verify(host, plan)
        assert host.run(["systemctl", "is-enabled", "rt-tune-irq-affinity.service"]).stdout.strip() == "enabled"
        # a measurement toggle moves the IRQs back and forth; the boot-time unit stays until the decision
        change.switch(host, plan.before, False)
        off = change.read(host)
        assert off["enabled"] and off["unit"] == plan.desired["unit"]
        assert not change.in_place(off, plan.desired)
        assert all(off["irqs"][i] == cpus for i, cpus in plan.before["irqs"].items()
                   if i in off["irqs"] and i not in off["fixed"])
        change.switch(host, plan.before, True)
        change.verify(host, plan)
        old = _reboot(host)
        _wait_new_boot(lab, "lab1-host", old)
        assert BOOT_ID.gather(host) != old
        live = change.read(host)
        assert change.in_place(live, plan.desired), live
        moved = [irq for irq, cpus in live["irqs"].items() if irq not in live["fixed"]]
        assert moved and all(live["irqs"][irq] == "0" for irq in moved)
        # systemd-tmpfiles wrote the knobs at boot: read with cat, not through rt-tune
        assert host.run(["cat", thp, wq]).stdout.split("\n")[:2] == ["always madvise [never]", "1"]
        assert _kthreads(host) == {"ksoftirqd": {("FF", "2")}, "kcompactd": {("0",)}}  # by rt-tune's boot unit
        assert all(k.plan(host).noop for k in knobs)  # a fresh plan finds them in place
    finally:
        change.rollback(host, plan.before)
        for k, kp in zip(knobs, knob_plans, strict=True):
            k.rollback(host, kp.before)
    change.verify_rolled_back(host, plan.before)
    for k, kp in zip(knobs, knob_plans, strict=True):
        k.verify_rolled_back(host, kp.before)
    assert "rt-tune-irq-affinity" not in host.run(["ls", "/etc/systemd/system",
                                                   "/etc/systemd/system/multi-user.target.wants"]).stdout
    assert {p: host.read_file(p) for p in (thp, wq)} == original  # byte for byte, as the kernel prints them
    assert "rt-tune" not in host.run(["ls", "/etc/tmpfiles.d"]).stdout
    assert _kthreads(host) == {"ksoftirqd": {("TS", "-")}, "kcompactd": {("0-1",)}}
    assert "rt-tune-kthreads" not in host.run(["ls", "/etc/systemd/system", "/usr/local/sbin"]).stdout


def _kthreads(t) -> dict[str, set[tuple[str, ...]]]:
    """ksoftirqd/N's scheduling class and RT priority, and kcompactd's CPUs (as a range: taskset prints "0,1"),
    read with ps and taskset."""
    out = t.run(["sh", "-c", "ps -e -o comm=,cls=,rtprio= | grep '^ksoftirqd/'; "
                             "for p in $(pgrep '^kcompactd'); do taskset -pc $p; done"]).stdout
    seen: dict[str, set[tuple[str, ...]]] = {"ksoftirqd": set(), "kcompactd": set()}
    for line in out.splitlines():
        if line.startswith("ksoftirqd/"):
            seen["ksoftirqd"].add(tuple(line.split()[1:3]))
        elif "current affinity list:" in line:
            seen["kcompactd"].add((format_cpulist(parse_kernel_cpulist(line.rsplit(":", 1)[1].strip())),))
    return seen


def test_vcpu_pinning_without_debug_threads_falls_back_to_qmp(host):
    """A QEMU started without debug-threads=on: no thread names, so the vCPUs are found through QMP."""
    unit = "rt-tune-test-nodebug"
    host.run(["systemd-run", f"--unit={unit}", "--collect", "--quiet", "--property=RuntimeDirectory=" + unit, "--",
              "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-smp", "2", "-m", "64", "-nodefaults",
              "-display", "none", "-S", "-qmp", f"unix:/run/{unit}/qmp.sock,server=on,wait=off"])
    try:
        change = VcpuPinningChange(f"{unit}.service", {1: 1}, [0])
        deadline = time.monotonic() + 30
        while True:
            try:
                plan = change.plan(host)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        assert {v: st["cpus"] for v, st in plan.before["threads"]["vcpus"].items()} == {"0": "0-1", "1": "0-1"}
        change.apply(host, plan.before)
        live = change.verify(host, plan)["threads"]
        assert {v: st["cpus"] for v, st in live["vcpus"].items()} == {"0": "0", "1": "1"}
        # no thread names without debug-threads: every thread but vCPU 1's is on the housekeeping CPU
        threads = qemu_threads(host, f"{unit}.service")
        allowed = sorted(c for cpus in threads.values() for c in cpus)
        assert allowed.count("1") == 1 and set(allowed) == {"0", "1"}, threads
        change.rollback(host, plan.before)
        change.verify_rolled_back(host, plan.before)
    finally:
        host.run(["systemctl", "stop", f"{unit}.service"], check=False)
