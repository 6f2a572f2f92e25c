"""The fleet workload done with rt-tune's real code path, for `benchmarks/fleet_bench.py`.

Per target: an `SSHTransport` (fabric/paramiko, host key checked against the known_hosts file), then
`SysctlChange(name, value)` planned together with the workload's facts (`plan_all`: hostname, kernel, arch,
CPUs online and the change's live value and drop-in, one round trip), and unless the plan is a no-op
`apply_and_read` (writes /etc/sysctl.d/90-rt-tune-NAME.conf, runs `sysctl -w` and reads both back: one round
trip) and `verify` on what it read. A no-op's verification is the plan's own read, as in `tune apply`. These
are the calls `tune plan` and `tune apply` make (run/engine.py). All targets at once on a thread pool (32
workers by default): the shape the fleet runner reuses.

As a script (what the benchmark times, so rt-tune pays its interpreter start and imports like the CLI tools):

    python benchmarks/fleet/rt_tune_run.py SPECS.json [--profile] [--connect-only] [--what-if-batched]

(--profile records every remote command; --what-if-batched is NOT rt-tune's code path: the same work in two
hand-written commands, the floor of any design with two round trips.)

SPECS.json is a list of {"host", "port", "user", "key_file", "known_hosts"}; prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from orchestrator.changes.base import plan_all
from orchestrator.changes.sysctl import SysctlChange
from orchestrator.facts.base import ARCH, CPUS_ONLINE, HOSTNAME, KERNEL_RELEASE
from orchestrator.remote.ssh import SSHTransport  # noqa: E402
from orchestrator.remote.transport import Endpoint  # noqa: E402

SYSCTL_NAME = "net.ipv4.ip_forward"
SYSCTL_VALUE = "1"
#: the workload's facts, as pyinfra and Ansible gather them (rt-tune's `tune facts` adds cmdline and boot id)
WORKLOAD_FACTS = (HOSTNAME, KERNEL_RELEASE, ARCH, CPUS_ONLINE)


@dataclass
class TargetOutcome:
    target: str
    ok: bool
    error: str | None = None
    facts: dict[str, object] | None = None
    noop: bool | None = None
    #: seconds spent in each phase: connect, facts, plan, apply, verify, close
    phases: dict[str, float] = field(default_factory=dict)
    #: (phase, command, seconds) for every remote command; filled by a `CountingSSHTransport` only
    commands: list[tuple[str, str, float]] = field(default_factory=list)


class CountingSSHTransport(SSHTransport):
    """SSHTransport that records every remote command and its duration (profiling only; same behaviour)."""

    def __init__(self, endpoint: Endpoint, **kwargs) -> None:
        super().__init__(endpoint, **kwargs)
        self.phase = "-"
        self.log: list[tuple[str, str, float]] = []

    def _exec(self, argv, *, timeout_s, stdin, sudo):
        start = time.monotonic()
        try:
            return super()._exec(argv, timeout_s=timeout_s, stdin=stdin, sudo=sudo)
        finally:
            self.log.append((self.phase, _command_kind(argv), time.monotonic() - start))


def _command_kind(argv: Sequence[str]) -> str:
    if argv[:2] == ["sh", "-c"]:
        script = argv[2]
        if script.startswith("set -f; m=$1"):
            return "gather (sh: facts and the change's state)"
        if script.startswith("m=$1; tmp=$2"):
            return "write_run_read (sh: write drop-in; sysctl -w; read back)"
        return "sh -c " + script[:30]
    if argv[0] == "cat" and argv[-1].startswith("/etc/"):
        return "read_file " + argv[-1]
    return shlex.join(argv)[:60]


def _phase(t: SSHTransport, outcome: TargetOutcome, name: str, fn: Callable[[], object]) -> object:
    if isinstance(t, CountingSSHTransport):
        t.phase = name
    start = time.monotonic()
    try:
        return fn()
    finally:
        outcome.phases[name] = time.monotonic() - start


def run_target(
    endpoint: Endpoint,
    *,
    name: str = SYSCTL_NAME,
    value: str = SYSCTL_VALUE,
    transport_factory: Callable[[Endpoint], SSHTransport] = SSHTransport,
) -> TargetOutcome:
    """Facts and one sysctl change planned in one round trip; applied, read back and verified in another unless
    already in place."""
    outcome = TargetOutcome(target=endpoint.label, ok=False)
    t = transport_factory(endpoint)
    try:
        _phase(t, outcome, "connect", t.connect)
        change = SysctlChange(name, value)
        facts, [plan] = _phase(t, outcome, "facts+plan", lambda: plan_all(t, [change], WORKLOAD_FACTS))
        outcome.facts = {"hostname": facts["hostname"], "kernel_release": facts["kernel_release"],
                         "arch": facts["arch"], "cpu_count": len(facts["cpus_online"])}
        outcome.noop = plan.noop
        if not plan.noop:
            live = _phase(t, outcome, "apply+verify", lambda: change.apply_and_read(t, plan.before))
            change.verify(t, plan, live)
        outcome.ok = True
    except Exception as exc:  # noqa: BLE001 - one failed target is reported, the others go on
        outcome.error = f"{type(exc).__name__}: {exc}"
    finally:
        _phase(t, outcome, "close", t.close)
        if isinstance(t, CountingSSHTransport):
            outcome.commands = list(t.log)
    return outcome


def rt_tune_fleet(
    endpoints: Sequence[Endpoint],
    *,
    name: str = SYSCTL_NAME,
    value: str = SYSCTL_VALUE,
    workers: int = 32,
    transport_factory: Callable[[Endpoint], SSHTransport] = SSHTransport,
) -> list[TargetOutcome]:
    """The workload on every endpoint at once (a thread pool of `workers`); outcomes in endpoint order."""
    workers = max(1, min(workers, len(endpoints)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rt-tune") as pool:
        futures = [pool.submit(run_target, ep, name=name, value=value, transport_factory=transport_factory)
                   for ep in endpoints]
        return [f.result() for f in futures]


# ---- profiling helpers (not rt-tune's code path) ----------------------------------------------------------

def connect_only(endpoints: Sequence[Endpoint], workers: int = 32) -> list[float]:
    """Only the paramiko connect + host key check + auth of every target at once: the floor of any design that
    opens one paramiko connection per target. Seconds per target."""

    def one(ep: Endpoint) -> float:
        t = SSHTransport(ep)
        start = time.monotonic()
        try:
            t.connect()
            return time.monotonic() - start
        finally:
            t.close()

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(endpoints)))) as pool:
        return list(pool.map(one, endpoints))


_BATCH_READ = (
    'uname -n; uname -r; uname -m; cat /sys/devices/system/cpu/online; cat "$1"; '
    'if [ -e "$2" ]; then echo present; base64 -w0 -- "$2"; echo; else echo absent; fi'
)
_BATCH_APPLY = (
    'umask 077; tmp=$1.rt-tune-tmp; cat > "$tmp" && chmod 0644 "$tmp" && mv -f -- "$tmp" "$1" && '
    'sysctl -q -w "$2=$3" && cat "$4" && base64 -w0 -- "$1"'
)


def batched_target(
    endpoint: Endpoint,
    *,
    name: str = SYSCTL_NAME,
    value: str = SYSCTL_VALUE,
    transport_factory: Callable[[Endpoint], SSHTransport] = SSHTransport,
) -> TargetOutcome:
    """WHAT-IF, not rt-tune's code: the same work in 2 round trips (facts + read in one command, write + sysctl
    + read-back in another), through the same SSHTransport. Shows what batching would save."""
    import base64

    outcome = TargetOutcome(target=endpoint.label, ok=False)
    change = SysctlChange(name, value)
    want = change._dropin_bytes()
    t = transport_factory(endpoint)
    try:
        _phase(t, outcome, "connect", t.connect)
        out = _phase(t, outcome, "facts+plan", lambda: t.run(["sh", "-c", _BATCH_READ, "-", change.proc_path,
                                                               change.dropin], timeout_s=30).stdout.splitlines())
        host, kernel, arch, cpus, live, present = out[:6]
        current = base64.b64decode(out[6]) if present == "present" else None
        outcome.facts = {"hostname": host, "kernel_release": kernel, "arch": arch, "cpus_online": cpus}
        outcome.noop = live.strip() == value and current == want
        if not outcome.noop:
            res = _phase(t, outcome, "apply+verify", lambda: t.run(
                ["sh", "-c", _BATCH_APPLY, "-", change.dropin, name, value, change.proc_path],
                stdin=want, timeout_s=30).stdout.splitlines())
            if res[0].strip() != value or base64.b64decode(res[1]) != want:
                raise RuntimeError(f"verify failed: {res}")
        outcome.ok = True
    except Exception as exc:  # noqa: BLE001
        outcome.error = f"{type(exc).__name__}: {exc}"
    finally:
        t.close()
    return outcome


def batched_fleet(
    endpoints: Sequence[Endpoint],
    workers: int = 32,
    transport_factory: Callable[[Endpoint], SSHTransport] = SSHTransport,
) -> list[TargetOutcome]:
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(endpoints)))) as pool:
        return list(pool.map(lambda ep: batched_target(ep, transport_factory=transport_factory), endpoints))


# ---- script ------------------------------------------------------------------------------------------------

def load_endpoints(path: str) -> list[Endpoint]:
    specs = json.loads(Path(path).read_text())
    return [Endpoint(host=s["host"], port=int(s["port"]), user=s["user"], key_file=s["key_file"],
                     known_hosts=s["known_hosts"]) for s in specs]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs")
    ap.add_argument("--workers", type=int, default=32)
    ap.add_argument("--profile", action="store_true", help="record every remote command (CountingSSHTransport)")
    ap.add_argument("--what-if-batched", action="store_true", help="the 2-round-trip what-if instead")
    ap.add_argument("--connect-only", action="store_true", help="only connect and authenticate")
    args = ap.parse_args(argv)
    endpoints = load_endpoints(args.specs)
    cpu0, start = time.process_time(), time.monotonic()
    if args.connect_only:
        secs = connect_only(endpoints, args.workers)
        doc = {"wall_s": time.monotonic() - start, "cpu_s": time.process_time() - cpu0, "connect_s": secs}
        print(json.dumps(doc))
        return 0
    factory = CountingSSHTransport if args.profile else SSHTransport
    if args.what_if_batched:
        outcomes = batched_fleet(endpoints, args.workers, transport_factory=factory)
    else:
        outcomes = rt_tune_fleet(endpoints, workers=args.workers, transport_factory=factory)
    doc = {"wall_s": time.monotonic() - start, "cpu_s": time.process_time() - cpu0,
           "ok": sum(o.ok for o in outcomes), "failed": [asdict(o) for o in outcomes if not o.ok],
           "outcomes": [asdict(o) for o in outcomes]}
    print(json.dumps(doc))
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
