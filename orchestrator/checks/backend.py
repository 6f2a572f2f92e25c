"""testinfra's paramiko backend, connected the way rt-tune connects: the client is rt-tune's (host keys checked
against the inventory's known_hosts, jump hosts, the user's ssh_config, keys or the agent), and every command
goes through rt-tune's transport (quoting, framing, a deadline that kills it, sudo for `become`).

Read-only: where the target has `unshare` and the session is root, each check command runs in a mount namespace
in which every mount is read-only (/proc/sys and /sys included): a check cannot write a file, a sysctl or a
sysfs knob. What that cannot stop, and so is not promised: requests to daemons over sockets (`systemctl
restart`, D-Bus), signals, and the network. Where it is not available the run says so.

The namespace is made once per check run (remounting every mount read-only is one `mount` per mount point,
tens of processes: a second or more per command on a small unit): a holder process (`sleep`) keeps it, each
command enters it with `nsenter` and first makes sure that what it entered is read-only (so a holder that is
gone and whose PID was reused is never entered writable); `close` ends the holder, and its `sleep` ends by
itself after the run's lifetime should rt-tune be killed. Without `nsenter`, each command makes its own."""

from __future__ import annotations

import functools
import math
from typing import Any

from testinfra.backend.base import BaseBackend, CommandResult
from testinfra.backend.paramiko import ParamikoBackend

from orchestrator.remote.transport import Transport

# Every mount of a private mount namespace made read-only, then the check's command. /proc/sys is bound onto
# itself first so that it is a mount of its own (procfs stays writable elsewhere for the kernel's own use).
READ_ONLY = ('mount --bind /proc/sys /proc/sys 2>/dev/null; '
             "awk '{print $2}' /proc/self/mounts | while read -r m; do "
             'mount -o remount,bind,ro "$m" 2>/dev/null; done; exec /bin/sh -c "$0"')


# The holder: its PID ($$, the process that becomes `sleep`) on stdout, then the read-only namespace, then sleep
# (the run's lifetime, $0). Started detached; the starter waits until it sleeps (the namespace is ready).
_HOLDER = 'exec </dev/null >/dev/null 2>&1; ' + READ_ONLY.replace('; exec /bin/sh -c "$0"', '; exec sleep "$0"')
_START_HOLDER = ('setsid unshare --mount sh -c "$0" "$1" & p=$!; n=0; '
                 'while [ "$(cat /proc/$p/comm 2>/dev/null)" != sleep ]; do '
                 'kill -0 $p 2>/dev/null || exit 1; n=$((n+1)); [ $n -lt 600 ] || exit 1; sleep 0.05; done; echo $p')
# Entering it: refuse to run anything where / or /proc/sys can be written (125, as a wrapper failure).
_ENTER = ('if [ -w / ] || [ -w /proc/sys ]; then echo "rt-tune: the read-only namespace is gone; not run" >&2; '
          'exit 125; fi; exec /bin/sh -c "$0"')
_STOP_HOLDER = '[ "$(cat /proc/$0/comm 2>/dev/null)" = sleep ] && kill $0; true'


class RtTuneBackend(ParamikoBackend):
    """A `ParamikoBackend` whose connection and commands are rt-tune's `transport`'s."""

    NAME = "paramiko"

    def __init__(self, transport: Transport, *, command_timeout_s: float = 60.0, read_only: bool = True,
                 lifetime_s: float = 3600.0, **kwargs: Any) -> None:
        BaseBackend.__init__(self, transport.label, **kwargs)  # not ParamikoBackend's: no hostspec, no own SSH
        self.transport = transport
        self.command_timeout_s = command_timeout_s
        self.get_pty = False
        self.timeout = int(command_timeout_s)
        #: the PID holding the run's read-only namespace (None: each command makes its own, or not read-only)
        self.holder: int | None = None
        self.read_only = read_only and (self._start_holder(lifetime_s) or self._can_isolate())

    def _start_holder(self, lifetime_s: float) -> bool:
        res = self.transport.run(["sh", "-c", _START_HOLDER, _HOLDER, str(math.ceil(lifetime_s))], check=False,
                                 timeout_s=60)
        pid = res.stdout.strip()
        if res.exit_status != 0 or not pid.isdigit():
            return False
        probe = self.transport.run(["nsenter", "-t", pid, "-m", "sh", "-c", _ENTER, "touch /etc/.rt-tune-probe"],
                                   check=False, timeout_s=30)
        self.holder = int(pid)
        if probe.exit_status == 0 or "Read-only file system" not in probe.stderr:  # no nsenter, or not read-only
            self.close()
            return False
        return True

    def close(self) -> None:
        """End the namespace's holder (idempotent)."""
        if self.holder is not None:
            self.transport.run(["sh", "-c", _STOP_HOLDER, str(self.holder)], check=False, timeout_s=30)
            self.holder = None

    def _can_isolate(self) -> bool:
        probe = self.transport.run(["unshare", "--mount", "sh", "-c", READ_ONLY, "touch /etc/.rt-tune-probe"],
                                   check=False, timeout_s=30)
        if probe.exit_status == 0:  # writable inside: the namespace did not make / read-only
            self.transport.run(["rm", "-f", "/etc/.rt-tune-probe"], check=False, timeout_s=30)
            return False
        return "Read-only file system" in probe.stderr

    @functools.cached_property
    def client(self):  # type: ignore[override]  # testinfra's paramiko client, here rt-tune's
        client = getattr(self.transport, "paramiko_client", None)
        if client is None:
            raise NotImplementedError(f"{self.transport.label}: not an SSH transport")
        return client()

    def run(self, command: str, *args: str, **kwargs: Any) -> CommandResult:
        cmd = self.get_command(command, *args)
        if self.holder is not None:
            argv = ["nsenter", "-t", str(self.holder), "-m", "sh", "-c", _ENTER, cmd]
        elif self.read_only:
            argv = ["unshare", "--mount", "sh", "-c", READ_ONLY, cmd]
        else:
            argv = ["sh", "-c", cmd]
        res = self.transport.run(argv, check=False, timeout_s=self.command_timeout_s)
        return self.result(res.exit_status, self.encode(cmd), res.stdout, res.stderr)
