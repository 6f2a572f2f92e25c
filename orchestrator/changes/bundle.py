"""Several runtime changes of one target as one change: applied together, measured as one, kept or rolled back
together (the measurement plan's `runtime.together`).

Why: a base profile sets a dozen small knobs (vmstat interval, NMI watchdog, workqueue cpumasks, THP, kernel
thread priorities ...). Alone, none moves a short plan's latency figures measurably, and measuring each costs
its own before and after runs; together they are one decision with the power the plan has. Each member keeps
its own contract: the bundle journals every member's exact previous state (`{member id: state}`), and its
rollback is each member's byte-exact rollback, newest first.

A member already in place, or with nothing to act on here (a sysfs knob the kernel lacks), is left out of the
bundle's apply, switch and rollback; which ones are is a pure function of the journaled previous state, so a
rollback from the journal alone leaves out the same ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from orchestrator.changes.base import Change, ChangeError, Plan, State
from orchestrator.core.errors import CommandFailed, ParseError
from orchestrator.facts.base import gather_facts
from orchestrator.remote.transport import CommandResult, Transport, run_commands

#: systemctl verbs that reload systemd's configuration themselves (systemctl(1), `--no-reload`)
SELF_RELOADING = frozenset({"enable", "disable", "reenable", "mask", "unmask", "preset", "link"})


class ReloadOnce:
    """The transport a bundle's members apply and roll back through: their `systemctl daemon-reload`s become one.

    Why: several members persist through systemd (kthreads' and the IRQ move's oneshot units, irqbalance's
    drop-in), each reloading after its own files: 2.5-4 s a reload on a TCG lab unit, five per round trip of the
    x86 host's bundle. A reload is held back until a systemctl command needs it (one that reloads itself,
    `enable`/`disable`, clears it) or the step ends. Commands that do not involve systemd run in order as given."""

    def __init__(self, t: Transport) -> None:
        self._t = t
        self.pending = False
        self.reloads = 0  # reloads run (for the tests: what the members asked for, as few as they need)

    def __enter__(self) -> ReloadOnce:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is None:
            self.flush()
        elif self.pending:  # the step failed: still reload what its files changed, and raise the first error
            try:
                self.flush()
            except (CommandFailed, OSError):
                pass

    @property
    def label(self) -> str:
        return self._t.label

    def flush(self) -> None:
        if self.pending:
            self.pending = False
            self.reloads += 1
            self._t.run(["systemctl", "daemon-reload"], timeout_s=60)

    def run(self, argv: Sequence[str], *, timeout_s: float | None = 60.0, check: bool = True,
            stdin: bytes | None = None, sudo: bool | None = None) -> CommandResult:
        args = list(argv)
        verbs = [a for a in args[1:] if not a.startswith("-")] if args[:1] == ["systemctl"] else []
        if verbs[:1] == ["daemon-reload"] and len(args) == 2:
            self.pending = True
            return CommandResult(tuple(args), 0, "", "", 0.0)
        if verbs[:1] and verbs[0] in SELF_RELOADING and "--no-reload" not in args:
            self.pending = False  # it reloads, after its own changes: every file written so far included
            self.reloads += 1
        elif any("systemctl" in a for a in args):
            self.flush()
        return self._t.run(args, timeout_s=timeout_s, check=check, stdin=stdin, sudo=sudo)

    def read_file(self, path: str) -> bytes:
        return self._t.read_file(path)

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._t.write_file(path, data, mode)

    def close(self) -> None:  # the connection is the caller's
        pass


class BundleChange(Change):
    kind = "bundle"

    def __init__(self, change_id: str, members: Sequence[tuple[str, Change]]) -> None:
        if not members:
            raise ChangeError(f"{change_id}: a bundle of no changes")
        ids = [i for i, _ in members]
        if len(set(ids)) != len(ids):
            raise ChangeError(f"{change_id}: member ids repeat: {ids}")
        self.change_id = change_id
        self.members = list(members)

    # ---- which members act ------------------------------------------------------------------------------
    def _skip(self, member: Change, before: State) -> str | None:
        """Why `member` is left out (its journaled `before`): not applicable here, or already in place."""
        why = member.not_applicable(before)
        if why:
            return f"not applicable: {why}"
        return "already in place" if member.in_place(before, member.desired(before)) else None

    def acting(self, before: State) -> list[tuple[str, Change]]:
        return [(i, m) for i, m in self.members if self._skip(m, before[i]) is None]

    # ---- the Change contract ----------------------------------------------------------------------------
    def read(self, t: Transport) -> State:
        """Every member's state in one round trip where each reads by a fact (the lab's bases: all of them)."""
        facts = {i: f for i, m in self.members if (f := m.state_fact()) is not None}
        names = [f.name for f in facts.values()]
        got = gather_facts(t, list(facts.values()), timeout_s=60) \
            if facts and len(set(names)) == len(names) else {}
        return {i: got[facts[i].name] if i in facts and got else m.read(t) for i, m in self.members}

    def desired(self, before: State) -> State:
        return {i: m.desired(before[i]) for i, m in self.acting(before)}

    def in_place(self, live: State, desired: State) -> bool:
        members = dict(self.members)
        return all(i in live and members[i].in_place(live[i], want) for i, want in desired.items())

    def not_applicable(self, before: State) -> str | None:
        whys = [(i, m.not_applicable(before[i])) for i, m in self.members]
        if all(why for _, why in whys):
            return "; ".join(f"{i}: {why}" for i, why in whys)
        return None

    def plan_from(self, before: State) -> Plan:
        """The plan, with the members listed (the report shows one a line) and, unless it is a no-op, those left
        out and why, also in its summary."""
        plan = super().plan_from(before)
        left = [f"{i} {why}" for i, m in self.members if (why := self._skip(m, before[i]))] if not plan.noop else []
        summary = plan.summary + (" (left out: " + "; ".join(left) + ")" if left else "")
        return dataclasses.replace(plan, summary=summary, members=tuple(m.describe() for _, m in self.members),
                                   left_out=tuple(left))

    def apply(self, t: Transport, before: State) -> None:
        with ReloadOnce(t) as once:
            for i, m in self.acting(before):
                m.apply(once, before[i])

    def verify(self, t: Transport, plan: Plan, live: State | None = None) -> State:
        live = self.read(t) if live is None else live
        for i, m in self.acting(plan.before):
            live[i] = m.verify(t, Plan(i, plan.before[i], plan.desired[i], False, m.describe()), live[i])
        return live

    def rollback(self, t: Transport, before: State) -> None:
        """Every acting member back, newest first; one that fails does not stop the others (the first error is
        raised after all were tried)."""
        errors: list[Exception] = []
        with ReloadOnce(t) as once:
            for i, m in reversed(self.acting(before)):
                try:
                    m.rollback(once, before[i])
                except (ChangeError, CommandFailed, ParseError) as exc:  # a lost connection ends it at once
                    errors.append(exc)
        if errors:
            raise ChangeError(f"{t.label}: {self.change_id}: {len(errors)} member(s) not rolled back; first: "
                              f"{errors[0]}")

    def verify_rolled_back(self, t: Transport, before: State) -> None:
        for i, m in self.acting(before):
            m.verify_rolled_back(t, before[i])

    @property
    def switch_keeps_persistence(self) -> bool:  # type: ignore[override]
        """True when any member's switch leaves its persistence: the transaction then rolls the bundle back
        after an "off" side (each member's rollback is harmless where its switch already undid everything)."""
        return any(m.switch_keeps_persistence for _, m in self.members)

    def switch(self, t: Transport, before: State, on: bool) -> None:
        """Members that switch with one command (sysctls, sysfs knobs) in one round trip, then the others."""
        acting = self.acting(before)
        ordered = acting if on else acting[::-1]
        batched = {i: c for i, m in ordered if (c := m.switch_command(before[i], on)) is not None}
        run_commands(t, list(batched.values()), timeout_s=60)
        for i, m in ordered:
            if i not in batched:
                m.switch(t, before[i], on)

    def describe(self) -> str:
        """The members' own descriptions, " | " between them (theirs may hold "; ")."""
        return f"{len(self.members)} changes together: " + " | ".join(m.describe() for _, m in self.members)

