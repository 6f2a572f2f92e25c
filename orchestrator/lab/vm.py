"""Starting and stopping one lab VM: a QEMU process booting OVMF -> GRUB (from its own ESP) -> the root disk."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.core.errors import LabError
from orchestrator.lab import sh
from orchestrator.lab.qmp import qmp_call

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
AAVMF_CODE = Path("/usr/share/AAVMF/AAVMF_CODE.fd")
AAVMF_VARS = Path("/usr/share/AAVMF/AAVMF_VARS.fd")
FIRMWARE = {"amd64": (OVMF_CODE, OVMF_VARS), "arm64": (AAVMF_CODE, AAVMF_VARS)}


@dataclass(frozen=True)
class VMSpec:
    name: str
    role: str
    directory: Path  # per-VM state: overlay, UEFI vars, QMP socket, serial log, pid file
    base_image: Path
    esp_image: Path
    ssh_port: int
    memory_mib: int = 1536
    cpus: int = 2
    accel: str = "tcg"
    fw_cfg: dict[str, Path] = field(default_factory=dict)
    arch: str = "amd64"
    forwards: tuple[tuple[int, int], ...] = ()  # more (127.0.0.1 port -> VM port) forwards, e.g. a nested guest

    @property
    def overlay(self) -> Path:
        return self.directory / "root.qcow2"

    @property
    def vars_file(self) -> Path:
        return self.directory / "OVMF_VARS.fd"

    @property
    def qmp_socket(self) -> Path:
        return self.directory / "qmp.sock"

    @property
    def serial_log(self) -> Path:
        return self.directory / "serial.log"

    @property
    def pidfile(self) -> Path:
        return self.directory / "qemu.pid"


def qemu_argv(spec: VMSpec) -> list[str]:
    # tb-size bounds the translation cache (QEMU defaults to 1 GiB per VM): one unit stays within 3 GiB
    accel = "tcg,thread=multi,tb-size=128" if spec.accel == "tcg" else spec.accel
    cpu = "max" if spec.accel == "tcg" else "host"
    code, _vars = FIRMWARE[spec.arch]
    if spec.arch == "arm64":
        # EL2 for the nested KVM guest; GICv3 as on the SoCs our users run (vgic_v4 needs a GICv4.1 though)
        machine = ["qemu-system-aarch64", "-name", f"{spec.name},debug-threads=on",
                   "-machine", "virt,virtualization=on,gic-version=3", "-accel", accel.replace("128", "256"),
                   "-cpu", cpu]
        watchdog: list[str] = []  # no i6300esb driver in an arm64 kernel's usual set; panic=N still resets
    else:
        machine = ["qemu-system-x86_64", "-name", f"{spec.name},debug-threads=on",
                   "-machine", "q35", "-accel", accel, "-cpu", cpu]
        # the unit's hardware watchdog: systemd pets it; a hung boot stops petting and the VM resets
        watchdog = ["-device", "i6300esb", "-action", "watchdog=reset"]
    hostfwd = ",".join(f"hostfwd=tcp:127.0.0.1:{outer}-:{inner}"
                       for outer, inner in ((spec.ssh_port, 22), *spec.forwards))
    argv = [
        *machine,
        "-smp", str(spec.cpus), "-m", str(spec.memory_mib),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
        "-drive", f"if=pflash,format=raw,unit=1,file={spec.vars_file}",
        "-drive", f"if=none,id=root,format=qcow2,file={spec.overlay},discard=unmap",
        "-device", "virtio-blk-pci,drive=root,bootindex=1",
        "-drive", f"if=none,id=esp,format=raw,readonly=on,file={spec.esp_image}",
        "-device", "virtio-blk-pci,drive=esp,bootindex=0",
        "-netdev", f"user,id=n0,{hostfwd}",
        "-device", "virtio-net-pci,netdev=n0,romfile=",
        "-device", "virtio-rng-pci",
        *watchdog,
        "-serial", f"file:{spec.serial_log}",
        "-qmp", f"unix:{spec.qmp_socket},server=on,wait=off",
        "-pidfile", str(spec.pidfile), "-daemonize",
    ]
    for name, path in sorted(spec.fw_cfg.items()):
        argv += ["-fw_cfg", f"name=opt/rt-tune/{name},file={path}"]
    return argv


def prepare_disks(spec: VMSpec, *, pristine: bool) -> bool:
    """Create the VM's copy-on-write overlay (and UEFI vars) if absent, or anew when `pristine`. True when the
    disks are new: the next boot is a pristine one."""
    spec.directory.mkdir(parents=True, exist_ok=True)
    fresh = pristine or not spec.overlay.exists()
    if fresh:
        spec.overlay.unlink(missing_ok=True)
        sh.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", spec.base_image, spec.overlay])
    if fresh or not spec.vars_file.exists():
        spec.vars_file.write_bytes(FIRMWARE[spec.arch][1].read_bytes())
    return fresh


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_port(preferred: int, taken: set[int], span: int = 200) -> int:
    """The preferred port if free, else the next free one; a clear error when none is."""
    for port in range(preferred, preferred + span):
        if port not in taken and port_is_free(port):
            return port
    raise LabError(f"no free TCP port on 127.0.0.1 in {preferred}-{preferred + span - 1} for the lab's SSH forwards")


def start(spec: VMSpec, *, paused: bool = False) -> int:
    """Start QEMU daemonized (`paused`: its CPUs stopped until QMP `cont`, e.g. to load a snapshot first);
    return its pid. Errors QEMU reports before daemonizing become LabError."""
    spec.serial_log.unlink(missing_ok=True)
    spec.qmp_socket.unlink(missing_ok=True)
    spec.pidfile.unlink(missing_ok=True)
    try:
        proc = subprocess.run([*qemu_argv(spec), *(["-S"] if paused else [])], capture_output=True, timeout=120)
    except BaseException:
        stop_all(spec)  # interrupted while QEMU daemonized: its pid never reached us, but it may be running
        raise
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        if "hostfwd" in err or "host forwarding" in err:
            raise LabError(f"{spec.name}: port {spec.ssh_port} on 127.0.0.1 is busy: {err}")
        raise LabError(f"{spec.name}: QEMU failed to start: {err}")
    return int(spec.pidfile.read_text().strip())


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def is_our_qemu(pid: int, directory: Path) -> bool:
    """Guard against pid reuse: the process must be a QEMU whose argv names a path below `directory` (with its
    slash: the VM `lab1-host` is not `lab1-host2`)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    needle = os.fsencode(str(directory)) + b"/"
    return bool(cmd) and b"qemu-system" in cmd[0] and any(needle in a for a in cmd)


