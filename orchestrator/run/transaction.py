"""THE journaled change: journal the intent, apply, verify, measure, decide, keep or undo, for every kind.

Two layers, used by every path that changes a unit (runtime and boot changes in `tune apply`, the sides of
`tune ab`, reconcile and rollback):

- `JournaledChange`: one change record from its intent to its end, and the event that goes with each step.
  It is the only code that records an intent or moves a change record; a change is journaled, with the exact
  previous state, before anything touches the unit.
- `run_change`: the measured transaction over a kind's `ActiveChange` (what "apply", "switch", "keep" and
  "undo" mean for that kind: a sysctl write, or a trial boot). Plan -> no-op / skipped / refused, or intent ->
  apply and verify (eager kinds) -> before and after runs in the decision rule's order -> keep or undo ->
  the unit's marker -> the outcome. Any error undoes the change before it is recorded as failed; Ctrl-C too,
  then it goes on up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from orchestrator.config.profile import ChangeSpec
from orchestrator.core.errors import TransportError, TuneError
from orchestrator.measure.model import LatencyResult
from orchestrator.measure.runner import measure
from orchestrator.remote.transport import Transport
from orchestrator.run.context import ChangeOutcome, RunContext, Status
from orchestrator.run.evidence import MechanismProbe
from orchestrator.stats.decide import SequentialDecision


class ChangeUndone(TuneError):
    """The kind found the change could not stay and has already undone it (a trial that fell back to the old
    boot, or came up unhealthy): the change ends rolled back, with this reason."""


class UnitLost(TuneError):
    """The unit did not come back (a trial boot that never answered again): nothing can be undone from here;
    the change ends as a failed rollback and the unit as degraded."""

    def __init__(self, message: str, *, reason: str, attention: str) -> None:
        super().__init__(message)
        self.reason = reason  # what happened, short: journaled as the error and the unit state's detail
        self.attention = attention  # what a human must know to recover the unit


# ---- the journal record ------------------------------------------------------------------------------------
@dataclass
class JournaledChange:
    """One change record, from its intent to its end, with the event each step publishes."""

    ctx: RunContext
    unit: str
    target: str
    rec: int

    @property
    def subject(self) -> str:
        return f"{self.unit}.{self.target}"

    @classmethod
    def resume(cls, ctx: RunContext, unit: str, target: str, rec: int) -> JournaledChange:
        """The record of a change made earlier (to roll it back, or to reconcile what a dead controller
        left)."""
        return cls(ctx, unit, target, rec)

    @classmethod
    def begin(cls, ctx: RunContext, run_id: int, unit: str, spec: ChangeSpec, *,
              change_id: str | None = None, before: dict[str, Any], state: dict[str, Any], summary: str | None,
              **event_data: Any) -> JournaledChange:
        """Journal the intent with the exact previous state; announce it (`summary`) unless None."""
        rec = ctx.journal.record_intent(run_id, unit, spec.target, change_id or spec.id, spec.kind,
                                        before=before, desired={"params": spec.params, "state": state})
        if summary is not None:
            ctx.emit("change.intent", f"{unit}.{spec.target}", summary, journal_id=rec, **event_data)
        return cls(ctx, unit, spec.target, rec)

    def applied(self, message: str | None = None) -> None:
        self.ctx.journal.mark(self.rec, "applied", message=message or "")

    def verified(self, after: dict[str, Any] | None) -> None:
        self.ctx.journal.mark(self.rec, "verified", after=after)

    def kept(self, decision: dict[str, Any]) -> None:
        self.ctx.journal.mark(self.rec, "kept", decision=decision)

    def rolled_back(self, *, decision: dict[str, Any] | None = None, message: str | None = None) -> None:
        self.ctx.journal.mark(self.rec, "rolled_back", decision=decision, message=message or "")

    def failed(self, error: BaseException, undo_error: BaseException | None) -> str:
        """A failure, undone (or not: `undo_error`); the reason an outcome gives, published as
        change.failed."""
        self.ctx.journal.mark(self.rec, "failed", error=str(error))
        if undo_error is None:
            self.ctx.journal.mark(self.rec, "rolled_back", message=f"undone after: {error}")
            reason = f"failed and rolled back: {error}"
        else:
            self.ctx.journal.mark(self.rec, "rollback_failed", error=str(undo_error))
            reason = f"failed: {error}; ROLLBACK FAILED: {undo_error}"
        self.ctx.emit("change.failed", self.subject, reason, journal_id=self.rec)
        return reason

    def lost(self, exc: UnitLost, change_id: str) -> str:
        self.ctx.journal.mark(self.rec, "failed", error=exc.reason)
        self.ctx.journal.mark(self.rec, "rollback_failed", error=exc.attention)
        self.ctx.journal.set_unit_state(self.unit, "degraded", f"{change_id}: {exc.reason}")
        self.ctx.emit("change.failed", self.subject, str(exc), journal_id=self.rec)
        return str(exc)


# ---- what a kind gives the transaction ---------------------------------------------------------------------
@dataclass
class Planned:
    """A kind's plan for one change: what it is, the exact state before, the state wanted; or why not."""

    summary: str
    noop_message: str | None = None  # the change.noop event's text, when not the summary
    before: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)  # the desired state journaled beside the profile's params
    noop: bool = False
    skip_reason: str = ""
    problems: list[str] = field(default_factory=list)  # preflight: refused unless the user accepts the risk
    members: tuple[str, ...] = ()  # a bundle's members, and those left out with why (Plan's)
    left_out: tuple[str, ...] = ()


