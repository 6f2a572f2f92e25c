"""Bootloader backends by kind: `backend_for("extlinux")`, `backend_for("qemu-append", service="vm.service")`.

The kinds are BootloaderInfo.kind's (grub, systemd-boot, extlinux, u-boot) plus the ones no probe on the unit
can find: grub-bls (RHEL-like: GRUB + BLS entries + grubby), and, for guests whose command line belongs to
their host, qemu-append (a systemd-managed QEMU's -append) and libvirt (a domain's <os><cmdline>). Modules are
imported when asked for, so a backend that does not import (being edited, or missing) breaks only its kind.
"""

from __future__ import annotations

import importlib
from typing import Any

from orchestrator.boot.loader import Bootloader
from orchestrator.core.errors import InputError

#: kind -> (module, class)
BACKENDS: dict[str, tuple[str, str]] = {
    "grub": ("orchestrator.boot.grub", "GrubBackend"),
    "grub-bls": ("orchestrator.boot.bls", "BlsGrubbyBackend"),
    "systemd-boot": ("orchestrator.boot.systemd_boot", "SystemdBootBackend"),
    "extlinux": ("orchestrator.boot.extlinux", "ExtlinuxBackend"),
    "u-boot": ("orchestrator.boot.uboot", "UBootEnvBackend"),
    "qemu-append": ("orchestrator.boot.qemu_append", "QemuAppendBackend"),
    "libvirt": ("orchestrator.boot.qemu_append", "LibvirtBackend"),
}


def backend_class(kind: str) -> type[Bootloader]:
    if kind not in BACKENDS:
        raise InputError(f"unknown bootloader kind {kind!r} (known: {', '.join(BACKENDS)})")
    module, name = BACKENDS[kind]
    cls = getattr(importlib.import_module(module), name)
    if getattr(cls, "kind", None) != kind:
        raise InputError(f"{module}.{name} is kind {getattr(cls, 'kind', None)!r}, not {kind!r}")
    return cls


def backend_for(kind: str, **kw: Any) -> Bootloader:
    """A backend of `kind` built with `kw` (e.g. service= for qemu-append, domain= for libvirt)."""
    return backend_class(kind)(**kw)
