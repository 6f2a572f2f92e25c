"""The SSH transport (paramiko): host keys verified against the inventory's known_hosts, private keys read
strictly, jump hosts, deadlines that kill the remote command, bounded reconnects."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import logging
import math
import os
import re
import secrets
import shlex
import socket
import stat
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

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
    CommandTimeout,
    ConnectError,
    HostKeyError,
    InputError,
    TransportError,
)
from orchestrator.remote.transport import (
    DEADLINE_GRACE_S,
    MAX_OUTPUT_BYTES,
    TIMEOUT_STATUSES,
    Endpoint,
    _CommandTransport,
    _describe,
    _Raw,
    _unframe,
    printable,
    remote_command,
)

log = logging.getLogger(__name__)
# paramiko's transport thread logs every refused/half-open connection (routine while a unit reboots) with a
# traceback; without a handler Python's last-resort handler prints them to stderr. Our retries report instead.
logging.getLogger("paramiko.transport").addHandler(logging.NullHandler())

#: Seconds `timeout -k` waits after TERM before it sends KILL.


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
        clients = [*self._jump_clients, *([self._client] if self._client else [])]
        self._client = None
        self._jump_clients = []
        _close_chain(clients)  # the target first, then its jump hosts

    def paramiko_client(self) -> paramiko.SSHClient:
        """The connected client (connecting now if needed), for a library that talks paramiko itself
        (testinfra's paramiko backend, orchestrator/checks/backend.py): verified as every connection is."""
        with self._lock:
            self._transport()
            assert self._client is not None
            return self._client

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
        chain: list[paramiko.SSHClient] = []  # the jump hosts, kept open across the target's attempts

        def attempt() -> tuple[paramiko.SSHClient, list[paramiko.SSHClient]]:
            nonlocal attempts, chain
            attempts += 1
            if self.endpoint.jump is not None and not _chain_alive(chain):
                _close_chain(chain)
                chain = []
                chain = _open_jump_chain(self.endpoint, deadline=deadline, defaults=self.default_known_hosts)
            client = _open_target(self.endpoint, chain, deadline=deadline, passphrase=self._passphrase,
                                  defaults=self.default_known_hosts)
            return client, chain

        try:
            return retrying(attempt)
        except ConnectError as exc:
            _close_chain(chain)
            raise ConnectError(
                f"{exc} (gave up after {attempts} attempt(s) in {time.monotonic() - start:.1f}s)"
            ) from exc
        except BaseException:
            _close_chain(chain)
            raise

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
    chain = _open_jump_chain(endpoint, deadline=deadline, defaults=defaults) if endpoint.jump is not None else []
    try:
        return _open_target(endpoint, chain, deadline=deadline, passphrase=passphrase, defaults=defaults), chain
    except BaseException:
        _close_chain(chain)
        raise


def _open_jump_chain(endpoint: Endpoint, *, deadline: float, defaults: Sequence[str]) -> list[paramiko.SSHClient]:
    """The open clients of `endpoint`'s jump hosts, outermost first. Kept across the attempts at the target: a
    target still booting (a guest behind its host) is retried through the same jump connection, not a new
    handshake with the jump host each time (under emulation that costs the host seconds of CPU, 2026-12-07:
    3.8 CPU-s of the arm64 lab's host per connection, taken from the nested guest booting on it)."""
    assert endpoint.jump is not None
    # The jump host's key is checked against its own known_hosts; its passphrase is not shared.
    try:
        jump_client, outer = _open_client(endpoint.jump, deadline=deadline, defaults=defaults)
    except (ConnectError, HostKeyError, AuthError) as exc:  # say which unit the jump host was for
        raise type(exc)(f"{endpoint.label}: through the jump host: {exc}") from exc
    return [*outer, jump_client]


def _chain_alive(chain: list[paramiko.SSHClient]) -> bool:
    transports = [c.get_transport() for c in chain]
    return bool(chain) and all(t is not None and t.is_active() for t in transports)


def _close_chain(chain: list[paramiko.SSHClient]) -> None:
    """Close a chain of clients, outermost first in the list, innermost first in time."""
    for client in reversed(chain):
        try:
            client.close()
        except Exception as exc:  # noqa: BLE001 - closing a dead client must not fail the caller
            log.debug("error while closing %s: %s", client, exc)


def _open_target(
    endpoint: Endpoint,
    chain: list[paramiko.SSHClient],
    *,
    deadline: float,
    passphrase: str | None,
    defaults: Sequence[str],
) -> paramiko.SSHClient:
    """Connect to `endpoint` itself: directly, or through a channel of the last client of its open jump chain."""
    sock: _JumpChannel | None = None
    timeout = max(1.0, min(endpoint.connect_timeout, deadline - time.monotonic()))
    if endpoint.jump is not None:
        assert chain, "a jump host's connection opens before its target's"
        jump_transport = chain[-1].get_transport()
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
    return _connect_client(endpoint, sock=sock, timeout=timeout, passphrase=passphrase, defaults=defaults)


def _fabric_connection(endpoint: Endpoint, timeout: float, connect_kwargs: dict):
    """A fabric Connection for one hop, settled already: the endpoint is resolved (the inventory and the user's
    SSH config, orchestrator/remote/sshconfig.py), so fabric reads no config file of its own (no ~/.fabric.yaml,
    no ssh_config a second time), and the jump chain is rt-tune's (gateway=False)."""
    import fabric

    config = fabric.Config(ssh_config=paramiko.SSHConfig(), lazy=True)
    return fabric.Connection(endpoint.host, user=endpoint.user, port=endpoint.port, config=config, gateway=False,
                             connect_timeout=math.ceil(timeout), connect_kwargs=connect_kwargs)


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
    pkey = _load_private_key(endpoint, passphrase)
    with_key = pkey is not None
    client = paramiko.SSHClient()  # replaced by the fabric Connection's own below, once the socket is open
    log.debug("%s: connecting%s", label, f" via {endpoint.jump.label}" if endpoint.jump else "")
    try:
        conn: _JumpChannel | socket.socket
        if sock is None:
            # Our own socket, with Nagle off: every command is a small request awaiting a small answer, and
            # with Nagle each one waits out the peer's delayed ACK (~40 ms on Linux) before it is sent.
            conn = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            conn = sock  # the jump chain is opened by _open_client, which names the hop that failed
        connection = _fabric_connection(endpoint, timeout, {
            "pkey": pkey,
            "allow_agent": not with_key,  # no key named: the agent's keys (SSH_AUTH_SOCK), then the default files
            "look_for_keys": not with_key,
            "banner_timeout": timeout,
            "auth_timeout": timeout,
            "channel_timeout": timeout,
            "sock": conn,
            "transport_factory": trust.transport,
        })
        client = connection.client
        # No keys loaded into the client: the policy decides every key from the files that decide (see _Trust).
        client.set_missing_host_key_policy(_KnownHostsPolicy(trust))
        connection.open()
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
