"""Runtime changes: each reads the live state, plans a diff (no-op when already in place), applies, verifies by
reading again, and rolls back to the exact previous state.

A change's `read()` returns a JSON-able snapshot that is journaled *before* the change is applied; `rollback()`
restores that snapshot byte for byte (files are kept base64-encoded). rt-tune owns only what it creates: its
sysctl drop-in files, its systemd drop-ins and scripts, which are named `*rt-tune*`.
"""

from __future__ import annotations

import base64
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from orchestrator.core.cpulist import format_cpulist
from orchestrator.core.cpulist import parse_kernel_cpulist as parse_cpu_list
from orchestrator.core.errors import InputError, TuneError
from orchestrator.core.names import SYSCTL_NAME, check_unit_name, service_to_disable  # whole-string, systemd's rules
from orchestrator.config.profile import describe_vcpu_map
from orchestrator.remote.transport import Transport, read_files, read_optional

State = dict[str, Any]


class ChangeError(TuneError):
    """A change could not be applied, verified or rolled back."""


@dataclass(frozen=True)
class Plan:
    change_id: str
    before: State
    desired: State
    noop: bool
    summary: str


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def restore_file(t: Transport, path: str, content: bytes | None, mode: int = 0o644) -> None:
    if content is None:
        t.run(["rm", "-f", "--", path], timeout_s=30)
    else:
        t.write_file(path, content, mode=mode)


class Change(ABC):
    """One tuning change on one target (a unit's host or guest)."""

    kind: str
    change_id: str

    @abstractmethod
    def read(self, t: Transport) -> State: ...

    @abstractmethod
    def desired(self, before: State) -> State: ...

    @abstractmethod
    def apply(self, t: Transport, before: State) -> None: ...

    @abstractmethod
    def rollback(self, t: Transport, before: State) -> None: ...

    @abstractmethod
    def describe(self) -> str: ...

    #: `switch` toggles the effect only and leaves what makes it persistent in place, so a change measured
    #: "before" after its first apply still needs its `rollback` when it is not kept.
    switch_keeps_persistence: bool = False

    def switch(self, t: Transport, before: State, on: bool) -> None:
        """Between measurement runs: the change's effect on (an "after" run) or off (a "before" run); the caller
        verifies an "on". By default the whole `apply` or `rollback`."""
        if on:
            self.apply(t, before)
        else:
            self.rollback(t, before)

    def in_place(self, live: State, desired: State) -> bool:
        """Does the live state already satisfy the desired one? (Default: every desired key matches.)"""
        return all(live.get(k) == v for k, v in desired.items())

    def plan(self, t: Transport) -> Plan:
        before = self.read(t)
        want = self.desired(before)
        noop = self.in_place(before, want)
        return Plan(self.change_id, before, want, noop, self.describe() + (" (already in place)" if noop else ""))

    def verify(self, t: Transport, plan: Plan) -> State:
        live = self.read(t)
        if not self.in_place(live, plan.desired):
            raise ChangeError(f"{t.label}: {self.describe()}: verify failed: live {live} != desired {plan.desired}")
        return live

    def verify_rolled_back(self, t: Transport, before: State) -> None:
        live = self.read(t)
        if live != before:
            raise ChangeError(f"{t.label}: {self.describe()}: rollback did not restore the previous state: "
                              f"live {live} != before {before}")


