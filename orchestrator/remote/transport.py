"""Run commands on a unit: over SSH (paramiko) or, for tests of higher layers, on this machine.

Rules this module enforces for every caller:

- `remote_command` is the one place where remote arguments are quoted. Callers pass argv lists; a shell is
  only used when a caller asks for one explicitly with ``["sh", "-c", script, ...]``.
- Every remote command is wrapped in ``timeout -k 5 N`` and also has a local deadline, so neither a hung
  command nor a dead peer can block forever.
- Every remote command's stdout is framed by random markers, its exit status after the closing one: what a
  login shell rc file, a MOTD script or a ForceCommand wrapper prints around it is cut off, and an answer that
  is not framed as sent is an error, never parsed.
- Unknown or changed host keys are refused (never accepted silently) and, like authentication failures,
  never retried. An endpoint's own known_hosts file alone decides; without one, the user's and the system's
  files, as OpenSSH does. Only connection-level failures are retried, with a bounded, jittered backoff.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import io
import logging
import math
import os
import posixpath
import re
import secrets
import shlex
import signal
import socket
import stat
import subprocess
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, Self, runtime_checkable

import paramiko
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_random_exponential,
)

from orchestrator.core.errors import (
    AuthError,
    CommandFailed,
    CommandTimeout,
    ConnectError,
    HostKeyError,
    InputError,
    TransportError,
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
#: Most output (stdout and stderr together) one remote command may send: the largest legitimate answer is a
#: cyclictest histogram (at most 64 MiB); beyond this the command (or a wrapper printing without end) is
#: stopped rather than filling the controller's memory.
MAX_OUTPUT_BYTES = 256 * 2**20


# --------------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Endpoint:
    """How to reach one unit (or a jump host) over SSH."""

    host: str
    port: int = 22
    user: str = "root"
    key_file: str | None = None
    #: The known_hosts file that alone decides this endpoint's host key; None: the user's and the system's
    #: (DEFAULT_KNOWN_HOSTS), as with OpenSSH.
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


# The frame around a command: $1 is the marker; the command's stdout follows "<marker>{", and
# "<marker>}<status>\n" follows it. The user's login shell only sees this `sh -c` with quoted words, as before
# (no `$?` there: a non-POSIX login shell would not understand it).
# When stdout and stderr are one stream (a ForceCommand wrapper or rc file with `2>&1`), the command's stderr
# would land inside the frame and be read as its output (a warning parsed as data): it is then captured and
# printed after the closing marker instead (`/dev/fd/N -ef` compares the pipes; false where /dev/fd is absent).
_FRAME_RUN = (
    'if [ /dev/fd/1 -ef /dev/fd/2 ]; then exec 3>&1; e=$("$@" 2>&1 1>&3 3>&-; echo "$?"); exec 3>&-; '
    'rc=${e##*[!0-9]}; e=${e%"$rc"}; printf "%s}%d\\n" "$m" "$rc"; printf "%s" "$e" >&2; '
    'else "$@"; rc=$?; printf "%s}%d\\n" "$m" "$rc"; fi; exit "$rc"'
)
_FRAME_SCRIPT = 'm=$1; shift; printf "%s{" "$m"; ' + _FRAME_RUN
# The same for a command given stdin: $2 is a nonce sent as the first line of stdin. When it is not the first
# line read here, something on the unit (a ForceCommand wrapper, a login rc file) read the stdin first: the
# command is not run (it would get a truncated or empty stdin, e.g. write an empty file) and the status
# field says "stdin". `read` takes a pipe byte by byte, so the command gets the rest exactly.
_FRAME_STDIN_SCRIPT = (
    'm=$1; n=$2; shift 2; printf "%s{" "$m"; IFS= read -r s; '
    'if [ "$s" != "$n" ]; then printf "%s}stdin\\n" "$m"; exit 125; fi; ' + _FRAME_RUN
)


def remote_command(
    argv: Sequence[str],
    *,
    timeout_s: float | None,
    sudo: bool,
    frame: str | None = None,
    stdin_nonce: str | None = None,
) -> str:
    """Return the command string sent to the remote shell: THE one place remote arguments are quoted.

    ``shlex.join(argv)``, wrapped in ``timeout -k 5 N`` (N = ceil(timeout_s)) when `timeout_s` is given, and
    prefixed with ``sudo -n --`` when `sudo`. No shell is added for the command: pass ``["sh", "-c", script]``
    to get one. With `frame` (a marker), a small ``sh -c`` prints the marker around the command's stdout and its
    exit status after it (see `_unframe`); with `stdin_nonce` as well, the command only runs when the first
    line of its stdin is that nonce (the caller sends it before the data).
    """
    args = _validate_argv(argv)
    if timeout_s is not None:
        if not math.isfinite(timeout_s) or timeout_s <= 0:
            # `timeout 0` would mean "no timeout at all".
            raise ValueError(f"timeout_s must be a positive number of seconds, not {timeout_s!r}")
        args = ["timeout", "-k", str(KILL_AFTER_S), str(math.ceil(timeout_s)), *args]
    if sudo:
        args = ["sudo", "-n", "--", *args]
    if frame is not None:
        if not frame or any(c.isspace() or c in "{}\0" for c in frame):
            raise ValueError(f"invalid frame marker {frame!r}")
        if stdin_nonce is None:
            args = ["sh", "-c", _FRAME_SCRIPT, "sh", frame, *args]
        else:
            if not stdin_nonce.isalnum() or not stdin_nonce.isascii():
                raise ValueError(f"invalid stdin nonce {stdin_nonce!r}")
            args = ["sh", "-c", _FRAME_STDIN_SCRIPT, "sh", frame, stdin_nonce, *args]
    elif stdin_nonce is not None:
        raise ValueError("a stdin nonce needs a frame")
    return shlex.join(args)


def _unframe(label: str, what: str, marker: str, status: int, out: bytes, err: bytes) -> tuple[int, bytes]:
    """(exit status, stdout) of a framed command, without what was printed around it; TransportError when the
    frame is not there exactly once as sent (a wrapper that ignores, repeats, rewrites or drops the command,
    or reads its stdin: nothing in such an answer can be trusted)."""
    begin, end = f"{marker}{{".encode(), f"{marker}}}".encode()
    begins, ends = out.count(begin), out.count(end)
    start = out.find(begin)
    stop = out.rfind(end)
    if begins == ends == 1 and start + len(begin) <= stop:
        code, newline, after = out[stop + len(end):].partition(b"\n")
        if newline and code.isdigit() and len(code) <= 3:
            if start or after:
                log.debug("%s: `%s`: ignored %d byte(s) printed before and %d after the command's output",
                          label, what, start, len(after))
            return int(code), out[start + len(begin):stop]
        if newline and code == b"stdin":
            raise TransportError(
                f"{label}: `{what}` was not run: something on the unit read its standard input before it "
                f"could (a ForceCommand wrapper or a login shell rc file that reads stdin?), so it would "
                f"have run on missing or partial input. Make the wrapper leave stdin alone (e.g. "
                f"`< /dev/null` on what it runs first).{_quoted(out, err)}"
            )
    if begins == ends == 0 and marker.lower().encode() not in out.lower():
        why = (f"`{what}` was not run: the unit answered (exit status {status}) without the markers rt-tune "
               f"frames every command with ({marker!r}). Something on the unit runs instead of the requested "
               f"command (a ForceCommand that ignores it, a restricted shell, a wrapper that exits early?).")
    elif begins > 1 or ends > 1:
        why = (f"`{what}` was run {max(begins, ends)} times in one session (its frame {marker!r} came back "
               f"{begins} and {ends} times): a ForceCommand wrapper or a login shell rc file runs the "
               f"requested command more than once, so its output and effects cannot be trusted.")
    else:
        why = (f"the answer to `{what}` is not what was sent for (exit status {status}): its output should "
               f"be framed by {marker!r}. Something on the unit rewrites the output of commands (a "
               f"ForceCommand wrapper or a login shell rc file that filters or replaces it?), so none of it "
               f"can be trusted.")
    raise TransportError(f"{label}: {why}{_quoted(out, err)}")


def _quoted(out: bytes, err: bytes) -> str:
    """The start of stdout (as a Python literal) and the tail of stderr, for a message."""
    shown = out[:300].decode("utf-8", "replace")
    if len(out) > 300:
        shown += f"... ({len(out)} bytes in all)"
    tail = _tail(err.decode("utf-8", "replace"))
    return f"\n--- stdout (start) ---\n{shown!r}\n--- stderr (tail) ---\n{tail}"


# --------------------------------------------------------------------------------------------------------
# Protocol and shared behaviour


@runtime_checkable
class Transport(Protocol):
    """What higher layers use to talk to a unit; a context manager that closes it."""

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc_info: object) -> None: ...

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


# Characters a terminal acts on (C0/C1 controls but newline and tab, DEL, bidirectional overrides): output a
# unit sends is quoted in messages with these escaped, so it cannot move the cursor, recolour or hide text.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with the characters a terminal would act on escaped (\\x1b, \\u202e): for quoting what a unit or
    a command printed in a message."""
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}",
                            text)


