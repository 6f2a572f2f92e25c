"""System fact parsers (sysctl, isolated CPUs, units, core dumps, QEMU threads, bootloader, IRQs) on output
recorded from the x86 lab VMs (tests/recorded/lab-x86/README.md says how), and on broken or truncated output,
which must raise ParseError instead of giving a silent partial answer."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest

from orchestrator.core.errors import ParseError
from orchestrator.facts.bootloader import BOOTLOADER, choose_bootloader
from orchestrator.facts.cpus import CPU_COUNT, CPUS_POSSIBLE, ISOLATED_CPUS, NOHZ_FULL_CPUS
from orchestrator.facts.irqs import IRQS, Irq, ipi_counts
from orchestrator.facts.qemu import QEMU_PROCESSES, parse_qemu_argv, split_qemu_opts
from orchestrator.facts.sysctl import (
    SYSCTL_FILES,
    effective_sysctl_settings,
    normalize_sysctl_key,
    parse_sysctl_conf,
    sysctl_fact,
    sysctl_path,
)
from orchestrator.facts.systemd import COREDUMP_MESSAGE_ID, COREDUMPS, coredumps_fact, parse_unit_state, unit_state_fact
from tests.conftest import RECORDED

pytestmark = pytest.mark.unit

LAB = RECORDED / "lab-x86"
MIROBOT = "mirobot_teleoperate.service"


def rec(name: str) -> str:
    return (LAB / name).read_text()


def _drop_last_lines(text: str, n: int) -> str:
    return "".join(text.splitlines(keepends=True)[:-n])


# ---- CPUs ------------------------------------------------------------------------------------------------
def test_cpu_counts_on_recorded_output():
    assert CPU_COUNT.parse(rec("host-cpu-online.txt")) == 2
    for vm in ("host", "guest"):
        assert CPUS_POSSIBLE.parse(rec(f"{vm}-facts-cpus-possible.txt")) == [0, 1]
    for bad in ("", "\n", "0-1", "0-1\n2\n", "x\n"):
        with pytest.raises(ParseError):
            CPU_COUNT.parse(bad)


def test_isolated_and_nohz_full_on_pristine_vms():
    for vm in ("host", "guest"):
        assert rec(f"{vm}-facts-isolated.txt") == "\n"
        assert ISOLATED_CPUS.parse(rec(f"{vm}-facts-isolated.txt")) == []
        # nohz_full exists (Debian's kernel has CONFIG_NO_HZ_FULL) and reads "(null)" without nohz_full=.
        assert rec(f"{vm}-facts-nohz_full.txt") == "(null)\n"
        assert NOHZ_FULL_CPUS.parse(rec(f"{vm}-facts-nohz_full.txt")) == []
    # What the fact's own script prints when the file does not exist (no CONFIG_NO_HZ_FULL).
    assert NOHZ_FULL_CPUS.parse("(absent)\n") == []
    assert NOHZ_FULL_CPUS.argv[:2] == ("sh", "-c")


@pytest.mark.parametrize("bad", ["", "1-3", "1-3\n4\n", "1-a\n", "3-1\n"])
def test_cpu_list_facts_refuse_garbage(bad):
    with pytest.raises(ParseError):
        ISOLATED_CPUS.parse(bad)
    with pytest.raises(ParseError):
        NOHZ_FULL_CPUS.parse(bad)


# ---- sysctl ----------------------------------------------------------------------------------------------
def test_sysctl_fact_on_recorded_output():
    fact = sysctl_fact("kernel.timer_migration")
    assert fact.argv == ("cat", "/proc/sys/kernel/timer_migration")
    for vm in ("host", "guest"):
        assert fact.parse(rec(f"{vm}-facts-sysctl-kernel.timer_migration.txt")) == "1"
    for bad in ("", "1", "1\n0\n"):
        with pytest.raises(ParseError, match="kernel.timer_migration"):
            fact.parse(bad)


@pytest.mark.parametrize(
    "name",
    ["", "kernel/timer_migration", "kernel..x", ".kernel", "kernel.", "Kernel.x", "a b", "k.*", "../etc"],
)
def test_sysctl_names_are_validated(name):
    with pytest.raises(ValueError):
        sysctl_fact(name)


def test_sysctl_path_keeps_dashes_and_underscores():
    assert sysctl_path("net.ipv4.conf.all.rp_filter") == "/proc/sys/net/ipv4/conf/all/rp_filter"
    assert sysctl_path("vm.stat-x_1") == "/proc/sys/vm/stat-x_1"


def test_sysctl_files_on_recorded_output():
    for vm in ("host", "guest"):
        files = SYSCTL_FILES.parse(rec(f"{vm}-facts-sysctl-files.txt"))
        assert [f.path for f in files] == [
            "/etc/sysctl.d/99-sysctl.conf",
            "/usr/lib/sysctl.d/50-coredump.conf",
            "/usr/lib/sysctl.d/50-pid-max.conf",
            "/usr/lib/sysctl.d/99-protect-links.conf",
        ]
        by_path = {f.path: f for f in files}
        # Debian's /etc/sysctl.conf (through the 99-sysctl.conf link) has only comments.
        assert by_path["/etc/sysctl.d/99-sysctl.conf"].settings == {}
        assert "#kernel.printk = 3 4 1 3" in by_path["/etc/sysctl.d/99-sysctl.conf"].content
        assert by_path["/usr/lib/sysctl.d/50-pid-max.conf"].settings == {"kernel.pid_max": "4194304"}
        assert (
            by_path["/usr/lib/sysctl.d/50-coredump.conf"]
            .settings["kernel.core_pattern"]
            .startswith("|/lib/systemd/systemd-coredump ")
        )
        assert all(f.invalid_lines == [] for f in files)
        effective = effective_sysctl_settings(files)
        assert effective["fs.protected_regular"] == ("2", "/usr/lib/sysctl.d/99-protect-links.conf")
        assert "kernel.timer_migration" not in effective


def test_sysctl_files_refuse_broken_output():
    good = rec("host-facts-sysctl-files.txt")
    for bad in (
        "",
        good[:-4],  # the final `end` line is missing
        _drop_last_lines(good, 2),  # a `file` line without its content, no `end`
        "file /etc/sysctl.d/x.conf\n!!not base64!!\nend\n",
        "unreadable /etc/sysctl.d/secret.conf\nend\n",
        "garbage\nend\n",
    ):
        with pytest.raises(ParseError):
            SYSCTL_FILES.parse(bad)
    assert SYSCTL_FILES.parse("end\n") == []


def test_sysctl_conf_syntax():
    # sysctl.d(5) configuration syntax (a file's content, not tool output).
    f = parse_sysctl_conf(
        "/etc/sysctl.d/90-rt.conf",
        "# comment\n; comment\nkernel.timer_migration = 0\n-kernel/sched_rt_runtime_us=-1\n"
        "no assignment here\nkernel.timer_migration=1\n",
    )
    assert f.settings == {"kernel.timer_migration": "1", "kernel.sched_rt_runtime_us": "-1"}
    assert f.ignore_failure == ["kernel.sched_rt_runtime_us"]
    assert f.invalid_lines == [5]
    assert (
        normalize_sysctl_key("net/ipv4/conf/enp3s0.200/forwarding")
        == "net.ipv4.conf.enp3s0/200.forwarding"
    )
    assert normalize_sysctl_key("net.ipv4.conf.all.rp_filter") == "net.ipv4.conf.all.rp_filter"


def test_effective_sysctl_settings_follow_systemd_precedence():
    etc = parse_sysctl_conf("/etc/sysctl.d/50-pid-max.conf", "kernel.pid_max = 32768\n")
    usr = parse_sysctl_conf("/usr/lib/sysctl.d/50-pid-max.conf", "kernel.pid_max = 4194304\n")
    later = parse_sysctl_conf("/usr/lib/sysctl.d/60-x.conf", "kernel.pid_max = 65536\n")
    # The /etc file masks the /usr/lib one of the same name; a later name overrides both.
    assert effective_sysctl_settings([usr, etc]) == {"kernel.pid_max": ("32768", etc.path)}
    assert effective_sysctl_settings([usr, etc, later])["kernel.pid_max"] == ("65536", later.path)


# ---- systemd units ---------------------------------------------------------------------------------------
def test_unit_state_of_the_hosts_qemu_service():
    s = parse_unit_state(rec("host-facts-unit-rt-guest-vm.txt"))
    assert s.model_dump() == {
        "name": "rt-guest-vm.service",
        "load_state": "loaded",
        "unit_file_state": "enabled",
        "active_state": "active",
        "sub_state": "running",
        "n_restarts": 0,
        "main_pid": 336,
        "exec_main_status": 0,
    }
    assert s.exists


def test_unit_state_of_the_crash_looping_service():
    running = parse_unit_state(rec("guest-facts-unit-mirobot_teleoperate.txt"))
    assert (running.name, running.unit_file_state, running.active_state, running.sub_state) == (
        MIROBOT, "enabled", "active", "running")  # fmt: skip
    assert running.n_restarts == 9 and running.n_restarts > 0
    assert running.main_pid == 678
    crashed = parse_unit_state(rec("guest-facts-unit-mirobot_teleoperate-auto-restart.txt"))
    assert (crashed.active_state, crashed.sub_state, crashed.main_pid) == ("activating", "auto-restart", None)
    assert crashed.exec_main_status == 11  # SIGSEGV
    assert crashed.n_restarts == 10 > running.n_restarts


def test_unit_state_of_a_unit_that_does_not_exist():
    for vm in ("host", "guest"):
        s = parse_unit_state(rec(f"{vm}-facts-unit-nonexistent.txt"))
        assert (s.name, s.load_state, s.unit_file_state, s.active_state, s.sub_state) == (
            "rt-tune-no-such-unit.service", "not-found", "", "inactive", "dead")  # fmt: skip
        assert not s.exists and s.main_pid is None


def test_unit_state_refuses_broken_output():
    good = rec("host-facts-unit-rt-guest-vm.txt")
    for bad in (
        "",
        _drop_last_lines(good, 1),  # UnitFileState missing
        good + "Id=other.service\n",  # a property twice
        good.replace("MainPID=336", "MainPID=abc"),
        good.replace("NRestarts=0", "NRestarts=many"),
        good.replace("LoadState=loaded", "LoadState="),
        good + "Description=not asked for\n",
        "Failed to connect to bus\n",
    ):
        with pytest.raises(ParseError):
            parse_unit_state(bad)


def test_unit_state_fact_command_and_name_validation():
    fact = unit_state_fact(MIROBOT)
    assert fact.argv == (
        "systemctl", "show",
        "-p", "Id,LoadState,UnitFileState,ActiveState,SubState,NRestarts,MainPID,ExecMainStatus",
        "--no-pager", "--", MIROBOT,
    )  # fmt: skip
    unit_state_fact("getty@tty1.service")
    unit_state_fact("sys-kernel-debug.mount")
    for bad in ("", "mirobot", "-x.service", "a b.service", "x.service;reboot", "../x.service", "x.servic"):
        with pytest.raises(ValueError):
            unit_state_fact(bad)


# ---- core dumps ------------------------------------------------------------------------------------------
def test_coredumps_of_the_guests_crash_looping_service():
    dumps = COREDUMPS.parse(rec("guest-facts-coredumps-3600s.txt"))
    assert len(dumps) == 43
    assert {d.unit for d in dumps} == {MIROBOT}
    assert {(d.signal, d.signal_name, d.exe, d.comm) for d in dumps} == {
        (11, "SIGSEGV", "/usr/bin/bash", "mirobot_teleope")
    }
    # The guest's disk had been booted once before (same lab state directory): two boots' worth of dumps.
    assert {d.boot_id for d in dumps} == {
        "d96cdb8ac5cb401aa3f48994c022759a",
        "7b64affb5b4c45c498a921b8ba211483",
    }
    first, last = dumps[0], dumps[-1]
    assert (first.pid, first.timestamp) == (332, datetime(2026, 11, 25, 12, 32, 45, tzinfo=UTC))
    assert first.filename == (
        "/var/lib/systemd/coredump/core.mirobot_teleope.0.d96cdb8ac5cb401aa3f48994c022759a.332.1795609965000000.zst"
    )
    # The main PID recorded while the service ran (678) is the last process that dumped core.
    assert last.pid == parse_unit_state(rec("guest-facts-unit-mirobot_teleoperate.txt")).main_pid
    assert [d.timestamp for d in dumps] == sorted(d.timestamp for d in dumps)


def test_coredumps_of_one_unit_in_the_last_600_s():
    dumps = COREDUMPS.parse(rec("guest-facts-coredumps-600s-mirobot_teleoperate.txt"))
    assert len(dumps) == 33 and {d.unit for d in dumps} == {MIROBOT}
    assert dumps[-1].timestamp - dumps[0].timestamp <= timedelta(seconds=600)


def test_no_coredumps_on_the_host():
    assert rec("host-facts-coredumps-3600s.txt") == ""
    assert COREDUMPS.parse(rec("host-facts-coredumps-3600s.txt")) == []


def test_coredumps_refuse_broken_output():
    good = rec("guest-facts-coredumps-3600s.txt")
    entry = json.loads(good.splitlines()[0])
    without_pid = {k: v for k, v in entry.items() if k != "COREDUMP_PID"}
    for bad in (
        good[: len(good) // 2],  # cut inside a JSON object
        "[]\n",
        "-- No entries --\n",
        json.dumps(without_pid) + "\n",
        json.dumps({**entry, "COREDUMP_SIGNAL": "SEGV"}) + "\n",
        json.dumps({**entry, "COREDUMP_TIMESTAMP": None}) + "\n",
    ):
        with pytest.raises(ParseError):
            COREDUMPS.parse(bad)


def test_coredumps_fact_command():
    fact = coredumps_fact(600, unit=MIROBOT)
    assert fact.sudo
    assert fact.argv[:5] == ("journalctl", "-o", "json", "--no-pager", "-q")
    assert "--since=-600s" in fact.argv
    assert fact.argv[-2:] == (f"MESSAGE_ID={COREDUMP_MESSAGE_ID}", f"COREDUMP_UNIT={MIROBOT}")
    assert COREDUMPS.argv[-1] == f"MESSAGE_ID={COREDUMP_MESSAGE_ID}"
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError):
            coredumps_fact(bad)
    with pytest.raises(ValueError):
        coredumps_fact(60, unit="x.service ; reboot")


# ---- QEMU ------------------------------------------------------------------------------------------------
def test_qemu_process_of_rt_guest_vm():
    (q,) = QEMU_PROCESSES.parse(rec("host-facts-qemu-processes.txt"))
    assert (q.pid, q.exe, q.name, q.debug_threads) == (336, "/usr/bin/qemu-system-x86_64", "rtguest", True)
    assert q.argv[:3] == ["/usr/bin/qemu-system-x86_64", "-name", "rtguest,debug-threads=on"]
    assert q.qmp_sockets == ["/run/rt-guest-vm/qmp.sock"]
    assert q.cpus_allowed == [0, 1]
    assert [(v.index, v.tid, v.comm, v.accel, v.cpus_allowed) for v in q.vcpus] == [
        (0, 351, "CPU 0/TCG", "TCG", [0, 1]),
        (1, 352, "CPU 1/TCG", "TCG", [0, 1]),
    ]
    assert [(t.tid, t.comm) for t in q.other_threads] == [
        (336, "qemu-system-x86"), (349, "qemu-system-x86"), (350, "IO mon_iothread")]  # fmt: skip
    # The unit's MainPID (recorded in the same session) is this QEMU.
    assert parse_unit_state(rec("host-facts-unit-rt-guest-vm.txt")).main_pid == q.pid


def test_qemu_process_after_pinning_one_vcpu():
    (q,) = QEMU_PROCESSES.parse(rec("host-facts-qemu-processes-vcpu1-pinned.txt"))
    assert [(v.tid, v.cpus_allowed) for v in q.vcpus] == [(351, [0, 1]), (352, [1])]
    assert q.cpus_allowed == [0, 1]


def test_no_qemu_on_the_guest():
    assert rec("guest-facts-qemu-processes.txt") == "done\n"
    assert QEMU_PROCESSES.parse(rec("guest-facts-qemu-processes.txt")) == []


def test_the_qemu_script_finds_qemu_by_its_exe_on_this_machine(tmp_path):
    """The script itself (not a recording), through a LocalTransport: a process whose exe is named qemu-system-*
    (a copy of `sleep`) is found with its argv and every thread; a decoy whose path only mentions qemu-system in a
    directory name, and one that only says so in its argv, are not."""
    import shutil
    import subprocess

    from orchestrator.remote.local import LocalTransport

    sleep = shutil.which("sleep")
    assert sleep
    fake = tmp_path / "bin" / "qemu-system-x86_64"
    decoy_dir = tmp_path / "qemu-system-tools"
    for d in (fake.parent, decoy_dir):
        d.mkdir()
    shutil.copy(sleep, fake)
    shutil.copy(sleep, decoy_dir / "sleep")
    procs = [subprocess.Popen([str(fake), "30"]), subprocess.Popen([str(decoy_dir / "sleep"), "30"]),
             subprocess.Popen(["sh", "-c", "exec -a qemu-system-aarch64 sleep 30"])]
    try:
        found = {q.pid: q for q in QEMU_PROCESSES.gather(LocalTransport())}
        assert procs[0].pid in found, found.keys()
        q = found[procs[0].pid]
        assert q.exe == str(fake) and q.argv == [str(fake), "30"]
        assert [t.tid for t in q.other_threads] == [procs[0].pid] and q.vcpus == []
        assert procs[1].pid not in found and procs[2].pid not in found
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_qemu_processes_refuse_broken_output():
    good = rec("host-facts-qemu-processes.txt")
    lines = good.splitlines(keepends=True)
    for bad in (
        "",
        good[:-5],  # no final `done`
        _drop_last_lines(good, 2) + "done\n",  # no `end` for the process
        good.replace("exe L3Vzci9i", "exe !!!"),
        good.replace("Cpus_allowed_list:\t0-1\n", "Cpus_allowed_list:\tzero\n", 1),
        "".join(line for line in lines if not line.startswith("Cpus_allowed_list")),
        "".join(line for line in lines if line.strip() != "task 336"),  # no main thread, Name lines orphaned
        good.replace("task 349\n", "task x\n"),
        "hello\ndone\n",
    ):
        with pytest.raises(ParseError):
            QEMU_PROCESSES.parse(bad)


def test_qemu_argv_forms():
    # Command lines (argv lists), in the forms QEMU documents and libvirt uses.
    a = parse_qemu_argv(
        ["qemu-system-aarch64", "-name", "guest=rt,,vm,debug-threads=on", "-chardev",
         "socket,id=charmonitor,path=/var/lib/libvirt/qemu/domain-1-rt/monitor.sock,server=on,wait=off",
         "-mon", "chardev=charmonitor,id=monitor,mode=control", "--qmp-pretty", "unix:/tmp/q2.sock,server"]
    )  # fmt: skip
    assert (a.name, a.debug_threads) == ("rt,vm", True)
    assert a.qmp_sockets == ["/tmp/q2.sock", "/var/lib/libvirt/qemu/domain-1-rt/monitor.sock"]
    b = parse_qemu_argv(["qemu-system-x86_64", "-name", "plain", "-qmp", "tcp:127.0.0.1:4444,server"])
    assert (b.name, b.debug_threads, b.qmp_sockets) == ("plain", False, [])
    assert parse_qemu_argv(["qemu-system-x86_64"]).name is None
    assert split_qemu_opts("a,,b,c=d") == ["a,b", "c=d"]


# ---- bootloader ------------------------------------------------------------------------------------------
def test_bootloader_is_grub_with_saved_default():
    for vm in ("host", "guest"):
        b = BOOTLOADER.parse(rec(f"{vm}-facts-bootloader.txt"))
        assert (b.kind, b.candidates) == ("grub", ["grub"])
        assert b.evidence == [
            "file /etc/default/grub",
            "command update-grub at /usr/sbin/update-grub",
            "command grub-mkconfig at /usr/sbin/grub-mkconfig",
            "file /boot/grub/grub.cfg",
        ]
        assert (b.grub_default, b.grub_default_source, b.grub_default_saved) == (
            "saved",
            "/etc/default/grub",
            True,
        )
        assert b.grubenv == "/boot/grub/grubenv"
        assert b.bootctl_is_installed is None and b.commands["bootctl"] is None
        assert b.commands["grub-reboot"] == "/usr/sbin/grub-reboot"
        assert b.loader_entries == {}


def test_bootloader_refuses_broken_output():
    good = rec("host-facts-bootloader.txt")
    for bad in (
        "",
        good[:-4],  # no final `end`
        "".join(line for line in good.splitlines(keepends=True) if not line.startswith("command")),
        good.replace("grub-default GRUB_DEFAULT=saved", 'grub-default GRUB_DEFAULT="saved'),
        good.replace("grub-default GRUB_DEFAULT=saved\n", ""),  # grub-default-in without its line
        "surprise\n" + good,
    ):
        with pytest.raises(ParseError):
            BOOTLOADER.parse(bad)


def test_bootloader_choice_rules():
    # The rules on structured inputs; only the grub case has a recording (the lab boots through GRUB).
    none = {c: None for c in ("update-grub", "grub-mkconfig", "fw_printenv", "bootctl")}
    assert choose_bootloader({}, none, {}, None) == ("unknown", [], [])
    kind, cands, ev = choose_bootloader(
        {"/boot/efi/loader/loader.conf": True}, none, {"/boot/efi/loader/entries": 2}, True
    )
    assert (kind, cands) == ("systemd-boot", ["systemd-boot"])
    assert ev == [
        "bootctl is-installed: yes",
        "file /boot/efi/loader/loader.conf",
        "2 entries in /boot/efi/loader/entries",
    ]
    kind, cands, _ = choose_bootloader(
        {"/boot/extlinux/extlinux.conf": True, "/etc/fw_env.config": True},
        {**none, "fw_printenv": "/usr/bin/fw_printenv"}, {}, None,
    )  # fmt: skip
    assert (kind, cands) == ("extlinux", ["extlinux", "u-boot"])
    # /etc/default/grub alone (no grub-mkconfig, no grub.cfg) is not GRUB.
    assert choose_bootloader({"/etc/default/grub": True}, none, {}, None)[0] == "unknown"
    # A Fedora-style ESP grub.cfg matches the glob pattern.
    kind, _, ev = choose_bootloader(
        {"/etc/default/grub": True, "/boot/efi/EFI/fedora/grub.cfg": True},
        {**none, "grub2-mkconfig": "/usr/sbin/grub2-mkconfig"}, {"/boot/loader/entries": 3}, None,
    )  # fmt: skip
    assert kind == "grub" and "file /boot/efi/EFI/fedora/grub.cfg" in ev


# ---- IRQs ------------------------------------------------------------------------------------------------
def test_irqs_on_the_x86_host():
    irqs = IRQS.parse(rec("host-facts-irqs.txt"))
    by = {i.irq: i for i in irqs}
    assert all(i.cpus == [0, 1] for i in irqs)
    timer = by["0"]
    assert (timer.chip, timer.hwirq, timer.trigger, timer.actions) == ("IO-APIC", "2", "edge", ["timer"])
    assert (timer.per_cpu_counts, timer.smp_affinity_list, timer.effective_affinity_list) == (
        [172, 0],
        [0, 1],
        [0],
    )
    assert (by["9"].trigger, by["9"].actions) == ("fasteoi", ["acpi"])
    ahci = by["24"]
    assert (ahci.chip, ahci.hwirq, ahci.actions) == ("PCI-MSI", "512000", ["ahci[0000:00:1f.2]"])
    q0 = by["26"]
    assert (q0.actions, q0.per_cpu_counts, q0.smp_affinity_list, q0.effective_affinity_list) == (
        ["virtio0-req.0"], [527, 0], [0], [0])  # fmt: skip
    assert by["LOC"].description == "Local timer interrupts" and by["LOC"].per_cpu_counts == [16731, 15113]
    assert by["LOC"].chip is None and by["LOC"].smp_affinity_list is None
    assert (by["ERR"].per_cpu, by["ERR"].per_cpu_counts, by["ERR"].description) == (False, [0], None)
    assert (by["MIS"].per_cpu, by["MIS"].total) == (False, 0)
    assert ipi_counts(irqs) == {"IWI": [0, 0], "RES": [1268, 1071], "CAL": [7301, 6832], "TLB": [5, 9]}
    # IRQ 2 (cascade) has a /proc/irq directory but no /proc/interrupts row; its effective affinity is empty.
    assert "2" not in by and "irq 2 smp=0-1 eff=\n" in rec("host-facts-irqs.txt")
    assert [i.irq for i in irqs if i.irq.isdigit()] == [
        "0",
        "1",
        "4",
        "8",
        "9",
        "12",
        "16",
        *map(str, range(24, 36)),
    ]


def test_irqs_on_the_x86_guest():
    irqs = IRQS.parse(rec("guest-facts-irqs.txt"))
    assert ipi_counts(irqs) == {
        "IWI": [0, 0],
        "RES": [1489, 1394],
        "CAL": [9702, 5582],
        "TLB": [23, 14],
    }
    assert {i.irq: i for i in irqs}["33"].actions == ["virtio2-output.0"]


def test_irqs_refuse_broken_output():
    good = rec("host-facts-irqs.txt")
    _header, rest = good.split("\n", 1)
    for bad in (
        "",
        good[:-4],  # no final `end`
        good.split("@@ affinity")[0] + "end\n",  # no affinity section
        rest,  # no header line
        good.replace("CPU0", "XPU0", 1),
        good.replace("  1:          0          9", "  1:          0", 1),  # a numeric IRQ row missing a count
        good.replace("LOC:      16731", "LOC:      16x31", 1),
        good.replace("irq 26 smp=0 eff=0", "irq 26 smp=zero eff=0"),
        good.replace("irq 26 smp=0 eff=0", "twenty-six"),
        good.replace("NMI:", "NMI", 1),
    ):
        with pytest.raises(ParseError):
            IRQS.parse(bad)


def test_ipi_counts_selects_ipi_rows():
    # Structured input (models, not tool output): arm64 IPI names are IPI rows, per-CPU rows only.
    def row(name, counts, per_cpu=True):
        return Irq(irq=name, cpus=[0, 1], per_cpu_counts=counts, per_cpu=per_cpu)

    irqs = [
        row("IPI0", [5, 6]),
        row("IPI5", [1, 0]),
        row("LOC", [9, 9]),
        row("42", [1, 2]),
        row("ERR", [0], False),
    ]
    assert ipi_counts(irqs) == {"IPI0": [5, 6], "IPI5": [1, 0]}


def test_arm64_proc_interrupts_from_the_arm64_lab():
    """Recorded on the arm64 lab (tests/recorded/lab-arm64/README.md): GICv3/ITS rows and IPI0..IPI7 per CPU."""
    from orchestrator.facts.irqs import parse_interrupts

    here = RECORDED / "lab-arm64"
    host = {r.irq: r for r in parse_interrupts((here / "host-proc-interrupts.txt").read_text())}
    assert [f"IPI{i}" for i in range(8)] == [k for k in host if k.startswith("IPI")]
    assert host["IPI0"].description == "Rescheduling interrupts" and host["IPI0"].per_cpu_counts == [5109, 4622]
    assert host["IPI1"].description == "Function call interrupts" and host["IPI1"].per_cpu
    assert (host["11"].chip, host["11"].hwirq, host["11"].trigger, host["11"].actions) == \
        ("GICv3", "27", "Level", ["kvm guest vtimer"])
    assert (host["53"].chip, host["53"].hwirq, host["53"].actions) == \
        ("ITS-PCI-MSIX-0000:00:01.0", "1", ["virtio0-req.0"])
    assert host["Err"].per_cpu_counts == [0] and not host["Err"].per_cpu
    guest = {r.irq: r for r in parse_interrupts((here / "guest-proc-interrupts.txt").read_text())}
    assert guest["11"].actions == ["arch_timer"] and guest["IPI0"].cpus == [0, 1]


# ---- the vCPU map's thread listing (`rt-tune-pin-vcpus --list`, the same helper that pins) -------------------


def test_thread_listing_parses_the_recorded_listings():
    from orchestrator.facts.qemu import parse_thread_listing

    pristine = parse_thread_listing(rec("host-vcpu-threads-pristine.json"))
    mapped = parse_thread_listing(rec("host-vcpu-threads-mapped.json"))
    assert set(pristine) == {"main", "vcpus", "threads"}  # `via` is how, not what: not journaled
    assert pristine["vcpus"]["1"] == {"cpus": "0-1", "policy": "other", "prio": 0}
    assert mapped["vcpus"]["1"]["cpus"] == "1" and mapped["vcpus"]["0"]["cpus"] == "0"
    assert all(st["cpus"] == "0" for sts in mapped["threads"].values() for st in sts)


def _listing_mutations() -> list[tuple[str, object]]:
    """The recorded pristine listing, broken one way each (the recording itself parses: test above)."""
    import copy

    doc = json.loads(rec("host-vcpu-threads-pristine.json"))
    out: list[tuple[str, object]] = [("no output", "")]
    no_prio = copy.deepcopy(doc)
    del no_prio["vcpus"]["0"]["prio"]
    out.append(("a field missing", no_prio))
    bad_index = copy.deepcopy(doc)
    bad_index["vcpus"]["x"] = bad_index["vcpus"].pop("0")
    out.append(("not a vCPU index", bad_index))
    extra = {**doc, "extra": 1}
    out.append(("a key the helper does not print", extra))
    text_prio = copy.deepcopy(doc)
    text_prio["vcpus"]["0"]["prio"] = "0"
    out.append(("a number as text", text_prio))
    return out


@pytest.mark.parametrize(("why", "bad"), _listing_mutations(), ids=lambda v: v if isinstance(v, str) else "")
def test_thread_listing_refuses_what_the_helper_does_not_print(why, bad):
    from orchestrator.facts.qemu import parse_thread_listing

    with pytest.raises(ParseError):
        parse_thread_listing(bad if isinstance(bad, str) else json.dumps(bad))


def test_thread_listing_fact_runs_the_shipped_helper_in_memory():
    """The fact's command is the helper rt-tune installs (remote/scripts/pin_vcpus.py), run with python3 -c:
    reading a QEMU's threads installs nothing."""
    from orchestrator.facts.qemu import thread_listing_fact
    from orchestrator.remote.remote_scripts import PIN_VCPUS, QA_COPY, SCRIPTS_DIR

    fact = thread_listing_fact(4242)
    assert fact.argv == ("python3", "-c", PIN_VCPUS, "--list", "4242")
    assert QA_COPY in PIN_VCPUS and "@QA_COPY@" in (SCRIPTS_DIR / "pin_vcpus.py").read_text()
    with pytest.raises(ParseError):
        thread_listing_fact(0)


