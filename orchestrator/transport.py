"""Run commands on a unit: over SSH (paramiko) or, for tests of higher layers, on this machine.

Rules this module enforces for every caller:

- `remote_command` is the one place where remote arguments are quoted. Callers pass argv lists; a shell is
  only used when a caller asks for one explicitly with ``["sh", "-c", script, ...]``.
- Every remote command is wrapped in ``timeout -k 5 N`` and also has a local deadline, so neither a hung
  command nor a dead peer can block forever.
- Unknown or changed host keys are refused (never accepted silently) and, like authentication failures,
  never retried. Only connection-level failures are retried, with a bounded, jittered backoff.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import math
import os
import posixpath
import secrets
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import paramiko
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_random_exponential,
)

from orchestrator.errors import (
    AuthError,
    CommandFailed,
    CommandTimeout,
    ConnectError,
    HostKeyError,
)

log = logging.getLogger(__name__)
# paramiko's transport thread logs every refused/half-open connection (routine while a unit reboots) with a
# traceback; without a handler Python's last-resort handler prints them to stderr. Our retries report instead.
logging.getLogger("paramiko.transport").addHandler(logging.NullHandler())

#: Seconds `timeout -k` waits after TERM before it sends KILL.
KILL_AFTER_S = 5
#: Extra seconds the local deadline allows beyond the remote `timeout`.
DEADLINE_GRACE_S = 10.0
#: Remote exit statuses meaning the `timeout` wrapper fired (TERM -> 124, KILL -> 128 + 9).
TIMEOUT_STATUSES = (124, 137)
#: How much of stdout/stderr an error message quotes.
_TAIL_CHARS = 2000


# --------------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Endpoint:
    """How to reach one unit (or a jump host) over SSH."""

    host: str
    port: int = 22
    user: str = "root"
    key_file: str | None = None
    #: Extra known_hosts file; ~/.ssh/known_hosts is loaded as well when it exists.
    known_hosts: str | None = None
    #: Run commands through `sudo -n --` when `user` is not root.
    become: bool = False
    #: ProxyJump: reach `host:port` through a direct-tcpip channel opened on this endpoint.
    jump: Endpoint | None = None
    connect_timeout: float = 10.0
    #: Seconds between transport keepalive packets (0 disables them).
    keepalive: int = 15

    def __post_init__(self) -> None:
        if not self.host or any(c.isspace() or c == "\0" for c in self.host):
            raise ValueError(f"invalid SSH host {self.host!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"invalid SSH port {self.port!r} for {self.host}")
        if not self.user or any(c.isspace() or c == "\0" for c in self.user):
            raise ValueError(f"invalid SSH user {self.user!r} for {self.host}")
        if self.connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be positive, not {self.connect_timeout!r}")
        if self.keepalive < 0:
            raise ValueError(f"keepalive must be >= 0, not {self.keepalive!r}")

    @property
    def label(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"

    @property
    def uses_sudo(self) -> bool:
        """Whether commands run through sudo by default."""
        return self.become and self.user != "root"


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    exit_status: int
    stdout: str
    stderr: str
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


# --------------------------------------------------------------------------------------------------------
# Quoting


def _validate_argv(argv: Sequence[str]) -> list[str]:
    if isinstance(argv, str | bytes):
        raise TypeError(f"argv must be a sequence of arguments, not a single string: {argv!r}")
    args = list(argv)
    if not args:
        raise ValueError("argv is empty")
    for arg in args:
        if not isinstance(arg, str):
            raise TypeError(f"argv items must be str, got {type(arg).__name__}: {arg!r}")
        if "\0" in arg:
            raise ValueError(f"argv item contains a NUL byte: {arg!r}")
    return args


def remote_command(argv: Sequence[str], *, timeout_s: float | None, sudo: bool) -> str:
    """Return the command string sent to the remote shell: THE one place remote arguments are quoted.

    ``shlex.join(argv)``, wrapped in ``timeout -k 5 N`` (N = ceil(timeout_s)) when `timeout_s` is given, and
    prefixed with ``sudo -n --`` when `sudo`. No shell is added: pass ``["sh", "-c", script]`` to get one.
    """
    args = _validate_argv(argv)
    if timeout_s is not None:
        if not math.isfinite(timeout_s) or timeout_s <= 0:
            # `timeout 0` would mean "no timeout at all".
            raise ValueError(f"timeout_s must be a positive number of seconds, not {timeout_s!r}")
        args = ["timeout", "-k", str(KILL_AFTER_S), str(math.ceil(timeout_s)), *args]
    if sudo:
        args = ["sudo", "-n", "--", *args]
    return shlex.join(args)


# --------------------------------------------------------------------------------------------------------
# Protocol and shared behaviour


@runtime_checkable
class Transport(Protocol):
    """What higher layers use to talk to a unit."""

    @property
    def label(self) -> str: ...

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout_s: float | None = 60.0,
        check: bool = True,
        stdin: bytes | None = None,
        sudo: bool | None = None,
    ) -> CommandResult: ...

    def read_file(self, path: str) -> bytes: ...

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class _Raw:
    """Undecoded outcome of one command."""

    exit_status: int
    stdout: bytes
    stderr: bytes
    duration_s: float


def _tail(text: str) -> str:
    text = text.rstrip()
    if len(text) > _TAIL_CHARS:
        return "..." + text[-_TAIL_CHARS:]
    return text


def _describe(argv: Sequence[str]) -> str:
    text = shlex.join(argv)
    return text if len(text) <= 200 else text[:200] + "..."


# Atomic replace, run with explicit positional arguments (no interpolation into the script):
# $1 temp file beside the target, $2 octal mode, $3 target.
_WRITE_SCRIPT = (
    "umask 077; tmp=$1; trap 'rm -f -- \"$tmp\"' EXIT; "
    'cat > "$tmp" && chmod -- "$2" "$tmp" && { sync -- "$tmp" 2>/dev/null || true; } && '
    'mv -f -- "$tmp" "$3"'
)


class _CommandTransport:
    """`run`, `read_file` and `write_file` on top of a subclass's `_exec`."""

    _default_sudo: bool = False

    @property
    def label(self) -> str:
        raise NotImplementedError

    def _exec(self, argv: list[str], *, timeout_s: float | None, stdin: bytes | None, sudo: bool) -> _Raw:
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - overridden
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _raw(
        self,
        argv: Sequence[str],
        *,
        timeout_s: float | None,
        check: bool,
        stdin: bytes | None,
        sudo: bool | None,
    ) -> _Raw:
        args = _validate_argv(argv)
        if timeout_s is not None and (not math.isfinite(timeout_s) or timeout_s <= 0):
            raise ValueError(f"timeout_s must be a positive number of seconds, not {timeout_s!r}")
        use_sudo = self._default_sudo if sudo is None else sudo
        raw = self._exec(args, timeout_s=timeout_s, stdin=stdin, sudo=use_sudo)
        log.debug("%s: %s -> exit %d in %.2fs", self.label, _describe(args), raw.exit_status, raw.duration_s)
        if check and raw.exit_status != 0:
            out = _tail(raw.stdout.decode("utf-8", "replace"))
            err = _tail(raw.stderr.decode("utf-8", "replace"))
            raise CommandFailed(
                f"{self.label}: `{_describe(args)}` exited with status {raw.exit_status}"
                f"\n--- stderr (tail) ---\n{err}\n--- stdout (tail) ---\n{out}",
                exit_status=raw.exit_status,
                stdout=raw.stdout.decode("utf-8", "replace"),
                stderr=raw.stderr.decode("utf-8", "replace"),
            )
        return raw

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout_s: float | None = 60.0,
        check: bool = True,
        stdin: bytes | None = None,
        sudo: bool | None = None,
    ) -> CommandResult:
        """Run argv (no shell); raise CommandTimeout past `timeout_s`, CommandFailed if `check` and non-zero.

        `sudo=None` uses the transport's default (Endpoint.become for SSH). Output is decoded as UTF-8 with
        replacement; use `read_file` for binary content.
        """
        raw = self._raw(argv, timeout_s=timeout_s, check=check, stdin=stdin, sudo=sudo)
        return CommandResult(
            argv=tuple(argv),
            exit_status=raw.exit_status,
            stdout=raw.stdout.decode("utf-8", "replace"),
            stderr=raw.stderr.decode("utf-8", "replace"),
            duration_s=raw.duration_s,
        )

    def read_file(self, path: str, *, timeout_s: float = 60.0) -> bytes:
        """The file's exact bytes (through sudo when the transport uses it)."""
        return self._raw(["cat", "--", path], timeout_s=timeout_s, check=True, stdin=None, sudo=None).stdout

    def write_file(self, path: str, data: bytes, mode: int = 0o644, *, timeout_s: float = 60.0) -> None:
        """Replace `path` atomically: write a temp file beside it, chmod, fsync, then rename over it."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data must be bytes, not {type(data).__name__}")
        if not path or path.endswith("/") or "\0" in path:
            raise ValueError(f"invalid file path {path!r}")
        if not 0 <= mode <= 0o7777:
            raise ValueError(f"invalid file mode {mode!r}")
        directory, base = posixpath.split(path)
        tmp = posixpath.join(directory, f".{base}.rt-tune-{secrets.token_hex(6)}.tmp")
        self._raw(
            ["sh", "-c", _WRITE_SCRIPT, "sh", tmp, format(mode, "04o"), path],
            timeout_s=timeout_s,
            check=True,
            stdin=bytes(data),
            sudo=None,
        )


# --------------------------------------------------------------------------------------------------------
# Local


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


# --------------------------------------------------------------------------------------------------------
# SSH


def host_key_fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style fingerprint: ``SHA256:`` + unpadded base64 of the SHA-256 of the key blob."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def _known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


class _UnknownHostKey(paramiko.SSHException):
    """Raised by `_RejectUnknownKey` so the offered key reaches the error message."""

    def __init__(self, hostname: str, key: paramiko.PKey) -> None:
        super().__init__(f"Server {hostname!r} not found in known_hosts")
        self.hostname = hostname
        self.key = key


class _RejectUnknownKey(paramiko.RejectPolicy):
    """paramiko's RejectPolicy, keeping the offered key for the error message."""

    def missing_host_key(self, client, hostname, key):
        raise _UnknownHostKey(hostname, key)


