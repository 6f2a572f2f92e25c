"""Lab tests: real QEMU VMs booted through OVMF and GRUB, real sshd, systemd, GRUB tools, watchdog and QMP."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from orchestrator.boot.loader import one_second_later
from orchestrator.core.errors import HostKeyError, TransportError
from orchestrator.facts.base import BOOT_ID, CMDLINE, gather_basic
from orchestrator.remote.ssh import SSHTransport, host_key_fingerprint
from orchestrator.remote.transport import Endpoint
from tests.conftest import REPO, tune_env

pytestmark = pytest.mark.lab


def _reboot(t: SSHTransport) -> str:
    """Ask for a reboot that happens after this command returned; give the old boot_id."""
    old = BOOT_ID.gather(t)
    t.run(one_second_later(["systemctl", "reboot"]))
    return old


def _wait_new_boot(lab, name: str, old: str, timeout: float = 300) -> str:
    state = lab.load_state()
    return lab.wait_ssh(state, [name], timeout, old_boot_ids={name: old})[name]


def _cmdline(lab, name: str) -> list[str]:
    rec = lab.record(lab.load_state(), name)
    with SSHTransport(lab.endpoint(rec)) as t:
        return CMDLINE.gather(t).split()


# ---- what the lab gives every test -----------------------------------------------------------------------
def test_both_vms_answer_with_their_facts(host, guest):
    h, g = gather_basic(host, "lab1.host"), gather_basic(guest, "lab1.guest")
    assert (h.hostname, g.hostname) == ("lab1-host", "lab1-guest")
    for f in (h, g):
        assert f.arch == "x86_64" and f.kernel_release.startswith("6.1.")
        assert f.cpus_online == [0, 1]
        assert "panic=10" in f.cmdline.split()  # a trial boot that panics resets instead of hanging
        assert f.cmdline.startswith("BOOT_IMAGE=/boot/vmlinuz-")  # booted by GRUB, not by QEMU -kernel
    assert h.boot_id != g.boot_id


def test_known_hosts_holds_the_vms_real_host_keys(lab, host):
    rec = lab.record(lab.load_state(), "lab1-host")
    in_vm = host.read_file("/etc/ssh/ssh_host_ed25519_key.pub").split()[1]
    known = [line.split() for line in lab.known_hosts.read_text().splitlines()]
    assert [f"[127.0.0.1]:{rec.ssh_port}", "ssh-ed25519", in_vm.decode()] in known


def test_unknown_host_key_is_refused_with_its_fingerprint(lab, tmp_path):
    import paramiko

    rec = lab.record(lab.load_state(), "lab1-guest")
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    ep = Endpoint(host="127.0.0.1", port=rec.ssh_port, key_file=str(lab.client_key), known_hosts=str(empty))
    key = paramiko.Ed25519Key.from_private_key_file(str(lab.host_key("lab1-guest")))
    with pytest.raises(HostKeyError) as exc, SSHTransport(ep, connect_deadline_s=5) as t:
        t.run(["true"])
    assert host_key_fingerprint(key) in str(exc.value)


def test_tuner_user_escalates_with_sudo(lab):
    rec = lab.record(lab.load_state(), "lab1-host")
    plain = Endpoint(host="127.0.0.1", port=rec.ssh_port, user="tuner", key_file=str(lab.client_key),
                     known_hosts=str(lab.known_hosts), become=False)
    with SSHTransport(plain) as t:
        assert t.run(["id", "-un"]).stdout.strip() == "tuner"
        assert t.run(["cat", "/etc/shadow"], check=False).exit_status != 0
    with SSHTransport(lab.endpoint(rec, user="tuner")) as t:  # become=True for non-root
        assert t.run(["id", "-u"]).stdout.strip() == "0"
        assert t.run(["cat", "/etc/shadow"]).ok


def test_guest_runs_a_crash_looping_service_with_core_dumps(guest):
    def restarts() -> int:
        out = guest.run(["systemctl", "show", "-p", "NRestarts", "--value", "mirobot_teleoperate.service"])
        return int(out.stdout.strip())

    assert guest.run(["systemctl", "is-enabled", "mirobot_teleoperate.service"]).stdout.strip() == "enabled"
    first = restarts()
    deadline = time.monotonic() + 60
    while restarts() <= first and time.monotonic() < deadline:
        time.sleep(3)
    assert restarts() > first, "the service should keep crashing and being restarted"
    out = guest.run(["journalctl", "--no-pager", "-o", "json", "COREDUMP_UNIT=mirobot_teleoperate.service"])
    dumps = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert dumps and all(d["COREDUMP_SIGNAL"] == "11" for d in dumps)


QMP_CPUS = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
json.loads(f.readline())
for cmd in ("qmp_capabilities", "query-cpus-fast"):
    f.write(json.dumps({"execute": cmd}) + "\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r: break
print(json.dumps(r["return"]))
"""


