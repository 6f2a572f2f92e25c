"""When a pristine snapshot may be restored (orchestrator/lab/snapshot.py `unusable`): on real qcow2 overlays
made with qemu-img (a snapshot taken offline has no RAM, which `unusable` does not read), every mismatch the
issue names (image rebuilt, overlay replaced, QEMU changed, snapshot gone or retaken) is refused with its
reason, and a matching snapshot is accepted."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from orchestrator.lab import snapshot, vm

pytestmark = pytest.mark.unit


def _qemu_img(*args) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


@pytest.fixture()
def spec(tmp_path):
    base = tmp_path / "root-guest.raw"
    base.write_bytes(b"\0" * 1024 * 1024)
    esp = tmp_path / "esp.img"
    esp.write_bytes(b"\0" * 65536)
    s = vm.VMSpec(name="lab1-guest", role="guest", directory=tmp_path / "vm", base_image=base, esp_image=esp,
                  ssh_port=2231)
    s.directory.mkdir()
    _qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, s.overlay)
    s.vars_file.write_bytes(b"vars" * 1000)
    _qemu_img("snapshot", "-c", snapshot.TAG, s.overlay)
    snapshot.keep_record(s, "7.2.22", snapshot.tagged(s.overlay), "boot-1", time.monotonic())
    return s


def test_a_matching_snapshot_is_usable(spec):
    assert snapshot.unusable(spec) is None
    assert snapshot.load_record(spec).boot_id == "boot-1"


def test_without_a_record_or_with_a_damaged_one_it_is_not(spec):
    snapshot.record_path(spec).write_text('{"tag": ')
    assert "is unreadable" in snapshot.unusable(spec)
    snapshot.forget(spec)
    assert snapshot.unusable(spec) == "no pristine snapshot"


def test_a_rebuilt_base_image_or_esp_is_refused(spec):
    st = spec.base_image.stat()
    os.utime(spec.base_image, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert "the base image" in snapshot.unusable(spec) and "changed" in snapshot.unusable(spec)
    os.utime(spec.base_image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert snapshot.unusable(spec) is None
    spec.esp_image.write_bytes(b"\1" * 65536)  # same size, new content and mtime
    assert "the ESP image" in snapshot.unusable(spec)


def test_a_replaced_overlay_is_refused_even_with_the_same_bytes(spec):
    copy = spec.overlay.with_suffix(".copy")
    shutil.copy2(spec.overlay, copy)
    os.replace(copy, spec.overlay)
    assert "was replaced" in snapshot.unusable(spec)


def test_another_qemu_binary_or_command_line_is_refused(spec):
    record = snapshot.load_record(spec)
    other = record.model_copy(update={"qemu_binary": record.qemu_binary.model_copy(update={"size": 1})})
    snapshot.record_path(spec).write_text(other.model_dump_json())
    assert snapshot.unusable(spec) == "the QEMU binary changed"
    snapshot.record_path(spec).write_text(record.model_dump_json())
    bigger = vm.VMSpec(**{**spec.__dict__, "memory_mib": 2048})
    assert snapshot.unusable(bigger) == "the VM's QEMU command line changed"


def test_changed_uefi_variables_copy_is_refused(spec):
    (spec.directory / snapshot.VARS_COPY).write_bytes(b"other")
    assert snapshot.unusable(spec) == "the UEFI variables copy changed"


def test_a_deleted_or_retaken_snapshot_is_refused(spec):
    _qemu_img("snapshot", "-d", snapshot.TAG, spec.overlay)
    assert "holds no snapshot" in snapshot.unusable(spec)
    time.sleep(1.1)  # the snapshot table's date has a one-second resolution in qemu-img's listing
    _qemu_img("snapshot", "-c", snapshot.TAG, spec.overlay)
    assert "is not the one recorded" in snapshot.unusable(spec)


def test_an_arm64_vm_is_never_restored(spec):
    """Restored arm64 TCG VMs stall (RCU stalls, SSH timeouts: seen on the lab 2026-12-05): they boot instead."""
    arm = vm.VMSpec(**{**spec.__dict__, "arch": "arm64"})
    assert "arm64 lab VMs stall after a snapshot restore" in snapshot.unusable(arm)
