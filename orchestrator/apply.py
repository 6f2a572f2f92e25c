"""`tune apply`: until the apply engine (issue #4) lands, connect to each unit and gather what it plans from."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from orchestrator.events import Event, EventSink, discard
from orchestrator.facts import BasicFacts, gather_basic
from orchestrator.inventory import load_inventory
from orchestrator.paths import Paths
from orchestrator.transport import SSHTransport


class UnitFacts(BaseModel):
    unit: str
    facts: list[BasicFacts]


class ShowResult(BaseModel):
    inventory: str
    lab_booted: bool
    units: list[UnitFacts]


def show_units(paths: Paths, inventory: Path, units: list[str], events: EventSink = discard) -> ShowResult:
    """Facts of every selected unit's host and guest; boots the local lab first when that is the inventory."""
    booted = False
    if inventory.resolve() == paths.lab_inventory.resolve():
        from orchestrator.lab.lab import Lab

        lab = Lab(paths, events)
        status = lab.status()
        if not status or not all(s.running for s in status):
            events(Event("apply.lab", "lab", "the local lab is not running: booting it"))
            lab.up()
            booted = True
    inv = load_inventory(inventory)
    out = []
    for name in units or sorted(inv.units):
        spec = inv.unit(name)
        gathered = []
        for target in ("host", "guest"):
            if target == "guest" and spec.guest is None:
                continue
            with SSHTransport(inv.endpoint(name, target)) as t:  # type: ignore[arg-type]
                gathered.append(gather_basic(t, f"{name}.{target}"))
            events(Event("apply.facts", f"{name}.{target}", "facts gathered"))
        out.append(UnitFacts(unit=name, facts=gathered))
    return ShowResult(inventory=str(inventory), lab_booted=booted, units=out)
