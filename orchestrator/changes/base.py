"""The contract of a runtime change: it reads the live state, plans a diff (no-op when already in place),
applies, verifies by reading again, and rolls back to the exact previous state.

A change's `read()` returns a JSON-able snapshot that is journaled *before* the change is applied; `rollback()`
restores that snapshot byte for byte (files are kept base64-encoded). rt-tune owns only what it creates: its
sysctl drop-in files, its systemd drop-ins and scripts, which are named `*rt-tune*`.
"""

from __future__ import annotations

import base64
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.core.errors import TuneError
from orchestrator.facts.base import Fact, gather_facts
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
    #: a bundle's members, each as it describes itself, and those left out with why (empty for one change)
    members: tuple[str, ...] = ()
    left_out: tuple[str, ...] = ()


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
        verifies an "on". Its `switch_command` where the kind has one, else the whole `apply` or `rollback`."""
        command = self.switch_command(before, on)
        if command is not None:
            if command:
                t.run(list(command), timeout_s=30)
            return
        if on:
            self.apply(t, before)
        else:
            self.rollback(t, before)

    def switch_command(self, before: State, on: bool) -> Sequence[str] | None:
        """`switch` as one command (an argv, no shell; empty when there is nothing to switch), so that a bundle
        switches many members in one round trip. None: this kind switches in several steps (`switch`)."""
        return None

    def in_place(self, live: State, desired: State) -> bool:
        """Does the live state already satisfy the desired one? (Default: every desired key matches.)"""
        return all(live.get(k) == v for k, v in desired.items())

    def not_applicable(self, before: State) -> str | None:
        """Why the change has nothing to act on here (a knob the unit's kernel lacks), or None. The plan then
        skips it, saying why: not an error, not a no-op."""
        return None

    def state_fact(self) -> Fact[State] | None:
        """`read` as a Fact (one command and a pure parser), so that planning gathers several changes' states
        and the unit's facts in one round trip (`plan_all`). None: this kind reads in several steps."""
        return None

    def plan(self, t: Transport) -> Plan:
        return self.plan_from(self.read(t))

    def plan_from(self, before: State) -> Plan:
        want = self.desired(before)
        noop = self.in_place(before, want)
        return Plan(self.change_id, before, want, noop, self.describe() + (" (already in place)" if noop else ""))

    def apply_and_read(self, t: Transport, before: State) -> State:
        """Apply, then read the live state back for `verify`: in one round trip where the kind can (a sysctl
        writes its drop-in, sets the value and reads both in one command); by default `apply`, then `read`."""
        self.apply(t, before)
        return self.read(t)

    def verify(self, t: Transport, plan: Plan, live: State | None = None) -> State:
        """The live state (read now, or `live` just read by `apply_and_read`) satisfies the plan, or ChangeError."""
        if live is None:
            live = self.read(t)
        if not self.in_place(live, plan.desired):
            raise ChangeError(f"{t.label}: {self.describe()}: verify failed: live {live} != desired {plan.desired}")
        return live

    def verify_rolled_back(self, t: Transport, before: State) -> None:
        live = self.read(t)
        if live != before:
            raise ChangeError(f"{t.label}: {self.describe()}: rollback did not restore the previous state: "
                              f"live {live} != before {before}")


def plan_all(t: Transport, changes: Sequence[Change], facts: Sequence[Fact[Any]] = ()) -> tuple[dict[str, Any],
                                                                                              list[Plan]]:
    """The unit's `facts` and a plan for each change, in one round trip for the facts and every change whose
    kind reads with a `state_fact` (the others read on their own). For changes that do not depend on each
    other: each plan sees the state before any of them is applied."""
    batched = {i: f for i, c in enumerate(changes) if (f := c.state_fact()) is not None}
    values = gather_facts(t, [*facts, *batched.values()]) if facts or batched else {}
    plans = [c.plan_from(values[batched[i].name]) if i in batched else c.plan(t) for i, c in enumerate(changes)]
    return {f.name: values[f.name] for f in facts}, plans
