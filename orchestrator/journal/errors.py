"""Errors the journal raises: each names what happened and, where a user can act, how."""

from __future__ import annotations

from orchestrator.core.errors import ExitStatus, TuneError


class JournalError(TuneError):
    """The journal refused an operation or could not be read or written (unknown record, bad state, I/O)."""

    exit_code = ExitStatus.ERROR


class InvalidTransition(JournalError):
    """A change record was asked to move to a state its current state does not lead to (e.g. kept -> applied)."""


class UnreconciledError(JournalError):
    """A unit still has changes a crashed controller left half done; they must be reconciled first."""


class JournalDamaged(JournalError):
    """The journal file is not a sound SQLite database (truncated, emptied, pages overwritten): never
    overwritten nor re-initialised; the message names the file and how to recover what it holds."""


class JournalURLError(JournalError):
    """A `--db` URL that is no usable PostgreSQL URL: refused before libpq sees it, its password redacted."""

    exit_code = ExitStatus.USAGE


class LockedError(TuneError):
    """Another controller holds the unit's lock (or `--force-unlock` named the wrong lock)."""

    exit_code = ExitStatus.LOCKED

    def __init__(self, message: str, *, unit: str = "", lock_id: str = "", owner: str = "",
                 since: float | None = None, stale: bool | None = None):
        super().__init__(message)
        self.unit = unit
        self.lock_id = lock_id
        self.owner = owner
        self.since = since
        self.stale = stale  # True: looks stale; False: holder alive on this host; None: cannot tell


class LockLostError(LockedError):
    """The lock this controller held is gone: released elsewhere or taken over with --force-unlock."""


class ClaimLostError(JournalError):
    """A rollout unit this controller claimed is no longer its claim (reclaimed, reset, or another's now)."""

    def __init__(self, message: str, *, unit: str = "", holder: str | None = None, state: str = ""):
        super().__init__(message)
        self.unit = unit
        self.holder = holder  # who holds the claim now (None: nobody)
        self.state = state  # the unit's state now
