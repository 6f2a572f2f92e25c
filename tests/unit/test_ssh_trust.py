"""Host keys and client keys against a REAL sshd (tests/sshd.py): the known_hosts file an endpoint names decides
alone; without one the user's and the system's files decide, as with OpenSSH; refusals name the deciding file
and the exact fix. A private key others may read is refused before connecting."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.core.errors import ConnectError, HostKeyError, InputError
from orchestrator.remote.ssh import DEFAULT_KNOWN_HOSTS, SSHTransport
from orchestrator.remote.transport import Endpoint
from tests.sshd import Sshd, free_port, keygen, public_key, sshd_server

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    with sshd_server(tmp_path_factory.mktemp("sshd-trust")) as server:
        yield server


@pytest.fixture(scope="module")
def impostor(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Another ed25519 host key: what a reinstalled unit or a man in the middle would offer."""
    path = tmp_path_factory.mktemp("impostor") / "key"
    keygen(path, "impostor")
    return public_key(path)


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A HOME of this test's own: ~/.ssh/known_hosts is the fake user file (never the real one)."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return home


def name(sshd: Sshd) -> str:
    return f"[127.0.0.1]:{sshd.port}"


def right(sshd: Sshd) -> str:
    return "{} {} {}\n".format(name(sshd), *public_key(sshd.host_key))


def wrong(sshd: Sshd, impostor: tuple[str, str]) -> str:
    return "{} {} {}\n".format(name(sshd), *impostor)


def connect(endpoint: Endpoint, **kw) -> str:
    with SSHTransport(endpoint, connect_deadline_s=10, **kw) as t:
        return t.run(["echo", "in"]).stdout


def refused(endpoint: Endpoint, **kw) -> str:
    start = time.monotonic()
    with pytest.raises(HostKeyError) as info:
        connect(endpoint, **kw)
    assert time.monotonic() - start < 5, "host key refusals are never retried"
    return str(info.value)


def backticked_commands(message: str) -> list[str]:
    return re.findall(r"`(ssh-keygen -R [^`]+)`", message)


def line_to_add(message: str) -> tuple[str, str]:
    """(file, line) from a refusal's "add this line to FILE:\\nLINE"."""
    match = re.search(r"add(?:ing)? this line to (?:the known_hosts file )?(.+):\n(.+)$", message)
    assert match, message
    return match.group(1), match.group(2)


# --------------------------------------------------------------------------------------------------------
# The endpoint's own file decides alone


def test_a_wrong_key_in_the_named_file_is_refused_even_when_the_users_file_has_the_right_one(
    sshd: Sshd, impostor: tuple[str, str], home: Path, tmp_path: Path
) -> None:
    (home / ".ssh" / "known_hosts").write_text(right(sshd))
    named = tmp_path / "inventory known_hosts"
    named.write_text("# pinned by ops\nother.example ssh-ed25519 " + impostor[1] + "\n" + wrong(sshd, impostor))
    message = refused(sshd.endpoint(known_hosts=str(named)))
    assert "has CHANGED" in message
    assert f"{named} line 3 (ssh-ed25519 SHA256:" in message, "the file that decided, and the line"
    assert str(home) not in message
    # The fix the message gives, run as given with the real tools, makes the connection work.
    commands = backticked_commands(message)
    assert commands == [f"ssh-keygen -R '{name(sshd)}' -f '{named}'"]
    subprocess.run(commands[0], shell=True, check=True, capture_output=True)
    assert "pinned by ops" in named.read_text() and impostor[1] in named.read_text(), "only that line removed"
    file, line = line_to_add(message)
    assert file == str(named) and line == right(sshd).strip()
    with named.open("a") as f:
        f.write(line + "\n")
    assert connect(sshd.endpoint(known_hosts=str(named))) == "in\n"


def test_the_right_key_in_the_named_file_works_even_when_the_users_file_has_a_wrong_one(
    sshd: Sshd, impostor: tuple[str, str], home: Path, tmp_path: Path
) -> None:
    (home / ".ssh" / "known_hosts").write_text(wrong(sshd, impostor))
    named = tmp_path / "known_hosts"
    named.write_text(right(sshd))
    assert connect(sshd.endpoint(known_hosts=str(named))) == "in\n"
    # ... and the user's file is what would have refused it.
    assert "has CHANGED" in refused(sshd.endpoint(known_hosts=None))


