"""One exception root for the whole core; the CLI maps each class to an exit code in one place."""

from __future__ import annotations


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
