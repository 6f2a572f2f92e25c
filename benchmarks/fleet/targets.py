"""A fleet of real SSH targets on this machine: one sshd per network namespace AND per mount namespace.

Target N (1-based) is:

- network namespace ``rtb-N``, reached over a veth pair ``rtbhN`` (root namespace, 10.231.N.1/30) ->
  ``rtbpN`` (inside, 10.231.N.2/30); ``lo`` is up inside. ``net.ipv4.*`` sysctls are per network namespace,
  so ``sysctl -w net.ipv4.ip_forward=1`` on a target changes that namespace only;
- an sshd started as ``ip netns exec rtb-N unshare --mount --uts --propagation private sh -c 'hostname rtb-N
  && mount --bind <base>/tN/sysctl.d /etc/sysctl.d && mount --bind <base>/root.bashrc /root/.bashrc && exec
  sshd -D -e -f <base>/tN/sshd_config'``. `ip netns exec` already
  enters a new mount namespace (it unshares one, makes / a recursive slave and remounts /sys for the network
  namespace) before it execs; `unshare --mount --propagation private` adds a private one of our own, so the
  bind mount is seen by that sshd and the sessions it forks only, and never propagates anywhere. What a
  target's session sees at /etc/sysctl.d is the empty, private directory <base>/tN/sysctl.d. Everything
  else of the filesystem is this machine's, shared by all targets, except /root/.bashrc: bash sources it for
  every command sshd runs, and this development machine's runs `pyenv init` (0.1-0.2 s per command, which no
  robot pays), so each target sees a plain one (bind-mounted too). `unshare --uts` as well, so each target has
  its own hostname (rtb-N) for the facts;
- its own ed25519 host key; root login with the controller's one ed25519 client key only (no passwords), and
  a known_hosts file listing every target's host key, so all tools run with host key checking ON.

Everything is removed on exit (also on Ctrl-C, SIGTERM, SIGHUP or an exception); leftovers of a killed earlier
run (namespaces ``rtb-<digits>``, links ``rtbh<digits>``) are removed before setup.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

NS_PREFIX = "rtb-"
HOST_LINK_PREFIX = "rtbh"
PEER_LINK_PREFIX = "rtbp"
SUBNET = "10.231"
SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
HOST_SYSCTL_DIR = Path("/etc/sysctl.d")

_SSHD_CONFIG = """\
# rt-tune fleet benchmark target {index}
ListenAddress {addr}
Port 22
HostKey {host_key}
PidFile none
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile {authorized_keys}
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
AllowTcpForwarding no
StrictModes yes
MaxStartups 100:30:200
MaxSessions 100
LogLevel ERROR
Subsystem sftp /usr/lib/openssh/sftp-server
"""


#: What a target's root shell reads (bash sources ~/.bashrc for every command run by sshd): Debian's default root
#: .bashrc has nothing active. This machine's /root/.bashrc runs `pyenv init` (~0.1-0.2 s of CPU per remote
#: command), which no robot has and which would dominate every tool's per-command cost.
_BASHRC = "# ~/.bashrc of the rt-tune fleet benchmark's targets: as Debian's default root one, nothing active\n"


def _run(argv: list[str], *, check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, input=input, capture_output=True)


def _keygen(path: Path, comment: str) -> None:
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def host_state() -> dict[str, object]:
    """This machine's /etc/sysctl.d (name -> sha256 of content, or symlink target) and its ip_forward."""
    files: dict[str, str] = {}
    for p in sorted(HOST_SYSCTL_DIR.iterdir()):
        if p.is_symlink():
            files[p.name] = "-> " + os.readlink(p)
        elif p.is_file():
            files[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
        else:
            files[p.name] = "(dir)"
    return {"etc_sysctl_d": files, "ip_forward": Path(IP_FORWARD).read_text().strip()}


@dataclass
class Target:
    index: int
    dir: Path
    proc: subprocess.Popen | None = None

    @property
    def ns(self) -> str:
        return f"{NS_PREFIX}{self.index}"

    @property
    def host_link(self) -> str:
        return f"{HOST_LINK_PREFIX}{self.index}"

    @property
    def peer_link(self) -> str:
        return f"{PEER_LINK_PREFIX}{self.index}"

    @property
    def host_addr(self) -> str:
        return f"{SUBNET}.{self.index}.1"

    @property
    def addr(self) -> str:
        return f"{SUBNET}.{self.index}.2"

    @property
    def sysctl_dir(self) -> Path:
        return self.dir / "sysctl.d"

    @property
    def host_key(self) -> Path:
        return self.dir / "ssh_host_ed25519_key"


def cleanup_stale(log: Callable[[str], None]) -> None:
    """Remove namespaces rtb-<digits> and links rtbh<digits> left by a killed earlier run (ours only)."""
    out = _run(["ip", "netns", "list"], check=False).stdout.decode()
    names = [line.split()[0] for line in out.splitlines() if line.split()]
    stale = [ns for ns in names if re.fullmatch(rf"{NS_PREFIX}\d+", ns)]
    for ns in stale:
        pids = _run(["ip", "netns", "pids", ns], check=False).stdout.decode().split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        _run(["ip", "netns", "del", ns], check=False)
    links = _run(["ip", "-o", "link", "show"], check=False).stdout.decode()
    stale_links = re.findall(rf"^\d+: ({HOST_LINK_PREFIX}\d+)[@:]", links, flags=re.M)
    for link in stale_links:
        _run(["ip", "link", "del", link], check=False)
    if stale or stale_links:
        log(f"removed leftovers of an earlier run: {len(stale)} namespaces, {len(stale_links)} links")


class SshFleet:
    """`with SshFleet(32) as fleet:` -> 32 running targets; `fleet.endpoints()` are rt-tune Endpoints."""

    def __init__(self, count: int, *, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)):
        if not 1 <= count <= 250:
            raise ValueError("between 1 and 250 targets")
        if os.geteuid() != 0:
            raise SystemExit("the fleet benchmark needs root (network namespaces, veth pairs, bind mounts)")
        if not os.access(SSHD, os.X_OK):
            raise SystemExit(f"{SSHD} is missing: apt-get install openssh-server")
        self.count = count
        self.log = log
        self.base: Path | None = None
        self.targets: list[Target] = []
        self._made_privsep = False
        self._old_handlers: dict[int, object] = {}
        self.host_before: dict[str, object] | None = None
        self.host_after: dict[str, object] | None = None

    # -- paths -------------------------------------------------------------------------------------------

    @property
    def client_key(self) -> Path:
        assert self.base is not None
        return self.base / "client_ed25519"

    @property
    def known_hosts(self) -> Path:
        assert self.base is not None
        return self.base / "known_hosts"

    @property
    def bashrc(self) -> Path:
        assert self.base is not None
        return self.base / "root.bashrc"

    @property
    def authorized_keys(self) -> Path:
        assert self.base is not None
        return self.base / "authorized_keys"

    # -- lifecycle ---------------------------------------------------------------------------------------

    def __enter__(self) -> SshFleet:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self.setup()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def _on_signal(self, signum, frame) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def setup(self) -> None:
        self.host_before = host_state()
        cleanup_stale(self.log)
        if not PRIVSEP_DIR.exists():
            PRIVSEP_DIR.mkdir(mode=0o755)
            self._made_privsep = True
        # /run: root-owned 0755 all the way up, as sshd's StrictModes wants for AuthorizedKeysFile
        self.base = Path(tempfile.mkdtemp(prefix="rt-tune-fleet-bench.", dir="/run"))
        _keygen(self.client_key, "rt-tune-fleet-bench")
        self.authorized_keys.write_bytes(self.client_key.with_suffix(".pub").read_bytes())
        self.authorized_keys.chmod(0o600)
        self.bashrc.write_text(_BASHRC)
        self.targets = [Target(i, self.base / f"t{i}") for i in range(1, self.count + 1)]
        known: list[str] = []
        for t in self.targets:
            t.dir.mkdir(mode=0o700)
            t.sysctl_dir.mkdir(mode=0o755)
            _keygen(t.host_key, f"rtb-target-{t.index}")
            kind, blob = t.host_key.with_suffix(".pub").read_text().split()[:2]
            known.append(f"{t.addr} {kind} {blob}\n")
            (t.dir / "sshd_config").write_text(_SSHD_CONFIG.format(
                index=t.index, addr=t.addr, host_key=t.host_key, authorized_keys=self.authorized_keys))
        self.known_hosts.write_text("".join(known))
        self.log(f"fleet: {self.count} host keys, client key and known_hosts in {self.base}")
        for t in self.targets:
            self._network(t)
        self.log(f"fleet: {self.count} network namespaces {NS_PREFIX}1..{NS_PREFIX}{self.count}, veth links up")
        for t in self.targets:
            self._start_sshd(t)
        self._wait_listening()
        self.log(f"fleet: {self.count} sshd running, each in its own network and mount namespace")

    def _network(self, t: Target) -> None:
        _run(["ip", "netns", "add", t.ns])
        _run(["ip", "link", "add", t.host_link, "type", "veth", "peer", "name", t.peer_link])
        _run(["ip", "link", "set", t.peer_link, "netns", t.ns])
        _run(["ip", "addr", "add", f"{t.host_addr}/30", "dev", t.host_link])
        _run(["ip", "link", "set", t.host_link, "up"])
        _run(["ip", "-n", t.ns, "addr", "add", f"{t.addr}/30", "dev", t.peer_link])
        _run(["ip", "-n", t.ns, "link", "set", t.peer_link, "up"])
        _run(["ip", "-n", t.ns, "link", "set", "lo", "up"])
        # the address must be reached over this veth only, never through a default route
        route = _run(["ip", "-o", "route", "get", t.addr]).stdout.decode()
        if f"dev {t.host_link}" not in route:
            raise RuntimeError(f"{t.addr} is not routed over {t.host_link}: {route.strip()}")

    def _start_sshd(self, t: Target) -> None:
        log = open(t.dir / "sshd.log", "wb")  # noqa: SIM115 - kept open by the child
        script = ('hostname "$4" && mount --bind "$1" /etc/sysctl.d && mount --bind "$5" /root/.bashrc && '
                  'exec "$2" -D -e -f "$3"')
        t.proc = subprocess.Popen(
            ["ip", "netns", "exec", t.ns, "unshare", "--mount", "--uts", "--propagation", "private",
             "sh", "-c", script, "sh", str(t.sysctl_dir), SSHD, str(t.dir / "sshd_config"), t.ns,
             str(self.bashrc)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()

    def _wait_listening(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(self.targets)
        while pending:
            t = pending[0]
            if t.proc is not None and t.proc.poll() is not None:
                raise RuntimeError(f"sshd of target {t.index} exited ({t.proc.returncode}): "
                                   f"{(t.dir / 'sshd.log').read_text()[-500:]}")
            try:
                with socket.create_connection((t.addr, 22), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-2.0-"):
                        pending.pop(0)
                        continue
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd of target {t.index} is not answering on {t.addr}:22")
            time.sleep(0.05)

    def cleanup(self) -> None:
        """Stop every sshd, delete namespaces and links, remove the files. Safe to call twice."""
        for t in self.targets:
            if t.proc is not None and t.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(t.proc.pid, signal.SIGTERM)
        for t in self.targets:
            if t.proc is None:
                continue
            try:
                t.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(t.proc.pid, signal.SIGKILL)
                t.proc.wait(timeout=3)
        for t in self.targets:
            # sessions still open (a tool's leftover) are in the namespace too
            for pid in _run(["ip", "netns", "pids", t.ns], check=False).stdout.decode().split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _run(["ip", "netns", "del", t.ns], check=False)
            _run(["ip", "link", "del", t.host_link], check=False)
        if self.targets:
            self.log(f"fleet: {len(self.targets)} targets stopped, namespaces and links deleted")
        self.targets = []
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None
        if self._made_privsep:
            with contextlib.suppress(OSError):
                PRIVSEP_DIR.rmdir()
            self._made_privsep = False
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}
        self.host_after = host_state()

    # -- use ---------------------------------------------------------------------------------------------

    def endpoints(self):
        from orchestrator.remote.transport import Endpoint

        return [Endpoint(host=t.addr, port=22, user="root", key_file=str(self.client_key),
                         known_hosts=str(self.known_hosts)) for t in self.targets]

    def target_specs(self) -> list[dict[str, object]]:
        """What the tools' inventories are made from (JSON-able)."""
        return [{"name": f"t{t.index}", "host": t.addr, "port": 22, "user": "root",
                 "key_file": str(self.client_key), "known_hosts": str(self.known_hosts)} for t in self.targets]

    def _in_all_ns(self, command: str) -> list[str]:
        """Run `command` (a fixed shell fragment) in each target's network namespace; one output line each."""
        script = 'for ns in "$@"; do ip netns exec "$ns" sh -c "$0" || echo ERROR; done'
        out = _run(["sh", "-c", script, command, *[t.ns for t in self.targets]]).stdout.decode().splitlines()
        if len(out) != len(self.targets):
            raise RuntimeError(f"expected {len(self.targets)} lines from the namespaces, got {out!r}")
        return out

    def check(self, value: str, dropin_name: str, dropin: bytes) -> list[str]:
        """Problems (empty when every target has runtime `value` and exactly the drop-in, byte for byte)."""
        problems: list[str] = []
        live = self._in_all_ns(f"cat {IP_FORWARD}")
        for t, v in zip(self.targets, live, strict=True):
            if v.strip() != value:
                problems.append(f"t{t.index}: ip_forward is {v.strip()!r}, not {value!r}")
            p = t.sysctl_dir / dropin_name
            if not p.is_file():
                problems.append(f"t{t.index}: {dropin_name} is missing")
            elif p.read_bytes() != dropin:
                problems.append(f"t{t.index}: {dropin_name} differs: {p.read_bytes()!r}")
            elif p.stat().st_mode & 0o777 != 0o644:
                problems.append(f"t{t.index}: {dropin_name} has mode {p.stat().st_mode & 0o777:o}, not 644")
            others = sorted(x.name for x in t.sysctl_dir.iterdir() if x.name != dropin_name)
            if others:
                problems.append(f"t{t.index}: stray files in /etc/sysctl.d: {others}")
        return problems

    def reset(self) -> None:
        """Every target back to the start: runtime ip_forward 0, its private /etc/sysctl.d empty."""
        out = self._in_all_ns(f"echo 0 > {IP_FORWARD} && cat {IP_FORWARD}")
        if any(v.strip() != "0" for v in out):
            raise RuntimeError(f"reset failed: {out}")
        for t in self.targets:
            for p in t.sysctl_dir.iterdir():
                p.unlink()

    def ip_forward_values(self) -> list[str]:
        return [v.strip() for v in self._in_all_ns(f"cat {IP_FORWARD}")]

    def sshd_pids(self) -> list[int]:
        return [t.proc.pid for t in self.targets if t.proc is not None]

    def target_cpu_s(self, settle_s: float = 10.0) -> float:
        """CPU seconds used so far by all targets: each sshd and every session it forked and reaped.

        Waits (up to `settle_s`) until no sshd has a connection child left, so a finished run is counted whole.
        """
        tick = os.sysconf("SC_CLK_TCK")
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline:
            busy = False
            for pid in self.sshd_pids():
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{pid}/task/{pid}/children").read_text().strip():
                        busy = True
                        break
            if not busy:
                break
            time.sleep(0.02)
        total = 0
        for pid in self.sshd_pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            # fields[0] is state (field 3); utime, stime, cutime, cstime are fields 14..17
            total += sum(int(x) for x in fields[11:15])
        return total / tick
