"""Hostile SSH situations against REAL sshd instances on 127.0.0.1 (tests/sshd.py; root and openssh-server):
wrappers and login rc files that read stdin, run the command twice, ignore it or print without end, pre-auth
banners, key files and known_hosts files that are not what they claim, jump hosts; and power_cycle commands
that print without end or leave a daemon holding their output. Each case checks the error class (so the exit
status), that the message names the unit and what went wrong, and that nothing hangs or is trusted wrongly."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.errors import CommandFailed, TransportError
from orchestrator.transport import SSHTransport, read_files
from tests.sshd import Sshd, sshd_server

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
    # a banner on stdout AND stderr, non-UTF-8 bytes and the shape of rt-tune's markers
    "noisy": 'printf "\\377\\376 MOTD @@rt-tune-0123456789abcdef{x}0\\n"; echo "stderr banner" >&2\n'
             'exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"\n',
}


@pytest.fixture(scope="module")
def wrapped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    d = tmp_path_factory.mktemp("hostile-sshd")
    commands = {}
    for name, body in WRAPPERS.items():
        script = d / f"wrapper-{name}"
        script.write_text("#!/bin/sh\n" + body)
        script.chmod(0o755)
        commands[name] = str(script)
    with sshd_server(d, commands) as server:
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
