"""Run commands on a unit: the Transport protocol and what every transport shares (SSH: orchestrator/remote/ssh.py;
this machine: orchestrator/remote/local.py).

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
import logging
import math
import posixpath
import re
import secrets
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, Self, runtime_checkable

from orchestrator.core.errors import (
    AuthError,
    CommandFailed,
    TransportError,
)

log = logging.getLogger(__name__)

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


# ---- reading files in one round trip ------------------------------------------------------------------------
# Each path ("$@"): "absent", or "present " + its exact bytes in base64 (so no content can be mistaken for a
# separator). One command for any number of files: on a unit reached through a jump host, a round trip costs.
FILE_RECORDS = ('for p in "$@"; do if [ -e "$p" ]; then printf "present "; base64 -w0 -- "$p" || exit 1; echo; '
                'else echo absent; fi; done')
# The records sit between two lines holding a random marker ($1): SSHTransport already cuts off what a login
# shell prints around a command, but read_files takes any Transport.
_READ_FILES = 'm=$1; shift; echo "$m"; ' + FILE_RECORDS + '; echo "$m"'


def parse_file_records(paths: Sequence[str], text: str) -> dict[str, bytes | None]:
    """FILE_RECORDS' answer for `paths` (exactly one line per path); ValueError saying what is wrong."""
    lines = text.split("\n")
    if len(lines) != len(paths) + 1 or lines[-1] != "":
        shown = text if len(text) <= 300 else text[:300] + f"... ({len(text)} characters in all)"
        raise ValueError(f"unexpected answer reading {len(paths)} file(s) (expected one line per file): {shown!r}")
    result: dict[str, bytes | None] = {}
    for path, line in zip(paths, lines, strict=False):
        if line == "absent":
            result[path] = None
        elif line.startswith("present "):
            try:
                result[path] = base64.b64decode(line[8:], validate=True)
            except ValueError as exc:
                raise ValueError(f"reading {path}: bad base64 from the unit: {exc}") from exc
        else:
            raise ValueError(f"unexpected answer reading {path}: {line[:100]!r}")
    return result


def _marked_records(t: Transport, out: str, marker: str, paths: Sequence[str]) -> dict[str, bytes | None]:
    parts = out.split(marker + "\n")
    if len(parts) != 3:
        shown = out if len(out) <= 300 else out[:300] + f"... ({len(out)} characters in all)"
        raise TransportError(f"{t.label}: unexpected answer reading {len(paths)} file(s) (expected one line per "
                             f"file between two {marker!r} lines): {shown!r}")
    try:
        return parse_file_records(paths, parts[1])
    except ValueError as exc:
        raise TransportError(f"{t.label}: {exc}") from exc


def read_files(t: Transport, paths: Sequence[str], *, timeout_s: float = 60.0) -> dict[str, bytes | None]:
    """The exact bytes of each file, or None for a file that does not exist (distinct from an empty one)."""
    if not paths:
        return {}
    marker = "@@rt-tune-files-" + secrets.token_hex(8)
    out = t.run(["sh", "-c", _READ_FILES, "-", marker, *paths], timeout_s=timeout_s).stdout
    return _marked_records(t, out, marker, paths)


COMMAND_SEP = "\x1f"  # joins one command's argv into one argument (split again with IFS on the unit)


# ---- several commands' outputs in one round trip (facts.base.gather_facts) -----------------------------------
# Several facts in one round trip. Each fact's argv travels as one argument joined by the unit separator
# (\x1f); the script splits it with IFS (globbing off), so nothing is re-quoted here: the transport quotes the
# arguments, as for every command. Each fact's record is a line "MARKER NAME", its command's exact stdout, then
# "MARKER STATUS" and a newline (on the same line as the output's end when the output has no final newline): the
# marker is random, so no output can be taken for it. No fork but each command's own, no pipes: on a small unit
# every process in a round trip counts.
GATHER_SCRIPT = ('set -f; m=$1; shift; IFS="' + COMMAND_SEP + '"; for spec in "$@"; do name=${spec%%"$IFS"*}; '
                 'cmd=${spec#*"$IFS"}; printf "%s %s\\n" "$m" "$name"; $cmd 2>/dev/null; '
                 'printf "%s %s\\n" "$m" "$?"; done')