def _tail(text: str) -> str:
    text = text.rstrip()
    if len(text) > _TAIL_CHARS:
        text = "..." + text[-_TAIL_CHARS:]
    return printable(text)


# sudo's own refusals (sudo 1.9, Debian 12, recorded with `sudo -n` over SSH without a terminal): its first
# word is "sudo:", so a command's own error is not mistaken for one.
_SUDO_REFUSED = re.compile(
    r"sudo: (?P<password>a password is required)"
    r"|sudo: (?P<tty>a terminal is required.*|sorry, you must have a tty.*)"
    r"|(?:sudo: )?(?P<denied>\S+ is not in the sudoers file.*|.*may not run sudo on .*"
    r"|sorry, user \S+ is not allowed to execute .*|.*account validation failure.*)"
)
_SUDO_MISSING = re.compile(r".*\bsudo: (?:command )?not found")


def _sudo_refusal(label: str, what: str, status: int, stderr: bytes) -> str | None:
    """The message for a command that sudo refused to run (or that found no sudo), from its stderr; None when
    stderr is not one of sudo's refusals."""
    text = stderr.decode("utf-8", "replace")
    lines = [printable(line.strip()) for line in text.splitlines() if line.strip()]
    user = label.rpartition("@")[0] or "the login user"
    if status == 127:
        if any(_SUDO_MISSING.fullmatch(line) for line in lines):
            return (f"{label}: `{what}` was not run: the endpoint has become: true, but sudo is not "
                    f"installed on the unit (or not in {user}'s PATH). Install it (apt-get install sudo) and "
                    f"give {user} a NOPASSWD rule, or log in as root.")
        return None
    for line in lines:
        match = _SUDO_REFUSED.fullmatch(line)
        if match is None:
            continue
        rule = f"`{user} ALL=(ALL) NOPASSWD: ALL` in /etc/sudoers.d/ (visudo -f)"
        if match["password"]:
            fix = (f"sudo asks {user} for a password, and rt-tune runs `sudo -n` (become: true), which never "
                   f"prompts: give {user} a rule without one, {rule}")
        elif match["tty"]:
            fix = (f"sudo requires a terminal (requiretty) and rt-tune runs commands without one: add "
                   f"`Defaults:{user} !requiretty` in /etc/sudoers.d/")
        else:
            fix = (f"{user} may not run it as root through sudo; rt-tune runs its commands through `timeout` "
                   f"and `sh`, so it needs {rule}")
        return f"{label}: `{what}` was not run: {fix}. sudo said: {line}"
    return None


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
    #: The session is root already: `sudo=True` ("as root") adds no sudo. sudo is a PAM session and a sudoers
    #: parse per command: 0.6 CPU-s of the arm64 lab host's emulated CPUs each, 3x a plain command.
    _root_session: bool = False

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
        use_sudo = (self._default_sudo if sudo is None else sudo) and not self._root_session
        raw = self._exec(args, timeout_s=timeout_s, stdin=stdin, sudo=use_sudo)
        log.debug("%s: %s -> exit %d in %.2fs", self.label, _describe(args), raw.exit_status, raw.duration_s)
        if use_sudo and raw.exit_status in (1, 127) and not raw.stdout:
            # Even with check=False: the command did not run, so its "failure" must not be read as an answer.
            refusal = _sudo_refusal(self.label, _describe(args), raw.exit_status, raw.stderr)
            if refusal is not None:
                raise AuthError(refusal)
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

        `sudo=None` uses the transport's default (Endpoint.become for SSH); `sudo=True` means as root, so a
        root login runs the command as it is. Output is decoded as UTF-8 with replacement; use `read_file` for
        binary content.
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


