"""The contract of a runtime change: it reads the live state, plans a diff (no-op when already in place),
applies, verifies by reading again, and rolls back to the exact previous state.

A change's `read()` returns a JSON-able snapshot that is journaled *before* the change is applied; `rollback()`
restores that snapshot byte for byte (files are kept base64-encoded). rt-tune owns only what it creates: its
sysctl drop-in files, its systemd drop-ins and scripts, which are named `*rt-tune*`.
"""

from __future__ import annotations

import base64
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from orchestrator.core.errors import TuneError
from orchestrator.remote.transport import Transport

State = dict[str, Any]


class ChangeError(TuneError):
    """A change could not be applied, verified or rolled back."""


@dataclass(frozen=True)
class Plan:
    change_id: str
    before: State
    desired: State
    noop: bool
    summary: str


def b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def restore_file(t: Transport, path: str, content: bytes | None, mode: int = 0o644) -> None:
    if content is None:
        t.run(["rm", "-f", "--", path], timeout_s=30)
    else:
        t.write_file(path, content, mode=mode)


class Change(ABC):
    """One tuning change on one target (a unit's host or guest)."""

    kind: str
    change_id: str

    @abstractmethod
    def read(self, t: Transport) -> State: ...

    @abstractmethod
    def desired(self, before: State) -> State: ...

    @abstractmethod
    def apply(self, t: Transport, before: State) -> None: ...

    @abstractmethod
    def rollback(self, t: Transport, before: State) -> None: ...

    @abstractmethod
    def describe(self) -> str: ...

    #: `switch` toggles the effect only and leaves what makes it persistent in place, so a change measured
    #: "before" after its first apply still needs its `rollback` when it is not kept.
    switch_keeps_persistence: bool = False

    def switch(self, t: Transport, before: State, on: bool) -> None:
        """Between measurement runs: the change's effect on (an "after" run) or off (a "before" run); the caller
        verifies an "on". By default the whole `apply` or `rollback`."""
        if on:
            self.apply(t, before)
        else:
            self.rollback(t, before)

    def in_place(self, live: State, desired: State) -> bool:
        """Does the live state already satisfy the desired one? (Default: every desired key matches.)"""
        return all(live.get(k) == v for k, v in desired.items())

    def plan(self, t: Transport) -> Plan:
        before = self.read(t)
        want = self.desired(before)
        noop = self.in_place(before, want)
        return Plan(self.change_id, before, want, noop, self.describe() + (" (already in place)" if noop else ""))

    def verify(self, t: Transport, plan: Plan) -> State:
        live = self.read(t)
        if not self.in_place(live, plan.desired):
            raise ChangeError(f"{t.label}: {self.describe()}: verify failed: live {live} != desired {plan.desired}")
        return live

    def verify_rolled_back(self, t: Transport, before: State) -> None:
        live = self.read(t)
        if live != before:
            raise ChangeError(f"{t.label}: {self.describe()}: rollback did not restore the previous state: "
                              f"live {live} != before {before}")