class ActiveChange(Protocol):
    """One kind's side of the transaction, for one change on one unit."""

    @property
    def eager(self) -> bool:
        """Apply and verify right after the intent (a runtime change), or at the first `after` run (a trial
        boot)."""

    @property
    def order(self) -> str | None:
        """The measurement order the kind needs ("blocked" when a side switch is a reboot), else the rule's."""

    @property
    def evidence(self) -> dict[str, Any] | None:
        """What the change showed besides latency (the WFI exit rates of a no-trap trial), for the outcome."""

    def plan(self) -> Planned: ...

    def prepare(self) -> None:
        """After the intent, before anything is measured (a kernel package installed)."""

    def apply(self) -> str | None:
        """Put the change in effect the first time; the message journaled with `applied`."""

    def verify(self) -> dict[str, Any] | None:
        """The change is in effect: the state journaled with `verified`; a TuneError when it is not."""

    def switch(self, on: bool) -> None:
        """Between measurement runs: the change's effect on (verified) or off."""

    def keep(self, on: bool) -> None:
        """Make the change last (it is in effect when `on`); verified."""

    def undo(self, on: bool | None) -> None:
        """Back to the journaled previous state, verified; `on=None` after a failure: find out from the
        unit."""

    def measure_on(self) -> Transport:
        """The connection the measurement runs go through (kept until the unit reboots)."""

    def connection(self, target: str) -> Transport:
        """The shared connection to the unit's `target` (host or guest), kept until the unit reboots."""

    def mark(self) -> None:
        """Write the unit's marker of rt-tune's changes on the changed target."""