#: Where host keys come from when an endpoint names no known_hosts file: OpenSSH's defaults (user, system).
DEFAULT_KNOWN_HOSTS: tuple[str, ...] = ("~/.ssh/known_hosts", "/etc/ssh/ssh_known_hosts")


def _known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def _pattern_matches(name: str, pattern: str) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, name, re.IGNORECASE | re.DOTALL) is not None


def _names_match(name: str, field: str) -> bool:
    """Whether a known_hosts host field names `name`, as OpenSSH reads it: one hashed name (|1|salt|hash), or
    comma-separated patterns with `*` and `?`, where a matching `!pattern` excludes the line."""
    if field.startswith("|1|"):
        try:
            return hmac.compare_digest(paramiko.HostKeys.hash_host(name, field), field)
        except (ValueError, IndexError):  # a damaged hash names nobody
            return False
    matched = False
    for pattern in field.split(","):
        if pattern.startswith("!"):
            if _pattern_matches(name, pattern[1:]):
                return False
        elif _pattern_matches(name, pattern):
            matched = True
    return matched


@dataclass(frozen=True)
class _KnownKey:
    path: str
    line: int
    key: paramiko.PKey
    revoked: bool = False

    @property
    def at(self) -> str:
        return f"{self.path} line {self.line} ({self.key.get_name()} {host_key_fingerprint(self.key)})"


