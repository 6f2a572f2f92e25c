"""The user's OpenSSH client configuration, so that a fleet's SSH setup carries over as it is.

Loaded into a `fabric.Config` (a paramiko `SSHConfig` inside, looked up as `fabric.Connection` does: `Host` and
`Match` blocks, first value wins) from the files OpenSSH reads: `~/.ssh/config`, then `/etc/ssh/ssh_config` (or
one file given instead, as `ssh -F`). What an endpoint takes from it, for what the inventory leaves out:
`HostName`, `User`, `Port`, `IdentityFile` (the first that exists), `ConnectTimeout`, `UserKnownHostsFile` (the
first file) and `ProxyJump` (several hops; the first hop's own `ProxyJump` too, as with `ssh -J`). Two things are
done here because paramiko does not: `Include` is expanded (relative paths from `~/.ssh` or `/etc/ssh`, globs, at
most 16 levels, a file including itself refused), and an error names the file and line. `ProxyCommand` is
refused: rt-tune opens jump hosts itself, so that it checks every hop's host key.
"""

from __future__ import annotations

import glob
import io
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from orchestrator.core.errors import InputError
from orchestrator.core.textfile import read_text_file

#: The files OpenSSH (and fabric) read, the user's first: the first value found for a setting wins.
USER_CONFIG = "~/.ssh/config"
SYSTEM_CONFIG = "/etc/ssh/ssh_config"
#: OpenSSH's limit on nested Include (READCONF_MAX_DEPTH) and on ProxyJump hops (to stop a loop).
MAX_INCLUDE_DEPTH = 16
MAX_HOPS = 16
MAX_CONFIG_BYTES = 2**20

_INCLUDE = re.compile(r"^\s*include(?:\s*=\s*|\s+)(.*?)\s*$", re.I)
_HOP = re.compile(r"^(?:ssh://)?(?:(?P<user>[^@\s]+)@)?(?P<host>\[[^\]]+\]|[^:@\s\[\]]+)(?::(?P<port>\d+))?$")


@dataclass(frozen=True)
class _Line:
    text: str
    path: str
    number: int


@dataclass
class SSHClientConfig:
    """The parsed configuration (a `fabric.Config`) and, per line of it, the file and line it came from."""

    files: tuple[str, ...]  # the top-level files read (those that exist)
    fabric_config: Any  # fabric.Config
    lines: list[_Line] = field(default_factory=list)

    @property
    def where(self) -> str:
        return " and ".join(self.files) or "no SSH config file"

    def origin(self, key: str, value: str) -> str:
        """Where `key value` was set ("FILE line N"): the first such line, as the first value wins."""
        pattern = re.compile(rf"^\s*{re.escape(key)}(?:\s*=\s*|\s+)\"?{re.escape(value)}\"?\s*$", re.I)
        line = next((x for x in self.lines if pattern.match(x.text)), None)
        return f"{line.path} line {line.number}" if line else self.where

    def lookup(self, name: str) -> dict[str, Any]:
        """What the configuration says about `name` (paramiko's lookup, as fabric.Connection does it)."""
        try:
            return dict(self.fabric_config.base_ssh_config.lookup(name))
        except Exception as exc:  # noqa: BLE001 - a third-party resolver on the user's file (Match exec, tokens)
            raise InputError(f"{self.where}: cannot resolve {name!r}: {type(exc).__name__}: "
                             f"{str(exc)[:200]}") from None


def load(path: Path | str | None = None) -> SSHClientConfig:
    """The user's and the system's files, or only `path` when given (as `ssh -F path`)."""
    import fabric
    import paramiko

    tops = [os.path.expanduser(str(path))] if path is not None else \
        [os.path.expanduser(USER_CONFIG), SYSTEM_CONFIG]
    lines: list[_Line] = []
    read: list[str] = []
    for top in tops:
        if not os.path.lexists(top):
            continue  # a FIFO, a directory or a dangling link is not skipped: read_text_file says what it is
        read.append(top)
        lines += _expand(top, depth=0, stack=(), base=_base_dir(top))
    parsed = paramiko.SSHConfig()
    try:
        parsed.parse(io.StringIO("".join(line.text + "\n" for line in lines)))
    except Exception as exc:  # noqa: BLE001 - paramiko's parser: ConfigParseError, or anything on odd input
        bad = _failing_line(lines)
        at = f"{bad.path} line {bad.number}" if bad else " and ".join(read)
        raise InputError(f"{at}: cannot read this SSH config (rt-tune takes what the inventory leaves out of an "
                         f"endpoint from it): {type(exc).__name__}: {str(exc)[:200]}") from None
    return SSHClientConfig(tuple(read), fabric.Config(ssh_config=parsed, lazy=True), lines)


def _base_dir(top: str) -> str:
    """Where a relative Include is looked for: ~/.ssh for a user's file, /etc/ssh for the system's."""
    return "/etc/ssh" if os.path.abspath(top).startswith("/etc/ssh/") else os.path.expanduser("~/.ssh")


