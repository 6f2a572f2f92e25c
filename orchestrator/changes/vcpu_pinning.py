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
from orchestrator.facts.base import program_fact
from orchestrator.facts.qemu import thread_listing_fact
from orchestrator.facts.systemd import unit_state_fact
from orchestrator.remote.remote_scripts import PIN_SCRIPT, PIN_VCPUS, QA_COPY
from orchestrator.remote.transport import Transport, read_files


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
        pid = unit_state_fact(self.service).gather(t).main_pid
        if pid is None:
            raise ChangeError(f"{t.label}: {self.service} is not running (no main process); nothing to pin")
        return str(pid)

    def _threads(self, t: Transport) -> dict[str, Any]:
        """Every thread's affinity and policy: the main thread, vCPUs by index, the others grouped by name
        (worker threads come and go; their name is what is stable). Read-only."""
        pid = self._main_pid(t)
        listing = thread_listing_fact(int(pid)).gather(t, timeout_s=60)
        if not listing.get("vcpus"):
            raise ChangeError(f"{t.label}: no vCPU threads found in {self.service} (pid {pid})")
        return listing

    def read(self, t: Transport) -> State:
        has_tool = program_fact("qemu-affinity").gather(t)
        files = read_files(t, [self.dropin, PIN_SCRIPT, QA_COPY])
        return {"threads": self._threads(t), "dropin": b64(files[self.dropin]),
                "script": b64(files[PIN_SCRIPT]), "qa_copy": b64(files[QA_COPY]),
                "unit_has_qemu_affinity": has_tool}

    def desired(self, before: State) -> State:
        qa = before["qa_copy"] if before["unit_has_qemu_affinity"] else b64(qemu_affinity_source())
        return {"map": {str(v): c for v, c in self.vcpus.items()}, "housekeeping": self.housekeeping,
                "rt_priority": self.rt_priority, "dropin": b64(self._dropin_bytes()),
                "script": b64(PIN_VCPUS.encode()), "qa_copy": qa}

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

    def verify(self, t: Transport, plan: Plan, live: State | None = None) -> State:
        if live is None:
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
        t.write_file(PIN_SCRIPT, PIN_VCPUS.encode(), mode=0o755)
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
        t.run(["python3", "-c", PIN_VCPUS, "--restore", self._main_pid(t),
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
            t.run(["python3", "-c", PIN_VCPUS, "--restore", self._main_pid(t),
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
