"""A REAL OpenSSH server on 127.0.0.1 for transport tests (needs root and /usr/sbin/sshd from Debian's
openssh-server). Shared by the transport and host-key trust tests; each test module starts its own.

Besides its main port, the server can listen on named extra ports, each with a `ForceCommand` (a wrapper
script, as on units whose login prints a banner)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from orchestrator.remote.transport import Endpoint

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path, comment: str, kind: str = "ed25519") -> None:
    """A fresh key pair (path, path.pub) of type `kind`, as a user makes one: mode 0600."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )


def public_key(path: Path) -> tuple[str, str]:
    """(type, base64 blob) of the public half of the key pair at `path`."""
    kind, blob = path.with_suffix(".pub").read_text().split()[:2]
    return kind, blob


@dataclass(frozen=True)
class Sshd:
    port: int
    dir: Path
    host_key: Path
    client_key: Path
    known_hosts: Path  # the host key for every port of this server
    log: Path
    #: Extra ports by name; each runs its ForceCommand instead of the requested command.
    ports: Mapping[str, int] = field(default_factory=dict)

    def endpoint(self, **changes) -> Endpoint:
        base = Endpoint(
            host="127.0.0.1",
            port=self.port,
            user="root",
            key_file=str(self.client_key),
            known_hosts=str(self.known_hosts),
            connect_timeout=5.0,
        )
        return replace(base, **changes)


@contextmanager
def sshd_server(
    d: Path,
    force_commands: Mapping[str, str] | None = None,
    *,
    config: Sequence[str] = (),
    extra_host_keys: Sequence[str] = (),
    wrap: Sequence[str] = (),
) -> Iterator[Sshd]:
    """Start sshd with its keys and config in `d`; `force_commands` maps an extra port's name to its command.
    `config`: more sshd_config lines (e.g. a pre-auth `Banner`); `extra_host_keys`: key types the server
    offers besides its ed25519 key (hostkey-<type>; only the ed25519 one is in `known_hosts`); `wrap`: a command
that runs sshd (`exec "$@"`), e.g. in a mount namespace with its own /etc/hosts."""
    if not os.path.exists(SSHD) or shutil.which("ssh-keygen") is None:
        pytest.fail("transport tests need a real sshd: apt-get install -y openssh-server")
    if os.geteuid() != 0:
        pytest.fail("transport tests start sshd on 127.0.0.1 and log in as root: run them as root")
    host_key, client_key = d / "hostkey", d / "clientkey"
    keygen(host_key, "rt-tune-test-host")
    keygen(client_key, "rt-tune-test-client")
    for kind in extra_host_keys:
        keygen(d / f"hostkey-{kind}", f"rt-tune-test-host-{kind}", kind)
    authorized = d / "authorized_keys"
    authorized.write_text(client_key.with_suffix(".pub").read_text())
    port = free_port()
    ports = {name: free_port() for name in force_commands or {}}
    known_hosts = d / "known_hosts"
    kind, blob = public_key(host_key)
    known_hosts.write_text("".join(f"[127.0.0.1]:{p} {kind} {blob}\n" for p in (port, *ports.values())))
    lines = [f"Port {p}" for p in (port, *ports.values())]
    lines += [
        "ListenAddress 127.0.0.1",
        f"HostKey {host_key}",
        *(f"HostKey {d / f'hostkey-{kind}'}" for kind in extra_host_keys),
        f"AuthorizedKeysFile {authorized}",
        "PidFile none",
        "UsePAM no",
        "StrictModes no",
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "AllowTcpForwarding yes",
        "MaxStartups 50",
        "LogLevel VERBOSE",
        *config,
    ]
    for name, command in (force_commands or {}).items():
        lines += [f"Match LocalPort {ports[name]}", f"    ForceCommand {command}"]
    config = d / "sshd_config"
    config.write_text("\n".join(lines) + "\n")
    os.makedirs("/run/sshd", exist_ok=True)  # privilege separation directory
    subprocess.run([SSHD, "-t", "-f", str(config)], check=True, capture_output=True)
    log = d / "sshd.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen([*wrap, SSHD, "-D", "-e", "-f", str(config)], stdout=log_file, stderr=log_file)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                pytest.fail(f"sshd exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-2.0"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"sshd did not come up:\n{log.read_text()}")
            time.sleep(0.05)
        yield Sshd(port, d, host_key, client_key, known_hosts, log, ports)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def wrapped_sshd_server(d: Path, wrappers: Mapping[str, str]) -> Iterator[Sshd]:
    """An sshd whose extra ports (one per name in `wrappers`) run that shell body as a ForceCommand wrapper
    around every command: banners, rc files and misbehaving wrappers as robots have them."""
    commands = {}
    for name, body in wrappers.items():
        script = d / f"wrapper-{name}"
        script.write_text("#!/bin/sh\n" + body)
        script.chmod(0o755)
        commands[name] = str(script)
    with sshd_server(d, commands) as server:
        yield server
