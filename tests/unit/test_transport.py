"""Transport tests against a REAL OpenSSH server started on 127.0.0.1 for this session (needs root and
/usr/sbin/sshd from Debian's openssh-server; tests/sshd.py), plus LocalTransport and quoting tests."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.core.errors import (
    AuthError,
    CommandFailed,
    CommandTimeout,
    ConnectError,
    HostKeyError,
    TransportError,
)
from orchestrator.facts.base import BOOT_ID, CPUS_ONLINE, HOSTNAME, Fact, gather_facts
from orchestrator.remote.local import LocalTransport
from orchestrator.remote.ssh import SSHTransport
from orchestrator.remote.transport import CommandResult, Endpoint, Transport, read_files, read_optional, remote_command
from tests.sshd import Sshd, free_port, keygen, sshd_server, wrapped_sshd_server

pytestmark = pytest.mark.unit

NASTY = "a  b 'single' \"double\" $(echo injected) `id`; echo semi; *\nsecond line \\ $HOME && | > x"


# --------------------------------------------------------------------------------------------------------
# Fixtures: a real sshd (tests/sshd.py)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    with sshd_server(tmp_path_factory.mktemp("sshd")) as server:
        yield server


# What runs on a unit instead of the command (sshd's ForceCommand; the command is in $SSH_ORIGINAL_COMMAND,
# interpreted by a shell as a login shell would): banners before and after it, as rc files, MOTD scripts and
# site wrappers print them, and wrappers that break the answer.
WRAPPERS = {
    # a banner, then the command itself (exec: its exit status is the session's)
    "banner": 'printf "Welcome to robot-7 (managed by ops)\\nLast login: never\\n"\n'
              'exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"\n',
    # a banner without a final newline before, a goodbye after
    "around": 'printf "motd: disk 93%% full"\n/bin/sh -c "$SSH_ORIGINAL_COMMAND"\nrc=$?\n'
              'echo "bye from the wrapper"\nexit $rc\n',
    # loses the command's exit status: the session always exits 0
    "swallow": 'echo "hello"\n/bin/sh -c "$SSH_ORIGINAL_COMMAND"\necho "done"\n',
    # rewrites everything the command prints
    "mangle": '/bin/sh -c "$SSH_ORIGINAL_COMMAND" | tr a-z A-Z\n',
}


@pytest.fixture(scope="session")
def wrapped_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """An sshd whose extra ports (by WRAPPERS name) run a wrapper around every command."""
    with wrapped_sshd_server(tmp_path_factory.mktemp("wrapped-sshd"), WRAPPERS) as server:
        yield server


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the real ~/.ssh (known_hosts, keys, agent) out of these tests."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


@pytest.fixture()
def ssh(sshd: Sshd) -> Iterator[SSHTransport]:
    with SSHTransport(sshd.endpoint(), connect_deadline_s=5) as transport:
        yield transport


def _pgrep(pattern: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", pattern], check=False, capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def _wait_gone(pattern: str, within_s: float = 3.0) -> list[str]:
    deadline = time.monotonic() + within_s
    while (left := _pgrep(pattern)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


# --------------------------------------------------------------------------------------------------------
# SSH


def test_ssh_quoting_round_trips_exactly(ssh: SSHTransport) -> None:
    result = ssh.run(["printf", "%s", NASTY])
    assert result.stdout == NASTY
    assert result.ok and result.exit_status == 0 and result.argv == ("printf", "%s", NASTY)
    echoed = ssh.run(["echo", NASTY])
    assert echoed.stdout == NASTY + "\n"
    assert isinstance(ssh, Transport)


def test_ssh_unknown_host_key_is_refused_with_fingerprint(sshd: Sshd, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    listing = subprocess.run(
        ["ssh-keygen", "-lf", str(sshd.host_key.with_suffix(".pub"))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    fingerprint = listing.split()[1]
    assert fingerprint.startswith("SHA256:")
    start = time.monotonic()
    with pytest.raises(HostKeyError) as info:
        SSHTransport(sshd.endpoint(known_hosts=str(empty)), connect_deadline_s=10).run(["true"])
    assert time.monotonic() - start < 5, "host key failures must not be retried"
    message = str(info.value)
    assert fingerprint in message
    assert f"127.0.0.1:{sshd.port}" in message
    assert "ssh-ed25519" in message
    assert "known_hosts" in message and str(empty) in message


def test_ssh_changed_host_key_is_refused_fast(sshd: Sshd, tmp_path: Path) -> None:
    other = tmp_path / "otherkey"
    keygen(other, "impostor")
    kind, blob = other.with_suffix(".pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {kind} {blob}\n")
    start = time.monotonic()
    with pytest.raises(HostKeyError) as info:
        SSHTransport(sshd.endpoint(known_hosts=str(known)), connect_deadline_s=10).run(["true"])
    assert time.monotonic() - start < 5, "host key failures must not be retried"
    assert "CHANGED" in str(info.value)


def test_ssh_wrong_client_key_is_auth_error_not_retried(sshd: Sshd, tmp_path: Path) -> None:
    wrong = tmp_path / "wrongkey"
    keygen(wrong, "stranger")
    start = time.monotonic()
    with pytest.raises(AuthError):
        SSHTransport(sshd.endpoint(key_file=str(wrong)), connect_deadline_s=10).run(["true"])
    assert time.monotonic() - start < 5, "authentication failures must not be retried"


def test_ssh_connection_refused_is_retried_until_the_deadline(sshd: Sshd) -> None:
    closed_port = free_port()
    start = time.monotonic()
    with pytest.raises(ConnectError) as info:
        SSHTransport(sshd.endpoint(port=closed_port), connect_deadline_s=2).run(["true"])
    elapsed = time.monotonic() - start
    assert 1.5 <= elapsed < 10, elapsed
    assert "attempt" in str(info.value)


def test_ssh_timeout_raises_and_kills_remote_command(ssh: SSHTransport) -> None:
    start = time.monotonic()
    with pytest.raises(CommandTimeout):
        ssh.run(["sleep", "31.4159"], timeout_s=2)
    assert time.monotonic() - start < 10
    assert _wait_gone("sleep 31.4159") == []
    # The connection stays usable afterwards.
    assert ssh.run(["echo", "still here"]).stdout == "still here\n"


def test_ssh_local_deadline_when_remote_does_not_answer(ssh: SSHTransport, monkeypatch) -> None:
    # The remote ignores TERM (so `timeout` only kills it 5 s later): the local deadline must fire first.
    monkeypatch.setattr(ssh, "deadline_grace_s", 1.0)
    start = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        ssh.run(["sh", "-c", "trap '' TERM; sleep 31.2718"], timeout_s=1)
    assert time.monotonic() - start < 4
    assert "local deadline" in str(info.value)
    assert _wait_gone("sleep 31.2718", within_s=8) == []


def test_ssh_nonzero_exit(ssh: SSHTransport) -> None:
    with pytest.raises(CommandFailed) as info:
        ssh.run(["sh", "-c", "echo out; echo oops >&2; exit 3"])
    assert info.value.exit_status == 3
    assert "oops" in str(info.value) and info.value.stderr == "oops\n" and info.value.stdout == "out\n"
    result = ssh.run(["sh", "-c", "exit 3"], check=False)
    assert result.exit_status == 3 and not result.ok
    assert ssh.run(["no-such-program-rt-tune"], check=False).exit_status == 127


def test_ssh_stdin_and_large_output(ssh: SSHTransport) -> None:
    payload = os.urandom(1024 * 1024).hex().encode()  # 2 MiB of text through stdin and back
    echoed = ssh.run(["cat"], stdin=payload)
    assert echoed.stdout.encode() == payload
    big = ssh.run(["head", "-c", str(2 * 1024 * 1024), "/dev/zero"])
    assert len(big.stdout) == 2 * 1024 * 1024
    both = ssh.run(["sh", "-c", "head -c 1000000 /dev/zero; head -c 1000000 /dev/zero >&2"])
    assert len(both.stdout) == len(both.stderr) == 1000000
    # Without stdin the remote sees EOF at once instead of hanging.
    assert ssh.run(["cat"], timeout_s=5).stdout == ""


def test_ssh_write_and_read_file_round_trip(ssh: SSHTransport, tmp_path: Path) -> None:
    target = tmp_path / "sub dir" / "it's a file"
    target.parent.mkdir()
    data = bytes(range(256)) * 64 + b"\0\n\r\xff"
    ssh.write_file(str(target), data, mode=0o600)
    assert target.read_bytes() == data
    assert target.stat().st_mode & 0o7777 == 0o600
    assert ssh.read_file(str(target)) == data
    ssh.write_file(str(target), b"replaced", mode=0o640)
    assert ssh.read_file(str(target)) == b"replaced"
    assert target.stat().st_mode & 0o7777 == 0o640
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name], "temp file left behind"
    with pytest.raises(CommandFailed):
        ssh.read_file(str(tmp_path / "missing"))


def test_ssh_jump_host(sshd: Sshd) -> None:
    endpoint = sshd.endpoint(jump=sshd.endpoint())
    with SSHTransport(endpoint, connect_deadline_s=5) as transport:
        assert transport.run(["echo", "through the jump"]).stdout == "through the jump\n"
        # Prove the path: the target sees a TCP peer that is the jump host's sshd, not this process.
        client_port = transport.run(["printenv", "SSH_CONNECTION"]).stdout.split()[1]
        owners = subprocess.run(
            ["ss", "-tnpH", "state", "established", f"sport = :{client_port}"],
            check=False,
            capture_output=True,
            text=True,
        ).stdout
        assert '"sshd"' in owners and f"pid={os.getpid()}," not in owners, owners
        assert transport.read_file("/proc/sys/kernel/hostname").strip()


def test_a_target_not_yet_up_is_retried_through_one_jump_connection(sshd: Sshd, monkeypatch, tmp_path) -> None:
    """A guest still booting behind its host: each attempt at the guest goes through the same host connection.
    (A new handshake with the host per attempt cost the emulated arm64 lab host 3.8 CPU-s each, taken from the
    booting guest.) Here the target's port answers only after a few refused attempts."""
    import orchestrator.remote.ssh as ssh_mod

    late = free_port()
    calls = {"chain": 0, "target": 0}
    real_chain, real_target = ssh_mod._open_jump_chain, ssh_mod._open_target

    def counting_chain(*args, **kwargs):
        calls["chain"] += 1
        return real_chain(*args, **kwargs)

    def counting_target(*args, **kwargs):
        calls["target"] += 1
        return real_target(*args, **kwargs)

    monkeypatch.setattr(ssh_mod, "_open_jump_chain", counting_chain)
    monkeypatch.setattr(ssh_mod, "_open_target", counting_target)
    stop = threading.Event()

    def forward_later() -> None:  # the "guest's sshd": sshd's port, reachable on `late` from the 3rd attempt
        while calls["target"] < 3 and not stop.is_set():
            time.sleep(0.05)
        with socket.create_server(("127.0.0.1", late)) as server:
            server.settimeout(0.2)
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                upstream = socket.create_connection(("127.0.0.1", sshd.port))
                for a, b in ((conn, upstream), (upstream, conn)):
                    threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    threading.Thread(target=forward_later, daemon=True).start()
    try:
        known = tmp_path / "known_hosts"  # the target is the same sshd, on its late port
        key = sshd.known_hosts.read_text().split("\n")[0].split(" ", 1)[1]
        known.write_text(f"[127.0.0.1]:{late} {key}\n")
        target = sshd.endpoint(port=late, known_hosts=str(known), jump=sshd.endpoint())
        with SSHTransport(target, connect_deadline_s=30) as transport:
            assert transport.run(["echo", "up at last"]).stdout == "up at last\n"
    finally:
        stop.set()
    assert calls["target"] >= 3 and calls["chain"] == 1, calls


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def test_closing_a_connection_whose_jump_link_is_gone_raises_nothing(sshd: Sshd) -> None:
    """The arm64 host reboots with its guest: the guest connection's transport thread closes its socket, a
    channel of the host connection that can no longer send. paramiko then raised EOFError in that thread, and
    Python printed its traceback on the user's terminal (seen in CI on `tune rollback`)."""
    endpoint = sshd.endpoint(jump=sshd.endpoint())
    with SSHTransport(endpoint, connect_deadline_s=5) as transport:
        assert transport.run(["echo", "up"]).stdout == "up\n"
        jump = transport._jump_clients[-1].get_transport()
        target = transport._client.get_transport()
        assert jump is not None and target is not None
        jump.sock.shutdown(socket.SHUT_WR)  # nothing more reaches the jump host
        target.sock.close()  # what the target's transport thread does when it ends
        target.close()
        assert not target.is_active()
        # the next command connects again, through a new jump connection
        assert transport.run(["echo", "again"]).stdout == "again\n"


