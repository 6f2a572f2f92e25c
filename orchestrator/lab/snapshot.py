"""Pristine snapshots: a lab VM's disk and memory right after its first pristine boot, restored in about a second.

A QEMU internal snapshot (`snapshot-save` into the VM's own qcow2 overlay: the root disk and the RAM) is taken
once the VM has booted on fresh disks and answers SSH. `tune lab reset` restores it instead of booting: QEMU is
restarted paused on the same command line, the UEFI variables file is put back from a copy taken with the
snapshot, `snapshot-load` brings back disk and memory, and the VM runs on. The lab then resynchronises its clock
and checks its host key and boot_id (`Lab.reset`).

A snapshot is restored only while everything it was taken with is unchanged: the base and ESP images, the QEMU
binary (and the version it reports), the VM's QEMU command line, the overlay file itself and the snapshot
inside it. A record (`pristine.json`) is written last, after the snapshot is complete: a snapshot without one
is never restored. Anything else means a cold reset, with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from pydantic import BaseModel, ValidationError

from orchestrator.core.errors import LabError
from orchestrator.lab import vm
from orchestrator.lab.qmp import QMP

TAG = "rt-tune-pristine"
RECORD = "pristine.json"
VARS_COPY = "pristine-vars.fd"
JOB_TIMEOUT_S = 300.0
# Architectures whose restored snapshots run honestly. An arm64 VM (TCG with EL2, QEMU 7.2) restored from a
# snapshot runs, but its timers do not fire: RCU stalls within seconds and SSH times out (seen 2026-12-05,
# serial log: "rcu_sched kthread starved"). Its resets boot, and say why.
RESTORABLE_ARCHES = ("amd64",)


class FileId(BaseModel):
    """Enough of a file's identity to tell it was replaced or rewritten."""

    path: str
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> FileId:
        st = path.stat()
        return cls(path=str(path), size=st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino)


class SnapshotRecord(BaseModel):
    """What a pristine snapshot was taken with; all of it must still hold for a restore."""

    tag: str
    qemu_version: str
    qemu_binary: FileId
    base_image: FileId
    esp_image: FileId
    overlay_inode: int
    argv_sha256: str
    vars_sha256: str
    snapshot_date: list[int]  # the snapshot's date-sec, date-nsec in the overlay's snapshot table
    boot_id: str
    saved_at: float
    save_seconds: float


def record_path(spec: vm.VMSpec) -> Path:
    return spec.directory / RECORD


def _vars_copy(spec: vm.VMSpec) -> Path:
    return spec.directory / VARS_COPY


def _argv_sha256(spec: vm.VMSpec) -> str:
    return hashlib.sha256("\0".join(vm.qemu_argv(spec)).encode()).hexdigest()


def _qemu_binary(spec: vm.VMSpec) -> Path:
    found = shutil.which(vm.qemu_argv(spec)[0])
    if not found:
        raise LabError(f"{vm.qemu_argv(spec)[0]} is not installed")
    return Path(found).resolve()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _version(q: QMP) -> str:
    v = q.command("query-version")
    return f"{v['qemu']['major']}.{v['qemu']['minor']}.{v['qemu']['micro']} {v.get('package', '')}".strip()


def _root_node(q: QMP) -> str:
    for dev in q.command("query-block"):
        if dev.get("device") == "root" and dev.get("inserted"):
            return dev["inserted"]["node-name"]
    raise LabError("QEMU has no block device 'root'")


def _run_job(q: QMP, command: str, timeout: float = JOB_TIMEOUT_S, **args: object) -> None:
    """Run a snapshot job to its end; its error (QEMU's words) becomes a LabError."""
    job_id = f"rt-tune-{command}-{os.getpid()}"
    q.command(command, **{"job-id": job_id, "tag": TAG, **args})
    deadline = time.monotonic() + timeout
    while True:
        jobs = {j["id"]: j for j in q.command("query-jobs")}
        job = jobs.get(job_id)
        if job is None or job["status"] in ("concluded", "null"):
            break
        if time.monotonic() > deadline:
            raise LabError(f"QEMU {command} did not finish within {timeout:.0f} s")
        time.sleep(0.1)
    if job is not None:
        q.command("job-dismiss", id=job_id)
        if job.get("error"):
            raise LabError(f"QEMU {command}: {job['error']}")


def listed_snapshots(overlay: Path) -> list[dict]:
    """The overlay's snapshot table, read without taking QEMU's lock (qemu-img -U)."""
    try:
        proc = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(overlay)], capture_output=True,
                              timeout=60, text=True)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"qemu-img info {overlay}: {exc}") from exc
    if proc.returncode != 0:
        raise LabError(f"qemu-img info {overlay}: {proc.stderr.strip()}")
    return json.loads(proc.stdout).get("snapshots", [])


def tagged(overlay: Path) -> dict | None:
    """The pristine snapshot's entry in the overlay's snapshot table, or None."""
    return next((s for s in listed_snapshots(overlay) if s.get("name") == TAG), None)


def forget(spec: vm.VMSpec) -> None:
    """Drop the record and the variables copy (the overlay, and any snapshot in it, is the caller's)."""
    record_path(spec).unlink(missing_ok=True)
    _vars_copy(spec).unlink(missing_ok=True)


def _delete_tag_offline(spec: vm.VMSpec) -> None:
    """Remove a (possibly half-written) snapshot from a stopped VM's overlay; nothing to remove is fine."""
    if spec.overlay.exists():
        subprocess.run(["qemu-img", "snapshot", "-d", TAG, str(spec.overlay)], capture_output=True, timeout=120)


