"""Hostile SSH situations against REAL sshd instances on 127.0.0.1 (tests/sshd.py; root and openssh-server):
wrappers and login rc files that read stdin, run the command twice, ignore it or print without end, pre-auth
banners, key files and known_hosts files that are not what they claim, jump hosts; and power_cycle commands
that print without end or leave a daemon holding their output. Each case checks the error class (so the exit
status), that the message names the unit and what went wrong, and that nothing hangs or is trusted wrongly."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from orchestrator.boot.trial import run_power_cycle
from orchestrator.core.errors import (
    AuthError,
    CommandFailed,
    CommandTimeout,
    HostKeyError,
    InputError,
    TransportError,
)
from orchestrator.remote import ssh, transport
from orchestrator.remote.ssh import SSHTransport
from orchestrator.remote.transport import Endpoint, read_files
from tests.sshd import Sshd, free_port, keygen, public_key, sshd_server, wrapped_sshd_server

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the real ~/.ssh (known_hosts, keys, agent) out of these tests."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


# What runs instead of the requested command (sshd's ForceCommand; the command is in $SSH_ORIGINAL_COMMAND).
WRAPPERS = {
    # reads all of stdin first (a wrapper that logs its input, or `cat` by mistake)
    "eats_stdin": 'cat > /dev/null\nexec /bin/sh -c "$SSH_ORIGINAL_COMMAND"\n',
    # reads one line of stdin first (a wrapper asking "continue? [y/n]")
    "reads_a_line": 'read -r answer\nexec /bin/sh -c "$SSH_ORIGINAL_COMMAND"\n',
    # runs the command twice (a retrying wrapper)
    "twice": '/bin/sh -c "$SSH_ORIGINAL_COMMAND"\n/bin/sh -c "$SSH_ORIGINAL_COMMAND"\n',
    # exits 0 without running anything (a restricted account)
    "ignores": 'echo "This account is restricted."\nexit 0\n',
    # one stream for stdout and stderr (a wrapper that logs everything)
    "merges": 'exec /bin/sh -c "$SSH_ORIGINAL_COMMAND" 2>&1\n',
    # a banner on stdout AND stderr, non-UTF-8 bytes and the shape of rt-tune's markers
    "noisy": 'printf "\\377\\376 MOTD @@rt-tune-0123456789abcdef{x}0\\n"; echo "stderr banner" >&2\n'
             'exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"\n',
}


@pytest.fixture(scope="module")
def wrapped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    with wrapped_sshd_server(tmp_path_factory.mktemp("hostile-sshd"), WRAPPERS) as server:
        yield server


def via(server: Sshd, wrapper: str) -> SSHTransport:
    return SSHTransport(server.endpoint(port=server.ports[wrapper]), connect_deadline_s=5)


# --------------------------------------------------------------------------------------------------------
# Wrappers


@pytest.mark.parametrize("wrapper", ["eats_stdin", "reads_a_line"])
def test_a_wrapper_that_reads_stdin_cannot_make_write_file_write_less(wrapped: Sshd, wrapper: str,
                                                                      tmp_path: Path) -> None:
    """Before: write_file wrote an empty file (or one without its first line) and reported success."""
    target = tmp_path / "grub.cfg"
    target.write_bytes(b"old\n")
    with via(wrapped, wrapper) as t:
        with pytest.raises(TransportError) as info:
            t.write_file(str(target), b"line1\nline2\n")
        assert target.read_bytes() == b"old\n", "nothing written"
        message = str(info.value)
        assert message.startswith(f"root@127.0.0.1:{wrapped.ports[wrapper]}: `sh -c")
        assert "was not run" in message and "read its standard input" in message
        # commands without stdin are unaffected
        assert t.run(["echo", "ok"]).stdout == "ok\n"
        with pytest.raises(TransportError, match="standard input"):
            t.run(["cat"], stdin=b"")


def test_a_wrapper_that_runs_the_command_twice_is_refused(wrapped: Sshd) -> None:
    """Before: `echo payload` returned 'payload\\n<marker>}0\\n<marker>{payload\\n' as its output."""
    with via(wrapped, "twice") as t:
        with pytest.raises(TransportError) as info:
            t.run(["echo", "payload"])
        assert "was run 2 times" in str(info.value)
        assert str(info.value).startswith(f"root@127.0.0.1:{wrapped.ports['twice']}: `echo payload`")


def test_a_wrapper_that_ignores_the_command_says_it_was_not_run(wrapped: Sshd) -> None:
    with via(wrapped, "ignores") as t:
        for call in (lambda: t.run(["sh", "-c", "exit 3"]), lambda: read_files(t, ["/etc/hostname"])):
            with pytest.raises(TransportError) as info:
                call()
            message = str(info.value)
            assert "was not run" in message and "ForceCommand that ignores it" in message
            assert "This account is restricted." in message, "what came back is quoted"


def test_banners_on_both_streams_with_binary_and_marker_shaped_text_are_cut_off(wrapped: Sshd,
                                                                                 tmp_path: Path) -> None:
    with via(wrapped, "noisy") as t:
        assert t.run(["echo", "payload"]).stdout == "payload\n"
        assert t.run(["sh", "-c", "exit 3"], check=False).exit_status == 3
        t.write_file(str(tmp_path / "f"), b"\x00\xff data")
        assert t.read_file(str(tmp_path / "f")) == b"\x00\xff data"


def test_a_wrapper_that_merges_stderr_into_stdout_cannot_put_warnings_in_the_output(wrapped: Sshd,
                                                                                     tmp_path: Path) -> None:
    """Before: `echo warning >&2; echo 42` answered 'warning\\n42\\n' as its stdout."""
    with via(wrapped, "merges") as t:
        result = t.run(["sh", "-c", "echo 'warning: deprecated' >&2; echo 42; echo 'more' >&2; exit 3"],
                       check=False)
        assert (result.stdout, result.exit_status) == ("42\n", 3)
        t.write_file(str(tmp_path / "f"), b"\x00\xff data\n")
        assert t.read_file(str(tmp_path / "f")) == b"\x00\xff data\n"
        assert read_files(t, [str(tmp_path / "f"), str(tmp_path / "none")]) == {
            str(tmp_path / "f"): b"\x00\xff data\n", str(tmp_path / "none"): None}
        with pytest.raises(CommandTimeout):
            t.run(["sleep", "30.5772"], timeout_s=1)


# --------------------------------------------------------------------------------------------------------
# Output


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    with sshd_server(tmp_path_factory.mktemp("plain-sshd")) as server:
        yield server


def test_a_command_printing_without_end_is_stopped_at_the_output_limit(sshd: Sshd) -> None:
    """Before: `yes` for 8 s took 3 GB of this machine's memory (about 20 GB within the default 60 s)."""
    with SSHTransport(sshd.endpoint(), connect_deadline_s=5) as t:
        t.max_output_bytes = 4 * 2**20
        start = time.monotonic()
        with pytest.raises(TransportError) as info:
            t.run(["yes"], timeout_s=60)
        assert time.monotonic() - start < 10
        assert "`yes` printed more than 4 MiB" in str(info.value)
        assert t.run(["echo", "still usable"]).stdout == "still usable\n"