def _known_keys(
    path: str, data: bytes, host: str, port: int
) -> tuple[list[_KnownKey], list[_KnownKey], list[str]]:
    """The keys the known_hosts file `path` (content `data`) lists for `host`:`port` (line numbers kept),
    those it lists for `host` without a port when `port` is not 22 (OpenSSH's fallback, see
    `_Trust.refusal`), and notes, as sentences, on lines for it that do not count (a bad key, a
    @cert-authority line)."""
    name = _known_hosts_name(host, port)
    keys: list[_KnownKey] = []
    portless: list[_KnownKey] = []
    notes: list[str] = []
    for number, text in enumerate(data.decode("utf-8", "replace").split("\n"), 1):
        fields = text.split()
        if not fields or fields[0].startswith("#"):
            continue
        marker = fields.pop(0) if fields[0].startswith("@") else None
        if len(fields) < 3:
            continue
        found = keys
        if not _names_match(name, fields[0]):
            if port == 22 or not _names_match(host, fields[0]):
                continue
            found = portless
        if marker == "@cert-authority":
            notes.append(f"{path} line {number} is a @cert-authority line for {name}: rt-tune checks the "
                         f"host's own keys only, not host certificates.")
            continue
        if marker not in (None, "@revoked"):
            continue
        try:
            key = paramiko.PKey.from_type_string(fields[1], base64.b64decode(fields[2], validate=True))
        except Exception as exc:  # noqa: BLE001 - any failure of a third-party parser on a bad line
            notes.append(f"This line for {name} could not be used: {path} line {number} "
                         f"({printable(fields[1][:40])}): {str(exc)[:100] or type(exc).__name__}.")
            continue
        found.append(_KnownKey(path, number, key, revoked=marker == "@revoked"))
    return keys, portless, notes