def _vcpu_threads(host) -> tuple[int, dict[int, str]]:
    pid = int(host.run(["systemctl", "show", "-p", "MainPID", "--value", "rt-guest-vm.service"]).stdout)
    listing = host.run(["sh", "-c", 'cd /proc/"$1"/task && for t in *; do echo "$t $(cat $t/comm)"; done', "-",
                        str(pid)]).stdout
    threads = {int(line.split(" ", 1)[0]): line.split(" ", 1)[1] for line in listing.splitlines()}
    return pid, {tid: name for tid, name in threads.items() if name.startswith("CPU ")}


def test_host_runs_a_qemu_guest_with_named_vcpu_threads_and_qmp(host):
    pid, vcpus = _vcpu_threads(host)
    assert sorted(vcpus.values()) == ["CPU 0/TCG", "CPU 1/TCG"]
    argv = host.read_file(f"/proc/{pid}/cmdline").split(b"\0")
    assert b"rtguest,debug-threads=on" in argv
    cpus = json.loads(host.run(["python3", "-c", QMP_CPUS, "/run/rt-guest-vm/qmp.sock"]).stdout)
    assert sorted(c["thread-id"] for c in cpus) == sorted(vcpus)  # QMP agrees with the thread names
    # restarted by its service manager: new process, vCPU threads exist again
    host.run(["systemctl", "restart", "rt-guest-vm.service"])
    deadline = time.monotonic() + 30
    new_pid, new_vcpus = pid, {}
    while time.monotonic() < deadline and (new_pid == pid or len(new_vcpus) < 2):
        time.sleep(1)
        try:
            new_pid, new_vcpus = _vcpu_threads(host)
        except TransportError:
            continue
    assert new_pid != pid and sorted(new_vcpus.values()) == ["CPU 0/TCG", "CPU 1/TCG"]


def test_one_unit_fits_in_3_gib(lab):
    state = lab.load_state()
    total_kib = 0
    for rec in state.vms:
        status = open(f"/proc/{rec.pid}/status").read()
        total_kib += int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])
    assert total_kib < 3 * 1024 * 1024, f"one unit uses {total_kib / 1024:.0f} MiB of RAM"


def test_cli_status_facts_and_apply_against_the_lab(lab, lab_paths):
    env = tune_env(lab_paths)
    status = json.loads(subprocess.run([sys.executable, "-m", "orchestrator", "lab", "status", "--json"], env=env,
                                       capture_output=True, text=True, check=True, timeout=60).stdout)
    assert {(s["name"], s["running"], s["ssh"], s["qemu_status"]) for s in status} == {
        ("lab1-host", True, True, "running"), ("lab1-guest", True, True, "running")}
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "facts", "lab1.guest", "--json"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=REPO / "tests")
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    assert facts["hostname"] == "lab1-guest" and len(facts["boot_id"]) == 36 and "panic=10" in facts["cmdline"]
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "plan", "rt-profile", "--json"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=REPO / "tests")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["lab_booted"] is False  # already running: not booted again
    [unit] = result["results"]
    assert unit["dry_run"] and {o["status"] for o in unit["outcomes"]} <= {"planned", "noop", "skipped"}
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "lab", "ssh", "lab1-guest", "--", "hostname"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "lab1-guest", proc.stderr


# ---- destructive: the bootloader, panics and hangs -----------------------------------------------------
def test_grub_is_real_cmdline_change_then_one_shot_entry_falls_back(lab, host):
    """GRUB_CMDLINE_LINUX + update-grub + reboot -> new argument; grub-reboot -> one boot only; reset -> default."""
    try:
        host.run(["sed", "-i", r's/^GRUB_CMDLINE_LINUX="\(.*\)"$/GRUB_CMDLINE_LINUX="\1 rttune.lab=1"/',
                  "/etc/default/grub"])
        host.run(["update-grub"], timeout_s=180)
        old = _reboot(host)
        _wait_new_boot(lab, "lab1-host", old)
        assert "rttune.lab=1" in _cmdline(lab, "lab1-host")

        rec = lab.record(lab.load_state(), "lab1-host")
        with SSHTransport(lab.endpoint(rec)) as t:
            kernel = t.run(["uname", "-r"]).stdout.strip()
            uuid = t.run(["findmnt", "-no", "UUID", "/"]).stdout.strip()
            entry = (
                "#!/bin/sh\nexec tail -n +3 $0\n"
                "menuentry 'rt-tune trial' --id rttune-trial {\n"
                f"  search --no-floppy --fs-uuid --set=root {uuid}\n"
                f"  linux /boot/vmlinuz-{kernel} root=UUID={uuid} ro console=ttyS0,115200 panic=10 rttune.trial=1\n"
                f"  initrd /boot/initrd.img-{kernel}\n}}\n"
            )
            t.write_file("/etc/grub.d/45_rttune_trial", entry.encode(), mode=0o755)
            t.run(["update-grub"], timeout_s=180)
            t.run(["grub-reboot", "rttune-trial"])
            assert "next_entry=rttune-trial" in t.run(["grub-editenv", "list"]).stdout
            old = _reboot(t)
        _wait_new_boot(lab, "lab1-host", old)
        trial = _cmdline(lab, "lab1-host")
        assert "rttune.trial=1" in trial and "rttune.lab=1" not in trial
        with SSHTransport(lab.endpoint(rec)) as t:  # GRUB consumed the one-shot entry
            assert "next_entry=rttune-trial" not in t.run(["grub-editenv", "list"]).stdout
        lab.power_cycle("lab1-host")  # pulling the power falls back to the saved default
        after = _cmdline(lab, "lab1-host")
        assert "rttune.lab=1" in after and "rttune.trial=1" not in after
    finally:
        lab.reset(["lab1-host"])  # back to pristine disks for whoever comes next
    assert "rttune.lab=1" not in _cmdline(lab, "lab1-host")