def test_ssh_connection_lost_mid_command_then_reconnect(ssh: SSHTransport) -> None:
    failure: list[BaseException] = []

    def victim() -> None:
        try:
            ssh.run(["sleep", "31.8281"], timeout_s=20)
        except BaseException as exc:  # noqa: BLE001
            failure.append(exc)

    thread = threading.Thread(target=victim)
    thread.start()
    deadline = time.monotonic() + 5
    while not (lines := _pgrep("^sleep 31.8281")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lines, "remote sleep did not start"
    # Kill the sshd process serving this session: the connection dies under the running command.
    pid = int(lines[0].split()[0])
    while True:
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        if Path(f"/proc/{pid}/comm").read_text().strip() == "sshd":
            break
    os.kill(pid, 9)
    thread.join(10)
    assert not thread.is_alive()
    assert len(failure) == 1 and isinstance(failure[0], ConnectError), failure
    # The next command builds a fresh connection; reconnect() does so explicitly.
    assert ssh.run(["echo", "back"]).stdout == "back\n"
    ssh.reconnect()
    assert ssh.run(["echo", "again"]).stdout == "again\n"
    for line in _pgrep("^sleep 31.8281"):  # orphaned by the killed session: clean up by pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.split()[0]), 9)


# --------------------------------------------------------------------------------------------------------
# Output printed around commands (login banners, wrappers)


def test_wrappers_really_print_around_commands(wrapped_sshd: Sshd) -> None:
    """The situation the next tests build: what the wrappers do to a command's output, seen with OpenSSH's
    own client."""
    def ssh(name: str, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ssh", "-F", "none", "-p", str(wrapped_sshd.ports[name]), "-i", str(wrapped_sshd.client_key),
             "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={wrapped_sshd.known_hosts}",
             "-o", "StrictHostKeyChecking=yes", "root@127.0.0.1", command],
            capture_output=True, text=True, timeout=30, check=False)

    assert ssh("banner", "echo payload").stdout == "Welcome to robot-7 (managed by ops)\nLast login: never\npayload\n"
    around = ssh("around", "echo payload; exit 4")
    assert around.stdout == "motd: disk 93% full" + "payload\nbye from the wrapper\n" and around.returncode == 4
    swallowed = ssh("swallow", "exit 4")
    assert swallowed.returncode == 0 and swallowed.stdout == "hello\ndone\n"
    assert ssh("mangle", "echo payload").stdout == "PAYLOAD\n"


