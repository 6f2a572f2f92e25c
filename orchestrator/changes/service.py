"""A systemd service stopped and disabled (optionally masked): the crash-looping services of the field notes."""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.changes.base import Change, ChangeError, Plan, State
from orchestrator.core.names import service_to_disable  # whole-string, systemd's rules
from orchestrator.facts.systemd import UnitState, unit_state_fact
from orchestrator.remote.transport import Transport


def read_service_state(t: Transport, unit: str) -> State:
    """load, file_state and active ("active" or "inactive") of `unit`."""
    return service_state(unit_state_fact(unit).gather(t))


def service_state(st: UnitState) -> State:
    """`read_service_state` from the unit's gathered state."""
    if not st.exists:
        return {"load": "not-found", "file_state": "", "active": "inactive"}
    # a crash-looping service is "activating" (auto-restart) most of the time: it counts as running
    running = "active" if st.active_state in ("active", "activating", "reloading") else "inactive"
    return {"load": st.load_state, "file_state": st.unit_file_state, "active": running}


@dataclass
class ServiceDisableChange(Change):
    """Stop and disable a service (optionally mask it); rollback restores enabled/masked and active states."""

    unit: str
    mask: bool = False
    kind: str = field(default="service_disable", init=False)

    def __post_init__(self) -> None:
        # the profile's rule (orchestrator.core.names): ".service" appended only without a unit-type suffix, and
        # only units that `disable --now` stops for good (never `dev-sda2.swap` + ".service")
        self.unit = service_to_disable(self.unit)
        self.change_id = f"service.{self.unit}"

    def read(self, t: Transport) -> State:
        return read_service_state(t, self.unit)

    def desired(self, before: State) -> State:
        if before["load"] == "not-found":
            return dict(before)
        return {"file_state": "masked" if self.mask else "disabled", "active": "inactive"}

    def in_place(self, live: State, desired: State) -> bool:
        if live.get("load") == "not-found":
            return True
        ok_states = {"masked"} if self.mask else {"disabled", "masked", "static", "indirect"}
        if desired.get("file_state") == "disabled" and live.get("file_state") == "static":
            ok_states = {"static"}
        return live.get("file_state") in ok_states and live.get("active") == "inactive"

    def apply(self, t: Transport, before: State) -> None:
        t.run(["systemctl", "disable", "--now", "--quiet", self.unit], timeout_s=90)
        if self.mask:
            t.run(["systemctl", "mask", "--quiet", self.unit], timeout_s=30)
        t.run(["systemctl", "reset-failed", self.unit], timeout_s=30, check=False)

    def rollback(self, t: Transport, before: State) -> None:
        if before["load"] == "not-found":
            return
        if self.mask and before["file_state"] != "masked":
            t.run(["systemctl", "unmask", "--quiet", self.unit], timeout_s=30)
        if before["file_state"] == "enabled":
            t.run(["systemctl", "enable", "--quiet", self.unit], timeout_s=30)
        elif before["file_state"] == "masked":
            t.run(["systemctl", "mask", "--quiet", self.unit], timeout_s=30)
        if before["active"] == "active":
            t.run(["systemctl", "start", "--no-block", self.unit], timeout_s=60)

    @property
    def switch_keeps_persistence(self) -> bool:  # type: ignore[override]
        return not self.mask

    def switch(self, t: Transport, before: State, on: bool) -> None:
        """Stop or start the service and leave it disabled between runs: `disable` and `enable` each reload
        systemd (seconds on a small or nested unit), and the enablement only acts at the next boot. A masked
        unit cannot be started, so masking toggles whole."""
        if self.mask:
            super().switch(t, before, on)
        elif on:
            t.run(["systemctl", "stop", self.unit], timeout_s=90)
            t.run(["systemctl", "reset-failed", self.unit], timeout_s=30, check=False)
        elif before["load"] != "not-found" and before["active"] == "active":
            t.run(["systemctl", "start", "--no-block", self.unit], timeout_s=60)

    def verify_rolled_back(self, t: Transport, before: State) -> None:
        live = self.read(t)
        if live["file_state"] != before["file_state"]:
            raise ChangeError(f"{t.label}: {self.unit}: file state {live['file_state']} != {before['file_state']}")

    def describe(self) -> str:
        return f"{'mask' if self.mask else 'disable'} {self.unit}"


@dataclass
class ServiceEnableChange(Change):
    """Enable a service (and with `start`, start it now): e.g. stalld beside RT throttling off. Rollback restores
    the file state it had (disabled, masked) and stops it if it was not running."""

    unit: str
    start: bool = True
    kind: str = field(default="service_enable", init=False)

    def __post_init__(self) -> None:
        self.unit = service_to_disable(self.unit)  # the same unit types: service, socket, timer, path
        self.change_id = f"service.{self.unit}"

    def read(self, t: Transport) -> State:
        return read_service_state(t, self.unit)

    def desired(self, before: State) -> State:
        return {"file_state": "enabled", "active": "active" if self.start else before["active"]}

    def in_place(self, live: State, desired: State) -> bool:
        return live.get("load") != "not-found" and live.get("file_state") == "enabled" and \
            live.get("active") == desired["active"]

    def plan(self, t: Transport) -> Plan:
        plan = super().plan(t)
        if plan.before["load"] == "not-found":
            raise ChangeError(f"{t.label}: {self.unit} does not exist on this unit: nothing to enable (install it "
                              "first, e.g. the distribution's stalld package)")
        return plan

    def apply(self, t: Transport, before: State) -> None:
        if before["file_state"] == "masked":
            t.run(["systemctl", "unmask", "--quiet", self.unit], timeout_s=30)
        t.run(["systemctl", "enable", "--quiet", *(["--now"] if self.start else []), self.unit], timeout_s=90)

    def rollback(self, t: Transport, before: State) -> None:
        if before["active"] != "active":
            t.run(["systemctl", "stop", self.unit], timeout_s=90, check=False)
        if before["file_state"] != "enabled":
            t.run(["systemctl", "disable", "--quiet", self.unit], timeout_s=30)
        if before["file_state"] == "masked":
            t.run(["systemctl", "mask", "--quiet", self.unit], timeout_s=30)

    switch_keeps_persistence = True

    def switch(self, t: Transport, before: State, on: bool) -> None:
        """Start or stop the service, leaving it enabled between runs (enablement acts at the next boot)."""
        if on and self.start:
            t.run(["systemctl", "start", self.unit], timeout_s=90)
        elif not on and before["active"] != "active":
            t.run(["systemctl", "stop", self.unit], timeout_s=90)

    def verify_rolled_back(self, t: Transport, before: State) -> None:
        live = self.read(t)
        if (live["file_state"], live["active"]) != (before["file_state"], before["active"]):
            raise ChangeError(f"{t.label}: {self.unit}: {live['file_state']}/{live['active']}, not "
                              f"{before['file_state']}/{before['active']} as before")

    def describe(self) -> str:
        return f"enable{' and start' if self.start else ''} {self.unit}"