def test_a_named_file_without_the_host_or_missing_is_unknown_and_names_it(
    sshd: Sshd, home: Path, tmp_path: Path
) -> None:
    (home / ".ssh" / "known_hosts").write_text(right(sshd))
    for named, note in ((tmp_path / "empty", ""), (tmp_path / "absent", " (which does not exist)")):
        if note == "":
            named.write_text("")
        message = refused(sshd.endpoint(known_hosts=str(named)))
        assert "is UNKNOWN" in message and f"names, {named}{note}, decides alone" in message
        assert line_to_add(message) == (str(named), right(sshd).strip())


def test_the_jump_hosts_named_file_decides_for_the_jump_host(
    sshd: Sshd, impostor: tuple[str, str], home: Path, tmp_path: Path
) -> None:
    (home / ".ssh" / "known_hosts").write_text(right(sshd))
    jump_file = tmp_path / "jump_known_hosts"
    jump_file.write_text(wrong(sshd, impostor))
    target = sshd.endpoint(jump=sshd.endpoint(known_hosts=str(jump_file)))
    message = refused(target)
    hop = f"root@127.0.0.1:{sshd.port}"
    assert message.startswith(f"{hop}: through the jump host: {hop}: host key") and "has CHANGED" in message
    assert f"{jump_file} line 1" in message and str(sshd.known_hosts) not in message
    # the right key in the jump's file, a wrong one in the user's: through.
    jump_file.write_text(right(sshd))
    (home / ".ssh" / "known_hosts").write_text(wrong(sshd, impostor))
    assert connect(target) == "in\n"


# --------------------------------------------------------------------------------------------------------
# No file named: the user's and the system's files, as with OpenSSH


def test_without_a_named_file_the_users_file_decides(
    sshd: Sshd, impostor: tuple[str, str], home: Path
) -> None:
    assert DEFAULT_KNOWN_HOSTS[0] == "~/.ssh/known_hosts"
    user = home / ".ssh" / "known_hosts"
    endpoint = sshd.endpoint(known_hosts=None)
    user.write_text(right(sshd))
    assert connect(endpoint) == "in\n"
    user.write_text(wrong(sshd, impostor))
    message = refused(endpoint)
    assert f"{user} line 1" in message and "user's and the system's known_hosts files" in message
    assert backticked_commands(message) == [f"ssh-keygen -R '{name(sshd)}' -f {user}"]
    user.write_text("")
    message = refused(endpoint)
    assert "is UNKNOWN" in message and line_to_add(message) == (str(user), right(sshd).strip())


def test_the_system_file_counts_too_and_any_matching_key_is_enough(
    sshd: Sshd, impostor: tuple[str, str], home: Path, tmp_path: Path
) -> None:
    user, system = home / "user_known_hosts", tmp_path / "ssh_known_hosts"
    files = (str(user), str(system))
    endpoint = sshd.endpoint(known_hosts=None)
    system.write_text(right(sshd))
    assert connect(endpoint, default_known_hosts=files) == "in\n", "user file missing, system file decides"
    user.write_text(wrong(sshd, impostor))
    assert connect(endpoint, default_known_hosts=files) == "in\n", "OpenSSH accepts a key either file lists"
    system.write_text(wrong(sshd, impostor))
    message = refused(endpoint, default_known_hosts=files)
    assert f"{user} line 1" in message and f"{system} line 1" in message
    assert len(backticked_commands(message)) == 2


# --------------------------------------------------------------------------------------------------------
# The same verdict as OpenSSH's own client on the same file

CASES = {
    "right": lambda s, i, rsa: right(s),
    "wrong": lambda s, i, rsa: wrong(s, i),
    "wrong then right": lambda s, i, rsa: wrong(s, i) + right(s),
    "pattern": lambda s, i, rsa: "{} {} {}\n".format("other,[127.0.0.?]:*", *public_key(s.host_key)),
    "negated": lambda s, i, rsa: "{} {} {}\n".format(f"[127.0.0.*]:*,!{name(s)}", *public_key(s.host_key)),
    "revoked": lambda s, i, rsa: "@revoked " + right(s) + right(s),
    "other type only": lambda s, i, rsa: "{} {} {}\n".format(name(s), *rsa),
    "damaged line, then right": lambda s, i, rsa: f"{name(s)} ssh-ed25519 AAAA!!notbase64\n" + right(s),
    "cert-authority": lambda s, i, rsa: "@cert-authority " + right(s),
}