def save(spec: vm.VMSpec, pid: int, boot_id: str) -> SnapshotRecord:
    """Snapshot the running VM (disk and RAM into its overlay) and record what it was taken with.

    A failure leaves no snapshot and no record, and the VM running. An interrupt (Ctrl-C) stops the VM and
    removes whatever part of the snapshot was written: no QEMU process and no half snapshot are left.
    """
    forget(spec)
    t0 = time.monotonic()
    try:
        with QMP(spec.qmp_socket, timeout=JOB_TIMEOUT_S) as q:
            version = _version(q)
            node = _root_node(q)
            if tagged(spec.overlay):
                _run_job(q, "snapshot-delete", devices=[node])
            _run_job(q, "snapshot-save", vmstate=node, devices=[node])
        snap = tagged(spec.overlay)
        if snap is None:
            raise LabError(f"{spec.name}: QEMU reported the snapshot saved, but {spec.overlay} does not list it")
        return keep_record(spec, version, snap, boot_id, t0)
    except Exception as exc:
        forget(spec)
        try:
            with QMP(spec.qmp_socket, timeout=60) as q:
                if tagged(spec.overlay):
                    _run_job(q, "snapshot-delete", devices=[_root_node(q)])
        except (LabError, OSError):
            pass
        raise LabError(f"{spec.name}: no pristine snapshot: {exc}") from exc
    except BaseException:
        forget(spec)
        vm.stop(spec, pid, grace=2.0)
        vm.stop_all(spec)
        _delete_tag_offline(spec)
        raise


def keep_record(spec: vm.VMSpec, version: str, snap: dict, boot_id: str, t0: float) -> SnapshotRecord:
    """Copy the UEFI variables beside the snapshot and write its record: the last step of a save."""
    shutil.copyfile(spec.vars_file, _vars_copy(spec))
    record = SnapshotRecord(
        tag=TAG, qemu_version=version, qemu_binary=FileId.of(_qemu_binary(spec)),
        base_image=FileId.of(spec.base_image), esp_image=FileId.of(spec.esp_image),
        overlay_inode=spec.overlay.stat().st_ino, argv_sha256=_argv_sha256(spec),
        vars_sha256=_sha256(_vars_copy(spec)),
        snapshot_date=[int(snap.get("date-sec", 0)), int(snap.get("date-nsec", 0))], boot_id=boot_id,
        saved_at=time.time(), save_seconds=round(time.monotonic() - t0, 2))
    tmp = record_path(spec).with_suffix(".tmp")
    tmp.write_text(record.model_dump_json(indent=2) + "\n")
    os.replace(tmp, record_path(spec))  # last: only a complete snapshot has a record
    return record


def load_record(spec: vm.VMSpec) -> SnapshotRecord | None:
    try:
        return SnapshotRecord.model_validate_json(record_path(spec).read_text())
    except (OSError, ValidationError, ValueError):
        return None


def unusable(spec: vm.VMSpec) -> str | None:
    """Why the VM's pristine snapshot cannot be restored, or None when it can."""
    if spec.arch not in RESTORABLE_ARCHES:
        return (f"{spec.arch} lab VMs stall after a snapshot restore (their timers stop firing under TCG), "
                "so they are not snapshotted")
    if not record_path(spec).exists():
        return "no pristine snapshot"
    record = load_record(spec)
    if record is None:
        return f"{record_path(spec)} is unreadable"
    try:
        checks = [
            (FileId.of(spec.base_image) != record.base_image, f"the base image {spec.base_image} changed"),
            (FileId.of(spec.esp_image) != record.esp_image, f"the ESP image {spec.esp_image} changed"),
            (FileId.of(_qemu_binary(spec)) != record.qemu_binary, "the QEMU binary changed"),
            (spec.overlay.stat().st_ino != record.overlay_inode, f"the overlay {spec.overlay} was replaced"),
            (_argv_sha256(spec) != record.argv_sha256, "the VM's QEMU command line changed"),
            (_sha256(_vars_copy(spec)) != record.vars_sha256, "the UEFI variables copy changed"),
        ]
    except (OSError, LabError) as exc:
        return f"cannot check the snapshot: {exc}"
    for failed, reason in checks:
        if failed:
            return reason
    try:
        snap = tagged(spec.overlay)
    except LabError as exc:
        return str(exc)
    if snap is None:
        return f"the overlay {spec.overlay} holds no snapshot {TAG}"
    if [int(snap.get("date-sec", 0)), int(snap.get("date-nsec", 0))] != record.snapshot_date:
        return f"the snapshot {TAG} in {spec.overlay} is not the one recorded"
    return None


def restore(spec: vm.VMSpec, pid: int | None) -> int:
    """Restart the VM's QEMU paused, load the pristine snapshot, run it; return the new pid.

    Call `unusable` first. Any failure or interrupt stops the new QEMU: no process is left behind, and the
    caller falls back to a cold reset.
    """
    record = load_record(spec)
    if record is None:
        raise LabError(f"{spec.name}: no pristine snapshot record")
    vm.stop(spec, pid)
    shutil.copyfile(_vars_copy(spec), spec.vars_file)
    new_pid = vm.start(spec, paused=True)
    try:
        with QMP(spec.qmp_socket, timeout=JOB_TIMEOUT_S) as q:
            version = _version(q)
            if version != record.qemu_version:
                raise LabError(f"QEMU is {version}, the snapshot was taken with {record.qemu_version}")
            _run_job(q, "snapshot-load", vmstate=_root_node(q), devices=[_root_node(q)])
            q.command("cont")
    except BaseException:
        vm.stop_all(spec)
        raise
    return new_pid
