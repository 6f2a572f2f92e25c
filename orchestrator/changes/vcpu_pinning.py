"""The vCPU map: each RT vCPU thread of a QEMU alone on its host CPU, every other QEMU thread on the housekeeping
CPUs, now and at every restart of the QEMU service."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from orchestrator.changes.base import Change, ChangeError, Plan, State, b64, restore_file, unb64
from orchestrator.config.profile import describe_vcpu_map
from orchestrator.core.cpulist import format_cpulist
from orchestrator.core.cpulist import parse_kernel_cpulist as parse_cpu_list
from orchestrator.core.errors import InputError
from orchestrator.core.names import check_unit_name  # whole-string, systemd's rules
from orchestrator.remote.transport import Transport, read_files

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
        return {"threads": self._threads(t), "dropin": b64(files[self.dropin]),
                "script": b64(files[PIN_SCRIPT]), "qa_copy": b64(files[QA_COPY]),
                "unit_has_qemu_affinity": has_tool}

    def desired(self, before: State) -> State:
        qa = before["qa_copy"] if before["unit_has_qemu_affinity"] else b64(qemu_affinity_source())
        return {"map": {str(v): c for v, c in self.vcpus.items()}, "housekeeping": self.housekeeping,
                "rt_priority": self.rt_priority, "dropin": b64(self._dropin_bytes()),
                "script": b64(PIN_SCRIPT_BODY.encode()), "qa_copy": qa}

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

        restore_file(t, self.dropin, unb64(before["dropin"]))
        restore_file(t, PIN_SCRIPT, unb64(before["script"]), mode=0o755)
        restore_file(t, QA_COPY, unb64(before["qa_copy"]))
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
        threads: dict[str, Any] = before["threads"]
        return threads
    return {"main": None, "threads": {},
            "vcpus": {name.split()[1]: {"cpus": format_cpulist(cpus)} for name, cpus in before["affinity"].items()}}
