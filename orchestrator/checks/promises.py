"""What a unit's kept changes promise, per target, in the terms a check reads back: the data the shipped checks
(orchestrator/checks/shipped/test_promises.py) test. Built from the journal's kept records (their desired
params), so a check tests exactly what rt-tune says it keeps."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, Field

from orchestrator.journal.records import ChangeRecord


class VcpuPromise(BaseModel):
    service: str
    vcpus: dict[str, int]  # guest vCPU -> host CPU
    housekeeping: list[int]


class IrqPromise(BaseModel):
    housekeeping: list[int]
    #: the IRQs the kernel let rt-tune move when the change was applied -> their CPU list before it
    moved: dict[str, str]


class SysfsPromise(BaseModel):
    knob: str
    #: file -> the value rt-tune wrote there (the files the unit had when the change was applied)
    values: dict[str, str]


class TargetPromise(BaseModel):
    """One target's promises; empty when rt-tune keeps nothing there (the user's checks still run)."""

    target: str
    cmdline: dict[str, str | None] = Field(default_factory=dict)  # argument -> value (None: a bare flag)
    sysctl: dict[str, str] = Field(default_factory=dict)
    services_disabled: dict[str, bool] = Field(default_factory=dict)  # unit -> masked
    services_enabled: dict[str, bool] = Field(default_factory=dict)  # unit -> started
    vcpu_pinning: VcpuPromise | None = None
    irq_affinity: IrqPromise | None = None
    sysfs: list[SysfsPromise] = Field(default_factory=list)
    #: irqbalance: new IRQs' default CPUs, and the RT CPUs irqbalance must not use (or `stop`)
    irqbalance: dict[str, Any] | None = None
    #: kthreads rules ({match, policy, priority, cpus}), later ones winning
    kthreads: list[dict[str, Any]] = Field(default_factory=list)
    wfx_notrap: bool = False
    change_ids: list[str] = Field(default_factory=list)


def promises(records: Iterable[ChangeRecord], targets: Iterable[str] = ("host", "guest")) -> dict[str, TargetPromise]:
    """The promises of the kept `records`, for each of `targets`."""
    out = {t: TargetPromise(target=t) for t in targets}
    for rec in records:
        p = out.setdefault(rec.target, TargetPromise(target=rec.target))
        p.change_ids.append(rec.change_id)
        for member in _members(rec):
            _promise(p, member)
    return out


def _members(rec: ChangeRecord) -> list[ChangeRecord]:
    """A bundle's acting members as records of their own (what each promised), else the record itself."""
    if rec.kind != "bundle":
        return [rec]
    state = rec.desired.get("state", {})  # the acting members only: {member id: desired state}
    return [rec.model_copy(update={"change_id": m["id"], "kind": m["kind"],
                                   "desired": {"params": m["params"], "state": state[m["id"]]},
                                   "before": rec.before.get(m["id"], {})})
            for m in rec.desired.get("params", {}).get("members", []) if m["id"] in state]


def _promise(p: TargetPromise, rec: ChangeRecord) -> None:
    """What one kept change promises on its target, added to `p`."""
    params: dict[str, Any] = rec.desired.get("params", {})
    if rec.kind == "cmdline":
        p.cmdline.update(params.get("add", {}))
    elif rec.kind == "sysctl":
        p.sysctl[params["name"]] = str(params["value"])
    elif rec.kind == "service_enable":
        p.services_enabled[params["unit"]] = bool(params.get("start", True))
    elif rec.kind == "service_disable":
        p.services_disabled[params["unit"]] = bool(params.get("mask"))
    elif rec.kind == "vcpu_pinning":
        p.vcpu_pinning = VcpuPromise(service=params["service"], vcpus=params["vcpus"],
                                     housekeeping=params["housekeeping"])
    elif rec.kind == "irqbalance":
        p.irqbalance = {"housekeeping": params["housekeeping"], "rt": params.get("rt") or [],
                        "stop": bool(params.get("stop"))}
    elif rec.kind == "kthreads":
        p.kthreads = list(params.get("rules", []))
    elif rec.kind == "sysfs":
        p.sysfs.append(SysfsPromise(knob=params["knob"], values=rec.desired.get("state", {}).get("values", {})))
    elif rec.kind == "irq_affinity":
        moved = rec.desired.get("state", {}).get("irqs", {})
        p.irq_affinity = IrqPromise(housekeeping=params["housekeeping"],
                                    moved={irq: rec.before.get("irqs", {}).get(irq, "") for irq in moved})
    elif rec.kind == "wfx_notrap":
        p.wfx_notrap = True
        if not params.get("kernel"):  # Linux >= 6.11: the boot parameters (a patched kernel has none)
            p.cmdline.update({"kvm-arm.wfi_trap_policy": params.get("wfi", "notrap"),
                              "kvm-arm.wfe_trap_policy": params.get("wfe", "notrap")})
