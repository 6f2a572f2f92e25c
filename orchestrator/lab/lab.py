"""The lab as a whole: units of (host VM, guest VM), their keys, ports, state file and inventory.

`Lab.up` builds or reuses the cached images, gives each VM a copy-on-write overlay, boots them through
UEFI and GRUB, waits until SSH answers with the host key the lab generated for that VM, and writes the
inventory `tune` uses by default. The harness keeps QMP control of every VM (power-cycle, pause, kill).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from orchestrator.config.yamlio import dump_yaml
from orchestrator.core.errors import HostKeyError, LabError, TransportError
from orchestrator.core.events import Event, EventSink, discard
from orchestrator.core.paths import Paths
from orchestrator.facts.base import BOOT_ID
from orchestrator.lab import deps, images, snapshot, vm
from orchestrator.lab.qmp import qmp_call
from orchestrator.remote.ssh import SSHTransport
from orchestrator.remote.transport import Endpoint

FIRST_SSH_PORT = 2230
ROLE_MEMORY_MIB = {"host": 1536, "guest": 1024}  # one unit in <= 3 GiB with QEMU's own overhead
ROLE_CPUS = {"host": 2, "guest": 2}
QEMU_SERVICE = "rt-guest-vm.service"
# arm64: the guest runs nested in the host VM (KVM inside TCG), so the host VM holds both
NESTED_HOST_MEMORY_MIB = 2048
NESTED_GUEST_MEMORY_MIB = 384  # rt-guest-vm.service's -m
NESTED_GUEST_SSH_PORT = 2222  # the guest's SSH as the host sees it (rt-guest-vm.service's hostfwd)
ARCHES = ("amd64", "arm64")


class VMRecord(BaseModel):
    name: str
    unit: str
    role: str
    ssh_port: int
    pid: int | None = None
    memory_mib: int
    cpus: int
    nested_in: str | None = None  # the host VM this guest runs inside (arm64); None: a QEMU process here


class LabState(BaseModel):
    image_dir: str
    arch: str = "amd64"
    accel: str = "tcg"
    vms: list[VMRecord]


class VMStatus(BaseModel):
    name: str
    unit: str
    role: str
    running: bool
    qemu_status: str | None  # QMP query-status: running, paused, ...
    ssh: bool
    ssh_port: int
    pid: int | None


class Lab:
    def __init__(self, paths: Paths, events: EventSink = discard) -> None:
        self.paths = paths
        self.dir = paths.lab
        self.events = events

    # ---- files ---------------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.dir / "lab.json"

    @property
    def client_key(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    def host_key(self, name: str) -> Path:
        return self.dir / "hostkeys" / name

    def load_state(self) -> LabState | None:
        if not self.state_file.exists():
            return None
        return LabState.model_validate_json(self.state_file.read_text())

    def _save_state(self, state: LabState) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(state.model_dump_json(indent=2) + "\n")
        os.replace(tmp, self.state_file)

    def spec(self, state: LabState, rec: VMRecord) -> vm.VMSpec:
        if rec.nested_in:
            raise LabError(f"{rec.name} runs inside {rec.nested_in}; it has no QEMU process of its own here")
        image_dir = Path(state.image_dir)
        vmdir = self.dir / "vms" / rec.name
        fw_cfg = {"host_key": self.host_key(rec.name), "authorized_keys": Path(f"{self.client_key}.pub"),
                  "hostname": vmdir / "hostname"}
        forwards: tuple[tuple[int, int], ...] = ()
        for nested in self.nested_guests(state, rec.name):
            # the nested guest's identity travels through the host's fw_cfg to the guest's own QEMU
            fw_cfg |= {"guest_host_key": self.host_key(nested.name),
                       "guest_authorized_keys": Path(f"{self.client_key}.pub"),
                       "guest_hostname": self.dir / "vms" / nested.name / "hostname"}
            forwards += ((nested.ssh_port, NESTED_GUEST_SSH_PORT),)
        return vm.VMSpec(
            name=rec.name, role=rec.role, directory=vmdir,
            base_image=image_dir / f"root-{rec.role}.raw", esp_image=image_dir / "esp.img",
            ssh_port=rec.ssh_port, memory_mib=rec.memory_mib, cpus=rec.cpus, accel=state.accel,
            fw_cfg=fw_cfg, arch=state.arch, forwards=forwards,
        )

    @staticmethod
    def nested_guests(state: LabState, host: str) -> list[VMRecord]:
        return [r for r in state.vms if r.nested_in == host]

    def record(self, state: LabState, name: str) -> VMRecord:
        for rec in state.vms:
            if rec.name == name:
                return rec
        raise LabError(f"no lab VM named {name!r}; VMs: {', '.join(r.name for r in state.vms)}")

    def endpoint(self, rec: VMRecord, user: str = "root") -> Endpoint:
        return Endpoint(host="127.0.0.1", port=rec.ssh_port, user=user, key_file=str(self.client_key),
                        known_hosts=str(self.known_hosts), become=user != "root")

    # ---- keys ----------------------------------------------------------------------------------------
    def _keygen(self, path: Path, comment: str) -> None:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                           check=True, capture_output=True)

    def nested_known_hosts(self, name: str) -> Path:
        """A nested guest's key as its host sees it ([127.0.0.1]:2222 on every arm64 host): a file per guest."""
        return self.dir / f"known_hosts.{name}"

    def _write_known_hosts(self, state: LabState) -> None:
        lines = []
        for rec in state.vms:
            kind, blob = Path(f"{self.host_key(rec.name)}.pub").read_text().split()[:2]
            lines.append(f"[127.0.0.1]:{rec.ssh_port} {kind} {blob}\n")
            if rec.nested_in:
                self.nested_known_hosts(rec.name).write_text(f"[127.0.0.1]:{NESTED_GUEST_SSH_PORT} {kind} {blob}\n")
        self.known_hosts.write_text("".join(lines))

    # ---- up / down -----------------------------------------------------------------------------------
    def up(self, units: int = 1, *, host_only: bool = False, boot_timeout: float | None = None,
           accel: str = "tcg", arch: str = "amd64") -> LabState:
        """Boot the lab (building images if needed); VMs already running are left as they are."""
        if arch not in ARCHES:
            raise LabError(f"no lab for architecture {arch!r}; known: {', '.join(ARCHES)}")
        deps.check(deps.LAB[arch])
        if units < 1:
            raise LabError("a lab needs at least one unit")
        old = self.load_state()
        if old and old.arch != arch and any(self._alive(old, r) for r in old.vms):
            raise LabError(f"the lab in {self.dir} runs {old.arch} VMs; `tune lab down` first, or use another "
                           "RT_TUNE_STATE for a second lab")
        if boot_timeout is None:
            boot_timeout = 900.0 if arch == "arm64" else 300.0  # the nested guest boots after its host
        self.dir.mkdir(parents=True, exist_ok=True)
        image_set = self.build(arch)
        running = {r.name: r for r in (old.vms if old else []) if self._alive(old, r)} if old else {}
        self._keygen(self.client_key, "rt-tune-lab")
        roles = ("host",) if host_only else ("host", "guest")
        wanted = [(f"lab{u}", role) for u in range(1, units + 1) for role in roles]
        taken = {r.ssh_port for r in running.values()}
        recs: list[VMRecord] = []
        for unit, role in wanted:
            name = f"{unit}-{role}"
            if name in running:
                recs.append(running[name])
                continue
            port = vm.pick_port(FIRST_SSH_PORT + len(recs), taken)
            taken.add(port)
            if image_set.nested_guest:
                nested_in = f"{unit}-host" if role == "guest" else None
                memory = NESTED_GUEST_MEMORY_MIB if role == "guest" else NESTED_HOST_MEMORY_MIB
            else:
                nested_in, memory = None, ROLE_MEMORY_MIB[role]
            recs.append(VMRecord(name=name, unit=unit, role=role, ssh_port=port, memory_mib=memory,
                                 cpus=ROLE_CPUS[role], nested_in=nested_in))
        for name, rec in running.items():  # VMs beyond what was asked stay in the state (and running)
            if name not in {r.name for r in recs}:
                recs.append(rec)
        state = LabState(image_dir=str(image_set.directory), arch=image_set.arch, accel=accel, vms=recs)
        if old and old.image_dir != state.image_dir and running:
            raise LabError("the lab is running on older images; `tune lab down` first, then `tune lab up`")
        for rec in recs:
            self._keygen(self.host_key(rec.name), rec.name)
            (self.dir / "vms" / rec.name).mkdir(parents=True, exist_ok=True)
            (self.dir / "vms" / rec.name / "hostname").write_text(rec.name)
        started: list[VMRecord] = []
        fresh: list[VMRecord] = []  # booting on new disks: snapshotted once up (pristine resets)
        try:
            for rec in recs:
                if rec.name in running:
                    continue
                if rec.nested_in:  # its host's rt-guest-vm.service starts it
                    started.append(rec)
                    continue
                spec = self.spec(state, rec)
                # new images (a changed recipe): overlays of the old ones must not be booted on the new bases
                if self._prepare_disks(spec, pristine=bool(old and old.image_dir != state.image_dir)):
                    fresh.append(rec)
                (spec.directory / "hostname").write_text(rec.name)
                rec.pid = self._start(spec, rec, taken)
                started.append(rec)
                self._write_known_hosts(state)
                self._save_state(state)
            self._write_known_hosts(state)
            self._save_state(state)
            boot_ids = self.wait_ssh(state, [r.name for r in started], boot_timeout)
            self._save_snapshots(state, fresh, boot_ids)
        except BaseException:
            # Ctrl-C or a failure while booting: leave nothing running that this call started
            for rec in started:
                if not rec.nested_in:
                    vm.stop(self.spec(state, rec), rec.pid)
                rec.pid = None
            self._save_state(state)
            raise
        self.write_inventory(state)
        return state

    def build(self, arch: str = "amd64") -> images.ImageSet:
        """The cached images for `arch`, built first if needed (waits for another process building them)."""
        if arch not in ARCHES:
            raise LabError(f"no lab for architecture {arch!r}; known: {', '.join(ARCHES)}")
        deps.check(deps.LAB[arch])
        return images.ensure_images(images.ImageRecipe.default(arch), self.paths.cache, self.events)

    def _start(self, spec: vm.VMSpec, rec: VMRecord, taken: set[int]) -> int:
        for _attempt in range(5):
            try:
                pid = vm.start(spec)
                self.events(Event("lab.vm.started", rec.name, f"QEMU pid {pid}, SSH on 127.0.0.1:{rec.ssh_port}"))
                return pid
            except LabError as exc:
                if "busy" not in str(exc):
                    raise
                # lost a race for the port between probing and QEMU binding it: take the next one
                rec.ssh_port = vm.pick_port(rec.ssh_port + 1, taken)
                taken.add(rec.ssh_port)
                spec = vm.VMSpec(**{**spec.__dict__, "ssh_port": rec.ssh_port})
        raise LabError(f"{rec.name}: could not find a free port for SSH")

    def _alive(self, state: LabState | None, rec: VMRecord) -> bool:
        if state is not None and rec.nested_in:
            return self._alive(state, self.record(state, rec.nested_in))
        if state is None or not vm.pid_alive(rec.pid):
            return False
        return vm.is_our_qemu(rec.pid or 0, self.spec(state, rec).directory)

    def down(self) -> list[str]:
        """Stop every lab VM (also ones whose state was lost: found by their argv). Returns what was stopped."""
        stopped = []
        state = self.load_state()
        if state:
            for rec in state.vms:
                if not rec.nested_in and vm.pid_alive(rec.pid):
                    vm.stop(self.spec(state, rec), rec.pid)
                    stopped.append(rec.name)
                rec.pid = None
            self._save_state(state)
        for pid in self.stray_qemu_pids():
            vm.stop(vm.VMSpec(name=f"pid {pid}", role="?", directory=self.dir, base_image=Path(),
                              esp_image=Path(), ssh_port=0), pid)
            stopped.append(f"pid {pid}")
        self.events(Event("lab.down", "lab", f"stopped {len(stopped)} VM(s)"))
        return stopped

    def stray_qemu_pids(self) -> list[int]:
        """QEMU processes running from this lab's directory (what `down` must leave none of)."""
        return vm.qemu_pids(self.dir / "vms")

    # ---- waiting for SSH -------------------------------------------------------------------------------
    def wait_ssh(self, state: LabState, names: list[str], timeout: float,
                 old_boot_ids: dict[str, str] | None = None) -> dict[str, str]:
        """Wait until each VM answers SSH (with its real host key) and, if given, has a new boot_id."""
        deadline = time.monotonic() + timeout
        pending = {n: self.record(state, n) for n in names}
        boot_ids: dict[str, str] = {}
        t0 = time.monotonic()
        while pending:
            for name, rec in list(pending.items()):
                if not self._alive(state, rec):
                    raise LabError(f"{name}: QEMU exited while booting; see {self.serial_log(state, rec)}")
                if not _ssh_banner(rec.ssh_port):
                    continue
                try:
                    with SSHTransport(self.endpoint(rec), connect_deadline_s=5) as t:
                        boot_id = BOOT_ID.gather(t, timeout_s=20)
                except TransportError:
                    continue
                if old_boot_ids and old_boot_ids.get(name) == boot_id:
                    continue
                boot_ids[name] = boot_id
                del pending[name]
                self.events(Event("lab.vm.ssh", name, f"SSH up after {time.monotonic() - t0:.0f} s",
                                  data={"seconds": round(time.monotonic() - t0, 1), "boot_id": boot_id}))
            if pending and time.monotonic() > deadline:
                logs = ", ".join(self.serial_log(state, r) for r in pending.values())
                raise LabError(f"{', '.join(pending)}: no SSH within {timeout:.0f} s; serial console: {logs}")
            if pending:
                time.sleep(1.0)
        return boot_ids

    def serial_log(self, state: LabState, rec: VMRecord) -> str:
        if rec.nested_in:
            return f"/var/log/rt-guest-vm.console on {rec.nested_in}"
        return str(self.spec(state, rec).serial_log)

    # ---- control ---------------------------------------------------------------------------------------
    def _require(self) -> LabState:
        state = self.load_state()
        if state is None:
            raise LabError(f"no lab in {self.dir}; run `tune lab up` first")
        return state

    def qmp(self, name: str, command: str, **args: Any) -> Any:
        state = self._require()
        rec = self.record(state, name)
        if rec.nested_in:
            raise LabError(f"{name} runs nested in {rec.nested_in}; its QMP socket is the host's "
                           "/run/rt-guest-vm/qmp.sock")
        if not self._alive(state, rec):
            raise LabError(f"{name} is not running")
        return qmp_call(self.spec(state, rec).qmp_socket, command, **args)

    def power_cycle(self, name: str, *, wait: bool = True, timeout: float = 240.0) -> str | None:
        """Hard reset through QMP, like pulling the unit's power; optionally wait for SSH on a new boot."""
        state = self._require()
        rec = self.record(state, name)
        old = self.boot_id(name) if wait else None
        if rec.nested_in:
            # the guest's QEMU killed on its host; Restart=always starts it again, as power coming back would
            with SSHTransport(self.endpoint(self.record(state, rec.nested_in)), connect_deadline_s=30) as t:
                t.run(["systemctl", "kill", "--signal=SIGKILL", QEMU_SERVICE], timeout_s=30)
            self.events(Event("lab.vm.power_cycle", name, f"guest QEMU killed on {rec.nested_in}; "
                                                         "systemd restarts it"))
        else:
            self.qmp(name, "system_reset")
            self.events(Event("lab.vm.power_cycle", name, "reset through QMP"))
        if not wait:
            return None
        return self.wait_ssh(state, [rec.name], timeout, old_boot_ids={rec.name: old} if old else None)[rec.name]

    def pause(self, name: str) -> None:
        self.qmp(name, "stop")

    def resume(self, name: str) -> None:
        self.qmp(name, "cont")

    def kill(self, name: str) -> None:
        """Hard kill, for fault injection: the VM disappears as a unit that lost power would."""
        state = self._require()
        rec = self.record(state, name)
        if rec.nested_in:
            raise LabError(f"{name} runs nested in {rec.nested_in}: kill the host, or power-cycle the guest")
        vm.stop(self.spec(state, rec), rec.pid, grace=0.5)
        rec.pid = None
        self._save_state(state)

    def boot_id(self, name: str) -> str | None:
        state = self._require()
        try:
            with SSHTransport(self.endpoint(self.record(state, name)), connect_deadline_s=5) as t:
                return BOOT_ID.gather(t, timeout_s=20)
        except TransportError:
            return None

    def _prepare_disks(self, spec: vm.VMSpec, *, pristine: bool) -> bool:
        fresh = vm.prepare_disks(spec, pristine=pristine)
        if fresh:
            snapshot.forget(spec)  # the old overlay, and the snapshot in it, are gone
        return fresh

    def _save_snapshots(self, state: LabState, recs: list[VMRecord], boot_ids: dict[str, str]) -> None:
        """Snapshot VMs that just booted pristine (an arm64 host once its nested guest is up too). A failure
        costs only the fast reset: it is reported, and the VM runs on."""
        for rec in recs:
            spec = self.spec(state, rec)
            if spec.arch not in snapshot.RESTORABLE_ARCHES:
                continue  # see snapshot.RESTORABLE_ARCHES: its resets boot
            try:
                saved = snapshot.save(spec, rec.pid or 0, boot_ids.get(rec.name, ""))
            except LabError as exc:
                self.events(Event("lab.snapshot.failed", rec.name, f"{exc}; `tune lab reset` will boot it"))
                continue
            self.events(Event("lab.snapshot.saved", rec.name, f"pristine snapshot saved in {saved.save_seconds} s",
                              data={"seconds": saved.save_seconds}))

    def reset(self, names: list[str] | None = None, boot_timeout: float = 300.0, *,
              cold: bool = False) -> LabState:
        """Return VMs to pristine: restore each one's pristine snapshot (disk and memory, about a second), or,
        with `cold`, without a usable snapshot or when restoring fails, stop it, give it fresh overlays and UEFI
        vars and boot it. A restored VM is checked (its host key, its snapshot's boot_id) and its clock set."""
        state = self._require()
        recs = [self.record(state, n) for n in names] if names else list(state.vms)
        for rec in [r for r in recs if r.nested_in]:
            if rec.nested_in not in {r.name for r in recs}:
                raise LabError(f"{rec.name} runs nested in {rec.nested_in}: its disk is inside the host's; "
                               f"reset {rec.nested_in} too")
        waited = [r.name for r in recs]
        recs = [r for r in recs if not r.nested_in]
        restored = self._restore_snapshots(state, [] if cold else recs)
        booted = [r for r in recs if r.name not in restored]
        for rec in booted:
            spec = self.spec(state, rec)
            vm.stop(spec, rec.pid)
            self._prepare_disks(spec, pristine=True)
            rec.pid = None
        self._save_state(state)
        taken = {r.ssh_port for r in state.vms}
        try:
            for rec in booted:
                rec.pid = self._start(self.spec(state, rec), rec, taken)
                self.events(Event("lab.reset.cold", rec.name, "booting on fresh disks"))
            self._write_known_hosts(state)
            self._save_state(state)
            cold_names = [n for n in waited if n not in restored]
            boot_ids = self.wait_ssh(state, cold_names, boot_timeout)
            self._save_snapshots(state, booted, boot_ids)
        except BaseException:
            for rec in booted:  # Ctrl-C or a failure while booting: leave nothing half-started
                vm.stop(self.spec(state, rec), rec.pid)
                rec.pid = None
            self._save_state(state)
            raise
        self.write_inventory(state)
        return state

    def _restore_snapshots(self, state: LabState, recs: list[VMRecord]) -> set[str]:
        """Restore what can be restored; return the names now pristine (a host's nested guests included).
        A VM whose snapshot does not match, or whose restore fails, is left for the cold path, and said so."""
        done: set[str] = set()
        for rec in recs:
            spec = self.spec(state, rec)
            reason = snapshot.unusable(spec)
            if reason is None:
                t0 = time.monotonic()
                old_pid = rec.pid
                try:
                    rec.pid = snapshot.restore(spec, rec.pid)
                    self._save_state(state)
                    self._check_restored(state, rec)
                except LabError as exc:
                    reason = f"restoring its snapshot failed: {exc}"
                except BaseException:  # Ctrl-C: no VM left half-restored, none left running
                    vm.stop(spec, old_pid, grace=2.0)
                    vm.stop_all(spec)
                    rec.pid = None
                    self._save_state(state)
                    raise
                else:
                    seconds = round(time.monotonic() - t0, 1)
                    self.events(Event("lab.reset.restored", rec.name, f"pristine snapshot restored in {seconds} s",
                                      data={"seconds": seconds}))
                    done |= {rec.name, *(g.name for g in self.nested_guests(state, rec.name))}
                    continue
            self.events(Event("lab.reset.fallback", rec.name, f"{reason}: a cold reset instead"))
        return done

    def _check_restored(self, state: LabState, rec: VMRecord) -> None:
        """A restored VM must be the snapshot's boot, answer with the lab's host key (SSHTransport checks it
        against known_hosts), and have the controller's time, not the snapshot's (its nested guests too)."""
        record = snapshot.load_record(self.spec(state, rec))
        expected = record.boot_id if record else ""
        for r in [rec, *self.nested_guests(state, rec.name)]:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with SSHTransport(self.endpoint(r), connect_deadline_s=10) as t:
                        boot_id = BOOT_ID.gather(t, timeout_s=20)
                        t.run(["date", "-u", "-s", f"@{time.time():.3f}"], timeout_s=20)
                    break
                except HostKeyError as exc:
                    raise LabError(f"{r.name} answers with another host key than the lab's: {exc}") from exc
                except TransportError as exc:
                    if time.monotonic() > deadline:
                        raise LabError(f"{r.name} does not answer SSH after the restore: {exc}") from exc
                    time.sleep(0.5)
            if r is rec and expected and boot_id != expected:
                raise LabError(f"{r.name} came back with boot_id {boot_id}, the snapshot's is {expected}")

    def start(self, name: str, boot_timeout: float = 300.0) -> None:
        """Start a stopped (or killed) VM again on its current disks."""
        state = self._require()
        rec = self.record(state, name)
        if rec.nested_in:
            name = rec.nested_in  # the guest starts with its host
            rec = self.record(state, name)
        if self._alive(state, rec):
            return
        rec.pid = self._start(self.spec(state, rec), rec, {r.ssh_port for r in state.vms})
        self._write_known_hosts(state)
        self._save_state(state)
        self.wait_ssh(state, [name], boot_timeout)

    def status(self) -> list[VMStatus]:
        state = self.load_state()
        if state is None:
            return []
        out = []
        for rec in state.vms:
            alive = self._alive(state, rec)
            qstat = None
            if alive and not rec.nested_in:
                try:
                    qstat = qmp_call(self.spec(state, rec).qmp_socket, "query-status", timeout=3)["status"]
                except LabError:
                    qstat = "unknown"
            out.append(VMStatus(name=rec.name, unit=rec.unit, role=rec.role, running=alive, qemu_status=qstat,
                                ssh=alive and _ssh_banner(rec.ssh_port), ssh_port=rec.ssh_port,
                                pid=rec.pid if alive and not rec.nested_in else None))
        return out

    # ---- inventory and ssh ----------------------------------------------------------------------------
    def write_inventory(self, state: LabState) -> Path:
        units: dict[str, dict] = {}
        for rec in state.vms:
            ep = {"address": "127.0.0.1", "port": rec.ssh_port, "user": "root", "key": str(self.client_key),
                  "known_hosts": str(self.known_hosts)}
            if rec.nested_in:
                # as on a robot: the guest is reached through its host (a jump host), at the host's forward
                ep |= {"port": NESTED_GUEST_SSH_PORT, "via_host": True,
                       "known_hosts": str(self.nested_known_hosts(rec.name))}
            unit = units.setdefault(rec.unit, {
                "power_cycle": [sys.executable, "-m", "orchestrator", "lab", "power-cycle", f"{rec.unit}-host",
                                "--no-wait"],
                "guest_power_cycle": [sys.executable, "-m", "orchestrator", "lab", "power-cycle",
                                      f"{rec.unit}-guest", "--no-wait"],
                "vars": {"rt_cpus": "1", "housekeeping_cpus": "0", "guest_rt_cpus": "1", "guest_housekeeping_cpus": "0",
                         "cpus": ROLE_CPUS["host"], "guest_cpus": ROLE_CPUS["guest"],
                         "qemu_service": QEMU_SERVICE, "lab": True, "arch": state.arch},
            })
            if rec.nested_in:
                # its command line is its host's: -append in rt-guest-vm.service
                unit["vars"]["guest_bootloader"] = "qemu-append"
            elif rec.role == "guest":
                unit["guest_on_host"] = False  # a sibling VM: the host's QEMU stand-in is not this guest
            unit[rec.role] = ep
        doc = {"units": {u: units[u] for u in sorted(units)}, "groups": {"lab": sorted(units)}}
        path = self.paths.lab_inventory
        path.write_text(dump_yaml(doc, header="written by `tune lab up`; edits are overwritten"))
        return path

    def ssh_argv(self, name: str, command: list[str], user: str = "root") -> list[str]:
        state = self._require()
        rec = self.record(state, name)
        return ["ssh", "-i", str(self.client_key), "-p", str(rec.ssh_port),
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=10", f"{user}@127.0.0.1", *command]



def _ssh_banner(port: int, timeout: float = 3.0) -> bool:
    """True when something speaking SSH answers (QEMU's forward accepts TCP before the guest's sshd is up)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False