def _trust_hint(endpoint: Endpoint, key: paramiko.PKey) -> str:
    target = endpoint.known_hosts or "~/.ssh/known_hosts"
    line = f"{_known_hosts_name(endpoint.host, endpoint.port)} {key.get_name()} {key.get_base64()}"
    return (
        f"If this is the right unit (compare with `ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub` on its "
        f"console), trust it by adding this line to the known_hosts file {target}:\n{line}"
    )


class SSHTransport(_CommandTransport):
    """Commands over one lazily opened paramiko SSHClient, optionally through a jump host.

    Connect failures are retried (tenacity) for at most `connect_deadline_s`; host key and authentication
    failures never are. A command is never retried: it might have run.
    """

    #: Local deadline of a command = ceil(timeout_s) + this grace (covers `timeout -k 5`).
    deadline_grace_s: float = DEADLINE_GRACE_S
    #: After the exit status arrives, how long to wait for EOF (a background child may hold stdout).
    eof_grace_s: float = 1.0

    def __init__(
        self, endpoint: Endpoint, *, connect_deadline_s: float = 30.0, passphrase: str | None = None
    ) -> None:
        if connect_deadline_s <= 0:
            raise ValueError(f"connect_deadline_s must be positive, not {connect_deadline_s!r}")
        self.endpoint = endpoint
        self.connect_deadline_s = connect_deadline_s
        self._passphrase = passphrase  # never logged, never in repr
        self._default_sudo = endpoint.uses_sudo
        self._lock = threading.RLock()
        self._client: paramiko.SSHClient | None = None
        self._jump_clients: list[paramiko.SSHClient] = []

    def __repr__(self) -> str:
        return f"SSHTransport({self.label})"

    @property
    def label(self) -> str:
        return self.endpoint.label

    # -- connection ------------------------------------------------------------------------------------

    def connect(self) -> None:
        """Connect now if not connected (otherwise done lazily on first use)."""
        self._transport()

    def reconnect(self) -> None:
        """Drop the client and build a fresh one (after a reboot, the old one is dead or stale)."""
        with self._lock:
            self._drop()
            self._transport()

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        clients = ([self._client] if self._client else []) + list(reversed(self._jump_clients))
        self._client = None
        self._jump_clients = []
        for client in clients:
            try:
                client.close()
            except Exception as exc:  # noqa: BLE001 - closing a dead client must not fail the caller
                log.debug("%s: error while closing client: %s", self.label, exc)

    def _transport(self) -> paramiko.Transport:
        with self._lock:
            if self._client is not None:
                transport = self._client.get_transport()
                if transport is not None and transport.is_active():
                    return transport
                log.debug("%s: connection is no longer active, reconnecting", self.label)
                self._drop()
            self._client, self._jump_clients = self._connect_with_retry()
            transport = self._client.get_transport()
            assert transport is not None
            return transport

    def _connect_with_retry(self) -> tuple[paramiko.SSHClient, list[paramiko.SSHClient]]:
        start = time.monotonic()
        deadline = start + self.connect_deadline_s

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.debug(
                "%s: connect attempt %d failed (%s), retrying in %.1fs",
                self.label,
                state.attempt_number,
                exc,
                state.upcoming_sleep,
            )

        retrying = Retrying(
            stop=stop_after_delay(self.connect_deadline_s),
            wait=wait_random_exponential(multiplier=0.5, max=5),
            retry=retry_if_exception_type(ConnectError),
            before_sleep=before_sleep,
            reraise=True,
        )
        attempts = 0

        def attempt() -> tuple[paramiko.SSHClient, list[paramiko.SSHClient]]:
            nonlocal attempts
            attempts += 1
            return _open_client(self.endpoint, deadline=deadline, passphrase=self._passphrase)

        try:
            return retrying(attempt)
        except ConnectError as exc:
            raise ConnectError(
                f"{exc} (gave up after {attempts} attempt(s) in {time.monotonic() - start:.1f}s)"
            ) from exc

    # -- commands --------------------------------------------------------------------------------------

    def _open_channel(self) -> paramiko.Channel:
        transport = self._transport()
        try:
            return transport.open_session(timeout=self.endpoint.connect_timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            # Nothing was sent yet, so one fresh connection is safe.
            log.debug("%s: opening a session failed (%s), reconnecting once", self.label, exc)
        with self._lock:
            self._drop()
        transport = self._transport()
        try:
            return transport.open_session(timeout=self.endpoint.connect_timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectError(f"{self.label}: cannot open an SSH session: {exc}") from exc

    def _exec(self, argv: list[str], *, timeout_s: float | None, stdin: bytes | None, sudo: bool) -> _Raw:
        command = remote_command(argv, timeout_s=timeout_s, sudo=sudo)
        what = _describe(argv)
        start = time.monotonic()
        deadline = None if timeout_s is None else start + math.ceil(timeout_s) + self.deadline_grace_s
        channel = self._open_channel()
        try:
            self._start(channel, command, what)
            status, out, err = self._collect(channel, stdin, deadline, what, timeout_s)
        finally:
            channel.close()
        duration = time.monotonic() - start
        if timeout_s is not None and status in TIMEOUT_STATUSES:
            raise CommandTimeout(
                f"{self.label}: `{what}` did not finish within {timeout_s:g}s "
                f"(remote `timeout` killed it, exit status {status})"
            )
        return _Raw(status, out, err, duration)

    def _start(self, channel: paramiko.Channel, command: str, what: str) -> None:
        # paramiko waits for the exec reply without any timeout: close the channel if it never comes.
        watchdog = threading.Timer(self.endpoint.connect_timeout, channel.close)
        watchdog.daemon = True
        watchdog.start()
        try:
            channel.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectError(f"{self.label}: could not start `{what}`: {exc}") from exc
        finally:
            watchdog.cancel()

    def _collect(
        self,
        channel: paramiko.Channel,
        stdin: bytes | None,
        deadline: float | None,
        what: str,
        timeout_s: float | None,
    ) -> tuple[int, bytes, bytes]:
        out: list[bytes] = []
        err: list[bytes] = []
        pending = memoryview(stdin or b"")
        if stdin is None or not pending:
            channel.shutdown_write()
            pending = memoryview(b"")
        transport = channel.get_transport()
        pause = 0.001
        exited_at: float | None = None
        last_data = time.monotonic()
        try:
            while True:
                progressed = False
                if pending and not channel.exit_status_ready() and channel.send_ready():
                    sent = channel.send(pending[:32768])
                    pending = pending[sent:]
                    if not pending:
                        channel.shutdown_write()
                    progressed = sent > 0
                while channel.recv_ready():
                    chunk = channel.recv(65536)
                    if not chunk:
                        break
                    out.append(chunk)
                    progressed = True
                while channel.recv_stderr_ready():
                    chunk = channel.recv_stderr(65536)
                    if not chunk:
                        break
                    err.append(chunk)
                    progressed = True
                now = time.monotonic()
                if progressed:
                    last_data = now
                if (
                    channel.exit_status_ready()
                    and not channel.recv_ready()
                    and not channel.recv_stderr_ready()
                ):
                    status = channel.exit_status
                    if status == -1 and (transport is None or not transport.is_active()):
                        raise ConnectError(f"{self.label}: connection lost while running `{what}`")
                    if channel.closed or channel.eof_received:
                        return status, b"".join(out), b"".join(err)
                    # Exit status arrived but not EOF yet: output may still be in flight.
                    exited_at = exited_at or now
                    if now - max(exited_at, last_data) > self.eof_grace_s:
                        log.debug("%s: `%s` exited but its output stayed open; not waiting", self.label, what)
                        return status, b"".join(out), b"".join(err)
                elif transport is None or not transport.is_active():
                    raise ConnectError(f"{self.label}: connection lost while running `{what}`")
                if deadline is not None and now > deadline:
                    raise CommandTimeout(
                        f"{self.label}: `{what}` did not finish within {timeout_s:g}s "
                        f"(no answer by the local deadline; channel closed)"
                    )
                if progressed:
                    pause = 0.001
                else:
                    time.sleep(pause)
                    pause = min(pause * 2, 0.05)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ConnectError(f"{self.label}: connection failed while running `{what}`: {exc}") from exc


def _open_client(
    endpoint: Endpoint, *, deadline: float, passphrase: str | None = None
) -> tuple[paramiko.SSHClient, list[paramiko.SSHClient]]:
    """One connection attempt (through the jump chain); returns the client and the jump clients to close."""
    jump_clients: list[paramiko.SSHClient] = []
    sock: paramiko.Channel | None = None
    timeout = max(1.0, min(endpoint.connect_timeout, deadline - time.monotonic()))
    try:
        if endpoint.jump is not None:
            # The jump host's key is checked against its own known_hosts; its passphrase is not shared.
            jump_client, outer = _open_client(endpoint.jump, deadline=deadline)
            jump_clients = [*outer, jump_client]
            jump_transport = jump_client.get_transport()
            assert jump_transport is not None
            try:
                sock = jump_transport.open_channel(
                    "direct-tcpip", (endpoint.host, endpoint.port), ("127.0.0.1", 0), timeout=timeout
                )
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise ConnectError(
                    f"{endpoint.label}: jump host {endpoint.jump.label} could not reach "
                    f"{endpoint.host}:{endpoint.port}: {exc}"
                ) from exc
        client = _connect_client(endpoint, sock=sock, timeout=timeout, passphrase=passphrase)
    except BaseException:
        for jump_client in reversed(jump_clients):
            jump_client.close()
        raise
    return client, jump_clients


def _connect_client(
    endpoint: Endpoint, *, sock: paramiko.Channel | None, timeout: float, passphrase: str | None
) -> paramiko.SSHClient:
    label = endpoint.label
    if endpoint.key_file is not None:
        try:
            with open(os.path.expanduser(endpoint.key_file), "rb"):
                pass
        except OSError as exc:
            raise AuthError(f"{label}: cannot read client key {endpoint.key_file}: {exc}") from exc
    client = paramiko.SSHClient()
    # Refuse unknown keys (a subclass of RejectPolicy that keeps the offered key for the message).
    client.set_missing_host_key_policy(_RejectUnknownKey())
    try:
        client.load_system_host_keys()  # ~/.ssh/known_hosts, when it exists
        if endpoint.known_hosts is not None:
            client.load_host_keys(os.path.expanduser(endpoint.known_hosts))
    except (OSError, paramiko.SSHException) as exc:
        raise HostKeyError(f"{label}: cannot load known_hosts {endpoint.known_hosts}: {exc}") from exc
    with_key = endpoint.key_file is not None
    log.debug("%s: connecting%s", label, f" via {endpoint.jump.label}" if endpoint.jump else "")
    try:
        if sock is None:
            # Our own socket, with Nagle off: every command is a small request awaiting a small answer, and
            # with Nagle each one waits out the peer's delayed ACK (~40 ms on Linux) before it is sent.
            tcp = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
            tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = tcp
        client.connect(
            endpoint.host,
            port=endpoint.port,
            username=endpoint.user,
            key_filename=os.path.expanduser(endpoint.key_file) if with_key else None,
            passphrase=passphrase,
            allow_agent=not with_key,
            look_for_keys=not with_key,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            channel_timeout=timeout,
            sock=sock,
        )
    except _UnknownHostKey as exc:
        client.close()
        raise HostKeyError(
            f"{label}: host key of {endpoint.host}:{endpoint.port} is UNKNOWN: the server offered "
            f"{exc.key.get_name()} {host_key_fingerprint(exc.key)}, which is in no known_hosts file. "
            f"Refusing to connect. {_trust_hint(endpoint, exc.key)}"
        ) from None
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise HostKeyError(
            f"{label}: host key of {endpoint.host}:{endpoint.port} has CHANGED: the server offered "
            f"{exc.key.get_name()} {host_key_fingerprint(exc.key)}, known_hosts expects "
            f"{exc.expected_key.get_name()} {host_key_fingerprint(exc.expected_key)}. This is a reinstalled "
            f"unit or someone in the middle. Refusing to connect. If the change is expected, remove the old "
            f"entry (ssh-keygen -R '{_known_hosts_name(endpoint.host, endpoint.port)}'"
            f"{' -f ' + endpoint.known_hosts if endpoint.known_hosts else ''}). "
            f"{_trust_hint(endpoint, exc.key)}"
        ) from None
    except paramiko.AuthenticationException as exc:
        client.close()
        raise AuthError(f"{label}: authentication failed: {exc}") from None
    except (TimeoutError, OSError, EOFError) as exc:  # includes NoValidConnectionsError
        client.close()
        raise ConnectError(f"{label}: cannot connect: {exc or type(exc).__name__}") from exc
    except paramiko.SSHException as exc:
        transport = client.get_transport()
        kex_done = transport is not None and transport.is_active() and transport.host_key is not None
        client.close()
        if kex_done:
            # The connection is up and the key checked: what failed is authentication (e.g. a bad key file).
            raise AuthError(f"{label}: authentication failed: {exc}") from None
        raise ConnectError(f"{label}: SSH handshake failed: {exc}") from exc
    transport = client.get_transport()
    assert transport is not None
    if endpoint.keepalive:
        transport.set_keepalive(endpoint.keepalive)
    log.debug("%s: connected", label)
    return client


# ---- reading files in one round trip ------------------------------------------------------------------------
# Each path: "absent", or "present " + its exact bytes in base64 (so no content can be mistaken for a
# separator). One command for any number of files: on a unit reached through a jump host, a round trip costs.
_READ_FILES = ('for p in "$@"; do if [ -e "$p" ]; then printf "present "; base64 -w0 -- "$p" || exit 1; echo; '
               'else echo absent; fi; done')


def read_files(t: Transport, paths: Sequence[str], *, timeout_s: float = 60.0) -> dict[str, bytes | None]:
    """The exact bytes of each file, or None for a file that does not exist (distinct from an empty one)."""
    if not paths:
        return {}
    out = t.run(["sh", "-c", _READ_FILES, "-", *paths], timeout_s=timeout_s).stdout
    lines = out.split("\n")
    if len(lines) != len(paths) + 1 or lines[-1] != "":
        raise TransportError(f"{t.label}: unexpected answer reading {len(paths)} file(s): {out[:200]!r}")
    result: dict[str, bytes | None] = {}
    for path, line in zip(paths, lines, strict=False):
        if line == "absent":
            result[path] = None
        elif line.startswith("present "):
            try:
                result[path] = base64.b64decode(line[8:], validate=True)
            except ValueError as exc:
                raise TransportError(f"{t.label}: reading {path}: bad base64 from the unit: {exc}") from exc
        else:
            raise TransportError(f"{t.label}: unexpected answer reading {path}: {line[:100]!r}")
    return result


def read_optional(t: Transport, path: str) -> bytes | None:
    """A file's exact bytes, or None when it does not exist; one round trip."""
    return read_files(t, [path])[path]