def test_panicking_kernel_resets_itself(lab, guest):
    old = BOOT_ID.gather(guest)
    guest.run(one_second_later(["sh", "-c", "echo c > /proc/sysrq-trigger"]))
    new = _wait_new_boot(lab, "lab1-guest", old)  # panic=10 reboots it; nobody touched QEMU
    assert new != old
    rec = lab.record(lab.load_state(), "lab1-guest")
    serial = (lab.dir / "vms" / rec.name / "serial.log").read_bytes()
    assert b"Kernel panic" in serial and b"Rebooting in 10 seconds" in serial


def test_hung_unit_is_reset_by_its_watchdog(lab, guest):
    """Starve everything (systemd included) with RT spinners: systemd stops petting i6300esb, which resets."""
    old = BOOT_ID.gather(guest)
    assert "i6300ESB timer" in guest.run(["cat", "/sys/class/watchdog/watchdog0/identity"]).stdout
    guest.run(["sh", "-c", "sysctl -qw kernel.sched_rt_runtime_us=-1; for c in 0 1; do "
               "nohup taskset -c $c chrt -f 99 sh -c 'while :; do :; done' >/dev/null 2>&1 & done"])
    new = _wait_new_boot(lab, "lab1-guest", old, timeout=360)
    assert new != old


def test_pause_and_kill_through_qmp(lab):
    lab.pause("lab1-guest")
    try:
        assert {s.name: s.qemu_status for s in lab.status()}["lab1-guest"] == "paused"
    finally:
        lab.resume("lab1-guest")
    lab.kill("lab1-guest")
    assert {s.name: s.running for s in lab.status()}["lab1-guest"] is False
    lab.start("lab1-guest")
    assert {s.name: s.ssh for s in lab.status()}["lab1-guest"] is True


# ---- pristine resets from a snapshot -------------------------------------------------------------------------
def test_reset_restores_the_pristine_snapshot_in_seconds_and_honestly(lab, lab_paths):
    """`tune lab reset`: disk and memory back to the first pristine boot (a file and a runtime sysctl undone),
    still that boot (no reboot), with the lab's host key (known_hosts is strict) and the controller's clock, not
    the snapshot's (taken when the VM last booted pristine, at least 30 s before)."""
    from orchestrator.lab import snapshot

    state = lab.load_state()
    rec = lab.record(state, "lab1-guest")
    record = snapshot.load_record(lab.spec(state, rec))
    assert record is not None, "the lab snapshots a VM once it has booted pristine"
    time.sleep(max(0.0, 30 - (time.time() - record.saved_at)))  # a clock left as restored would be >= 30 s late
    with SSHTransport(lab.endpoint(rec)) as t:
        t.run(["sh", "-c", "echo x > /root/rt-tune-reset-marker && sync && sysctl -qw kernel.timer_migration=0"])
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "lab", "reset", "lab1-guest"],
                          env=tune_env(lab_paths), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "lab1-guest pristine snapshot restored in" in proc.stderr, proc.stderr
    assert "cold" not in proc.stderr
    with SSHTransport(lab.endpoint(rec)) as t:
        assert t.run(["test", "-e", "/root/rt-tune-reset-marker"], check=False).exit_status == 1
        assert t.run(["cat", "/proc/sys/kernel/timer_migration"]).stdout.strip() == "1"
        assert BOOT_ID.gather(t) == record.boot_id
        assert abs(float(t.run(["date", "+%s.%N"]).stdout) - time.time()) < 10