# ---- sysctl ------------------------------------------------------------------------------------------------
@dataclass
class SysctlChange(Change):
    """A sysctl: the runtime value now, and a drop-in file rt-tune owns so it survives a reboot."""

    name: str
    value: str
    kind: str = field(default="sysctl", init=False)

    def __post_init__(self) -> None:
        if not SYSCTL_NAME.match(self.name):
            raise InputError(f"sysctl name {self.name!r}: expected dotted lowercase words like kernel.timer_migration")
        if not re.fullmatch(r"[A-Za-z0-9 _./:,-]*", self.value) or "\n" in self.value:
            raise InputError(f"sysctl {self.name} value {self.value!r}: no shell metacharacters or newlines")
        self.change_id = f"sysctl.{self.name}"

    @property
    def proc_path(self) -> str:
        return "/proc/sys/" + self.name.replace(".", "/")

    @property
    def dropin(self) -> str:
        return f"/etc/sysctl.d/90-rt-tune-{self.name}.conf"

    def read(self, t: Transport) -> State:
        files = read_files(t, [self.proc_path, self.dropin])  # one round trip
        if files[self.proc_path] is None:
            raise ChangeError(f"{t.label}: no sysctl {self.name} ({self.proc_path} does not exist)")
        return {"value": files[self.proc_path].decode().strip(), "dropin": _b64(files[self.dropin])}

    def _dropin_bytes(self) -> bytes:
        return f"# managed by rt-tune: {self.change_id}\n{self.name} = {self.value}\n".encode()

    def desired(self, before: State) -> State:
        return {"value": self.value, "dropin": _b64(self._dropin_bytes())}

    def in_place(self, live: State, desired: State) -> bool:
        # compare numbers by value: the kernel prints "0", a profile may say "0" or " 0"
        return " ".join(live["value"].split()) == " ".join(str(desired["value"]).split()) and \
            live["dropin"] == desired["dropin"]

    def apply(self, t: Transport, before: State) -> None:
        t.write_file(self.dropin, self._dropin_bytes())
        t.run(["sysctl", "-q", "-w", f"{self.name}={self.value}"], timeout_s=30)

    def rollback(self, t: Transport, before: State) -> None:
        t.run(["sysctl", "-q", "-w", f"{self.name}={before['value']}"], timeout_s=30)
        restore_file(t, self.dropin, _unb64(before["dropin"]))

    switch_keeps_persistence = True

    def switch(self, t: Transport, before: State, on: bool) -> None:
        """The runtime value only: the drop-in acts at the next boot, and a measurement run does not boot."""
        t.run(["sysctl", "-q", "-w", f"{self.name}={self.value if on else before['value']}"], timeout_s=30)

    def describe(self) -> str:
        return f"sysctl {self.name}={self.value}"


# ---- systemd service disable -------------------------------------------------------------------------------
@dataclass
class ServiceDisableChange(Change):
    """Stop and disable a service (optionally mask it); rollback restores enabled/masked and active states."""

    unit: str
    mask: bool = False
    kind: str = field(default="service_disable", init=False)

    def __post_init__(self) -> None:
        # the profile's rule (orchestrator.core.names): ".service" appended only without a unit-type suffix, and
        # only units that `disable --now` stops for good (never `dev-sda2.swap` + ".service")
        self.unit = service_to_disable(self.unit)
        self.change_id = f"service.{self.unit}"

    def read(self, t: Transport) -> State:
        out = t.run(["systemctl", "show", "--no-pager", "-p", "LoadState,UnitFileState,ActiveState", self.unit],
                    timeout_s=30).stdout
        props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        if props.get("LoadState") == "not-found":
            return {"load": "not-found", "file_state": "", "active": "inactive"}
        active = props.get("ActiveState", "")
        # a crash-looping service is "activating" (auto-restart) most of the time: it counts as running
        running = "active" if active in ("active", "activating", "reloading") else "inactive"
        return {"load": props.get("LoadState", ""), "file_state": props.get("UnitFileState", ""),
                "active": running}

    def desired(self, before: State) -> State:
        if before["load"] == "not-found":
            return dict(before)
        return {"file_state": "masked" if self.mask else "disabled", "active": "inactive"}

    def in_place(self, live: State, desired: State) -> bool:
        if live.get("load") == "not-found":
            return True
        ok_states = {"masked"} if self.mask else {"disabled", "masked", "static", "indirect"}
        if desired.get("file_state") == "disabled" and live.get("file_state") == "static":
            ok_states = {"static"}
        return live.get("file_state") in ok_states and live.get("active") == "inactive"

    def apply(self, t: Transport, before: State) -> None:
        t.run(["systemctl", "disable", "--now", "--quiet", self.unit], timeout_s=90)
        if self.mask:
            t.run(["systemctl", "mask", "--quiet", self.unit], timeout_s=30)
        t.run(["systemctl", "reset-failed", self.unit], timeout_s=30, check=False)

    def rollback(self, t: Transport, before: State) -> None:
        if before["load"] == "not-found":
            return
        if self.mask and before["file_state"] != "masked":
            t.run(["systemctl", "unmask", "--quiet", self.unit], timeout_s=30)
        if before["file_state"] == "enabled":
            t.run(["systemctl", "enable", "--quiet", self.unit], timeout_s=30)
        elif before["file_state"] == "masked":
            t.run(["systemctl", "mask", "--quiet", self.unit], timeout_s=30)
        if before["active"] == "active":
            t.run(["systemctl", "start", "--no-block", self.unit], timeout_s=60)

    @property
    def switch_keeps_persistence(self) -> bool:  # type: ignore[override]
        return not self.mask

    def switch(self, t: Transport, before: State, on: bool) -> None:
        """Stop or start the service and leave it disabled between runs: `disable` and `enable` each reload
        systemd (seconds on a small or nested unit), and the enablement only acts at the next boot. A masked
        unit cannot be started, so masking toggles whole."""
        if self.mask:
            super().switch(t, before, on)
        elif on:
            t.run(["systemctl", "stop", self.unit], timeout_s=90)
            t.run(["systemctl", "reset-failed", self.unit], timeout_s=30, check=False)
        elif before["load"] != "not-found" and before["active"] == "active":
            t.run(["systemctl", "start", "--no-block", self.unit], timeout_s=60)

    def verify_rolled_back(self, t: Transport, before: State) -> None:
        live = self.read(t)
        if live["file_state"] != before["file_state"]:
            raise ChangeError(f"{t.label}: {self.unit}: file state {live['file_state']} != {before['file_state']}")

    def describe(self) -> str:
        return f"{'mask' if self.mask else 'disable'} {self.unit}"


