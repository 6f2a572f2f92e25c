"""The user's SSH setup carries over (issue #19): ~/.ssh/config (Host aliases, Include, Match, ProxyJump chains)
resolved into endpoints, and the real thing: an inventory that names only a Host alias whose ProxyJump reaches a
target through a bastion, with two real sshd processes, where the target's name resolves on the bastion only
(the bastion's sshd runs in a mount namespace with its own /etc/hosts). Keys from a real ssh-agent."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.config.inventory import EndpointSpec, _endpoint, load_inventory
from orchestrator.core.errors import InputError
from orchestrator.remote import sshconfig
from orchestrator.remote.ssh import SSHTransport
from tests.sshd import Sshd, sshd_server

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
TARGET_NAME = "rt-tune-target.internal"  # resolves on the bastion only


def endpoint(tmp_path: Path, text: str, address: str = "robot", **spec) -> object:
    path = tmp_path / "config"
    path.write_text(text)
    return _endpoint(EndpointSpec(address=address, **spec), None, ssh_config=path)


# ---- resolution (no network) ----------------------------------------------------------------------------------
def test_a_host_alias_gives_what_the_inventory_leaves_out_and_the_inventory_wins(tmp_path):
    key = tmp_path / "robot-key"
    key.write_text("x")
    text = (f"Host robot\n  HostName 10.1.2.3\n  Port 2222\n  User tuner\n  IdentityFile {tmp_path}/missing\n"
            f"  IdentityFile {key}\n  ConnectTimeout 7\n  UserKnownHostsFile {tmp_path}/kh {tmp_path}/kh2\n")
    e = endpoint(tmp_path, text)
    assert (e.host, e.port, e.user, e.key_file, e.connect_timeout, e.known_hosts, e.jump) == \
        ("10.1.2.3", 2222, "tuner", str(key), 7.0, f"{tmp_path}/kh", None)  # the first IdentityFile that exists
    e = endpoint(tmp_path, text, port=22, user="root", key="/k", known_hosts="/inv-kh")
    assert (e.host, e.port, e.user, e.key_file, e.known_hosts) == ("10.1.2.3", 22, "root", "/k", "/inv-kh")
    e = endpoint(tmp_path, text, address="other")  # not in the config: the inventory's defaults
    assert (e.host, e.port, e.user, e.key_file, e.jump) == ("other", 22, "root", None, None)


def test_include_match_and_first_value_wins_as_in_openssh(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh" / "conf.d").mkdir(parents=True)
    (tmp_path / ".ssh" / "conf.d" / "10-robots.conf").write_text("Host robot\n  HostName 10.0.0.9\n  Port 2201\n")
    (tmp_path / ".ssh" / "conf.d" / "20-late.conf").write_text("Host robot\n  HostName 10.9.9.9\n  User late\n")
    (tmp_path / ".ssh" / "config").write_text("Include conf.d/*.conf\nMatch host robot\n  User matched\n")
    e = _endpoint(EndpointSpec(address="robot"), None)  # ~/.ssh/config (and the system's), as OpenSSH
    assert (e.host, e.port, e.user) == ("10.0.0.9", 2201, "late")  # the first HostName; User only from 20-late
    (tmp_path / ".ssh" / "config").write_text("Match host robot\n  User matched\nInclude conf.d/*.conf\n")
    assert _endpoint(EndpointSpec(address="robot"), None).user == "matched"


def test_proxyjump_chains_become_jump_endpoints_with_each_hops_own_settings(tmp_path):
    text = ("Host robot\n  HostName 10.0.0.5\n  ProxyJump ops@bastion:2022,inner\n"
            "Host bastion\n  HostName bastion.example.org\n  User nobody\n  Port 99\n  ProxyJump edge\n"
            "Host inner\n  HostName 192.168.7.1\n  ProxyJump ignored-as-with-ssh-J\n"
            "Host edge\n  HostName 203.0.113.4\n")
    e = endpoint(tmp_path, text)
    chain = []
    hop = e
    while hop is not None:
        chain.append((hop.user, hop.host, hop.port))
        hop = hop.jump
    # robot <- inner <- bastion (its user and port from the hop string) <- edge (bastion's own ProxyJump)
    assert chain == [("root", "10.0.0.5", 22), ("root", "192.168.7.1", 22),
                     ("ops", "bastion.example.org", 2022), ("root", "203.0.113.4", 22)]
    # `via_host` (the unit's host as the jump) replaces the config's ProxyJump
    path = tmp_path / "config"
    host = _endpoint(EndpointSpec(address="10.9.9.9"), None, ssh_config=path)
    guest = _endpoint(EndpointSpec(address="robot", via_host=True), host, ssh_config=path)
    assert guest.jump == host and host.jump is None
    assert endpoint(tmp_path, text.replace("ProxyJump ops@bastion:2022,inner", "ProxyJump none")).jump is None
    # the usual wildcard: every host through the bastion, the bastion itself directly
    e = endpoint(tmp_path, "Host bastion\n  HostName 198.51.100.1\nHost *\n  ProxyJump bastion\n")
    assert (e.host, e.jump.host, e.jump.jump) == ("robot", "198.51.100.1", None)


@pytest.mark.parametrize("text, message", [
    ("Host robot\n  ProxyJump a\nHost a\n  ProxyJump b\nHost b\n  ProxyJump a\n",
     "ProxyJump loops: robot -> a -> b -> a"),
    ("Host robot\n  ProxyJump bad@@hop\n", "line 2: for robot: ProxyJump hop 'bad@@hop': expected [user@]host[:port]"),
    ("Host robot\n  ProxyJump hop:70000\n", "port 70000 is not 1..65535"),
    ("Host robot\n  ProxyCommand nc -X connect %h %p\n", "ProxyCommand 'nc -X connect robot 22' is not supported"),
    ("Host robot\n  ConnectTimeout soon\n", "line 2: for robot: ConnectTimeout 'soon': expected seconds"),
    ("# robots\nHost robot\n  Port 22x\n", "line 3: Port '22x' for robot: expected a port number 1..65535"),
    ("Host robot\n  User a b\n", "invalid SSH user 'a b'"),
])
def test_bad_ssh_config_settings_are_input_errors_naming_what_and_where(tmp_path, text, message):
    with pytest.raises(InputError) as exc:
        endpoint(tmp_path, text)
    assert message in str(exc.value) and str(tmp_path / "config") in str(exc.value), str(exc.value)


def test_an_unparsable_line_or_an_include_loop_names_the_file_and_line(tmp_path):
    inc = tmp_path / "inc.conf"
    inc.write_text("Host robot\n  HostName 10.0.0.1\n=broken\n")
    with pytest.raises(InputError) as exc:
        endpoint(tmp_path, f"# robots\nInclude {inc}\n")
    assert str(exc.value).startswith(f"{inc} line 3: cannot read this SSH config"), str(exc.value)
    inc.write_text(f"Include {tmp_path}/config\n")
    with pytest.raises(InputError, match="includes itself"):
        endpoint(tmp_path, f"Include {inc}\n")


# ---- two real sshd processes: the target only through the bastion -----------------------------------------------
@pytest.fixture(scope="module")
def bastion_and_target(tmp_path_factory) -> Iterator[tuple[Sshd, Sshd]]:
    base = tmp_path_factory.mktemp("proxyjump")
    (base / "target").mkdir()
    (base / "bastion").mkdir()
    # the target's own /etc/sysctl.d (a mount namespace): the apply test's profile is in place there already,
    # so nothing on this machine changes
    sysctl_d = base / "target-sysctl.d"
    sysctl_d.mkdir()
    value = Path("/proc/sys/kernel/timer_migration").read_text().strip()
    (sysctl_d / "90-rt-tune-kernel.timer_migration.conf").write_text(
        f"# managed by rt-tune: sysctl.kernel.timer_migration\n-kernel.timer_migration = {value}\n")
    private = ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/sysctl.d && exec "$@"', str(sysctl_d)]
    with sshd_server(base / "target", wrap=private) as target:
        hosts = base / "bastion-hosts"
        hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {TARGET_NAME}\n")
        wrap = ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts)]
        with sshd_server(base / "bastion", wrap=wrap) as bastion:
            yield bastion, target


def write_alias_setup(d: Path, bastion: Sshd, target: Sshd) -> Path:
    """~/.ssh/config with the alias `robot` (through `jumpbox`), known_hosts for both, and an inventory naming
    only the alias."""
    ssh = d / ".ssh"
    ssh.mkdir(exist_ok=True)
    (ssh / "known_hosts").write_text(
        bastion.known_hosts.read_text() + target.known_hosts.read_text().replace("127.0.0.1", TARGET_NAME))
    (ssh / "config").write_text(
        f"Host robot\n  HostName {TARGET_NAME}\n  Port {target.port}\n  ProxyJump jumpbox\n"
        f"  IdentityFile {target.client_key}\n"
        f"Host jumpbox\n  HostName 127.0.0.1\n  Port {bastion.port}\n  IdentityFile {bastion.client_key}\n"
        f"Host *\n  UserKnownHostsFile {ssh / 'known_hosts'}\n")
    inventory = d / "inventory.yaml"
    inventory.write_text("units:\n  r1:\n    host: {address: robot}\n")
    return inventory


def test_the_target_is_reached_only_through_the_bastion_named_by_an_alias(bastion_and_target, tmp_path,
                                                                           monkeypatch):
    bastion, target = bastion_and_target
    monkeypatch.setenv("HOME", str(tmp_path))
    inventory = write_alias_setup(tmp_path, bastion, target)
    e = load_inventory(inventory).endpoint("r1")
    assert (e.host, e.port, e.jump.host, e.jump.port) == (TARGET_NAME, target.port, "127.0.0.1", bastion.port)
    with SSHTransport(e, connect_deadline_s=10) as t:
        peer = t.run(["printenv", "SSH_CONNECTION"]).stdout.split()
        assert peer[2:] == ["127.0.0.1", str(target.port)]  # the target's sshd answered
    direct = subprocess.run(["getent", "hosts", TARGET_NAME], capture_output=True)
    assert direct.returncode != 0  # from here, the name does not resolve: only the bastion reaches it


def test_facts_plan_and_apply_through_the_bastion_by_alias(bastion_and_target, tmp_path):
    bastion, target = bastion_and_target
    inventory = write_alias_setup(tmp_path, bastion, target)
    value = Path("/proc/sys/kernel/timer_migration").read_text().strip()
    profile = tmp_path / "noop.yaml"  # in place on the target (see the fixture): through the bastion, a no-op
    profile.write_text(f"name: noop\nhost:\n  sysctl:\n    kernel.timer_migration: \"{value}\"\n")
    env = {"HOME": str(tmp_path), "RT_TUNE_STATE": str(tmp_path / "state"), "PATH": os.environ["PATH"],
           "PYTHONPATH": str(REPO)}

    def tune(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "orchestrator", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    facts = tune("facts", "r1", "-i", str(inventory), "--json")
    assert facts.returncode == 0, facts.stderr
    assert os.uname().release in facts.stdout
    plan = tune("plan", str(profile), "--unit", "r1", "-i", str(inventory), "--json")
    assert plan.returncode == 0, plan.stderr
    assert "noop" in plan.stdout or "in place" in plan.stdout, plan.stdout
    apply = tune("apply", str(profile), "--unit", "r1", "-i", str(inventory), "--json")
    assert apply.returncode == 0, apply.stderr
    assert '"noop"' in apply.stdout, apply.stdout
    # an unreachable hop is named: the bastion's port closed
    (tmp_path / ".ssh" / "config").write_text((tmp_path / ".ssh" / "config").read_text()
                                              .replace(f"Port {bastion.port}", "Port 1"))
    facts = tune("facts", "r1", "-i", str(inventory))
    assert facts.returncode != 0 and "through the jump host: root@127.0.0.1:1" in facts.stderr, facts.stderr


def test_keys_from_a_running_ssh_agent(bastion_and_target, tmp_path, monkeypatch):
    _, target = bastion_and_target
    agent = subprocess.run(["ssh-agent", "-s", "-a", str(tmp_path / "agent.sock")], capture_output=True, text=True,
                           check=True)
    pid = next(line.split("=")[1].split(";")[0] for line in agent.stdout.split("\n") if "SSH_AGENT_PID=" in line)
    try:
        monkeypatch.setenv("SSH_AUTH_SOCK", str(tmp_path / "agent.sock"))
        monkeypatch.setenv("HOME", str(tmp_path))  # no default key files to fall back on
        e = target.endpoint(key_file=None)
        with pytest.raises(Exception, match="authentication failed"):  # the agent holds no key yet
            with SSHTransport(e, connect_deadline_s=5) as t:
                t.run(["true"])
        subprocess.run(["ssh-add", str(target.client_key)], check=True, capture_output=True,
                       env={**os.environ, "SSH_AUTH_SOCK": str(tmp_path / "agent.sock")})
        with SSHTransport(e, connect_deadline_s=5) as t:
            assert t.run(["echo", "agent"]).stdout == "agent\n"
    finally:
        subprocess.run(["kill", pid], check=False)


def test_sshconfig_load_reads_the_users_and_the_systems_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text("Host x\n  Port 1\n")
    config = sshconfig.load()
    assert config.files[0] == str(tmp_path / ".ssh" / "config")
    assert config.lookup("x")["port"] == "1"


def test_a_config_that_is_not_a_regular_file_is_an_error_not_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    os.mkfifo(tmp_path / ".ssh" / "config")  # would block a reader forever
    with pytest.raises(InputError, match="not a regular file"):
        _endpoint(EndpointSpec(address="robot"), None)
