"""What the journal stores, as typed records, and the states and transitions a change record may take."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Self, get_args

from pydantic import BaseModel, ConfigDict

from orchestrator.core.events import Event
from orchestrator.journal.scrub import _load

ChangeState = Literal["intent", "applied", "verified", "kept", "rolled_back", "failed", "rollback_failed"]
UnitStateName = Literal["pending", "working", "done", "degraded", "failed"]

RolloutStatus = Literal["running", "pausing", "paused", "halted", "done"]
RolloutUnitState = Literal["pending", "working", "done", "degraded", "failed", "rolled_back"]

CHANGE_STATES: tuple[str, ...] = get_args(ChangeState)
UNIT_STATES: tuple[str, ...] = get_args(UnitStateName)
ROLLOUT_STATUSES: tuple[str, ...] = get_args(RolloutStatus)
ROLLOUT_UNIT_STATES: tuple[str, ...] = get_args(RolloutUnitState)
FINISHED_UNIT_STATES: tuple[str, ...] = ("done", "degraded", "failed")  # what finish_unit may report
INCOMPLETE_STATES: tuple[str, ...] = ("intent", "applied", "verified")

TRANSITIONS: dict[str, frozenset[str]] = {
    "intent": frozenset({"applied", "failed", "rolled_back"}),
    "applied": frozenset({"verified", "failed", "rolled_back", "rollback_failed"}),
    "verified": frozenset({"kept", "failed", "rolled_back", "rollback_failed"}),
    "kept": frozenset({"rolled_back", "rollback_failed"}),
    "failed": frozenset({"rolled_back", "rollback_failed"}),
    "rollback_failed": frozenset({"rolled_back", "rollback_failed"}),
    "rolled_back": frozenset(),
}


class ChangeRecord(BaseModel):
    """One remote change and everything known about it. `before`/`desired`/`after` are opaque JSON."""

    model_config = ConfigDict(frozen=True)

    id: int
    run_id: int
    unit: str
    target: str  # "host" / "guest"
    change_id: str  # the profile's name for the change
    kind: str  # "sysctl", "file", "service", "cmdline", ...
    state: ChangeState
    before: dict[str, Any]  # the exact prior state, enough to undo the change
    desired: dict[str, Any]
    after: dict[str, Any] | None = None  # the state seen after applying (or after a rollback)
    decision: dict[str, Any] | None = None  # the keep/rollback decision and its evidence
    error: str | None = None
    times: dict[str, float]  # state -> when the record (last) entered it (epoch seconds)
    created_at: float
    updated_at: float

    @property
    def incomplete(self) -> bool:
        return self.state in INCOMPLETE_STATES


class RunRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    unit: str
    profile: str
    controller: str
    status: str  # "running" until end_run
    started_at: float
    ended_at: float | None = None


class UnitState(BaseModel):
    model_config = ConfigDict(frozen=True)

    unit: str
    state: UnitStateName
    detail: str = ""
    updated_at: float


class EventRecord(BaseModel):
    """A stored event. `run_id` is the run it happened in, when known."""

    model_config = ConfigDict(frozen=True)

    id: int
    run_id: int | None = None
    kind: str
    subject: str
    message: str = ""
    data: dict[str, Any] = {}
    done: float | None = None
    total: float | None = None
    at: float

    def to_event(self) -> Event:
        return Event(self.kind, self.subject, self.message, dict(self.data), self.done, self.total, self.at)


class RolloutRecord(BaseModel):
    """A rollout: a profile applied to an inventory's units, wave by wave, under a policy (opaque JSON)."""

    model_config = ConfigDict(frozen=True)

    id: int
    profile: str
    inventory: str
    policy: dict[str, Any]
    status: RolloutStatus
    reason: str = ""
    owner: str  # the controller that created it
    created_at: float
    updated_at: float


class RolloutUnit(BaseModel):
    """One unit of a rollout: its wave (0 = the canary), its place in the rollout's order, and its claim."""

    model_config = ConfigDict(frozen=True)

    rollout_id: int
    unit: str
    wave: int
    position: int
    state: RolloutUnitState
    claimed_by: str | None = None  # "host:pid" of the controller that claimed it last (kept once finished)
    claimed_at: float | None = None
    attempts: int = 0  # how many times it was claimed
    detail: str = ""
    result: dict[str, Any] | None = None
    updated_at: float


class _Releaser(Protocol):
    """What a lock handle needs of its journal (orchestrator.journal.locks.LockOps)."""

    def release_lock(self, lock: Lock) -> bool: ...


@dataclass
class Lock:
    """A held unit lock. A context manager: leaving the `with` block releases it."""

    unit: str
    lock_id: str
    owner: str  # "host:pid"
    acquired_at: float
    heartbeat_at: float
    _journal: _Releaser | None = field(default=None, repr=False, compare=False)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._journal is not None:
            self._journal.release_lock(self)


@dataclass(frozen=True)
class LockInfo:
    """A lock as stored, with the staleness verdict seen from this machine."""

    unit: str
    lock_id: str
    owner: str
    acquired_at: float
    heartbeat_at: float
    stale: bool | None  # True: looks stale; False: holder alive on this host; None: cannot tell
    why: str  # one sentence explaining `stale`


def _row_change(row: Any) -> ChangeRecord:
    return ChangeRecord(
        id=row["id"], run_id=row["run_id"], unit=row["unit"], target=row["target"], change_id=row["change_id"],
        kind=row["kind"], state=row["state"], before=_load(row["before"]), desired=_load(row["desired"]),
        after=_load(row["after"]), decision=_load(row["decision"]), error=row["error"],
        times=_load(row["times"]), created_at=row["created_at"], updated_at=row["updated_at"],
    )


def _row_run(row: Any) -> RunRecord:
    return RunRecord(id=row["id"], unit=row["unit"], profile=row["profile"], controller=row["controller"],
                     status=row["status"], started_at=row["started_at"], ended_at=row["ended_at"])


def _row_rollout(row: Any) -> RolloutRecord:
    return RolloutRecord(id=row["id"], profile=row["profile"], inventory=row["inventory"],
                         policy=_load(row["policy"]), status=row["status"], reason=row["reason"],
                         owner=row["owner"], created_at=row["created_at"], updated_at=row["updated_at"])


def _row_rollout_unit(row: Any) -> RolloutUnit:
    return RolloutUnit(rollout_id=row["rollout_id"], unit=row["unit"], wave=row["wave"],
                       position=row["position"], state=row["state"], claimed_by=row["claimed_by"],
                       claimed_at=row["claimed_at"],
                       attempts=row["attempts"], detail=row["detail"], result=_load(row["result"]),
                       updated_at=row["updated_at"])
