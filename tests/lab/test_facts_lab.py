"""System facts gathered live from the session lab's VMs, checked against each other and against what the lab
is known to run (rt-guest-vm.service on the host, the crash-looping mirobot_teleoperate.service on the guest).
Read-only: nothing here changes a VM."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

from orchestrator.facts.base import BOOT_ID, CMDLINE, CPUS_ONLINE
from orchestrator.facts.bootloader import BOOTLOADER
from orchestrator.facts.cpus import CPU_COUNT, CPUS_POSSIBLE, CPUS_PRESENT, ISOLATED_CPUS, NOHZ_FULL_CPUS
from orchestrator.facts.irqs import IRQS, ipi_counts
from orchestrator.facts.qemu import QEMU_PROCESSES
from orchestrator.facts.sysctl import SYSCTL_FILES, effective_sysctl_settings, sysctl_fact
from orchestrator.facts.systemd import COREDUMPS, coredumps_fact, unit_state_fact
from orchestrator.remote.ssh import SSHTransport

pytestmark = pytest.mark.lab

T = TypeVar("T")

MIROBOT = "mirobot_teleoperate.service"
RT_GUEST_VM = "rt-guest-vm.service"


def _wait_for(what: str, probe: Callable[[], T], ok: Callable[[T], bool], timeout_s: float = 90) -> T:
    """Poll `probe` until `ok` (the guest's service crashes every ~20 s, QEMU may be restarting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still {value!r} after {timeout_s} s")
        time.sleep(2)


def test_sysctl_values_on_pristine_vms(host: SSHTransport, guest: SSHTransport):
    for t in (host, guest):
        assert sysctl_fact("kernel.timer_migration").gather(t) == "1"
        assert sysctl_fact("kernel.ostype").gather(t) == "Linux"
        # systemd-sysctl applied the shipped files: the live value is what the effective configuration says.
        effective = effective_sysctl_settings(SYSCTL_FILES.gather(t))
        value, source = effective["kernel.core_pattern"]
        assert source == "/usr/lib/sysctl.d/50-coredump.conf"
        assert sysctl_fact("kernel.core_pattern").gather(t) == value
        assert sysctl_fact("kernel.pid_max").gather(t) == effective["kernel.pid_max"][0]


def test_cpu_facts_agree(host: SSHTransport, guest: SSHTransport):
    for t in (host, guest):
        online = CPUS_ONLINE.gather(t)
        assert CPU_COUNT.gather(t) == len(online) == 2
        assert set(online) <= set(CPUS_PRESENT.gather(t)) <= set(CPUS_POSSIBLE.gather(t))
        cmdline = CMDLINE.gather(t).split()
        # Pristine VMs boot without isolcpus=/nohz_full=: nothing isolated, nothing tickless.
        assert not any(a.startswith(("isolcpus=", "nohz_full=")) for a in cmdline)
        assert ISOLATED_CPUS.gather(t) == []
        assert NOHZ_FULL_CPUS.gather(t) == []


def test_unit_states(host: SSHTransport, guest: SSHTransport):
    vm = _wait_for(
        "rt-guest-vm.service",
        lambda: unit_state_fact(RT_GUEST_VM).gather(host),
        lambda s: s.sub_state == "running",
    )
    assert (vm.name, vm.load_state, vm.unit_file_state, vm.active_state) == (
        RT_GUEST_VM, "loaded", "enabled", "active")  # fmt: skip
    assert vm.main_pid is not None and vm.n_restarts is not None
    missing = unit_state_fact("rt-tune-no-such-unit.service").gather(guest)
    assert (missing.load_state, missing.exists, missing.main_pid) == ("not-found", False, None)
    crashy = _wait_for(
        MIROBOT,
        lambda: unit_state_fact(MIROBOT).gather(guest),
        lambda s: (s.n_restarts or 0) > 0,
    )
    assert (crashy.load_state, crashy.unit_file_state) == ("loaded", "enabled")
    assert crashy.active_state in ("active", "activating")
    # Both VMs come from one image: the host has the guest's service installed but not enabled, never started.
    on_host = unit_state_fact(MIROBOT).gather(host)
    assert (on_host.load_state, on_host.unit_file_state, on_host.active_state) == (
        "loaded",
        "disabled",
        "inactive",
    )
    assert (on_host.n_restarts, on_host.main_pid) == (0, None)


def test_coredumps_of_the_crash_looping_service(host: SSHTransport, guest: SSHTransport):
    boot_id = BOOT_ID.gather(guest).replace("-", "")
    # earlier lab tests reboot the guest (trial boots): the last hour's dumps span boots; look at this boot's
    dumps = _wait_for(
        "core dumps of mirobot_teleoperate in this boot", lambda: COREDUMPS.gather(guest),
        lambda d: len([x for x in d if x.boot_id == boot_id]) >= 2
    )
    ours = [d for d in dumps if d.unit == MIROBOT and d.boot_id == boot_id]
    assert ours, dumps
    for d in ours:
        assert (d.signal, d.signal_name, d.boot_id) == (11, "SIGSEGV", boot_id)
        assert d.filename and d.filename.startswith("/var/lib/systemd/coredump/core.")
    assert len({d.pid for d in ours}) == len(ours)
    assert [d.timestamp for d in ours] == sorted(d.timestamp for d in ours)
    only = coredumps_fact(3600, unit=MIROBOT).gather(guest)
    assert only and all(d.unit == MIROBOT for d in only)
    # Restarts and core dumps tell the same story: the service keeps crashing.
    assert (unit_state_fact(MIROBOT).gather(guest).n_restarts or 0) >= 1
    assert all(d.unit != MIROBOT for d in COREDUMPS.gather(host))


def test_qemu_processes_on_the_host(host: SSHTransport, guest: SSHTransport):
    state = _wait_for(
        "rt-guest-vm.service",
        lambda: unit_state_fact(RT_GUEST_VM).gather(host),
        lambda s: s.sub_state == "running" and s.main_pid is not None,
    )
    procs = _wait_for(
        "QEMU with 2 vCPU threads",
        lambda: QEMU_PROCESSES.gather(host),
        lambda ps: any(p.pid == state.main_pid and len(p.vcpus) == 2 for p in ps),
    )
    (qemu,) = [p for p in procs if p.pid == state.main_pid]
    assert qemu.exe == "/usr/bin/qemu-system-x86_64"
    assert (qemu.name, qemu.debug_threads) == ("rtguest", True)
    assert qemu.qmp_sockets == ["/run/rt-guest-vm/qmp.sock"]
    assert [(v.index, v.comm, v.accel) for v in qemu.vcpus] == [
        (0, "CPU 0/TCG", "TCG"),
        (1, "CPU 1/TCG", "TCG"),
    ]
    online = set(CPUS_ONLINE.gather(host))
    assert set(qemu.cpus_allowed) <= online
    assert all(set(v.cpus_allowed) <= online for v in qemu.vcpus)
    # The threads are the process's tasks, as /proc lists them.
    tasks = {int(x) for x in host.run(["ls", f"/proc/{qemu.pid}/task"]).stdout.split()}
    assert {v.tid for v in qemu.vcpus} | {t.tid for t in qemu.other_threads} == tasks
    assert qemu.pid in {t.tid for t in qemu.other_threads}
    # The guest VM runs no QEMU.
    assert QEMU_PROCESSES.gather(guest) == []


def test_bootloader_is_grub_with_saved_default(host: SSHTransport, guest: SSHTransport):
    for t in (host, guest):
        info = BOOTLOADER.gather(t)
        assert info.kind == "grub" and info.candidates == ["grub"]
        assert info.grub_default == "saved" and info.grub_default_saved
        assert info.grubenv == "/boot/grub/grubenv"
        assert info.commands["update-grub"] == "/usr/sbin/update-grub"
        # The grubenv the fact found is a real one: grub-editenv reads it.
        t.run(["grub-editenv", info.grubenv, "list"])


def test_irqs_and_ipis(host: SSHTransport, guest: SSHTransport):
    for t in (host, guest):
        online = CPUS_ONLINE.gather(t)
        before = IRQS.gather(t)
        time.sleep(1)
        after = IRQS.gather(t)
        by_name = {i.irq: i for i in after}
        assert all(i.cpus == online for i in after)
        assert by_name["LOC"].per_cpu and all(c > 0 for c in by_name["LOC"].per_cpu_counts)
        assert not by_name["ERR"].per_cpu
        ipis_before, ipis_after = ipi_counts(before), ipi_counts(after)
        assert {"RES", "CAL", "TLB", "IWI"} <= set(ipis_after)
        for name, counts in ipis_after.items():
            assert len(counts) == len(online)
            assert all(a >= b for a, b in zip(counts, ipis_before[name], strict=True)), name
        loc_before = {i.irq: i for i in before}["LOC"].per_cpu_counts
        assert sum(by_name["LOC"].per_cpu_counts) > sum(loc_before)
        numeric = [i for i in after if i.irq.isdigit()]
        assert numeric and any("virtio" in a for i in numeric for a in i.actions)
        for i in numeric:
            assert i.smp_affinity_list is not None and set(i.smp_affinity_list) <= set(online)
            assert i.effective_affinity_list is not None
            # (not a subset of smp_affinity_list: right after an affinity write, x86 moves the vector only at
            # the IRQ's next interrupt; earlier tests write affinities)
            assert set(i.effective_affinity_list) <= set(online)