@pytest.mark.parametrize("wrapper", ["banner", "around"])
def test_reads_and_writes_through_a_login_banner(wrapped_sshd: Sshd, wrapper: str, tmp_path: Path) -> None:
    endpoint = wrapped_sshd.endpoint(port=wrapped_sshd.ports[wrapper])
    data = b"first line\n\0\xff" + os.urandom(3000) + b"Last login: never\n"
    (tmp_path / "data").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    paths = [str(tmp_path / "data"), str(tmp_path / "empty"), str(tmp_path / "missing")]
    with SSHTransport(endpoint, connect_deadline_s=5) as t:
        assert t.run(["printf", "%s", NASTY]).stdout == NASTY
        assert t.run(["cat"], stdin=b"through stdin").stdout == "through stdin"
        assert read_files(t, paths) == {paths[0]: data, paths[1]: b"", paths[2]: None}
        assert read_optional(t, paths[0]) == data
        assert t.read_file(paths[0]) == data
        target = tmp_path / "written"
        t.write_file(str(target), data, mode=0o600)
        assert target.read_bytes() == data and target.stat().st_mode & 0o7777 == 0o600
        with pytest.raises(CommandFailed) as info:  # the write's check still sees a failure
            t.write_file(str(tmp_path / "no such dir" / "f"), b"x")
        assert info.value.stdout == "" and "Welcome" not in str(info.value) and "motd" not in str(info.value)
        # each gathered fact sees exactly its command's output
        facts = gather_facts(t, [HOSTNAME, BOOT_ID, CPUS_ONLINE, Fact("bare", ("printf", "abc"), str)])
        assert facts["hostname"] == Path("/proc/sys/kernel/hostname").read_text().strip()
        assert facts["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        assert facts["bare"] == "abc" and facts["cpus_online"][0] == 0
        assert t.run(["sh", "-c", "exit 7"], check=False).exit_status == 7


def test_a_wrapper_that_loses_the_exit_status_cannot_hide_a_failure(wrapped_sshd: Sshd, tmp_path: Path) -> None:
    endpoint = wrapped_sshd.endpoint(port=wrapped_sshd.ports["swallow"])
    with SSHTransport(endpoint, connect_deadline_s=5) as t:
        result = t.run(["sh", "-c", "echo out; exit 3"], check=False)
        assert (result.exit_status, result.stdout) == (3, "out\n")
        with pytest.raises(CommandFailed) as info:
            t.write_file(str(tmp_path / "no such dir" / "f"), b"x")
        assert info.value.exit_status != 0
        t.write_file(str(tmp_path / "f"), b"written")
        assert (tmp_path / "f").read_bytes() == b"written"


def test_a_wrapper_that_rewrites_the_output_is_a_clear_error(wrapped_sshd: Sshd, tmp_path: Path) -> None:
    endpoint = wrapped_sshd.endpoint(port=wrapped_sshd.ports["mangle"])
    (tmp_path / "f").write_text("content")
    with SSHTransport(endpoint, connect_deadline_s=5) as t:
        for read in (lambda: read_files(t, [str(tmp_path / "f")]), lambda: t.read_file(str(tmp_path / "f")),
                     lambda: gather_facts(t, [HOSTNAME]), lambda: t.run(["echo", "hello"])):
            with pytest.raises(TransportError) as info:
                read()
            message = str(info.value)
            assert message.startswith(f"root@127.0.0.1:{endpoint.port}: the answer to `")
            assert "@@RT-TUNE-" in message, "what came back is quoted"
            assert "rewrites the output" in message


class _BannerTransport(LocalTransport):
    """Runs each command behind a real shell that prints around it: a transport that does not frame (read_files
    takes any Transport)."""

    def __init__(self, script: str) -> None:
        super().__init__(label="bannered")
        self._script = script

    def _exec(self, argv, *, timeout_s, stdin, sudo):
        return super()._exec(["sh", "-c", self._script, "sh", *argv], timeout_s=timeout_s, stdin=stdin, sudo=sudo)


def test_read_files_frames_its_own_records_on_any_transport(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"absent\npresent x\n")
    paths = [str(tmp_path / "f"), str(tmp_path / "none")]
    around = _BannerTransport('printf "Welcome\\nabsent\\n"; "$@"; rc=$?; echo absent; exit $rc')
    assert read_files(around, paths) == {paths[0]: b"absent\npresent x\n", paths[1]: None}
    mangled = _BannerTransport('"$@" | tr a-z A-Z')
    with pytest.raises(TransportError, match=r"^bannered: unexpected answer reading 2 file\(s\).*ABSENT"):
        read_files(mangled, paths)


# --------------------------------------------------------------------------------------------------------
# remote_command


def test_remote_command_quotes_every_argument() -> None:
    assert remote_command(["echo", "a b", "$(x)"], timeout_s=None, sudo=False) == "echo 'a b' '$(x)'"


def test_remote_command_timeout_and_sudo() -> None:
    assert remote_command(["true"], timeout_s=2.1, sudo=False) == "timeout -k 5 3 true"
    assert remote_command(["true"], timeout_s=None, sudo=True) == "sudo -n -- true"
    assert remote_command(["cat", "/a b"], timeout_s=60, sudo=True) == "sudo -n -- timeout -k 5 60 cat '/a b'"


@pytest.mark.parametrize("argv", [[], ["echo", "a\0b"], ["\0"]])
def test_remote_command_rejects_bad_argv(argv) -> None:
    with pytest.raises(ValueError):
        remote_command(argv, timeout_s=None, sudo=False)


@pytest.mark.parametrize("argv", ["echo hi", ["echo", 1]])
def test_remote_command_rejects_non_argv(argv) -> None:
    with pytest.raises(TypeError):
        remote_command(argv, timeout_s=None, sudo=False)


@pytest.mark.parametrize("timeout_s", [0, -1, float("inf"), float("nan")])
def test_remote_command_rejects_bad_timeout(timeout_s) -> None:
    with pytest.raises(ValueError):
        remote_command(["true"], timeout_s=timeout_s, sudo=False)


def test_endpoint_label() -> None:
    assert Endpoint("unit1", port=2222, user="ops").label == "ops@unit1:2222"
    assert Endpoint("unit1").label == "root@unit1:22"
    with pytest.raises(ValueError):
        Endpoint("unit1", port=0)


# --------------------------------------------------------------------------------------------------------
# LocalTransport


def test_local_quoting_stdin_and_check() -> None:
    with LocalTransport() as local:
        assert isinstance(local, Transport)
        result = local.run(["printf", "%s", NASTY])
        assert isinstance(result, CommandResult) and result.stdout == NASTY
        assert local.run(["cat"], stdin=b"piped\n").stdout == "piped\n"
        with pytest.raises(CommandFailed) as info:
            local.run(["sh", "-c", "echo bad >&2; exit 4"])
        assert info.value.exit_status == 4 and "bad" in str(info.value)
        assert local.run(["sh", "-c", "exit 4"], check=False).exit_status == 4
        assert local.run(["no-such-program-rt-tune"], check=False).exit_status == 127
        with pytest.raises(ValueError):
            local.run(["echo", "a\0b"])


def test_local_timeout_kills_the_process() -> None:
    start = time.monotonic()
    with pytest.raises(CommandTimeout):
        LocalTransport().run(["sh", "-c", "sleep 31.5926; true"], timeout_s=1)
    assert time.monotonic() - start < 5
    assert _wait_gone("sleep 31.5926") == []


def test_local_write_and_read_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    data = os.urandom(4096)
    local = LocalTransport()
    local.write_file(str(target), data, mode=0o751)
    assert local.read_file(str(target)) == data
    assert target.stat().st_mode & 0o7777 == 0o751


def test_verbose_logs_each_remote_command_with_its_status_and_time(sshd: Sshd, tmp_path: Path) -> None:
    """`tune -v`: where a slow or stuck unit spends its time, one timestamped line per command."""
    import re
    import sys

    inv = tmp_path / "inventory.yaml"
    inv.write_text(f"units:\n  u1:\n    host:\n      address: 127.0.0.1\n      port: {sshd.port}\n      user: root\n"
                   f"      key: {sshd.client_key}\n      known_hosts: {sshd.known_hosts}\n")

    def facts(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "orchestrator", *flags, "facts", "u1.host", "-i", str(inv),
                               "--json"], capture_output=True, text=True, timeout=120)
    loud = facts("-v")
    assert loud.returncode == 0, loud.stderr
    lines = re.findall(r"^\d\d:\d\d:\d\d\.\d{3} root@127\.0\.0\.1:\d+: (.+) -> exit (\d+) in [\d.]+s$",
                       loud.stderr, re.M)
    assert lines and all(status == "0" for _, status in lines), loud.stderr  # the facts, in one round trip
    assert re.search(r"^\d\d:\d\d:\d\d\.\d{3} root@127\.0\.0\.1:\d+: connected$", loud.stderr, re.M), loud.stderr
    quiet = facts()
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert json.loads(quiet.stdout) == json.loads(loud.stdout) | {"boot_id": json.loads(quiet.stdout)["boot_id"]}


def test_run_commands_runs_each_argv_in_order_in_one_shell_and_stops_at_the_first_failure(tmp_path: Path) -> None:
    """A real sh: arguments with spaces, quotes, globs and `$` travel as they are (set -f, no re-quoting)."""
    from orchestrator.core.errors import CommandFailed
    from orchestrator.remote.local import LocalTransport
    from orchestrator.remote.transport import run_commands, write_values_command

    a, b, c = (tmp_path / n for n in ("a b", "*", "c"))
    t = LocalTransport()
    run_commands(t, [write_values_command([(str(a), "x $HOME 'q' *")]), (), ["cp", "--", str(a), str(b)]])
    assert a.read_text() == "x $HOME 'q' *\n" and b.read_text() == a.read_text()
    with pytest.raises(CommandFailed, match="No such file"):
        run_commands(t, [["cat", "--", str(tmp_path / "none")], ["cp", "--", str(a), str(c)]])
    assert not c.exists()  # the command after the failing one never ran
    with pytest.raises(ValueError, match="unit separator"):
        run_commands(t, [["echo", "a\x1fb"]])
