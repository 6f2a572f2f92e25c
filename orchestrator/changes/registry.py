"""Which change a profile entry is: runtime kinds are built here; boot kinds are run by orchestrator/run/boot.py
(a trial boot). The one place a kind name is mapped to code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from orchestrator.changes.base import Change
from orchestrator.changes.bundle import BundleChange
from orchestrator.changes.irq_affinity import IrqAffinityChange
from orchestrator.changes.irqbalance import IrqbalanceChange
from orchestrator.changes.kthreads import KthreadsChange
from orchestrator.changes.service import ServiceDisableChange, ServiceEnableChange
from orchestrator.changes.sysctl import SysctlChange
from orchestrator.changes.sysfs import SysfsChange
from orchestrator.changes.vcpu_pinning import VcpuPinningChange
from orchestrator.core.errors import InputError

#: Changes that need a reboot to act: booted once on trial, made permanent only after the unit comes back healthy.
BOOT_KINDS = ("cmdline", "kernel", "wfx_notrap")

RUNTIME_KINDS: dict[str, Callable[[dict[str, Any]], Change]] = {
    "sysctl": lambda p: SysctlChange(p["name"], str(p["value"])),
    "service_disable": lambda p: ServiceDisableChange(p["unit"], mask=bool(p.get("mask", False))),
    "service_enable": lambda p: ServiceEnableChange(p["unit"], start=bool(p.get("start", True))),
    "vcpu_pinning": VcpuPinningChange.from_params,
    "irq_affinity": lambda p: IrqAffinityChange(list(p["housekeeping"])),
    "sysfs": SysfsChange.from_params,
    "kthreads": KthreadsChange.from_params,
    "irqbalance": IrqbalanceChange.from_params,
}


BUNDLE = "bundle"  # several runtime changes of a target as one (the measurement plan's `runtime.together`)


def is_boot_kind(kind: str) -> bool:
    return kind in BOOT_KINDS


def build_change(kind: str, params: dict[str, Any]) -> Change:
    """The runtime Change for a resolved profile entry (or a journaled record's params)."""
    if kind in RUNTIME_KINDS:
        return RUNTIME_KINDS[kind](params)
    if kind == BUNDLE:
        inner = [m["kind"] for m in params["members"] if m["kind"] not in RUNTIME_KINDS]
        if inner:
            raise InputError(f"a bundle holds runtime changes only, not {', '.join(map(repr, inner))}")
        return BundleChange(str(params["id"]), [(str(m["id"]), RUNTIME_KINDS[m["kind"]](m["params"]))
                                                 for m in params["members"]])
    if kind in BOOT_KINDS:
        raise InputError(f"a {kind} change is a boot change: it is run by a trial boot, not built as a runtime change")
    raise InputError(f"unknown change kind {kind!r}; known: {', '.join([*RUNTIME_KINDS, *BOOT_KINDS])}")
