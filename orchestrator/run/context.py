"""What one run of rt-tune against units needs from around it, in one object passed explicitly: the inventory,
the journal, the measurement plan, where artifacts go, who hears events, how to connect. Also the outcome of
one change (ChangeOutcome), which the apply loop, boot changes, rollouts and reports share.

The apply loop (orchestrator.run.engine) and boot changes (orchestrator.run.boot) both take a RunContext, so
neither imports the other's module for it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from orchestrator.config.inventory import Inventory
from orchestrator.core.errors import TransportError
from orchestrator.core.events import Event, EventSink, discard
from orchestrator.journal.journal import Journal
from orchestrator.measure.model import LatencyResult
from orchestrator.remote.ssh import SSHTransport
from orchestrator.remote.transport import Transport
from orchestrator.stats.decide import MeasurementPlan

MARKER = "/var/lib/rt-tune/changes.json"
Status = Literal["kept", "rolled_back", "noop", "failed", "skipped", "planned", "refused"]
Connect = Callable[[Inventory, str, str], Transport]


def ssh_connect(inv: Inventory, unit: str, target: str) -> Transport:
    return SSHTransport(inv.endpoint(unit, target))  # type: ignore[arg-type]


class ChangeOutcome(BaseModel):
    id: str
    target: str
    kind: str
    description: str
    #: a bundle's members, each as it describes itself, and those left out of it with why (`runtime.together`)
    members: list[str] = []
    left_out: list[str] = []
    status: Status
    reason: str = ""
    journal_id: int | None = None
    decision: dict[str, Any] | None = None
    before: list[LatencyResult] = []
    after: list[LatencyResult] = []
    evidence: dict[str, Any] | None = None  # what a trial showed besides latency (wfx_notrap: WFI exit rates)
    #: the mechanisms the change targets (orchestrator.changes.mechanism), and each run's rate of each
    mechanisms: list[dict[str, Any]] = []
    rates: dict[str, list[dict[str, float | None]]] = {}
    #: declared mechanisms the unit cannot count (e.g. no kvm:kvm_sys_access on an x86 host), with why
    mechanisms_left_out: list[dict[str, Any]] = []
    #: False: a host change measured in a guest that does not run on that host (its latency is not evidence)
    latency_applicable: bool = True

    def figures(self) -> dict[str, float | None]:
        import statistics

        def med(rs: list[LatencyResult], key: str) -> float | None:
            vals = [getattr(r.all, key) for r in rs if getattr(r.all, key) is not None]
            return statistics.median(vals) if vals else None

        return {f"{side}_{k}": med(rs, k) for side, rs in (("before", self.before), ("after", self.after))
                for k in ("p999_us", "max_us")}


@dataclass
class RunContext:
    inventory: Inventory
    journal: Journal
    plan: MeasurementPlan
    artifacts: Path
    events: EventSink = discard
    connect: Connect = ssh_connect
    #: Trial-boot a change even when preflight says a failed trial could not fall back by itself.
    accept_boot_risk: bool = False
    #: How long to wait for a unit to come back from a reboot (then power-cycle it, then as long again).
    boot_timeout_s: float = 300.0
    #: The file the measurement plan was read from (its errors name file and line).
    plan_path: Path | None = None

    def publish(self, event: Event) -> None:
        """The one publish path: the journal (the record) first, then whoever listens (progress, reports)."""
        self.journal(event)
        self.events(event)

    def emit(self, kind: str, subject: str, message: str, **data: Any) -> None:
        self.publish(Event(kind, subject, message, data=data))

    def measure_target(self, unit: str) -> str:
        """Where cyclictest runs for `unit`: its guest when it has one (the RT workload), else its host."""
        return "guest" if self.inventory.unit(unit).guest is not None else "host"

    def write_marker(self, t: Transport, unit: str, target: str) -> None:
        """A marker on the unit naming what rt-tune changed there (for humans and other tools)."""
        kept = [r for r in self.journal.active_changes(unit) if r.target == target]
        doc = {"managed_by": "rt-tune", "unit": unit, "target": target, "updated_at": time.time(),
               "changes": [{"id": r.change_id, "kind": r.kind, "journal_id": r.id,
                            "desired": r.desired.get("params")} for r in kept]}
        t.run(["mkdir", "-p", MARKER.rsplit("/", 1)[0]], timeout_s=30)
        t.write_file(MARKER, (json.dumps(doc, indent=2) + "\n").encode())


class SharedConnections:
    """One connection per unit and target for the steps of a boot change between reboots: an SSH handshake costs
    1-2 s on a small unit and twice that for a guest behind its host, and a boot change took about ten of them.
    Dropped before the unit reboots (the trial boot itself connects afresh) and when the change is done."""

    def __init__(self, connect: Callable[[str, str], Transport]) -> None:
        self._connect = connect
        self._open: dict[tuple[str, str], Transport] = {}

    def get(self, unit: str, target: str) -> Transport:
        key = (unit, target)
        if key not in self._open:
            self._open[key] = self._connect(unit, target).__enter__()
        return self._open[key]

    @contextmanager
    def use(self, unit: str, target: str) -> Iterator[Transport]:
        yield self.get(unit, target)

    def drop(self) -> None:
        """Close every connection (before a reboot: the next step connects to the unit as it comes back)."""
        while self._open:
            _, t = self._open.popitem()
            with suppress(TransportError, OSError):
                t.__exit__(None, None, None)
