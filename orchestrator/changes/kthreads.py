"""Kernel threads' scheduling and CPUs by name pattern (tuned's scheduler plugin, for ksoftirqd/N, rcuc/N,
rcuop/N, ktimers/N, irq/N-name, kcompactd0 ...), now and at every boot.

A rule names threads by a shell-style pattern on their name (`ksoftirqd/*`) and sets any of: the policy and RT
priority (`fifo 2`, `other`), the CPUs (a CPU list; a per-CPU thread, which the kernel does not let move, keeps
its CPU and the plan says so). Later rules win for a thread several match. A pattern matching no thread on the
unit is reported in the plan, not an error. Persistence: a oneshot unit of rt-tune's runs a script at every boot
that applies the same rules by name (the threads' PIDs change with the boot); rollback puts each thread back
by PID as it was and removes both.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any

from orchestrator.changes.base import Change, ChangeError, Plan, State, b64, restore_file, unb64
from orchestrator.config.knobs import check_kthread_rule
from orchestrator.core.cpulist import format_cpulist, parse_kernel_cpulist
from orchestrator.core.errors import InputError
from orchestrator.facts.base import Fact, compound_fact, files_fact
from orchestrator.facts.kthreads import KTHREADS, Kthread
from orchestrator.facts.systemd import symlink_fact
from orchestrator.remote.transport import Transport

UNIT = "/etc/systemd/system/rt-tune-kthreads.service"
UNIT_LINK = "/etc/systemd/system/multi-user.target.wants/rt-tune-kthreads.service"
SCRIPT = "/usr/local/sbin/rt-tune-kthreads"

# The boot-time script: each rule a line "PATTERN POLICY PRIO CPUS" (- for unset), applied to every kernel
# thread (PPid 2) whose name matches, later rules last. Errors on one thread (it exited, it is per-CPU) are
# ignored: the unit must not fail the boot.
_BOOT_SCRIPT = """#!/bin/sh
# managed by rt-tune: kernel threads' policy, priority and CPUs (removed when rt-tune rolls it back)
apply() {
  for s in /proc/[0-9]*/status; do
    d=${s%/status}; name= ppid=
    while IFS=: read -r k v; do
      case $k in Name) name=${v#"${v%%[![:space:]]*}"};; PPid) ppid=${v#"${v%%[![:space:]]*}"};; esac
    done < "$s" 2>/dev/null
    [ "$ppid" = 2 ] || continue
    case $name in $1) ;; *) continue;; esac
    pid=${d#/proc/}
    [ "$2" = - ] || chrt -p "--$2" "$3" "$pid" >/dev/null 2>&1
    [ "$4" = - ] || taskset -pc "$4" "$pid" >/dev/null 2>&1
  done
}
"""


@dataclass(frozen=True)
class KthreadRule:
    match: str
    policy: str | None = None  # fifo, rr or other
    priority: int | None = None  # 1..99 with fifo/rr
    cpus: tuple[int, ...] | None = None

    def check(self) -> None:
        problem = check_kthread_rule({"match": self.match, "policy": self.policy, "priority": self.priority,
                                      "cpus": self.cpus})
        if problem:
            raise InputError(f"kthreads {self.match}: {problem}")
        if self.cpus is not None and not self.cpus:
            raise InputError(f"kthreads {self.match}: an empty CPU list")

    def want(self, k: Kthread) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.policy is not None:
            out["policy"], out["priority"] = self.policy, self.priority or 0
        if self.cpus is not None and k.movable:
            out["cpus"] = format_cpulist(list(self.cpus))
        return out


@dataclass
class KthreadsChange(Change):
    rules: list[KthreadRule]
    kind: str = field(default="kthreads", init=False)

    def __post_init__(self) -> None:
        if not self.rules:
            raise InputError("kthreads: no rule")
        for r in self.rules:
            r.check()
        self.change_id = "kthreads"

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> KthreadsChange:
        return cls([KthreadRule(r["match"], r.get("policy"), r.get("priority"),
                                tuple(r["cpus"]) if r.get("cpus") is not None else None)
                    for r in params.get("rules", [])])

    def read(self, t: Transport) -> State:
        return self.state_fact().gather(t, timeout_s=60)

    def state_fact(self) -> Fact[State]:
        """The threads, rt-tune's boot unit and script, and whether it is enabled: three commands, one fact."""
        files, link = files_fact(f"change:{self.change_id}:files", [UNIT, SCRIPT]), symlink_fact(UNIT_LINK)

        def combine(parts: dict[str, Any]) -> State:
            got = parts[files.name]
            return {"threads": {str(k.pid): k.model_dump() for k in parts[KTHREADS.name]},
                    "unit": b64(got[UNIT]), "script": b64(got[SCRIPT]), "enabled": parts[link.name] is not None}

        return compound_fact(f"change:{self.change_id}", [KTHREADS, files, link], combine)

    def _wanted(self, threads: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """PID -> the policy/priority/cpus each matched thread should have (later rules win)."""
        out: dict[str, dict[str, Any]] = {}
        for pid, k in threads.items():
            for r in self.rules:
                if fnmatch.fnmatchcase(k["comm"], r.match):
                    out.setdefault(pid, {}).update(r.want(Kthread(**k)))
        return {pid: w for pid, w in out.items() if w}

    def plan_from(self, before: State) -> Plan:
        """The plan; a rule whose pattern matches no thread here is named in its summary (not an error)."""
        plan = super().plan_from(before)
        missing = self.unmatched(before)
        if not missing:
            return plan
        return dataclasses.replace(plan, summary=f"{plan.summary} (no thread here matches {', '.join(missing)})")

    def unmatched(self, before: State) -> list[str]:
        names = [k["comm"] for k in before["threads"].values()]
        return [r.match for r in self.rules if not any(fnmatch.fnmatchcase(n, r.match) for n in names)]

    def _script_bytes(self) -> bytes:
        lines = [_BOOT_SCRIPT]
        for r in self.rules:
            cpus = format_cpulist(list(r.cpus)) if r.cpus is not None else "-"
            lines.append(f"apply '{r.match}' {r.policy or '-'} {r.priority or 0} {cpus}\n")
        return "".join(lines).encode()

    def _unit_bytes(self) -> bytes:
        return ("# rt-tune: kthreads change (removed when rt-tune rolls it back)\n"
                "[Unit]\nDescription=rt-tune: kernel threads' policy and CPUs\nDefaultDependencies=no\n"
                "After=local-fs.target\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\n"
                f"ExecStart={SCRIPT}\n\n[Install]\nWantedBy=multi-user.target\n").encode()

    def desired(self, before: State) -> State:
        return {"threads": self._wanted(before["threads"]), "unit": b64(self._unit_bytes()),
                "script": b64(self._script_bytes()), "enabled": True}

    def in_place(self, live: State, desired: State) -> bool:
        """Every thread the rules match now has what they say (matched by name: PIDs change with each boot,
        and a thread that exited is no longer held to anything), and rt-tune's files are in place."""
        for pid, want in self._wanted(live["threads"]).items():
            k = live["threads"][pid]
            if "policy" in want and (k["policy"], k["priority"]) != (want["policy"], want["priority"]):
                return False
            if "cpus" in want and parse_kernel_cpulist(k["cpus"]) != parse_kernel_cpulist(want["cpus"]):
                return False
        return all(live.get(key) == desired[key] for key in ("unit", "script", "enabled"))

    def _set(self, t: Transport, threads: dict[str, dict[str, Any]], names: dict[str, str]) -> None:
        command = _set_command(threads, names)
        if command:
            t.run(list(command), timeout_s=60)

    def _apply_rules(self, t: Transport, threads: dict[str, dict[str, Any]]) -> None:
        self._set(t, self._wanted(threads), {pid: k["comm"] for pid, k in threads.items()})

    def apply(self, t: Transport, before: State) -> None:
        self._apply_rules(t, before["threads"])
        t.write_file(SCRIPT, self._script_bytes(), mode=0o755)
        t.write_file(UNIT, self._unit_bytes())
        # `enable` reloads systemd's configuration itself (systemctl(1), --no-reload): no daemon-reload first
        t.run(["systemctl", "enable", "--quiet", "rt-tune-kthreads.service"], timeout_s=60)

    def _as_before(self, live: dict[str, dict[str, Any]], before: State) -> dict[str, dict[str, Any]]:
        """PID (live) -> the settings its thread had before, found by name (PIDs change with each boot): for
        every live thread the rules match."""
        by_name: dict[str, dict[str, Any]] = {}
        for k in before["threads"].values():
            by_name.setdefault(k["comm"], k)
        out: dict[str, dict[str, Any]] = {}
        for pid, w in self._wanted(live).items():
            b = by_name.get(live[pid]["comm"])
            if b is not None:
                out[pid] = {key: b[key] for key in ("policy", "priority", "cpus")
                            if key in w or (key == "priority" and "policy" in w)}
        return out

    def _restore_threads(self, t: Transport, before: State) -> None:
        live = {str(k.pid): k.model_dump() for k in KTHREADS.gather(t, timeout_s=60)}
        self._set(t, self._as_before(live, before), {pid: k["comm"] for pid, k in live.items()})

    def rollback(self, t: Transport, before: State) -> None:
        if not before.get("enabled"):
            t.run(["systemctl", "disable", "--quiet", "rt-tune-kthreads.service"], timeout_s=60, check=False)
        restore_file(t, UNIT, unb64(before.get("unit")))
        restore_file(t, SCRIPT, unb64(before.get("script")), mode=0o755)
        t.run(["systemctl", "daemon-reload"], timeout_s=60)
        self._restore_threads(t, before)

    switch_keeps_persistence = True

    def switch_command(self, before: State, on: bool) -> tuple[str, ...]:
        """The threads only (the boot-time unit acts at the next boot), those read before the change: kernel
        threads of these names live as long as their CPU, and each PID is checked against its name."""
        threads = before["threads"]
        names = {pid: k["comm"] for pid, k in threads.items()}
        return _set_command(self._wanted(threads) if on else self._as_before(threads, before), names)

    def verify_rolled_back(self, t: Transport, before: State) -> None:
        live = self.read(t)
        restored = self._as_before(live["threads"], before)
        wrong = [f"{live['threads'][pid]['comm']} ({pid})" for pid, b in restored.items()
                 if any(live["threads"][pid][key] != b[key] for key in b)]
        if wrong or any(live.get(key) != before.get(key) for key in ("unit", "script")):
            raise ChangeError(f"{t.label}: {self.describe()}: rollback did not restore "
                              + (", ".join(wrong) if wrong else f"{UNIT} and {SCRIPT}"))

    def describe(self) -> str:
        parts = []
        for r in self.rules:
            what = [f"{r.policy}{f' {r.priority}' if r.priority else ''}" if r.policy else "",
                    f"CPUs {format_cpulist(list(r.cpus))}" if r.cpus is not None else ""]
            parts.append(f"{r.match} -> {', '.join(w for w in what if w)}")
        return "kernel threads: " + "; ".join(parts)


_SET_SCRIPT = ('while [ $# -ge 5 ]; do n=$(cat /proc/$1/comm 2>/dev/null); [ "$n" = "$2" ] && { '
               '[ "$3" = - ] || chrt -p "--$3" "$4" "$1" >/dev/null || exit 1; '
               '[ "$5" = - ] || taskset -pc "$5" "$1" >/dev/null || exit 1; }; shift 5; done')


def _set_command(threads: dict[str, dict[str, Any]], names: dict[str, str]) -> tuple[str, ...]:
    """chrt and taskset for each PID whose name is still `names[pid]` (a PID reused by another thread is left
    alone; a thread that exited is skipped): one command for all (empty: nothing to set)."""
    args: list[str] = []
    for pid, w in sorted(threads.items(), key=lambda kv: int(kv[0])):
        args += [pid, names[pid], w.get("policy", "-"), str(w.get("priority", 0)), w.get("cpus", "-")]
    return ("sh", "-c", _SET_SCRIPT, "-", *args) if args else ()