# ---- vCPU pinning ------------------------------------------------------------------------------------------
PIN_SCRIPT = "/usr/local/sbin/rt-tune-pin-vcpus"
QA_COPY = "/usr/local/lib/rt-tune/qemu_affinity.py"  # qemu-affinity, installed by rt-tune when absent
PIN_SCRIPT_BODY = r"""#!/usr/bin/env python3
# managed by rt-tune: the vCPU map of a QEMU. Also run by systemd (ExecStartPost), so a restarted QEMU is pinned
# again.  rt-tune-pin-vcpus MAINPID --map VCPU:CPU[,VCPU:CPU...] --housekeeping CPUS [--fifo PRIO]
#        rt-tune-pin-vcpus --list MAINPID             (JSON: every thread's affinity and policy; read-only)
#        rt-tune-pin-vcpus --restore MAINPID JSON     (put back what --list printed before)
# Each mapped vCPU thread is allowed on its CPU alone; every other thread (the other vCPUs, the main loop, I/O
# and worker threads, call_rcu) on the housekeeping CPUs; threads QEMU starts later inherit the main thread's.
# vCPU threads: by name with -name ...,debug-threads=on ("CPU n/KVM", "CPU n/TCG"), pinned with qemu-affinity
# (the unit's, else rt-tune's copy); without debug-threads: QMP query-cpus-fast thread ids, pinned directly.
import json, os, re, shutil, socket, subprocess, sys, time

POLICIES = {0: "other", 1: "fifo", 2: "rr", 3: "batch", 5: "idle", 6: "deadline"}

def tasks(pid):
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            found[int(tid)] = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
        except OSError:
            continue
    return found

def named_vcpus(pid):
    found = {}
    for tid, comm in tasks(pid).items():
        m = re.fullmatch(r"CPU (\d+)/(KVM|TCG|HVF|WHPX)", comm)
        if m:
            found[int(m.group(1))] = (tid, comm)
    return found

def qmp_vcpus(argv):
    path = None
    for i, a in enumerate(argv):
        if a == b"-qmp" and i + 1 < len(argv) and argv[i + 1].startswith(b"unix:"):
            path = argv[i + 1][5:].split(b",")[0].decode()
    if path is None:
        sys.exit("no debug-threads=on and no -qmp unix: socket: cannot find the vCPU threads")
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    f = s.makefile("rw")
    json.loads(f.readline())
    for cmd in ("qmp_capabilities", "query-cpus-fast"):
        f.write(json.dumps({"execute": cmd}) + "\n"); f.flush()
        while True:
            reply = json.loads(f.readline())
            if "return" in reply or "error" in reply:
                break
    return {c["cpu-index"]: (c["thread-id"], None) for c in reply.get("return", [])}

def cpulist(cpus):
    out, cpus = [], sorted(cpus)
    i = 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        out.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(out)

def parse_cpus(text):
    cpus = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus

def state(tid):
    try:
        pol = os.sched_getscheduler(tid)
        return {"cpus": cpulist(os.sched_getaffinity(tid)), "policy": POLICIES.get(pol, str(pol)),
                "prio": os.sched_getparam(tid).sched_priority}
    except ProcessLookupError:
        return None

def find_vcpus(pid, wait_for):
    argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    if any(b"debug-threads=on" in a for a in argv):
        deadline = time.time() + 30
        while len(named_vcpus(pid)) < wait_for and time.time() < deadline:
            time.sleep(0.1)
        vcpus = named_vcpus(pid)
        if vcpus:
            return vcpus, "names"
    return qmp_vcpus(argv), "qmp"

def listing(pid):
    vcpus, via = find_vcpus(pid, 1)
    vtids = {tid for tid, _ in vcpus.values()}
    out = {"via": via, "main": state(pid), "vcpus": {}, "threads": {}}
    for i, (tid, _) in sorted(vcpus.items()):
        out["vcpus"][str(i)] = state(tid)
    for tid, comm in tasks(pid).items():
        st = None if tid == pid or tid in vtids else state(tid)
        if st is not None:
            seen = out["threads"].setdefault(comm, [])
            if st not in seen:
                seen.append(st)
    for comm in out["threads"]:
        out["threads"][comm].sort(key=lambda st: json.dumps(st, sort_keys=True))
    return out

def set_policy(tid, policy, prio):
    pol = {v: k for k, v in POLICIES.items()}[policy]
    os.sched_setscheduler(tid, pol, os.sched_param(prio))

def pin(pid, vmap, hk, fifo):
    vcpus, via = find_vcpus(pid, max(vmap) + 1)
    missing = sorted(set(vmap) - set(vcpus))
    if missing:
        sys.exit(f"vCPU {missing[0]} not found: QEMU pid {pid} has vCPUs {cpulist(vcpus) or 'none'}")
    done = False
    if via == "names":
        tool = shutil.which("qemu-affinity")
        cmd = [tool] if tool else [sys.executable, "@QA_COPY@"]
        spec = [f"{vcpus[v][1]}:{c}" for v, c in sorted(vmap.items())]
        others = [] if hk is None else ["-p", cpulist(hk)]
        spec += [] if hk is None else [f"*:{cpulist(hk)}"]
        done = subprocess.run(cmd + [str(pid), *others, "-t", *spec], stdout=subprocess.DEVNULL).returncode == 0
        if not done:
            print("qemu-affinity failed; pinning by thread id", file=sys.stderr)
    if not done:
        rt = {vcpus[v][0]: c for v, c in vmap.items()}
        for tid in tasks(pid):
            if tid not in rt and hk is None:
                continue
            try:
                os.sched_setaffinity(tid, {rt[tid]} if tid in rt else hk)
            except ProcessLookupError:
                pass  # a worker thread that just ended
    if fifo:
        for v in vmap:
            set_policy(vcpus[v][0], "fifo", fifo)

def restore(pid, before):
    vcpus, _ = find_vcpus(pid, len(before["vcpus"]))
    by_tid = {vcpus[int(v)][0]: st for v, st in before["vcpus"].items() if int(v) in vcpus}
    if before.get("main"):
        by_tid[pid] = before["main"]
    for tid, comm in tasks(pid).items():
        if tid in by_tid:
            continue
        seen = before.get("threads", {}).get(comm) or []
        by_tid[tid] = seen[0] if len(seen) == 1 else before.get("main")
    for tid, st in by_tid.items():
        if not st:
            continue
        try:
            os.sched_setaffinity(tid, parse_cpus(st["cpus"]))
            if "policy" in st and st["policy"] in ("other", "fifo", "rr", "batch", "idle"):
                set_policy(tid, st["policy"], st["prio"])
        except ProcessLookupError:
            pass

def main():
    if sys.argv[1] == "--list":
        print(json.dumps(listing(int(sys.argv[2]))))
    elif sys.argv[1] == "--restore":
        restore(int(sys.argv[2]), json.loads(sys.argv[3]))
    else:
        pid, opts = int(sys.argv[1]), sys.argv[2:]
        args = dict(zip(opts[::2], opts[1::2]))
        vmap = {int(v): int(c) for v, c in (p.split(":") for p in args["--map"].split(","))}
        hk = parse_cpus(args["--housekeeping"]) if "--housekeeping" in args else None
        pin(pid, vmap, hk, int(args.get("--fifo", 0)))

main()
""".replace("@QA_COPY@", QA_COPY)