def test_the_pin_helper_sweeps_threads_left_on_the_old_cpus(tmp_path):
    """A thread QEMU starts while its threads are being pinned inherits the old affinity (CI, 2026-12-07: a
    thread-pool `worker` on 0-1 after pinning made the change's verify fail): the helper's last pass moves every
    thread but the pinned vCPUs to the housekeeping CPUs. Run on a real process of this machine."""
    import importlib.util
    import os
    import subprocess
    import sys

    from orchestrator.remote.remote_scripts import SCRIPTS_DIR

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs to tell the housekeeping CPU from the rest")
    spec = importlib.util.spec_from_file_location("pin_vcpus", SCRIPTS_DIR / "pin_vcpus.py")
    assert spec and spec.loader
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    code = ("import threading, time\n"
            "for _ in range(3): threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
            "time.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        for _ in range(100):
            tids = sorted(helper.tasks(child.pid))
            if len(tids) == 4:
                break
            time.sleep(0.05)
        assert len(tids) == 4, tids
        all_cpus = os.sched_getaffinity(child.pid)
        vcpu = tids[-1]
        helper.sweep(child.pid, {vcpu}, {0})
        assert {t: os.sched_getaffinity(t) for t in tids} == {**{t: {0} for t in tids[:-1]}, vcpu: all_cpus}
    finally:
        child.kill()
        child.wait()


# ---- IRQ affinity with movability (what the IRQ-affinity change reads) --------------------------------------


def _irq_mutations() -> list[tuple[str, str]]:
    """The recorded host listing, broken one way each."""
    text = rec("host-irq-affinity.txt")
    first = text.splitlines(keepends=True)[0]  # "0 0-1 0"
    return [
        ("nothing at all", ""),
        ("cut before the final end", _drop_last_lines(text, 1)),
        ("a second end", text + "end\n"),
        ("a field missing", text.replace(first, first.rsplit(" ", 1)[0] + "\n", 1)),
        ("not an IRQ number", text.replace(first, "x" + first[1:], 1)),
        ("movable neither 0 nor 1", text.replace(first, first[:-2] + "2\n", 1)),
        ("not a cpulist", text.replace(first, first.replace("0-1", "0-x"), 1)),
    ]


@pytest.mark.parametrize(("why", "bad"), _irq_mutations(), ids=lambda v: v if " " in v or not v else "")
def test_irq_affinity_refuses_a_cut_or_foreign_listing(why, bad):
    from orchestrator.facts.irqs import parse_irq_affinity

    with pytest.raises(ParseError):
        parse_irq_affinity(bad)


@pytest.mark.parametrize("vm", ["host", "guest"])
def test_irq_affinity_parses_the_recorded_listing(vm):
    """Recorded from the x86 lab (tests/recorded/lab-x86/README.md): 29 IRQs on CPUs 0-1, the timer (0), the
    cascade (2) and the virtio disks' per-queue request IRQs (25, 26, 28, 29: managed by the kernel) refusing to
    move."""
    from orchestrator.facts.irqs import parse_irq_affinity

    text = rec(f"{vm}-irq-affinity.txt")
    got = parse_irq_affinity(text)
    assert len(got.irqs) == 29 and got.irqs["1"] == "0-1"
    assert got.fixed == ["0", "2", "25", "26", "28", "29"]
    with pytest.raises(ParseError):
        parse_irq_affinity(_drop_last_lines(text, 1))  # cut: no `end`