# ---- the measured transaction ------------------------------------------------------------------------------
def run_change(ctx: RunContext, unit: str, run_id: int, spec: ChangeSpec,
               active: ActiveChange) -> ChangeOutcome:
    """One change through the whole transaction (module docstring); never leaves it half applied."""
    subject = f"{unit}.{spec.target}"
    base: dict[str, Any] = {"id": spec.id, "target": spec.target, "kind": spec.kind}
    try:
        plan = active.plan()
    except TransportError:
        raise  # the unit cannot be reached: nothing of this unit can be done (a rollout counts it failed)
    except TuneError as exc:
        ctx.emit("change.failed", subject, f"{spec.id}: {exc}")
        return ChangeOutcome(**base, description=spec.id, status="failed", reason=f"not started: {exc}")
    base.update(description=plan.summary, members=list(plan.members), left_out=list(plan.left_out))
    if plan.skip_reason:
        ctx.emit("change.skipped", subject, f"{spec.id}: {plan.skip_reason}")
        return ChangeOutcome(**{**base, "description": spec.id}, status="skipped", reason=plan.skip_reason)
    if plan.noop:
        ctx.emit("change.noop", subject, plan.noop_message or plan.summary)
        return ChangeOutcome(**base, status="noop", reason="already in place")
    if plan.problems and not ctx.accept_boot_risk:
        reason = ("refused by preflight (a failed trial could not fall back by itself; --accept-boot-risk "
                  "overrides): " + "; ".join(plan.problems))
        ctx.emit("change.refused", subject, f"{spec.id}: {reason}")
        return ChangeOutcome(**base, status="refused", reason=reason)
    extra: dict[str, Any] = {"preflight_overridden": plan.problems} if plan.problems else {}
    probe = MechanismProbe(ctx, unit, spec, active.connection)  # may ask the host what it can count
    change = JournaledChange.begin(ctx, run_id, unit, spec, before=plan.before, state=plan.state,
                                   summary=plan.summary, **extra)
    base["journal_id"] = change.rec
    rule = ctx.plan.decision
    if active.order is not None:
        rule = rule.model_copy(update={"order": active.order})
    seq = SequentialDecision(rule, latency_applicable=probe.latency_applicable, mechanisms=probe.labels)
    runs: dict[str, list[LatencyResult]] = seq.runs
    rates: dict[str, list[dict[str, float | None]]] = {"before": [], "after": []}
    dec: dict[str, Any] | None = None

    def outcome(status: Status, reason: str) -> ChangeOutcome:
        return ChangeOutcome(**base, status=status, reason=reason, decision=dec, evidence=active.evidence,
                             before=runs["before"], after=runs["after"], mechanisms=probe.declared(),
                             mechanisms_left_out=probe.left_out(), rates=rates,
                             latency_applicable=probe.latency_applicable)

    on = False
    applied = False
    measured_this_boot = False  # a run was taken on the boot the unit is on now
    try:
        active.prepare()
        if active.eager:
            change.applied(active.apply())
            change.verified(active.verify())
            on = applied = True
        while (step := seq.next_step()) is not None:
            side = step.side
            want = side == "after"
            if want and not applied:
                change.applied(active.apply())
                on = applied = True
                change.verified(active.verify())
                measured_this_boot = False
            elif want != on or (step.new_boot and measured_this_boot):
                on = want  # set first: a switch that fails halfway is undone as if it had happened
                active.switch(want)  # a boot change reboots, also into the same side (boots are the replicates)
                measured_this_boot = False
            result, evidence = probe.around(lambda: measure(
                active.measure_on(), ctx.plan.cyclictest, ctx.plan.load, target=f"{unit}.{ctx.measure_target(unit)}",
                artifacts=ctx.artifacts, events=ctx.events))
            measured_this_boot = True
            rates[side].append(evidence.rates)
            seq.add(side, result, evidence.rates)
            ctx.emit("change.run", subject, f"{spec.id}: {side} run, p99.9 {result.all.p999_us} us"
                     + "".join(f"; {label} {_per_s(v)}" for label, v in evidence.rates.items()),
                     side=side, p999_us=result.all.p999_us, max_us=result.all.max_us, rates=evidence.rates,
                     missing=evidence.missing)
        decision = seq.decision
        assert decision is not None
        dec = json.loads(decision.model_dump_json())
        if decision.action == "keep":
            active.keep(on)
            change.kept(dec)
            status: Status = "kept"
        else:
            active.undo(on)
            change.rolled_back(decision=dec)
            status = "rolled_back"
    except ChangeUndone as exc:
        note = str(exc)
        change.rolled_back(message=note)
        ctx.emit("change.rolled_back", subject, f"{spec.id}: {note}", journal_id=change.rec)
        active.mark()
        return outcome("rolled_back", note)
    except UnitLost as exc:
        return outcome("failed", change.lost(exc, spec.id))
    except (TuneError, KeyError, ValueError) as exc:
        return outcome("failed", _undo_after(change, active, exc))
    except BaseException:  # Ctrl-C: undo now rather than leave it to the next run's reconcile
        _undo_after(change, active, TuneError("interrupted"))
        raise
    active.mark()
    ctx.emit("change.kept" if status == "kept" else "change.rolled_back", subject,
             f"{plan.summary}: {decision.verdict} -> {status}", journal_id=change.rec)
    return outcome(status, decision.reason)


def _per_s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}/s"


def _undo_after(change: JournaledChange, active: ActiveChange, exc: BaseException) -> str:
    try:
        active.undo(None)
    except (TuneError, KeyError, ValueError, OSError) as undo_exc:
        return change.failed(exc, undo_exc)
    return change.failed(exc, None)