def qemu_affinity_source() -> bytes:
    """qemu-affinity (PyPI, pure Python, one file) as installed on the controller, to install on units."""
    import importlib.util

    spec = importlib.util.find_spec("qemu_affinity")
    if spec is None or spec.origin is None:
        raise ChangeError("qemu-affinity is not installed on the controller (pip install qemu-affinity)")
    return Path(spec.origin).read_bytes()


@dataclass
class VcpuPinningChange(Change):
    """The vCPU map: guest vCPU v on host CPU `vcpus[v]` alone, every other thread of the QEMU run by `service`
    (other vCPUs, main loop, I/O and worker threads) on `housekeeping`, optionally SCHED_FIFO `rt_priority` for
    the mapped vCPUs; now and at every restart of the service (a systemd drop-in with ExecStartPost). The guest's
    RT CPU n is its vCPU n, so this is what puts the guest's RT work on the host's isolated CPUs."""

    service: str
    vcpus: dict[int, int]
    housekeeping: list[int] | None  # None only for a change journaled by an older rt-tune (see from_params)
    rt_priority: int | None = None
    kind: str = field(default="vcpu_pinning", init=False)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> VcpuPinningChange:
        """From a resolved profile's params; a record journaled before the vCPU map ({service, cpus}: vCPU i on
        cpus[i], other threads left alone) is rebuilt as it was made, so it can still be verified and undone."""
        if "vcpus" not in params:
            return cls(params["service"], dict(enumerate(params["cpus"])), None)
        return cls(params["service"], {int(v): int(c) for v, c in params["vcpus"].items()},
                   list(params["housekeeping"]), params.get("rt_priority"))

    def __post_init__(self) -> None:
        self.service = check_unit_name(self.service, types=("service",), what="QEMU service name")
        if not self.vcpus:
            raise InputError("vCPU pinning needs at least one guest vCPU mapped to a host CPU")
        if self.housekeeping is not None and not self.housekeeping:
            raise InputError("vCPU pinning needs the housekeeping CPUs for QEMU's other threads")
        self.vcpus = {int(v): int(c) for v, c in sorted(self.vcpus.items())}
        if len(set(self.vcpus.values())) != len(self.vcpus):
            raise InputError(f"vCPU map {self.vcpus}: each RT vCPU needs its own host CPU")
        if set(self.vcpus.values()) & set(self.housekeeping or []):
            raise InputError(f"vCPU map {self.vcpus}: the housekeeping CPUs {self.housekeeping} overlap the RT CPUs")
        if self.rt_priority is not None and not 1 <= self.rt_priority <= 99:
            raise InputError(f"SCHED_FIFO priority {self.rt_priority} is outside 1..99")
        self.change_id = f"vcpu_pinning.{self.service}"

    @property
    def dropin(self) -> str:
        return f"/etc/systemd/system/{self.service}.d/50-rt-tune-vcpu-pinning.conf"

    def _pin_args(self) -> list[str]:
        args = ["--map", ",".join(f"{v}:{c}" for v, c in self.vcpus.items())]
        if self.housekeeping is not None:
            args += ["--housekeeping", format_cpulist(self.housekeeping)]
        return args + (["--fifo", str(self.rt_priority)] if self.rt_priority else [])

    def _dropin_bytes(self) -> bytes:
        """`-`: a re-pin that fails (a vCPU gone from QEMU's command line) must not stop the guest a robot runs
        on; the threads are then off their map, which `tune verify` reports as drift."""
        return (f"# managed by rt-tune: {self.change_id}\n[Service]\n"
                f"ExecStartPost=-{PIN_SCRIPT} $MAINPID {' '.join(self._pin_args())}\n").encode()

    def _main_pid(self, t: Transport) -> str:
        pid = t.run(["systemctl", "show", "-p", "MainPID", "--value", self.service], timeout_s=30).stdout.strip()
        if not pid.isdigit() or pid == "0":
            raise ChangeError(f"{t.label}: {self.service} is not running (MainPID {pid!r}); nothing to pin")
        return pid

    def _threads(self, t: Transport) -> dict[str, Any]:
        """Every thread's affinity and policy: the main thread, vCPUs by index, the others grouped by name
        (worker threads come and go; their name is what is stable). Read-only."""
        import json

        pid = self._main_pid(t)
        out = t.run(["python3", "-c", PIN_SCRIPT_BODY, "--list", pid], timeout_s=60).stdout
        try:
            listing = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise ChangeError(f"{t.label}: unexpected thread listing for {self.service}: {out[:200]!r}") from None
        if not listing.get("vcpus"):
            raise ChangeError(f"{t.label}: no vCPU threads found in {self.service} (pid {pid})")
        return {k: listing[k] for k in ("main", "vcpus", "threads")}

    def read(self, t: Transport) -> State:
        has_tool = t.run(["sh", "-c", "command -v qemu-affinity || true"], timeout_s=30).stdout.strip() != ""
        files = read_files(t, [self.dropin, PIN_SCRIPT, QA_COPY])
        return {"threads": self._threads(t), "dropin": _b64(files[self.dropin]),
                "script": _b64(files[PIN_SCRIPT]), "qa_copy": _b64(files[QA_COPY]),
                "unit_has_qemu_affinity": has_tool}

    def desired(self, before: State) -> State:
        qa = before["qa_copy"] if before["unit_has_qemu_affinity"] else _b64(qemu_affinity_source())
        return {"map": {str(v): c for v, c in self.vcpus.items()}, "housekeeping": self.housekeeping,
                "rt_priority": self.rt_priority, "dropin": _b64(self._dropin_bytes()),
                "script": _b64(PIN_SCRIPT_BODY.encode()), "qa_copy": qa}

    def misplaced(self, threads: dict[str, Any]) -> list[str]:
        """What breaks the map, one line per thread group (empty: the map holds)."""
        wrong: list[str] = []
        live_vcpus = threads.get("vcpus", {})
        for v, cpu in self.vcpus.items():
            st = live_vcpus.get(str(v))
            if st is None:
                wrong.append(f"vCPU {v}: no such vCPU thread (QEMU has {sorted(live_vcpus, key=int)})")
                continue
            if parse_cpu_list(st["cpus"]) != [cpu]:
                wrong.append(f"vCPU {v}: allowed on {st['cpus']}, want {cpu}")
            if self.rt_priority and (st["policy"], st["prio"]) != ("fifo", self.rt_priority):
                wrong.append(f"vCPU {v}: {st['policy']} {st['prio']}, want fifo {self.rt_priority}")
        if self.housekeeping is None:  # journaled by an older rt-tune: it left the other threads alone
            return wrong
        hk = sorted(set(self.housekeeping))
        others = [(f"vCPU {v}", st) for v, st in live_vcpus.items() if int(v) not in self.vcpus]
        others += [("main loop", threads.get("main"))]
        others += [(name, st) for name, sts in threads.get("threads", {}).items() for st in sts]
        for name, st in others:
            if st is not None and parse_cpu_list(st["cpus"]) != hk:
                wrong.append(f"{name}: allowed on {st['cpus']}, want housekeeping {format_cpulist(hk)}")
        return wrong

    def in_place(self, live: State, desired: State) -> bool:
        """Every mapped vCPU alone on its CPU (with its policy), every other QEMU thread on the housekeeping
        CPUs, and rt-tune's files in place."""
        return not self.misplaced(live["threads"]) \
            and all(live.get(k) == desired[k] for k in ("dropin", "script", "qa_copy"))

    def verify(self, t: Transport, plan: Plan) -> State:
        live = self.read(t)
        wrong = self.misplaced(live["threads"])
        if wrong or not self.in_place(live, plan.desired):
            raise ChangeError(f"{t.label}: {self.describe()}: verify failed: "
                              + ("; ".join(wrong) if wrong else "rt-tune's files are not in place"))
        return live

    def verify_rolled_back(self, t: Transport, before: State) -> None:
        """As the base check, except thread groups that exist only on one side (worker threads come and go)."""
        live = self.read(t)
        lt, bt = live["threads"], _threads_of(before)
        same = (lt["main"] == bt["main"] and lt["vcpus"] == bt["vcpus"]
                and all(lt["threads"][n] == bt["threads"][n] for n in set(lt["threads"]) & set(bt["threads"]))
                and all(live.get(k) == before.get(k) for k in ("dropin", "script", "qa_copy")))
        if not same:
            raise ChangeError(f"{t.label}: {self.describe()}: rollback did not restore the previous state: "
                              f"live {live} != before {before}")

    def apply(self, t: Transport, before: State) -> None:
        if not before["unit_has_qemu_affinity"]:  # "installed if absent": rt-tune's own copy, removed on rollback
            t.run(["mkdir", "-p", QA_COPY.rsplit("/", 1)[0]], timeout_s=30)
            t.write_file(QA_COPY, qemu_affinity_source())
        t.write_file(PIN_SCRIPT, PIN_SCRIPT_BODY.encode(), mode=0o755)
        t.run(["mkdir", "-p", self.dropin.rsplit("/", 1)[0]], timeout_s=30)
        t.write_file(self.dropin, self._dropin_bytes())
        t.run(["systemctl", "daemon-reload"], timeout_s=60)
        t.run([PIN_SCRIPT, self._main_pid(t), *self._pin_args()], timeout_s=60)

    def rollback(self, t: Transport, before: State) -> None:
        import json

        restore_file(t, self.dropin, _unb64(before["dropin"]))
        restore_file(t, PIN_SCRIPT, _unb64(before["script"]), mode=0o755)
        restore_file(t, QA_COPY, _unb64(before["qa_copy"]))
        t.run(["systemctl", "daemon-reload"], timeout_s=60)
        # every thread's previous affinity and policy, put back by the same helper, run in memory
        t.run(["python3", "-c", PIN_SCRIPT_BODY, "--restore", self._main_pid(t),
               json.dumps(_threads_of(before), sort_keys=True)], timeout_s=60)

    switch_keeps_persistence = True

    def switch(self, t: Transport, before: State, on: bool) -> None:
        """Only the threads: their placement is what the runs compare. The drop-in, the pin script and the
        qemu-affinity copy stay from the first apply to the decision: each way they cost a daemon-reload (7-9 s
        and 14-18 CPU-s on the arm64 lab host, measured), and they only act when QEMU starts."""
        import json

        if on:
            t.run([PIN_SCRIPT, self._main_pid(t), *self._pin_args()], timeout_s=60)
        else:
            t.run(["python3", "-c", PIN_SCRIPT_BODY, "--restore", self._main_pid(t),
                   json.dumps(_threads_of(before), sort_keys=True)], timeout_s=60)

    def describe(self, other_vcpus: list[int] | None = None) -> str:
        params = {"vcpus": self.vcpus, "housekeeping": self.housekeeping, "rt_priority": self.rt_priority}
        return f"pin the threads of {self.service}: {describe_vcpu_map(params, other_vcpus)}"

    def plan(self, t: Transport) -> Plan:
        """As every change's, with the map named against the live QEMU: "...; vCPU 0, main loop, ... -> 0"."""
        plan = super().plan(t)
        others = sorted(int(v) for v in plan.before["threads"]["vcpus"] if int(v) not in self.vcpus)
        return replace(plan, summary=self.describe(others) + (" (already in place)" if plan.noop else ""))


