"""One exception root for the whole core; the CLI maps each class to an exit code in one place.

Exit statuses of `tune` (decided in orchestrator/cli.py `exit_status`): 0 success; a TuneError's own
`exit_code` (1 TuneError and JournalError, 2 InputError and usage errors, 3 MissingDependencyError,
4 LabError, 5 TransportError, 6 ParseError, 7 LockedError, 9 and 10 a rollout's, 11 a diagnosis that left
tracing changed); 8 drift found by `tune verify`; 70 an internal error (a bug: the traceback is logged, never
printed); 74 a file or directory of the controller's own could not be read or written; 130 interrupted;
141 stdout was closed."""

from __future__ import annotations

EXIT_USAGE = 2  # click's usage errors, like InputError
EXIT_DRIFT = 8  # `tune verify` found kept changes drifted
EXIT_INTERNAL = 70  # sysexits.h EX_SOFTWARE: a bug in rt-tune
EXIT_IO = 74  # sysexits.h EX_IOERR: an OSError on the controller (a file it could not read or write)
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: whoever read stdout went away


class TuneError(Exception):
    """Root of every error rt-tune raises on purpose. `exit_code` is what the CLI exits with."""

    exit_code = 1


class InputError(TuneError):
    """Bad input from the user (file, flag, inventory): reported before anything touches a unit."""

    exit_code = 2


class MissingDependencyError(TuneError):
    """A program or file this machine needs is not installed; the message names the Debian package."""

    exit_code = 3


class LabError(TuneError):
    """The rehearsal lab could not be built, booted, reached or stopped."""

    exit_code = 4


class TransportError(TuneError):
    """Talking to a unit failed."""

    exit_code = 5


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

    exit_code = 6