def _expand(path: str, *, depth: int, stack: tuple[str, ...], base: str) -> list[_Line]:
    """The lines of `path` with every Include replaced by the lines of the files it names (in place: an
    Include inside a Host block includes into that block, as OpenSSH does for the usual layouts)."""
    real = os.path.realpath(path)
    where = f"{stack[-1]}" if stack else path
    if real in stack:
        raise InputError(f"{where}: the SSH config includes itself: {' -> '.join((*stack, real))}")
    out: list[_Line] = []
    for number, text in enumerate(read_text_file(Path(path), MAX_CONFIG_BYTES, "an SSH config").splitlines(), 1):
        m = _INCLUDE.match(text)
        if not m:
            out.append(_Line(text, path, number))
            continue
        if depth >= MAX_INCLUDE_DEPTH:
            raise InputError(f"{path} line {number}: Include nested more than {MAX_INCLUDE_DEPTH} deep")
        for pattern in m.group(1).split():
            pattern = os.path.expanduser(pattern.strip('"'))
            if not os.path.isabs(pattern):
                pattern = os.path.join(base, pattern)
            for included in sorted(glob.glob(pattern)):  # OpenSSH: no match is not an error
                if os.path.isfile(included):
                    out += _expand(included, depth=depth + 1, stack=(*stack, real), base=base)
    return out


def _failing_line(lines: list[_Line]) -> _Line | None:
    """The first line at which paramiko's parser fails (parsed prefix by prefix: only on an error)."""
    import paramiko

    text = ""
    for line in lines:
        text += line.text + "\n"
        try:
            paramiko.SSHConfig().parse(io.StringIO(text))
        except Exception:  # noqa: BLE001
            return line
    return None


# ---- what an endpoint takes from it -------------------------------------------------------------------------
@dataclass(frozen=True)
class Hop:
    """One name to connect to, as the configuration resolves it; `jump` is the hop before it, if any."""

    alias: str
    host: str
    port: int
    user: str | None
    key_file: str | None
    known_hosts: str | None
    connect_timeout: float | None
    jump: Hop | None


def resolve(config: SSHClientConfig, alias: str, *, port: int | None = None, user: str | None = None,
            jump: bool = True, _path: tuple[str, ...] = ()) -> Hop:
    """`alias` (with a user or port given explicitly, which win) resolved through the configuration, with its
    ProxyJump chain unless `jump` is False (the caller names the jump host itself)."""
    settings = config.lookup(alias)

    def at(key: str) -> str:
        return f"{config.origin(key, str(settings[key]))}: for {alias}"

    name = f"{user + '@' if user else ''}{alias}{':' + str(port) if port else ''}"
    if name in _path:
        raise InputError(f"{config.where}: ProxyJump loops: {' -> '.join((*_path, name))}")
    if len(_path) >= MAX_HOPS:
        raise InputError(f"{config.where}: ProxyJump chain longer than {MAX_HOPS} hops: {' -> '.join(_path)}")
    path = (*_path, name)
    cfg_port = settings.get("port")
    if port is None and cfg_port is not None:
        if not (cfg_port.isascii() and cfg_port.isdigit()):
            raise InputError(f"{config.origin('port', cfg_port)}: Port {cfg_port!r} for {alias}: expected a port "
                             "number 1..65535")
        port = int(cfg_port)
    proxy = settings.get("proxyjump")
    if jump and proxy is None and settings.get("proxycommand"):
        raise InputError(f"{config.where}: for {alias}: ProxyCommand {settings['proxycommand']!r} is not "
                         "supported: rt-tune opens jump hosts itself, to check each one's host key; use ProxyJump")
    timeout = settings.get("connecttimeout")
    if timeout is not None:
        try:
            timeout = float(timeout)
            if not 0 < timeout < 86400:
                raise ValueError
        except ValueError:
            raise InputError(f"{at('connecttimeout')}: ConnectTimeout {settings['connecttimeout']!r}: expected "
                             "seconds, a positive number") from None
    previous = None
    if jump and proxy and proxy.lower() != "none":
        hops = [h.strip() for h in proxy.split(",")]
        for i, hop in enumerate(hops):
            m = _HOP.match(hop)
            if not m:
                raise InputError(f"{at('proxyjump')}: ProxyJump hop {hop!r}: expected [user@]host[:port]")
            if i == 0 and m["host"] == alias and len(hops) == 1:
                break  # `Host *` with `ProxyJump bastion` reaches bastion itself directly (as fabric does)
            hop_port = int(m["port"]) if m["port"] else None
            if hop_port is not None and not 0 < hop_port < 65536:
                raise InputError(f"{at('proxyjump')}: ProxyJump hop {hop!r}: port {hop_port} is not 1..65535")
            # as `ssh -J a,b`: b is reached through a, whatever b's own config says; a through its own ProxyJump
            hop_resolved = resolve(config, m["host"].strip("[]"), port=hop_port, user=m["user"],
                                   jump=i == 0, _path=path)
            previous = hop_resolved if i == 0 else replace(hop_resolved, jump=previous)
    known = settings.get("userknownhostsfile")
    return Hop(alias=alias, host=settings["hostname"], port=port or 22,
               user=user or settings.get("user"), key_file=_first_identity(settings.get("identityfile") or []),
               known_hosts=known.split()[0] if known else None, connect_timeout=timeout, jump=previous)


def _first_identity(files: list[str]) -> str | None:
    """The first IdentityFile that exists; None when none does (then, as OpenSSH, the agent's keys and the
    default ones are tried)."""
    return next((f for f in files if os.path.exists(os.path.expanduser(f))), None)