def _threads_of(before: State) -> dict[str, Any]:
    """The thread state a before-snapshot holds; a snapshot journaled by an older rt-tune kept only
    {"affinity": {"CPU i": [cpus]}} (vCPUs by index)."""
    if "threads" in before:
        return before["threads"]
    return {"main": None, "threads": {},
            "vcpus": {name.split()[1]: {"cpus": format_cpulist(cpus)} for name, cpus in before["affinity"].items()}}


# ---- IRQ affinity ------------------------------------------------------------------------------------------
IRQ_UNIT = "/etc/systemd/system/rt-tune-irq-affinity.service"
IRQ_UNIT_LINK = "/etc/systemd/system/multi-user.target.wants/rt-tune-irq-affinity.service"


@dataclass
class IrqAffinityChange(Change):
    """Move every movable device IRQ to the housekeeping CPUs (smp_affinity_list), now and at every boot (a
    oneshot unit of rt-tune's: /proc/irq settings do not survive the reboots of trial boots); rollback restores
    each IRQ and removes the unit."""

    housekeeping: list[int]
    kind: str = field(default="irq_affinity", init=False)

    def __post_init__(self) -> None:
        if not self.housekeeping:
            raise InputError("IRQ affinity needs at least one housekeeping CPU")
        self.change_id = "irq_affinity"

    def _want(self) -> str:
        return ",".join(str(c) for c in self.housekeeping)

    def _unit_bytes(self) -> bytes:
        return (
            "# rt-tune: irq_affinity change (removed when rt-tune rolls it back)\n"
            "[Unit]\nDescription=rt-tune: device IRQs to housekeeping CPUs " + self._want() + "\n"
            # after udev has probed every device present at boot: a driver that coldplug loads (virtio_net, a
            # NIC's) allocates its IRQs then, and an IRQ allocated after this unit ran would keep all CPUs
            "DefaultDependencies=no\nWants=systemd-udev-settle.service\n"
            "After=systemd-udev-settle.service local-fs.target\n\n"
            "[Service]\nType=oneshot\nRemainAfterExit=yes\n"
            "ExecStart=/bin/sh -c 'for f in /proc/irq/[0-9]*/smp_affinity_list; do "
            f"echo {self._want()} > \"$$f\" 2>/dev/null || true; done'\n\n"
            "[Install]\nWantedBy=multi-user.target\n"
        ).encode()

    def read(self, t: Transport) -> State:
        """Each IRQ's affinity, which ones the kernel refuses to move (per-CPU, managed, the timer): found by
        writing the current value back, which changes nothing for an IRQ that can move and fails for one that
        cannot; and rt-tune's boot-time unit."""
        script = ('for d in /proc/irq/[0-9]*; do f="$d/smp_affinity_list"; [ -r "$f" ] || continue; '
                  'cur=$(cat "$f"); if echo "$cur" > "$f" 2>/dev/null; then m=1; else m=0; fi; '
                  'printf "%s %s %s\\n" "${d##*/}" "$cur" "$m"; done; echo end')
        out = t.run(["sh", "-c", script], timeout_s=60).stdout.splitlines()
        if not out or out[-1] != "end":
            raise ChangeError(f"{t.label}: truncated IRQ listing")
        irqs, fixed = {}, []
        for line in out[:-1]:
            irq, cpus, movable = line.split(" ")
            irqs[irq] = cpus
            if movable != "1":
                fixed.append(irq)
        link = t.run(["sh", "-c", 'if [ -L "$1" ]; then readlink "$1"; fi', "-", IRQ_UNIT_LINK], timeout_s=30)
        return {"irqs": irqs, "fixed": sorted(fixed, key=int), "unit": _b64(read_optional(t, IRQ_UNIT)),
                "enabled": bool(link.stdout.strip())}

    def desired(self, before: State) -> State:
        want = self._want()
        return {"irqs": {irq: want for irq in before["irqs"] if irq not in before["fixed"]},
                "unit": _b64(self._unit_bytes()), "enabled": True}

    def in_place(self, live: State, desired: State) -> bool:
        """Every IRQ that exists and can move now is on the housekeeping CPUs. (After a reboot an IRQ may have
        become one the kernel manages, e.g. with isolcpus=managed_irq: that is the kernel's call, not drift.)"""
        fixed = set(live.get("fixed", []))
        irqs_ok = all(irq not in live["irqs"] or irq in fixed
                      or parse_cpu_list(live["irqs"][irq]) == parse_cpu_list(v)
                      for irq, v in desired["irqs"].items())
        persist_ok = "unit" not in desired or (live.get("unit") == desired["unit"]
                                               and live.get("enabled") == desired["enabled"])
        return irqs_ok and persist_ok

    def _move_irqs(self, t: Transport, before: State) -> None:
        movable = [irq for irq in before["irqs"] if irq not in before["fixed"]]
        script = 'want=$1; shift; for irq in "$@"; do echo "$want" > /proc/irq/"$irq"/smp_affinity_list; done'
        t.run(["sh", "-c", script, "-", self._want(), *movable], timeout_s=60)

    def apply(self, t: Transport, before: State) -> None:
        self._move_irqs(t, before)
        t.write_file(IRQ_UNIT, self._unit_bytes())
        t.run(["systemctl", "daemon-reload"], timeout_s=60)
        t.run(["systemctl", "enable", "rt-tune-irq-affinity.service"], timeout_s=60)

    def rollback(self, t: Transport, before: State) -> None:
        if not before.get("enabled"):
            t.run(["systemctl", "disable", "rt-tune-irq-affinity.service"], timeout_s=60, check=False)
        restore_file(t, IRQ_UNIT, _unb64(before.get("unit")))
        t.run(["systemctl", "daemon-reload"], timeout_s=60)
        self._restore_irqs(t, before)

    switch_keeps_persistence = True

    def switch(self, t: Transport, before: State, on: bool) -> None:
        """The IRQs' affinity only: the boot-time unit stays from the first apply to the decision (installing
        and removing it costs two systemd reloads each way) and acts only at boot."""
        if on:
            self._move_irqs(t, before)
        else:
            self._restore_irqs(t, before)

    def _restore_irqs(self, t: Transport, before: State) -> None:
        pairs = [f"{irq}={cpus}" for irq, cpus in sorted(before["irqs"].items())]
        script = ('for p in "$@"; do irq=${p%%=*}; cpus=${p#*=}; '
                  'echo "$cpus" > /proc/irq/"$irq"/smp_affinity_list 2>/dev/null || true; done')
        t.run(["sh", "-c", script, "-", *pairs], timeout_s=60)

    def verify_rolled_back(self, t: Transport, before: State) -> None:
        state = self.read(t)
        live, fixed = state["irqs"], set(state["fixed"])
        wrong = [i for i, v in before["irqs"].items()
                 if i in live and i not in fixed and parse_cpu_list(live[i]) != parse_cpu_list(v)]
        if wrong:
            raise ChangeError(f"{t.label}: IRQs {', '.join(wrong)} did not return to their previous affinity")
        if state["unit"] != before.get("unit") or state["enabled"] != bool(before.get("enabled")):
            raise ChangeError(f"{t.label}: {IRQ_UNIT} is not back to its previous state")

    def describe(self) -> str:
        return f"IRQ affinity -> housekeeping CPUs {','.join(map(str, self.housekeeping))}"