@dataclass(frozen=True)
class _Trust:
    """What the known_hosts files that decide for one endpoint say about it.

    The endpoint's own file alone when it names one (a pinned key must not be outvoted by ~/.ssh/known_hosts,
    which paramiko's load_system_host_keys would consult first); otherwise the user's and the system's files,
    where any matching key is enough, as with OpenSSH."""

    endpoint: Endpoint
    name: str  # the name looked up: host, or [host]:port
    files: tuple[str, ...]  # the deciding files, expanded
    missing: tuple[str, ...]
    keys: tuple[_KnownKey, ...]
    problems: tuple[str, ...]
    #: Keys listed for the host without a port, when its port is not 22 (OpenSSH's fallback).
    portless: tuple[_KnownKey, ...] = ()

    @classmethod
    def load(cls, endpoint: Endpoint, defaults: Sequence[str]) -> _Trust:
        given = [endpoint.known_hosts] if endpoint.known_hosts is not None else list(defaults)
        files = tuple(os.path.abspath(os.path.expanduser(f)) for f in given)
        name = _known_hosts_name(endpoint.host.lower(), endpoint.port)
        keys: list[_KnownKey] = []
        portless: list[_KnownKey] = []
        problems: list[str] = []
        missing: list[str] = []
        for path in files:
            if not os.path.exists(path):  # a dangling symlink too, as with OpenSSH
                missing.append(path)
                continue
            whose = " named by the inventory" if endpoint.known_hosts is not None else ""
            if os.path.realpath(path) == os.devnull:
                raise InputError(f"{endpoint.label}: the known_hosts file{whose} is {path}, the OpenSSH idiom "
                                 f"for turning host-key checking off; rt-tune always checks host keys: name a "
                                 f"known_hosts file that lists this unit's key (ssh-keyscan, checked on its "
                                 f"console)")
            data, _ = _read_regular(path, MAX_KNOWN_HOSTS_BYTES, endpoint.label,
                                    f"the known_hosts file {path}{whose}")
            found, without_port, notes = _known_keys(path, data, endpoint.host.lower(), endpoint.port)
            keys += found
            portless += without_port
            problems += notes
        return cls(endpoint, name, files, tuple(missing), tuple(keys), tuple(problems), tuple(portless))

    @property
    def decided_by(self) -> str:
        def one(path: str) -> str:
            return path + (" (which does not exist)" if path in self.missing else "")

        if self.endpoint.known_hosts is not None:
            return f"the known_hosts file the endpoint names, {one(self.files[0])}, decides alone"
        return "decided by the user's and the system's known_hosts files: " + ", ".join(map(one, self.files))

    def key_types(self) -> set[str]:
        """The algorithms of the keys this host is known by (an RSA key by its SHA-2 signatures too)."""
        names = {k.key.get_name() for k in self.keys if not k.revoked}
        if "ssh-rsa" in names:
            names |= {"rsa-sha2-512", "rsa-sha2-256"}
        return names

    def refusal(self, key: paramiko.PKey) -> str | None:
        """Why `key`, offered by the server, is refused; None when a deciding file lists it for this host.

        As OpenSSH's client (sshconnect.c, "found matching key w/out port"): on a port other than 22, when no
        line lists any key for [host]:port, a line for the host without a port that lists the offered key
        vouches for it (a key listed for [host]:port, of any type, is never outvoted so). A key marked
        @revoked for the host under either name is refused."""
        blob = key.asbytes()
        where = f"{self.endpoint.label}: host key of {self.endpoint.host}:{self.endpoint.port}"
        offered = f"the server offered {key.get_name()} {host_key_fingerprint(key)}"
        revoked = [k for k in (*self.keys, *self.portless) if k.revoked and k.key.asbytes() == blob]
        if revoked:
            return (f"{where} is REVOKED: {offered}, marked @revoked for {self.name} at {revoked[0].path} "
                    f"line {revoked[0].line}. Refusing to connect.")
        if any(not k.revoked and k.key.asbytes() == blob for k in self.keys):
            return None
        line = f"{self.name} {key.get_name()} {key.get_base64()}"
        check = "compare with `ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub` on its console"
        notes = "".join(f" {p}" for p in self.problems)
        same = [k for k in self.keys if not k.revoked and k.key.get_name() == key.get_name()]
        if same:
            paths = list(dict.fromkeys(k.path for k in same))
            removes = " and ".join(f"`ssh-keygen -R {shlex.quote(self.name)} -f {shlex.quote(p)}`" for p in paths)
            return (
                f"{where} has CHANGED: {offered}, but the known_hosts entry for {self.name} at "
                f"{' and '.join(k.at for k in same)} expects another key ({self.decided_by}). This is a "
                f"reinstalled unit or someone in the middle. Refusing to connect.{notes} If the change is "
                f"expected ({check}), remove the old entry with {removes} (or delete that line), then add this "
                f"line to {paths[0]}:\n{line}"
            )
        portless = [k for k in self.portless if not k.revoked]
        unlisted = not any(not k.revoked for k in self.keys)
        if unlisted and any(k.key.asbytes() == blob for k in portless):
            log.debug("%s: host key found for %s without a port, accepted as OpenSSH does",
                      self.endpoint.label, self.endpoint.host)
            return None
        if portless:
            notes += (f" Lines for {self.endpoint.host} without a port count for port {self.endpoint.port} "
                      f"only when they hold the offered key and no line lists a key for {self.name}, as "
                      f"with OpenSSH: {', '.join(k.at for k in portless)}.")
        others = [k for k in self.keys if not k.revoked]
        if others:
            notes = f" Only keys of other types are known for {self.name}: {', '.join(k.at for k in others)}." + notes
        add_to = self.files[0] if self.files else os.path.expanduser(DEFAULT_KNOWN_HOSTS[0])
        return (
            f"{where} is UNKNOWN: {offered}, which no known_hosts entry lists for {self.name} "
            f"({self.decided_by}). Refusing to connect.{notes} If this is the right unit ({check}), trust it by "
            f"adding this line to the known_hosts file {add_to}:\n{line}"
        )

    def transport(self, sock, **kwargs) -> paramiko.Transport:
        """A paramiko Transport that asks first for the key types this host is known by (as OpenSSH orders its
        HostKeyAlgorithms), so a server with several host keys offers one that can be checked."""
        transport = paramiko.Transport(sock, **kwargs)
        known = self.key_types()
        if known:
            options = transport.get_security_options()
            types = list(options.key_types)
            options.key_types = [t for t in types if t in known] + [t for t in types if t not in known]
        return transport


class _HostKeyRefused(paramiko.SSHException):
    """Raised by `_KnownHostsPolicy` with the message for the user."""


class _KnownHostsPolicy(paramiko.MissingHostKeyPolicy):
    """Decides every host key (the client is given none, so paramiko asks this policy each time)."""

    def __init__(self, trust: _Trust) -> None:
        self.trust = trust

    def missing_host_key(self, client, hostname, key):
        refusal = self.trust.refusal(key)
        if refusal is not None:
            raise _HostKeyRefused(refusal)


#: A private key file is a few KB (a 16384-bit RSA key is about 13 KB); a larger file is not one.
MAX_KEY_FILE_BYTES = 2**20
#: known_hosts files are read line by line on every connection; a larger one is refused, never read.
MAX_KNOWN_HOSTS_BYTES = 64 * 2**20

_FILE_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
               stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


