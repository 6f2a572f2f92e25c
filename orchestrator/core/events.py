"""Events: the single record of what happened. The journal, the progress display and reports subscribe to
them.

Every kind rt-tune emits is listed in KINDS with what it means (a unit test holds the source to the list), so
a consumer such as a rollout's progress count names kinds that exist, never a string built somewhere else.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

KINDS: dict[str, str] = {
    # one change through the transaction (orchestrator.run.transaction)
    "change.intent": "a change is journaled with its exact previous state, about to be made",
    "change.run": "one measurement run of a change's before or after side",
    "change.kept": "a change kept on the decision rule's verdict",
    "change.rolled_back": "a change undone: on the verdict, by a trial's fallback, on request or by reconcile",
    "change.failed": "a change that failed (undone, or its rollback failed too), or could not start",
    "change.noop": "a change already in place: nothing done",
    "change.skipped": "a change that does not apply to this unit (WFI/WFE on x86)",
    "change.refused": "a boot change refused by preflight (a failed trial could not fall back by itself)",
    "unit.degraded": "`tune verify` found a kept change drifted",
    "kernel.install": "a kernel package installed for a trial boot",
    "wfx.evidence": "the WFI exit rates before and on a no-trap trial boot",
    # trial boots (orchestrator.boot.trial)
    "trial.reboot": "the unit reboots into a one-shot trial entry (or back to its default)",
    "trial.reconnect": "the unit went away during an undo: waiting for it, then undoing again",
    "trial.power_cycle": "the unit did not come back in time: its power_cycle command runs",
    "trial.dependent_power_cycle": "a guest did not come back with its host: its power_cycle runs",
    "trial.power_cycle_failed": "a power_cycle command could not run or failed",
    "trial.dependents": "the guests that restart with a host answer again",
    "trial.healthy": "the trial booted with the intended cmdline and kernel, healthy",
    "trial.fallback": "the unit came back on its old cmdline: the trial fell back by itself",
    "trial.unhealthy": "the trial booted but is not healthy (or came back on neither cmdline)",
    "trial.checks": "the profile's health checks ran on the trial boot (a failure makes it unhealthy)",
    "trial.lost": "the unit did not come back at all",
    # measurement runs (orchestrator.measure.runner)
    "measure.load": "the load a run starts before cyclictest",
    "measure.progress": "cyclictest running: seconds done of the run",
    "measure.done": "a run's figures",
    # the journal's own record of its writes (orchestrator.journal)
    "journal.run.begin": "a run of a profile on a unit begins",
    "journal.run.end": "a run ends (done, degraded, interrupted, crashed)",
    "journal.change.intent": "a change record is created",
    **{f"journal.change.{state}": f"a change record moved to {state}"
       for state in ("applied", "verified", "kept", "failed", "rolled_back", "rollback_failed")},
    "journal.unit.state": "a unit's state changed",
    "journal.lock.acquired": "a controller locked a unit",
    "journal.lock.released": "a controller released its unit lock",
    "journal.lock.lost": "a controller found its unit lock taken over",
    "journal.lock.forced": "a stale lock was taken over with --force-unlock",
    "journal.lock.refused": "a unit's lock is held by another controller",
    # rollouts (orchestrator.run.fleet, journal)
    "rollout.created": "a rollout was created with its waves",
    "rollout.wave": "a wave of units starts",
    "rollout.status": "a rollout's status changed",
    "rollout.halted": "a halt rule stopped the rollout",
    "rollout.interrupted": "the rollout's controller was interrupted",
    "rollout.unit.claimed": "a controller claimed a unit of the rollout",
    "rollout.unit.reclaimed": "a unit whose controller died was claimed again",
    "rollout.unit.progress": "a unit's changes done so far",
    "rollout.unit.state": "a unit's rollout state changed",
    "rollout.unit.finished": "a unit finished (done, degraded or failed)",
    "rollout.unit.lost": "a unit could not be worked on (unreachable, an error)",
    "rollout.unit.rolled_back": "a unit rolled back after the rollout halted",
    "rollout.unit.rollback_failed": "rolling a unit back after a halt failed",
    # A/B, diagnosis, apply, the lab
    "ab.run": "one run of an A/B experiment",
    "diagnose.window": "a diagnosis window's progress",
    "diagnose.window.started": "a diagnosis window started on a target",
    "diagnose.window.done": "a diagnosis window ended",
    "diagnose.window.aborted": "a diagnosis window was stopped before it started",
    "diagnose.target.done": "a target's diagnosis is complete",
    "apply.lab": "the local lab is booted for `tune apply`",
    "lab.build.step": "a step of a lab image build",
    "lab.build.cached": "a lab image found in the cache",
    "lab.vm.started": "a lab VM's QEMU started",
    "lab.vm.ssh": "a lab VM answers SSH",
    "lab.vm.power_cycle": "a lab VM was reset (its power_cycle)",
    "lab.snapshot.saved": "a pristine snapshot of a lab VM was saved",
    "lab.snapshot.failed": "a pristine snapshot could not be saved",
    "lab.reset.restored": "a lab VM was reset from its snapshot",
    "lab.reset.fallback": "a snapshot restore failed: a cold reset instead",
    "lab.reset.cold": "a lab VM was reset by booting it again",
    "lab.down": "the lab was stopped",
}

#: A change's last event in a run: one per change, whatever became of it (a rollout counts them as
#: progress).
CHANGE_ENDED: tuple[str, ...] = ("change.noop", "change.kept", "change.rolled_back", "change.failed",
                                 "change.skipped", "change.refused")


@dataclass(frozen=True)
class Event:
    kind: str  # e.g. "lab.build.step", "lab.vm.booted"
    subject: str  # what it is about: a VM name, a unit, an image key
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    # for long steps: progress so far and the expected total, in the same unit
    done: float | None = None
    total: float | None = None
    at: float = field(default_factory=time.time)


EventSink = Callable[[Event], None]


def discard(_event: Event) -> None:
    """A sink that ignores everything (library use without a display)."""


class EventLog:
    """Collects events in memory (tests, JSON output) and forwards them to other sinks."""

    def __init__(self, *forward: EventSink) -> None:
        self.events: list[Event] = []
        self._forward = forward

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        for sink in self._forward:
            sink(event)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]