# ---- small values written to files (sysfs, procfs): one process for all ------------------------------------
# Arguments: PATH VALUE pairs; each VALUE and a newline in one write(2), as `echo VALUE > PATH` does (a sysfs
# file takes one write).
WRITE_VALUES = 'while [ $# -gt 1 ]; do printf "%s\\n" "$2" > "$1" || exit 1; shift 2; done'


def write_values_command(pairs: Sequence[tuple[str, str]]) -> tuple[str, ...]:
    """The command writing each (path, value): give it to `run` or `write_run_read`."""
    return ("sh", "-c", WRITE_VALUES, "-", *[x for pair in pairs for x in pair])


# ---- several commands in one round trip, in order ----------------------------------------------------------
# Each argument is one command's argv joined by the unit separator (as in GATHER_SCRIPT); the first that fails
# ends the script with its stderr as the error. A bundle switches its members with it (a measurement's side
# switch was one round trip per member: about 20 s for the lab's bases under TCG).
RUN_COMMANDS = 'set -f; IFS="' + COMMAND_SEP + '"; for c in "$@"; do $c >/dev/null || exit 1; done'


def run_commands(t: Transport, commands: Sequence[Sequence[str]], *, timeout_s: float = 60.0) -> None:
    """Run each command (an argv, no shell; empty ones skipped) in order, in one round trip."""
    cmds = [list(c) for c in commands if c]
    for c in cmds:
        if any(not a or COMMAND_SEP in a for a in c):
            raise ValueError(f"command {c!r}: empty argument or unit separator")
    if cmds:
        t.run(["sh", "-c", RUN_COMMANDS, "-", *[COMMAND_SEP.join(c) for c in cmds]], timeout_s=timeout_s)


# ---- write, run, read back: one round trip ------------------------------------------------------------------
# $1 marker, $2 temp file, $3 mode, $4 path, $5 the command as one argument joined by the unit separator (\x1f;
# empty: none), then the paths to read. The file is replaced as write_file does (umask 077 only while the temp
# file exists); the command's stdout is dropped (its stderr is the error message); FILE_RECORDS follow.
_WRITE_RUN_READ = (
    "m=$1; tmp=$2; u=$(umask); umask 077; trap 'rm -f -- \"$tmp\"' EXIT; "
    'cat > "$tmp" && chmod -- "$3" "$tmp" && { sync -- "$tmp" 2>/dev/null || true; } && mv -f -- "$tmp" "$4" '
    '|| exit 1; umask "$u"; cmd=$5; shift 5; '
    'if [ -n "$cmd" ]; then set -f; IFS="' + COMMAND_SEP + '"; $cmd >/dev/null || exit 1; fi; '
    'echo "$m"; ' + FILE_RECORDS + '; echo "$m"'
)


def write_run_read(t: Transport, path: str, data: bytes, *, mode: int = 0o644, command: Sequence[str] = (),
                   read: Sequence[str] = (), timeout_s: float = 60.0) -> dict[str, bytes | None]:
    """Replace `path` atomically (as `write_file`), then run `command` (no shell), then read the files `read`
    back (as `read_files`): one round trip where three would be. A change applies and verifies with it."""
    if not path or path.endswith("/") or "\0" in path:
        raise ValueError(f"invalid file path {path!r}")
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"invalid file mode {mode!r}")
    if any(not a or COMMAND_SEP in a for a in command):
        raise ValueError(f"command {list(command)!r}: empty argument or unit separator")
    directory, base = posixpath.split(path)
    tmp = posixpath.join(directory, f".{base}.rt-tune-{secrets.token_hex(6)}.tmp")
    marker = "@@rt-tune-files-" + secrets.token_hex(8)
    out = t.run(["sh", "-c", _WRITE_RUN_READ, "-", marker, tmp, format(mode, "04o"), path,
                 COMMAND_SEP.join(command), *read], timeout_s=timeout_s, stdin=bytes(data)).stdout
    return _marked_records(t, out, marker, read)


def read_optional(t: Transport, path: str) -> bytes | None:
    """A file's exact bytes, or None when it does not exist; one round trip."""
    return read_files(t, [path])[path]
