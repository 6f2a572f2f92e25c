"""One exception root for the whole core, and `tune`'s exit statuses in one table (ExitStatus): each TuneError
class names its status; orchestrator/cli/main.py `exit_status` maps any exception to one, in one place."""

from __future__ import annotations

from enum import IntEnum


class ExitStatus(IntEnum):
    """Every exit status `tune` has."""

    OK = 0
    ERROR = 1  # TuneError, JournalError
    USAGE = 2  # InputError, click's usage errors, a bad --db URL
    MISSING_DEPENDENCY = 3  # a program or file this machine needs (the message names the Debian package)
    LAB = 4  # LabError
    TRANSPORT = 5  # TransportError: connection, host key, authentication, a command
    PARSE = 6  # ParseError: a tool's output could not be parsed
    LOCKED = 7  # LockedError: another controller holds the unit
    DRIFT = 8  # `tune verify` found kept changes drifted
    ROLLOUT = 9  # FleetError: a rollout could not go on
    ROLLOUT_HALTED = 10  # RolloutHalted: too many failures or a latency regression
    TRACING_CHANGED = 11  # a diagnosis left the target's tracing state changed
    CHECK_FAILED = 12  # `tune check`: a health check failed, or a target could not be checked
    INTERNAL = 70  # sysexits.h EX_SOFTWARE: a bug in rt-tune (the traceback is logged, never printed)
    IO = 74  # sysexits.h EX_IOERR: a file or directory of the controller's own could not be read or written
    INTERRUPTED = 130  # 128 + SIGINT
    BROKEN_PIPE = 141  # 128 + SIGPIPE: whoever read stdout went away


class TuneError(Exception):
    """Root of every error rt-tune raises on purpose. `exit_code` is what the CLI exits with."""

    exit_code: int = ExitStatus.ERROR


class InputError(TuneError):
    """Bad input from the user (file, flag, inventory): reported before anything touches a unit."""

    exit_code = ExitStatus.USAGE


class MissingDependencyError(TuneError):
    """A program or file this machine needs is not installed; the message names the Debian package."""

    exit_code = ExitStatus.MISSING_DEPENDENCY


class LabError(TuneError):
    """The rehearsal lab could not be built, booted, reached or stopped."""

    exit_code = ExitStatus.LAB


class TransportError(TuneError):
    """Talking to a unit failed."""

    exit_code = ExitStatus.TRANSPORT


class ConnectError(TransportError):
    """The TCP/SSH connection could not be made or was lost: the only transport error worth retrying."""


class HostKeyError(TransportError):
    """The unit's host key is unknown or changed: refused, never retried."""


class AuthError(TransportError):
    """Authentication failed: never retried."""


class CommandTimeout(TransportError):
    """A remote command passed its deadline; it was killed remotely by `timeout` as well."""


class CommandFailed(TransportError):
    """A remote command exited non-zero where success was required."""

    def __init__(self, message: str, *, exit_status: int | None = None, stdout: str = "", stderr: str = ""):
        super().__init__(message)
        self.exit_status = exit_status
        self.stdout = stdout
        self.stderr = stderr


class ParseError(TuneError):
    """A tool's output could not be parsed: never a silent zero."""

    exit_code = ExitStatus.PARSE