def test_what_a_unit_prints_cannot_drive_the_terminal(sshd: Sshd) -> None:
    """Escape sequences and bidi overrides from a failing command are quoted escaped, never raw."""
    with SSHTransport(sshd.endpoint(), connect_deadline_s=5) as t:
        with pytest.raises(CommandFailed) as info:
            t.run(["sh", "-c", "printf 'boom\\033[2J\\033]0;pwned\\007\\342\\200\\256 end' >&2; exit 1"])
        message = str(info.value)
        assert "\x1b" not in message and "\x07" not in message and "\u202e" not in message
        assert "boom\\x1b[2J\\x1b]0;pwned\\x07\\u202e end" in message
        assert info.value.stderr.startswith("boom\x1b[2J"), "the raw bytes stay available to callers"


def test_binary_and_empty_stdin_still_reach_the_command(sshd: Sshd) -> None:
    payload = os.urandom(70000) + b"\n\n\x00"
    with SSHTransport(sshd.endpoint(), connect_deadline_s=5) as t:
        assert t.run(["sh", "-c", "od -An -tx1 | wc -l"], stdin=payload).stdout.strip() == str(
            (len(payload) + 15) // 16)
        assert t.run(["wc", "-c"], stdin=b"").stdout.strip() == "0"


# --------------------------------------------------------------------------------------------------------
# Private key files: every problem an InputError (exit 2) naming the file, before connecting, never a hang


def nobody_listens(server: Sshd, **changes) -> Endpoint:
    """The server's endpoint on a port nothing listens on: a key problem is reported before connecting."""
    return server.endpoint(port=free_port(), **changes)


def refused_before_connecting(endpoint: Endpoint, **kw) -> str:
    start = time.monotonic()
    with pytest.raises(InputError) as info:
        SSHTransport(endpoint, connect_deadline_s=10, **kw).run(["true"])
    assert time.monotonic() - start < 3, "refused before any connection attempt"
    assert str(info.value).startswith(endpoint.label + ": ")
    return str(info.value)


def private(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def test_a_key_file_that_is_a_fifo_a_device_or_a_directory_is_refused_without_blocking(
    sshd: Sshd, tmp_path: Path
) -> None:
    """Before: a FIFO named as the key blocked forever in open()."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    (tmp_path / "dir").mkdir(mode=0o700)
    kinds = ((fifo, "a FIFO"), ("/dev/zero", "a character device"), (tmp_path / "dir", "a directory"))
    for path, kind in kinds:
        message = refused_before_connecting(nobody_listens(sshd, key_file=str(path)))
        assert f"the private key {path} named by the inventory is {kind}, not a regular file" in message


@pytest.mark.parametrize("case", ["public key", "empty", "binary garbage", "huge", "truncated"])
def test_a_key_file_that_is_no_private_key_is_named(sshd: Sshd, tmp_path: Path, case: str) -> None:
    """Before: garbage bytes were a UnicodeDecodeError traceback, a public key 'authentication failed'."""
    content = {
        "public key": sshd.client_key.with_suffix(".pub").read_bytes(),
        "empty": b"",
        "binary garbage": b"\xbe\xef" + os.urandom(3000),
        "huge": b"-----BEGIN OPENSSH PRIVATE KEY-----\n" + b"A" * (2 * 2**20),
        "truncated": sshd.client_key.read_bytes()[:200] + b"\n-----END OPENSSH PRIVATE KEY-----\n",
    }[case]
    key = private(tmp_path / "id_test.pub" if case == "public key" else tmp_path / "id_test", content)
    message = refused_before_connecting(nobody_listens(sshd, key_file=str(key)))
    expected = {
        "public key": f"is a public key, not a private one: name the private key ({tmp_path / 'id_test'})",
        "empty": "is empty",
        "binary garbage": "is not a private key file",
        "huge": "bytes, more than the 1048576 it may be",
        "truncated": "cannot be read as a private key",
    }[case]
    assert expected in message and str(key) in message


def test_an_encrypted_key_without_its_passphrase_is_refused_and_with_it_used(sshd: Sshd,
                                                                             tmp_path: Path) -> None:
    """Before: 'authentication failed: Private key file is encrypted' (exit 5) after connecting."""
    for fmt in ("RFC4716", "PEM"):  # OpenSSH's own format and the legacy PEM one
        key = tmp_path / f"enc-{fmt}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-m", fmt, "-N", "sesame-42", "-f", str(key)],
                       check=True, capture_output=True)
        message = refused_before_connecting(nobody_listens(sshd, key_file=str(key)))
        assert "is encrypted with a passphrase, and rt-tune never prompts for one" in message
        assert "ssh-agent" in message
        bad = refused_before_connecting(nobody_listens(sshd, key_file=str(key)), passphrase="wrong")
        assert "cannot be read as a private key (is the passphrase right?)" in bad
        authorize(sshd, key)
        endpoint = sshd.endpoint(key_file=str(key))
        with SSHTransport(endpoint, connect_deadline_s=5, passphrase="sesame-42") as t:
            assert t.run(["echo", "in"]).stdout == "in\n"


def test_a_key_of_a_type_paramiko_cannot_use_is_named(sshd: Sshd, tmp_path: Path) -> None:
    """Before: a DSA key was a 'ValueError: p*q must equal modulus' traceback (exit 70)."""
    key = tmp_path / "id_dsa"
    made = subprocess.run(["ssh-keygen", "-q", "-t", "dsa", "-N", "", "-f", str(key)], capture_output=True,
                          check=False)
    if made.returncode != 0:
        pytest.skip(f"this ssh-keygen makes no DSA keys: {made.stderr!r}")
    message = refused_before_connecting(nobody_listens(sshd, key_file=str(key)))
    assert "is a DSA key, which rt-tune" in message and "use an ed25519, ECDSA or RSA key" in message


def test_a_symlink_to_a_key_others_may_read_is_refused(sshd: Sshd, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.write_bytes(sshd.client_key.read_bytes())
    shared.chmod(0o644)
    link = tmp_path / "id_link"
    link.symlink_to(shared)
    message = refused_before_connecting(nobody_listens(sshd, key_file=str(link)))
    assert "is accessible by others (mode 0644)" in message and f"chmod 600 {link}" in message


def authorize(server: Sshd, key: Path) -> None:
    authorized = server.dir / "authorized_keys"
    line = key.with_suffix(".pub").read_text() if key.with_suffix(".pub").exists() else \
        Path(str(key) + ".pub").read_text()
    if line not in authorized.read_text():
        with open(authorized, "a") as f:
            f.write(line)


@pytest.mark.parametrize("kind, fmt", [("rsa", "RFC4716"), ("rsa", "PEM"), ("ecdsa", "RFC4716"),
                                       ("ed25519", "RFC4716")])
def test_authorized_keys_of_every_usable_type_and_format_log_in(sshd: Sshd, tmp_path: Path, kind: str,
                                                                fmt: str) -> None:
    key = tmp_path / f"id_{kind}_{fmt}"
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-m", fmt, "-N", "", "-f", str(key)], check=True,
                   capture_output=True)
    with pytest.raises(AuthError):  # not yet authorized: the unit refuses it (exit 5), not an input error
        SSHTransport(sshd.endpoint(key_file=str(key)), connect_deadline_s=5).run(["true"])
    authorize(sshd, key)
    with SSHTransport(sshd.endpoint(key_file=f"~/{key.relative_to(tmp_path)}"), connect_deadline_s=5) as t:
        assert t.run(["echo", "in"]).stdout == "in\n"


# --------------------------------------------------------------------------------------------------------
# known_hosts files


def host_line(server: Sshd, name: str | None = None, key: Path | None = None) -> str:
    kind, blob = public_key(key or server.host_key)
    return f"{name or f'[127.0.0.1]:{server.port}'} {kind} {blob}\n"


def test_a_known_hosts_that_is_a_fifo_a_device_or_a_directory_is_refused_without_blocking(
    sshd: Sshd, tmp_path: Path
) -> None:
    """Before: a FIFO or /dev/zero as known_hosts hung (reading without end); a directory was exit 5."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    (tmp_path / "dir").mkdir()
    kinds = ((fifo, "a FIFO"), ("/dev/zero", "a character device"), (tmp_path / "dir", "a directory"))
    for path, kind in kinds:
        message = refused_before_connecting(sshd.endpoint(known_hosts=str(path)))
        assert f"the known_hosts file {path} named by the inventory is {kind}, not a regular file" in message


def test_dev_null_as_known_hosts_never_turns_checking_off(sshd: Sshd, tmp_path: Path) -> None:
    """`UserKnownHostsFile /dev/null` (often in ~/.ssh/config, which the inventory reads) disables checking
    in OpenSSH with StrictHostKeyChecking=no; here it is refused, saying so (it said: add this line to
    /dev/null)."""
    link = tmp_path / "kh"
    link.symlink_to(os.devnull)
    for path in (os.devnull, str(link)):
        message = refused_before_connecting(sshd.endpoint(known_hosts=path))
        assert "the OpenSSH idiom for turning host-key checking off; rt-tune always checks" in message


def test_a_known_hosts_over_the_limit_is_refused_unread(sshd: Sshd, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ssh, "MAX_KNOWN_HOSTS_BYTES", 4096)
    big = tmp_path / "known_hosts"
    big.write_text("# padding\n" * 500 + host_line(sshd))
    message = refused_before_connecting(sshd.endpoint(known_hosts=str(big)))
    assert f"the known_hosts file {big} named by the inventory is {big.stat().st_size} bytes" in message
    monkeypatch.setattr(ssh, "MAX_KNOWN_HOSTS_BYTES", 64 * 2**20)
    with SSHTransport(sshd.endpoint(known_hosts=str(big)), connect_deadline_s=5) as t:
        assert t.run(["echo", "in"]).stdout == "in\n"


def test_binary_junk_hashed_entries_and_tilde_paths(sshd: Sshd, tmp_path: Path) -> None:
    known = tmp_path / "kh"
    known.write_text(host_line(sshd))
    subprocess.run(["ssh-keygen", "-H", "-f", str(known)], check=True, capture_output=True)
    assert f"[127.0.0.1]:{sshd.port}" not in known.read_text(), "the name is hashed"
    known.write_bytes(os.urandom(20000).replace(b"\n", b" ") + b"\n\0\xff\n" + known.read_bytes())
    with SSHTransport(sshd.endpoint(known_hosts="~/kh"), connect_deadline_s=5) as t:
        assert t.run(["echo", "in"]).stdout == "in\n"


PORTLESS_CASES = {
    # OpenSSH accepts a key listed for the host without a port when no line lists a key for [host]:port
    "portless right": lambda s, imp, rsa: host_line(s, "127.0.0.1"),
    "portless wrong": lambda s, imp, rsa: host_line(s, "127.0.0.1", imp),
    "bracketed wrong, portless right": lambda s, imp, rsa: host_line(s, key=imp) + host_line(s, "127.0.0.1"),
    "bracketed other type, portless right": lambda s, imp, rsa: host_line(s, key=rsa)
    + host_line(s, "127.0.0.1"),
    "portless right but revoked": lambda s, imp, rsa: host_line(s, "127.0.0.1") + "@revoked "
    + host_line(s, "127.0.0.1"),
    "cert-authority": lambda s, imp, rsa: "@cert-authority " + host_line(s),
}


@pytest.mark.parametrize("hashed", [False, True], ids=["plain", "hashed"])
@pytest.mark.parametrize("case", list(PORTLESS_CASES))
def test_lines_without_the_port_and_cert_authority_lines_as_openssh_reads_them(
    sshd: Sshd, tmp_path: Path, case: str, hashed: bool
) -> None:
    """Before: a line for the host without the port was never used (OpenSSH accepts it when it holds the
    offered key and no line lists a key for [host]:port), and refusals did not say why lines did not count."""
    impostor, rsa = tmp_path / "impostor", tmp_path / "rsa"
    keygen(impostor, "impostor")
    keygen(rsa, "rsa", "rsa")
    known = tmp_path / "kh"
    known.write_text(PORTLESS_CASES[case](sshd, impostor, rsa))
    if hashed:
        subprocess.run(["ssh-keygen", "-H", "-f", str(known)], check=True, capture_output=True)
    openssh = subprocess.run(
        ["ssh", "-F", "none", "-p", str(sshd.port), "-i", str(sshd.client_key), "-o", "BatchMode=yes",
         "-o", f"UserKnownHostsFile={known}", "-o", "GlobalKnownHostsFile=/dev/null",
         "-o", "StrictHostKeyChecking=yes", "root@127.0.0.1", "echo in"],
        capture_output=True, text=True, timeout=30, check=False)
    accepted = case == "portless right"
    assert (openssh.returncode == 0) == accepted, openssh.stderr
    endpoint = sshd.endpoint(known_hosts=str(known))
    if accepted:
        with SSHTransport(endpoint, connect_deadline_s=5) as t:
            assert t.run(["echo", "in"]).stdout == "in\n"
        return
    with pytest.raises(HostKeyError) as info:
        SSHTransport(endpoint, connect_deadline_s=5).run(["true"])
    message = str(info.value)
    assert str(known) in message
    expected = {
        "portless wrong": f"Lines for 127.0.0.1 without a port count for port {sshd.port} only when",
        "bracketed other type, portless right": "Only keys of other types are known",
        "bracketed wrong, portless right": "has CHANGED",
        "portless right but revoked": "is REVOKED",
        "cert-authority": f"{known} line 1 is a @cert-authority line",
    }[case]
    assert expected in message


# --------------------------------------------------------------------------------------------------------
# A server with several host keys and a pre-auth banner; jump hosts


@pytest.fixture(scope="module")
def bannered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    d = tmp_path_factory.mktemp("bannered-sshd")
    banner = d / "banner"
    banner.write_bytes(b"*** AUTHORIZED USE ONLY ***\n@@rt-tune-0123456789abcdef{\n\xff\xfe\x1b[31m\n"
                       + b"x" * 20000 + b"\n")
    with sshd_server(d, config=[f"Banner {banner}"], extra_host_keys=("ecdsa", "rsa")) as server:
        yield server


@pytest.mark.parametrize("kind", ["ecdsa", "rsa"])
def test_the_host_key_type_the_file_knows_is_the_one_checked(bannered: Sshd, tmp_path: Path,
                                                             kind: str) -> None:
    known = tmp_path / "kh"
    known.write_text(host_line(bannered, key=bannered.dir / f"hostkey-{kind}"))
    with SSHTransport(bannered.endpoint(known_hosts=str(known)), connect_deadline_s=5) as t:
        assert t.run(["echo", "in"]).stdout == "in\n"
        assert t._transport().get_remote_server_key().asbytes() == paramiko.PKey.from_path(
            bannered.dir / f"hostkey-{kind}").asbytes()


def test_a_wrong_preferred_key_is_not_outvoted_by_a_right_one_of_another_type(bannered: Sshd,
                                                                               tmp_path: Path) -> None:
    impostor = tmp_path / "impostor"
    keygen(impostor, "impostor")
    known = tmp_path / "kh"
    known.write_text(host_line(bannered, key=impostor)
                     + host_line(bannered, key=bannered.dir / "hostkey-rsa"))
    with pytest.raises(HostKeyError, match="has CHANGED"):
        SSHTransport(bannered.endpoint(known_hosts=str(known)), connect_deadline_s=5).run(["true"])


def test_a_pre_auth_banner_is_harmless(bannered: Sshd) -> None:
    with SSHTransport(bannered.endpoint(), connect_deadline_s=5) as t:
        assert t.run(["echo", "in"]).stdout == "in\n"


def test_each_hop_is_checked_against_its_own_file_and_a_refusal_names_the_target(sshd: Sshd, bannered: Sshd,
                                                                                  tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("")
    target = bannered.endpoint(jump=sshd.endpoint(known_hosts=str(empty)))
    with pytest.raises(HostKeyError) as info:
        SSHTransport(target, connect_deadline_s=5).run(["true"])
    message = str(info.value)
    assert message.startswith(f"{target.label}: through the jump host: {sshd.endpoint().label}: host key")
    assert "is UNKNOWN" in message and str(empty) in message
    # the target's file does not vouch for the jump host, nor the jump host's for the target
    with pytest.raises(HostKeyError, match=f"^{re.escape(target.label)}: through the jump host: .*UNKNOWN"):
        SSHTransport(bannered.endpoint(jump=sshd.endpoint(known_hosts=str(bannered.known_hosts))),
                     connect_deadline_s=5).run(["true"])
    with pytest.raises(HostKeyError, match=f"^{re.escape(target.label)}: host key .* UNKNOWN"):
        SSHTransport(bannered.endpoint(known_hosts=str(sshd.known_hosts), jump=sshd.endpoint()),
                     connect_deadline_s=5).run(["true"])
    with SSHTransport(bannered.endpoint(jump=sshd.endpoint()), connect_deadline_s=5) as t:
        assert t.run(["echo", "in"]).stdout == "in\n"
    shared = tmp_path / "shared-key"
    shared.write_bytes(sshd.client_key.read_bytes())
    shared.chmod(0o640)
    message = refused_before_connecting(bannered.endpoint(jump=sshd.endpoint(key_file=str(shared))))
    assert "through the jump host" in message and "chmod 600" in message


# --------------------------------------------------------------------------------------------------------
# power_cycle commands (run on this machine by a trial boot)


def test_a_power_cycle_printing_without_end_is_killed_at_its_timeout_in_bounded_memory() -> None:
    """Before: `yes` for a 4 s timeout took 8 GB of memory and 25 s."""
    start = time.monotonic()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert run_power_cycle(["yes"], 2) == "timed out after 2 s (killed)"
    assert time.monotonic() - start < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024, "KiB: output not kept"
    script = "head -c 30000000 /dev/zero | tr '\\0' x; echo relay stuck >&2; exit 4"
    big = run_power_cycle(["sh", "-c", script], 30)
    assert big == "exit status 4: relay stuck"


def test_a_power_cycle_leaving_a_daemon_that_holds_its_output_succeeds_when_it_exits(tmp_path: Path) -> None:
    """Before: a command that exited 0 but started a daemon keeping stdout open was 'timed out' (and waited
    out the whole timeout), so a unit that was power-cycled counted as a failed power cycle."""
    pidfile = tmp_path / "daemon.pid"
    argv = ["sh", "-c", f"setsid sleep 31.4142 & echo $! > {pidfile}; echo 'outlet 4 cycled'; exit 0"]
    start = time.monotonic()
    try:
        assert run_power_cycle(argv, 20) is None
        assert time.monotonic() - start < 5
    finally:
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)


@pytest.mark.parametrize("script, reason", [
    ("read -r password || { echo 'no password given' >&2; exit 1; }", "exit status 1: no password given"),
    ("exec 3</dev/tty", "cannot open /dev/tty"),
])
def test_a_power_cycle_that_wants_input_fails_at_once(script: str, reason: str) -> None:
    start = time.monotonic()
    failure = run_power_cycle(["sh", "-c", script], 20)
    assert failure is not None and reason in failure
    assert time.monotonic() - start < 3


def test_a_power_cycle_reason_cannot_drive_the_terminal() -> None:
    failure = run_power_cycle(["sh", "-c", "printf 'relay\\033[2J\\033]0;x\\007 down' >&2; exit 2"], 5)
    assert failure == "exit status 2: relay\\x1b[2J\\x1b]0;x\\x07 down"


# --------------------------------------------------------------------------------------------------------
# become: true with a sudo that refuses


# sudo's stderr, recorded here over SSH (sudo 1.9.13p3, Debian 12; the login shell dash) for user rtredteam:
# no sudoers rule or `Defaults lecture=always` + a rule with a password; `Defaults requiretty`; sudo absent.
RECORDED_SUDO = {
    "password": (1, b"sudo: a password is required\n"),
    "tty": (1, b"sudo: sorry, you must have a tty to run sudo\n"),
    "missing": (127, b"sh: 1: sudo: not found\n"),
}


@pytest.mark.parametrize("case, expected", [
    ("password", "sudo asks rtredteam for a password, and rt-tune runs `sudo -n`"),
    ("tty", "add `Defaults:rtredteam !requiretty`"),
    ("missing", "the endpoint has become: true, but sudo is not installed on the unit"),
])
def test_sudo_refusals_are_named(case: str, expected: str) -> None:
    status, stderr = RECORDED_SUDO[case]
    message = transport._sudo_refusal("rtredteam@robot7:22", "cat -- /etc/shadow", status,
                                      b"a stderr banner\n" + stderr)
    assert message is not None and expected in message
    assert message.startswith("rtredteam@robot7:22: `cat -- /etc/shadow` was not run: ")


def test_a_commands_own_failure_is_not_a_sudo_refusal() -> None:
    assert transport._sudo_refusal("u@h:22", "cat /x", 1, b"cat: /x: No such file or directory\n") is None
    assert transport._sudo_refusal("u@h:22", "x", 127, b"sh: 1: systemd-detect-virt: not found\n") is None


@pytest.fixture(scope="module")
def open_sshd() -> Iterator[Sshd]:
    """An sshd whose authorized_keys a non-root user can read (sshd reads it with the user's rights; pytest's
    temporary directories are private to root)."""
    d = Path(tempfile.mkdtemp(prefix="rt-tune-sshd-"))
    try:
        d.chmod(0o755)
        with sshd_server(d) as server:
            yield server
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture()
def sudo_user(tmp_path: Path) -> Iterator[str]:
    """A throwaway non-root login user (removed afterwards) whose sudo rule the test writes."""
    if shutil.which("sudo") is None or shutil.which("useradd") is None:
        pytest.skip("needs sudo and useradd on this machine (apt-get install sudo)")
    name = "rttune" + secrets.token_hex(3)
    subprocess.run(["useradd", "-M", "-d", str(tmp_path), "-s", "/bin/sh", "-p", "*", name], check=True)
    try:
        yield name
    finally:
        Path(f"/etc/sudoers.d/{name}").unlink(missing_ok=True)
        deadline = time.monotonic() + 5  # its sshd session may take a moment to end
        while subprocess.run(["userdel", name], check=False, capture_output=True).returncode == 8:  # in use
            if time.monotonic() > deadline:
                subprocess.run(["userdel", "-f", name], check=False, capture_output=True)
                break
            time.sleep(0.1)


@pytest.mark.parametrize("rule, expected", [
    (None, "sudo asks {user} for a password"),
    ("{user} ALL=(ALL) ALL", "sudo asks {user} for a password"),
    ("Defaults:{user} requiretty\n{user} ALL=(ALL) NOPASSWD: ALL", "add `Defaults:{user} !requiretty`"),
])
def test_a_sudo_that_refuses_is_an_error_even_without_check(open_sshd: Sshd, sudo_user: str,
                                                            rule: str | None, expected: str) -> None:
    """Before: `sudo: a password is required` was a CommandFailed, and with check=False the command looked as
    if it had run and failed (status 1)."""
    if rule is not None:
        Path(f"/etc/sudoers.d/{sudo_user}").write_text(rule.format(user=sudo_user) + "\n")
    with SSHTransport(open_sshd.endpoint(user=sudo_user, become=True), connect_deadline_s=5) as t:
        assert t.run(["id", "-un"], sudo=False).stdout == f"{sudo_user}\n"
        for check in (True, False):
            with pytest.raises(AuthError) as info:
                t.run(["id", "-u"], check=check)
            assert f"{sudo_user}@127.0.0.1:{open_sshd.port}: `id -u` was not run: " in str(info.value)
            assert expected.format(user=sudo_user) in str(info.value)
    Path(f"/etc/sudoers.d/{sudo_user}").write_text(f"{sudo_user} ALL=(ALL) NOPASSWD: ALL\n")
    with SSHTransport(open_sshd.endpoint(user=sudo_user, become=True), connect_deadline_s=5) as t:
        assert t.run(["id", "-u"]).stdout == "0\n"
        # a command's own failure under sudo is its answer
        assert t.run(["cat", "/nonexistent"], check=False).exit_status == 1


def test_as_root_needs_no_sudo_for_a_root_login(open_sshd: Sshd, sudo_user: str) -> None:
    """`sudo=True` means "as root": a root login runs the command as it is (sudo costs a PAM session per
    command), a non-root login through sudo (which sets SUDO_USER)."""
    probe = ["sh", "-c", 'echo "$(id -u) ${SUDO_USER-none}"']
    with SSHTransport(open_sshd.endpoint(), connect_deadline_s=5) as t:
        assert t.run(probe, sudo=True).stdout == "0 none\n"
    Path(f"/etc/sudoers.d/{sudo_user}").write_text(f"{sudo_user} ALL=(ALL) NOPASSWD: ALL\n")
    with SSHTransport(open_sshd.endpoint(user=sudo_user), connect_deadline_s=5) as t:
        assert t.run(probe, sudo=True).stdout == f"0 {sudo_user}\n"
        assert t.run(["id", "-u"]).stdout != "0\n"  # become: false, so no sudo unless asked


# --------------------------------------------------------------------------------------------------------
# Through the real CLI


def test_the_cli_reports_hostile_units_with_their_exit_status_and_no_traceback(wrapped: Sshd,
                                                                                tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    (tmp_path / "dir").mkdir()

    def unit(name: str, port: int, key: Path | str = wrapped.client_key,
             known: Path | str = wrapped.known_hosts) -> str:
        return (f"  {name}:\n    host:\n      address: 127.0.0.1\n      port: {port}\n      key: {key}\n"
                f"      known_hosts: {known}\n")

    inventory = tmp_path / "inventory.yaml"
    inventory.write_text("units:\n" + unit("noisy", wrapped.ports["noisy"])
                         + unit("ignores", wrapped.ports["ignores"]) + unit("twice", wrapped.ports["twice"])
                         + unit("fifokey", wrapped.port, key=fifo)
                         + unit("khdir", wrapped.port, known=tmp_path / "dir"))
    env = dict(os.environ, RT_TUNE_STATE=str(tmp_path / "state"), HOME=str(tmp_path))
    cases = {
        "noisy": (0, ""),
        "ignores": (5, "was not run: the unit answered (exit status 0) without the markers"),
        "twice": (5, "was run 2 times in one session"),
        "fifokey": (2, f"the private key {fifo} named by the inventory is a FIFO, not a regular file"),
        "khdir": (2, f"the known_hosts file {tmp_path / 'dir'} named by the inventory is a directory"),
    }
    for name, (status, expected) in cases.items():
        argv = [sys.executable, "-m", "orchestrator", "facts", f"{name}.host", "-i", str(inventory)]
        result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)
        assert result.returncode == status, (name, result.stderr)
        assert "Traceback" not in result.stderr + result.stdout
        if status:
            shown = " ".join(result.stderr.split())  # rich wraps long lines
            assert "error: root@127.0.0.1:" in shown and expected in shown, result.stderr
        else:
            assert "boot_id" in result.stdout
