"""testinfra's paramiko backend, connected the way rt-tune connects: the client is rt-tune's (host keys checked
against the inventory's known_hosts, jump hosts, the user's ssh_config, keys or the agent), and every command
goes through rt-tune's transport (quoting, framing, a deadline that kills it, sudo for `become`).

Read-only: where the target has `unshare` and the session is root, each check command runs in a mount namespace
of its own in which every mount is read-only (/proc/sys and /sys included): a check cannot write a file, a
sysctl or a sysfs knob. What that cannot stop, and so is not promised: requests to daemons over sockets
(`systemctl restart`, D-Bus), signals, and the network. Where it is not available the run says so."""

from __future__ import annotations

import functools
from typing import Any

from testinfra.backend.base import BaseBackend, CommandResult
from testinfra.backend.paramiko import ParamikoBackend

from orchestrator.remote.transport import Transport

# Every mount of a private mount namespace made read-only, then the check's command. /proc/sys is bound onto
# itself first so that it is a mount of its own (procfs stays writable elsewhere for the kernel's own use).
READ_ONLY = ('mount --bind /proc/sys /proc/sys 2>/dev/null; '
             "awk '{print $2}' /proc/self/mounts | while read -r m; do "
             'mount -o remount,bind,ro "$m" 2>/dev/null; done; exec /bin/sh -c "$0"')


class RtTuneBackend(ParamikoBackend):
    """A `ParamikoBackend` whose connection and commands are rt-tune's `transport`'s."""

    NAME = "paramiko"

    def __init__(self, transport: Transport, *, command_timeout_s: float = 60.0, read_only: bool = True,
                 **kwargs: Any) -> None:
        BaseBackend.__init__(self, transport.label, **kwargs)  # not ParamikoBackend's: no hostspec, no own SSH
        self.transport = transport
        self.command_timeout_s = command_timeout_s
        self.get_pty = False
        self.timeout = int(command_timeout_s)
        self.read_only = read_only and self._can_isolate()

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
        argv = ["unshare", "--mount", "sh", "-c", READ_ONLY, cmd] if self.read_only else ["sh", "-c", cmd]
        res = self.transport.run(argv, check=False, timeout_s=self.command_timeout_s)
        return self.result(res.exit_status, self.encode(cmd), res.stdout, res.stderr)
