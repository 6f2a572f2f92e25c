"""Ctrl-C during `tune lab up`: nothing left running, nothing half-built. Real debootstrap, real QEMU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.core.paths import Paths
from orchestrator.lab import sh

pytestmark = pytest.mark.lab


def _procs_mentioning(path: Path) -> list[str]:
    needle = os.fsencode(str(path))
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            cwd = os.readlink(proc / "cwd") if (proc / "cwd").exists() else ""
        except OSError:
            continue
        if needle in cmd or cwd.startswith(str(path)):
            shown = cmd.replace(b"\0", b" ")[:200]
            found.append(f"{proc.name}: {shown!r}")
    return found


def _tune(paths: Paths) -> subprocess.Popen:
    env = {**os.environ, "RT_TUNE_CACHE": str(paths.cache), "RT_TUNE_STATE": str(paths.state)}
    # Ctrl-C reaches a foreground `tune` with SIGINT's default action; pytest itself may run with SIGINT
    # ignored (a shell starts background jobs that way, and Python then installs no KeyboardInterrupt handler)
    return subprocess.Popen([sys.executable, "-m", "orchestrator", "lab", "up"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _kill(proc: subprocess.Popen, paths: Paths) -> None:
    """If the test failed half-way, do not leak a `tune lab up` (or its VMs) into the rest of the session."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    from orchestrator.lab.lab import Lab

    Lab(paths).down()


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_ctrl_c_while_vms_boot_leaves_nothing_running(lab, tmp_path):
    """Images come from the shared cache (the session lab built them); Ctrl-C once QEMU runs."""
    paths = Paths(cache=lab.paths.cache, state=tmp_path / "state")
    proc = _tune(paths)
    state_file = paths.lab / "lab.json"

    def vms_started() -> bool:
        if not state_file.exists():
            return False
        pids = [v.get("pid") for v in json.loads(state_file.read_text())["vms"]]
        return len(pids) == 2 and all(pids)

    try:
        _wait_for(vms_started, 120, "both QEMU processes to start")
        assert _procs_mentioning(paths.state), "QEMU should be running from the lab directory now"
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        _kill(proc, paths)
    assert proc.returncode == 130, err
    assert _procs_mentioning(paths.state) == []


def test_ctrl_c_during_image_build_leaves_no_half_cache(tmp_path):
    """A cold cache: interrupt debootstrap mid-download; no build dir, no image, no process, no mount remains."""
    paths = Paths(cache=tmp_path / "cache", state=tmp_path / "state")
    proc = _tune(paths)
    images = paths.cache / "images"
    try:
        _wait_for(lambda: images.exists() and any(images.glob(".build-*/tree/var")), 120, "debootstrap to start")
        time.sleep(8)  # well into downloading and unpacking
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=90)
    finally:
        _kill(proc, paths)
    assert proc.returncode == 130, err
    assert [p.name for p in images.iterdir() if not p.name.endswith(".lock")] == []
    assert _procs_mentioning(tmp_path) == []
    assert sh.mounts_below(tmp_path) == []


def _qemu_pids(vm_dir: Path) -> list[int]:
    """QEMU processes whose argv names the VM's directory, read from /proc here (not with the lab's code)."""
    out = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0") if proc.name.isdigit() else []
            zombie = argv and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if argv and b"qemu-system" in argv[0] and not zombie and any(os.fsencode(vm_dir) in a for a in argv):
            out.append(int(proc.name))
    return out


def test_snapshot_faults_interrupts_and_a_failed_restore_fall_back_to_a_cold_reset(lab, lab_paths):
    """Ctrl-C while a snapshot is restored or saved leaves no QEMU process and no half snapshot; a snapshot
    that cannot be restored (QEMU is another version than the one that took it) gives a cold reset that says
    so, and the VM, booted pristine again, gets a new snapshot."""
    from orchestrator.lab import snapshot

    lab.reset(["lab1-guest"])  # pristine, with its snapshot (restored, or booted and taken if it had none)
    state = lab.load_state()
    rec = lab.record(state, "lab1-guest")
    spec = lab.spec(state, rec)
    assert snapshot.unusable(spec) is None
    old_pid = rec.pid
    env = {**os.environ, "RT_TUNE_CACHE": str(lab_paths.cache), "RT_TUNE_STATE": str(lab_paths.state)}

    # 1. Ctrl-C once the restore has started a new QEMU (paused, loading the snapshot)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "lab", "reset", "lab1-guest"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60  # the restore takes about a second: look often
        while not any(p != old_pid for p in _qemu_pids(spec.directory)):
            assert time.monotonic() < deadline and proc.poll() is None, "no restoring QEMU seen"
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert _qemu_pids(spec.directory) == []
    assert snapshot.unusable(spec) is None  # a restore writes no snapshot: the pristine one is intact

    # 2. a restore that fails (the record says another QEMU took it): a cold reset, said so, snapshotted anew
    record = snapshot.load_record(spec)
    snapshot.record_path(spec).write_text(record.model_copy(update={"qemu_version": "0.0.0"}).model_dump_json())
    events = []
    shown, lab.events = lab.events, events.append
    try:
        lab.reset(["lab1-guest"])
    finally:
        lab.events = shown
    said = {e.kind: e.message for e in events}
    assert "restoring its snapshot failed" in said["lab.reset.fallback"], said
    assert "the snapshot was taken with 0.0.0" in said["lab.reset.fallback"]
    assert "lab.reset.cold" in said and "lab.snapshot.saved" in said and "lab.reset.restored" not in said
    renewed = snapshot.load_record(spec)
    assert renewed.boot_id != record.boot_id and snapshot.unusable(spec) is None

    # 3. Ctrl-C while a snapshot is saved: the VM is stopped and no part of the snapshot is left
    pid = lab.load_state().vms[[v.name for v in lab.load_state().vms].index("lab1-guest")].pid

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.05)
    try:
        with pytest.raises(KeyboardInterrupt):
            snapshot.save(spec, pid, renewed.boot_id)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert _qemu_pids(spec.directory) == []
    assert snapshot.tagged(spec.overlay) is None and not snapshot.record_path(spec).exists()
    events.clear()
    lab.events = events.append
    try:
        lab.reset(["lab1-guest"])  # no snapshot: booted cold, and snapshotted
    finally:
        lab.events = shown
    said = {e.kind: e.message for e in events}
    assert said["lab.reset.fallback"] == "no pristine snapshot: a cold reset instead", said
    assert snapshot.unusable(spec) is None