def stop(spec: VMSpec, pid: int | None, grace: float = 5.0) -> None:
    """Stop the VM for certain: QMP quit, then SIGTERM, then SIGKILL. Never leaves a QEMU behind."""
    if pid and pid_alive(pid) and not is_our_qemu(pid, spec.directory):
        return  # the pid was reused by something else: the VM is long gone
    if pid_alive(pid):
        try:
            qmp_call(spec.qmp_socket, "quit", timeout=3)
        except LabError:
            pass
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None and pid_alive(pid):
            try:
                os.kill(pid, sig)  # type: ignore[arg-type]
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not pid_alive(pid):
            break
    if pid_alive(pid):
        raise LabError(f"{spec.name}: QEMU pid {pid} survived SIGKILL")
    spec.qmp_socket.unlink(missing_ok=True)
    spec.pidfile.unlink(missing_ok=True)


def qemu_pids(directory: Path) -> list[int]:
    """Every live QEMU process whose argv names a path below `directory` (whatever pid files or state say)."""
    return [int(proc.name) for proc in Path("/proc").iterdir()
            if proc.name.isdigit() and is_our_qemu(int(proc.name), directory) and pid_alive(int(proc.name))]


def stop_all(spec: VMSpec, grace: float = 2.0) -> None:
    """Stop every QEMU running from the VM's directory: after an interrupt, when which pid is ours is unsure."""
    for pid in qemu_pids(spec.directory):
        stop(spec, pid, grace=grace)
