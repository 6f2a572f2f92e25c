"""A transport on this machine (subprocess): the same framing, deadlines and errors as SSH, for tests and a
controller that is its own unit."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time

from orchestrator.core.errors import (
    CommandTimeout,
)
from orchestrator.remote.transport import _CommandTransport, _describe, _Raw

log = logging.getLogger(__name__)
# paramiko's transport thread logs every refused/half-open connection (routine while a unit reboots) with a

#: Seconds `timeout -k` waits after TERM before it sends KILL.


class LocalTransport(_CommandTransport):
    """Runs commands on this machine with subprocess (never through a shell); same semantics as SSH."""

    def __init__(self, *, become: bool = False, label: str = "local") -> None:
        self._label = label
        self._default_sudo = become

    @property
    def label(self) -> str:
        return self._label

    def _exec(self, argv: list[str], *, timeout_s: float | None, stdin: bytes | None, sudo: bool) -> _Raw:
        args = ["sudo", "-n", "--", *argv] if sudo and os.geteuid() != 0 else argv
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # own process group, so a timeout kills its children as well
            )
        except FileNotFoundError:
            # What a remote shell reports for a missing program.
            return _Raw(127, b"", f"{args[0]}: command not found\n".encode(), time.monotonic() - start)
        except PermissionError:
            return _Raw(126, b"", f"{args[0]}: Permission denied\n".encode(), time.monotonic() - start)
        try:
            out, err = proc.communicate(input=stdin, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            raise CommandTimeout(
                f"{self.label}: `{_describe(argv)}` did not finish within {timeout_s:g}s; killed"
            ) from None
        except BaseException:
            _kill_group(proc)
            proc.wait()
            raise
        return _Raw(proc.returncode, out, err, time.monotonic() - start)

    def close(self) -> None:
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