def _read_regular(path: str, limit: int, label: str, what: str) -> tuple[bytes, int]:
    """(content, mode) of the regular file `path`; InputError ("`label`: `what` ...") when it cannot be read,
    is not a regular file (a FIFO or device would block or never end) or is larger than `limit` bytes."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; the type is checked before reading.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise InputError(f"{label}: cannot read {what}: {exc.strerror or exc}") from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = _FILE_KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
        raise InputError(f"{label}: {what} is {kind}, not a regular file")
    with os.fdopen(fd, "rb") as f:
        if info.st_size > limit:
            raise InputError(f"{label}: {what} is {info.st_size} bytes, more than the {limit} it may be")
        try:
            data = f.read(limit + 1)
        except OSError as exc:
            raise InputError(f"{label}: cannot read {what}: {exc.strerror or exc}") from exc
    if len(data) > limit:  # grew while being read
        raise InputError(f"{label}: {what} is more than the {limit} bytes it may be")
    return data, info.st_mode


_PUBLIC_KEY_PREFIXES = (b"ssh-", b"ecdsa-sha2-", b"sk-ssh-", b"sk-ecdsa-")


def _load_private_key(endpoint: Endpoint, passphrase: str | None) -> paramiko.PKey | None:
    """The endpoint's private key, loaded here so every problem with the file is an InputError naming it,
    before connecting: unreadable, not a regular file (a FIFO would block), readable by others (refused as
    OpenSSH refuses an "UNPROTECTED PRIVATE KEY FILE"; stricter only in that the owner does not matter), a
    public key, encrypted without a passphrase, or of a type paramiko cannot use. None when the endpoint
    names no key.

    InputError (exit 2), not AuthError: it is a file on this machine for the user to fix, not something the
    unit refused; no retry and no other unit can succeed with it, and callers that treat a TransportError as
    "this unit is unreachable" must not hide it as one."""
    if endpoint.key_file is None:
        return None
    path = os.path.expanduser(endpoint.key_file)
    what = f"{endpoint.label}: the private key {endpoint.key_file} named by the inventory"
    data, mode = _read_regular(path, MAX_KEY_FILE_BYTES, endpoint.label,
                               f"the private key {endpoint.key_file} named by the inventory")
    if mode & 0o077:
        raise InputError(
            f"{endpoint.label}: the private key {path} is accessible by others (mode {mode & 0o7777:04o}); "
            f"OpenSSH refuses such a key and so does rt-tune. Make it private: chmod 600 {shlex.quote(path)}"
        )
    if not data.strip():
        raise InputError(f"{what} is empty")
    if data.lstrip().startswith(_PUBLIC_KEY_PREFIXES):
        private = path[:-4] if path.endswith(".pub") else "the file ssh-keygen wrote beside it, without .pub"
        raise InputError(f"{what} is a public key, not a private one: name the private key ({private})")
    if b"-----BEGIN " not in data or b"PRIVATE KEY-----" not in data:
        raise InputError(f"{what} is not a private key file (no -----BEGIN ... PRIVATE KEY----- block)")
    return _parse_private_key(data, path, passphrase, what)


def _parse_private_key(data: bytes, path: str, passphrase: str | None, what: str) -> paramiko.PKey:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    openssh = b"-----BEGIN OPENSSH PRIVATE KEY-----" in data
    load = serialization.load_ssh_private_key if openssh else serialization.load_pem_private_key

    def decode(password: str | None):
        with warnings.catch_warnings():  # DSA's deprecation: refused below with a message of our own
            warnings.simplefilter("ignore")
            return load(data, password=None if password is None else password.encode())

    try:
        try:
            loaded = decode(passphrase)
        except TypeError:
            if passphrase is None:
                raise
            loaded = decode(None)  # a passphrase given for a key that has none
    except TypeError as exc:  # cryptography: "Password was not given but private key is encrypted"
        raise InputError(
            f"{what} is encrypted with a passphrase, and rt-tune never prompts for one ({exc}). Use a key "
            f"without a passphrase kept at mode 600, or leave `key:` out of the inventory and load the key "
            f"into ssh-agent (ssh-add), which rt-tune then uses."
        ) from None
    except UnsupportedAlgorithm as exc:
        raise InputError(f"{what} is of a type rt-tune cannot use ({exc}); use an ed25519, ECDSA or RSA "
                         f"key") from None
    except ValueError as exc:
        hint = " (is the passphrase right?)" if passphrase is not None else ""
        raise InputError(f"{what} cannot be read as a private key{hint}: {exc}") from None
    kinds = ((ed25519.Ed25519PrivateKey, paramiko.Ed25519Key),
             (ec.EllipticCurvePrivateKey, paramiko.ECDSAKey),
             (rsa.RSAPrivateKey, paramiko.RSAKey))
    cls = next((c for typ, c in kinds if isinstance(loaded, typ)), None)
    if cls is None:
        kind = type(loaded).__name__.removeprefix("_").replace("PrivateKey", "")
        raise InputError(f"{what} is a {kind} key, which rt-tune (paramiko {paramiko.__version__}) cannot "
                         f"use; use an ed25519, ECDSA or RSA key")
    try:
        key = cls.from_private_key(io.StringIO(data.decode("ascii")), password=passphrase)
        cert = path + "-cert.pub"
        if os.path.isfile(cert):  # as paramiko (and OpenSSH) do with a certificate beside the key
            key.load_certificate(cert)
    except Exception as exc:  # noqa: BLE001 - any failure of a third-party parser on a file
        raise InputError(f"{what} cannot be loaded: {str(exc)[:200] or type(exc).__name__}") from None
    return key


class SSHTransport(_CommandTransport):
    """Commands over one lazily opened paramiko SSHClient, optionally through a jump host.

    Connect failures are retried (tenacity) for at most `connect_deadline_s`; host key and authentication
    failures never are. A command is never retried: it might have run.
    """

    #: Local deadline of a command = ceil(timeout_s) + this grace (covers `timeout -k 5`).
    deadline_grace_s: float = DEADLINE_GRACE_S
    #: After the exit status arrives, how long to wait for EOF (a background child may hold stdout).
    eof_grace_s: float = 1.0
    #: Most bytes of output (stdout and stderr) one command may send before it is stopped.
    max_output_bytes: int = MAX_OUTPUT_BYTES

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        connect_deadline_s: float = 30.0,
        passphrase: str | None = None,
        default_known_hosts: Sequence[str] = DEFAULT_KNOWN_HOSTS,
    ) -> None:
        """`default_known_hosts`: the files that decide for an endpoint (and its jump hosts) naming none."""
        if connect_deadline_s <= 0:
            raise ValueError(f"connect_deadline_s must be positive, not {connect_deadline_s!r}")
        self.endpoint = endpoint
        self.connect_deadline_s = connect_deadline_s
        self.default_known_hosts = tuple(default_known_hosts)
        self._passphrase = passphrase  # never logged, never in repr
        self._default_sudo = endpoint.uses_sudo
        self._root_session = endpoint.user == "root"
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
        hop: Endpoint | None = self.endpoint
        while hop is not None:  # every key of the chain, before connecting (passphrase: the target's only)
            try:
                _load_private_key(hop, self._passphrase if hop is self.endpoint else None)
            except InputError as exc:
                if hop is self.endpoint:
                    raise
                raise InputError(f"{self.label}: through the jump host: {exc}") from None
            hop = hop.jump
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
            return _open_client(
                self.endpoint, deadline=deadline, passphrase=self._passphrase, defaults=self.default_known_hosts
            )

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
        # A fresh marker per command: no file content or earlier output can contain it.
        marker = "@@rt-tune-" + secrets.token_hex(8)
        # With stdin, a nonce line first, so a wrapper that reads stdin before the command cannot go unseen.
        nonce = secrets.token_hex(8) if stdin is not None else None
        if nonce is not None and stdin is not None:
            stdin = nonce.encode() + b"\n" + stdin
        command = remote_command(argv, timeout_s=timeout_s, sudo=sudo, frame=marker, stdin_nonce=nonce)
        what = _describe(argv)
        start = time.monotonic()
        deadline = None if timeout_s is None else start + math.ceil(timeout_s) + self.deadline_grace_s
        channel = self._open_channel()
        try:
            self._start(channel, command, what)
            status, out, err = self._collect(channel, stdin, deadline, what, timeout_s)
        finally:
            channel.close()
        # The status from inside the frame: a wrapper that does not pass the command's on must not turn a
        # failure into success.
        status, out = _unframe(self.label, what, marker, status, out, err)
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
        received = 0
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
                    received += len(chunk)
                    progressed = True
                while channel.recv_stderr_ready():
                    chunk = channel.recv_stderr(65536)
                    if not chunk:
                        break
                    err.append(chunk)
                    received += len(chunk)
                    progressed = True
                if received > self.max_output_bytes:
                    raise TransportError(
                        f"{self.label}: `{what}` printed more than {self.max_output_bytes // 2**20} MiB "
                        f"(stdout and stderr); stopped it and closed the session rather than fill this "
                        f"machine's memory. A command or a wrapper on the unit that prints without end?"
                    )
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


class _JumpChannel:
    """A direct-tcpip channel used as the socket of the connection through it, whose close() cannot raise.

    paramiko's transport thread closes its socket when it ends; through a jump host that is a channel, and closing
    it sends a message on the jump host's connection. When the jump host has just gone away (it rebooted, with
    its guest) or was closed first, that send raises EOFError in the thread, which Python prints as a traceback
    on stderr. The channel is gone either way, so the error says nothing: it is dropped here.
    """

    def __init__(self, channel: paramiko.Channel) -> None:
        self._channel = channel

    def close(self) -> None:
        try:
            self._channel.close()
        except (EOFError, OSError, paramiko.SSHException):
            pass

    def __getattr__(self, name: str):  # recv, send, settimeout, getpeername, _closed, ...
        return getattr(self._channel, name)


def _open_client(
    endpoint: Endpoint,
    *,
    deadline: float,
    passphrase: str | None = None,
    defaults: Sequence[str] = DEFAULT_KNOWN_HOSTS,
) -> tuple[paramiko.SSHClient, list[paramiko.SSHClient]]:
    """One connection attempt (through the jump chain); returns the client and the jump clients to close."""
    jump_clients: list[paramiko.SSHClient] = []
    sock: _JumpChannel | None = None
    timeout = max(1.0, min(endpoint.connect_timeout, deadline - time.monotonic()))
    try:
        if endpoint.jump is not None:
            # The jump host's key is checked against its own known_hosts; its passphrase is not shared.
            try:
                jump_client, outer = _open_client(endpoint.jump, deadline=deadline, defaults=defaults)
            except (ConnectError, HostKeyError, AuthError) as exc:  # say which unit the jump host was for
                raise type(exc)(f"{endpoint.label}: through the jump host: {exc}") from exc
            jump_clients = [*outer, jump_client]
            jump_transport = jump_client.get_transport()
            assert jump_transport is not None
            try:
                sock = _JumpChannel(jump_transport.open_channel(
                    "direct-tcpip", (endpoint.host, endpoint.port), ("127.0.0.1", 0), timeout=timeout
                ))
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise ConnectError(
                    f"{endpoint.label}: jump host {endpoint.jump.label} could not reach "
                    f"{endpoint.host}:{endpoint.port}: {exc}"
                ) from exc
        client = _connect_client(endpoint, sock=sock, timeout=timeout, passphrase=passphrase, defaults=defaults)
    except BaseException:
        for jump_client in reversed(jump_clients):
            jump_client.close()
        raise
    return client, jump_clients


def _connect_client(
    endpoint: Endpoint,
    *,
    sock: _JumpChannel | None,
    timeout: float,
    passphrase: str | None,
    defaults: Sequence[str] = DEFAULT_KNOWN_HOSTS,
) -> paramiko.SSHClient:
    label = endpoint.label
    trust = _Trust.load(endpoint, defaults)
    client = paramiko.SSHClient()
    # No keys loaded into the client: the policy decides every key from the files that decide (see _Trust).
    client.set_missing_host_key_policy(_KnownHostsPolicy(trust))
    pkey = _load_private_key(endpoint, passphrase)
    with_key = pkey is not None
    log.debug("%s: connecting%s", label, f" via {endpoint.jump.label}" if endpoint.jump else "")
    try:
        conn: _JumpChannel | socket.socket
        if sock is None:
            # Our own socket, with Nagle off: every command is a small request awaiting a small answer, and
            # with Nagle each one waits out the peer's delayed ACK (~40 ms on Linux) before it is sent.
            conn = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            conn = sock
        client.connect(
            endpoint.host,
            port=endpoint.port,
            username=endpoint.user,
            pkey=pkey,
            allow_agent=not with_key,
            look_for_keys=not with_key,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            channel_timeout=timeout,
            sock=conn,  # type: ignore[arg-type]  # paramiko wants a socket-like object
            transport_factory=trust.transport,
        )
    except _HostKeyRefused as exc:
        client.close()
        raise HostKeyError(str(exc)) from None
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
# The records sit between two lines holding a random marker ($1): SSHTransport already cuts off what a login
# shell prints around a command, but read_files takes any Transport.
_READ_FILES = ('m=$1; shift; echo "$m"; for p in "$@"; do if [ -e "$p" ]; then printf "present "; '
               'base64 -w0 -- "$p" || exit 1; echo; else echo absent; fi; done; echo "$m"')


def read_files(t: Transport, paths: Sequence[str], *, timeout_s: float = 60.0) -> dict[str, bytes | None]:
    """The exact bytes of each file, or None for a file that does not exist (distinct from an empty one)."""
    if not paths:
        return {}
    marker = "@@rt-tune-files-" + secrets.token_hex(8)
    out = t.run(["sh", "-c", _READ_FILES, "-", marker, *paths], timeout_s=timeout_s).stdout
    parts = out.split(marker + "\n")
    lines = parts[1].split("\n") if len(parts) == 3 else []
    if len(lines) != len(paths) + 1 or lines[-1] != "":
        shown = out if len(out) <= 300 else out[:300] + f"... ({len(out)} characters in all)"
        raise TransportError(f"{t.label}: unexpected answer reading {len(paths)} file(s) (expected one line per "
                             f"file between two {marker!r} lines): {shown!r}")
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