@pytest.mark.parametrize("hashed", [False, True], ids=["plain", "hashed"])
@pytest.mark.parametrize("case", list(CASES))
def test_same_verdict_as_openssh(
    sshd: Sshd, impostor: tuple[str, str], home: Path, tmp_path: Path, case: str, hashed: bool
) -> None:
    rsa = tmp_path / "rsa"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(rsa)], check=True)
    known = tmp_path / "known_hosts"
    known.write_text(CASES[case](sshd, impostor, public_key(rsa)))
    if hashed:
        subprocess.run(["ssh-keygen", "-H", "-f", str(known)], check=True, capture_output=True)
    openssh = subprocess.run(
        ["ssh", "-F", "none", "-p", str(sshd.port), "-i", str(sshd.client_key), "-o", "BatchMode=yes",
         "-o", f"UserKnownHostsFile={known}", "-o", "GlobalKnownHostsFile=/dev/null",
         "-o", "StrictHostKeyChecking=yes", "root@127.0.0.1", "echo in"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    endpoint = sshd.endpoint(known_hosts=str(known))
    if openssh.returncode == 0:
        assert connect(endpoint) == "in\n"
    else:
        assert "Host key verification failed" in openssh.stderr, openssh.stderr
        message = refused(endpoint)
        assert str(known) in message and name(sshd) in message
    accepted = {"right", "wrong then right", "damaged line, then right", "pattern"}
    assert (openssh.returncode == 0) == (case in accepted), "the cases mean what they say"


# --------------------------------------------------------------------------------------------------------
# Private keys others may read


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o601], ids=lambda m: f"{m:04o}")
def test_a_private_key_others_may_access_is_refused_before_connecting(sshd: Sshd, home: Path, mode: int) -> None:
    key = home / ".ssh" / "id unit"
    shutil.copyfile(sshd.client_key, key)
    key.chmod(mode)
    nobody_listens = free_port()
    for endpoint in (sshd.endpoint(key_file=str(key), port=nobody_listens),
                     sshd.endpoint(port=nobody_listens, jump=sshd.endpoint(key_file=str(key)))):
        start = time.monotonic()
        with pytest.raises(InputError) as info:  # not ConnectError: no connection was tried
            SSHTransport(endpoint, connect_deadline_s=10).run(["true"])
        assert time.monotonic() - start < 2
        assert f"{key} is accessible by others (mode {mode:04o})" in str(info.value)
        assert str(info.value).endswith(f"chmod 600 '{key}'")
    # The command from the message, run as given, fixes it.
    subprocess.run(str(info.value).rsplit(": ", 1)[1], shell=True, check=True)
    assert key.stat().st_mode & 0o777 == 0o600
    assert connect(sshd.endpoint(key_file=str(key))) == "in\n"


def test_a_private_key_only_its_owner_may_read_is_used(sshd: Sshd, home: Path) -> None:
    key = home / "key"
    shutil.copyfile(sshd.client_key, key)
    key.chmod(0o400)
    assert connect(sshd.endpoint(key_file=str(key))) == "in\n"
    with pytest.raises(ConnectError):  # a good key goes on to connect (and nothing listens here)
        SSHTransport(sshd.endpoint(key_file=str(key), port=free_port()), connect_deadline_s=1).run(["true"])


def test_a_missing_private_key_is_an_input_error_before_connecting(tmp_path: Path) -> None:
    from orchestrator.remote.transport import Endpoint

    endpoint = Endpoint(host="127.0.0.1", port=free_port(), user="root", key_file=str(tmp_path / "no such key"))
    start = time.monotonic()
    with pytest.raises(InputError, match="cannot read the private key .*no such key named by the inventory: "
                                         "No such file or directory"):
        SSHTransport(endpoint, connect_deadline_s=10).run(["true"])
    assert time.monotonic() - start < 2
