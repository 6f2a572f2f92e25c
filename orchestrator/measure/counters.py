"""Mechanism counters read around every cyclictest run: what the kernel counted on the target (and, for a guest,
on its host) while the run lasted.

A measurement run (runner.py, remote/scripts/measure_run.sh) snapshots the counters in its one round trip right
before cyclictest starts (after the load settled) and right after it ends. The interval is /proc/uptime's (to
0.01 s) and includes systemd-run starting and collecting cyclictest's unit (tens of ms on the lab guest): the
rates are over slightly more than cyclictest's `-D`, the same way for every run. `read_counters(transport)` takes one
snapshot alone, in one round trip, with the same script and parser: the engine calls it on the HOST of a guest
target right before and right after the guest's run, for the KVM per-VM counters and the vCPU threads:

    before = read_counters(host, tids=vcpu_tids)
    result = measure(guest, settings, load, target=..., artifacts=...)   # result.counters: the guest's deltas
    after = read_counters(host, tids=vcpu_tids)
    host_deltas = counter_deltas(before, after)                          # kvm:..., thread:..., irq:... of the host

Counter keys (flat strings; `:cpu<N>` last when the count is per CPU; width: where the kernel wraps it):

- `irq:<NAME>:cpu<N>` (32 bit): the /proc/interrupts row NAME as printed (`LOC`, `RES`, `CAL`, `TLB`, `IWI`,
  `IPI0`..`IPI7`, or the IRQ number `27`) on CPU N; `irq:<NAME>` for rows with one total (`ERR`, `MIS`).
- `softirq:<NAME>:cpu<N>` (32 bit): /proc/softirqs (`TIMER`, `SCHED`, `RCU`, `HRTIMER`, `NET_RX`, ...).
- `cputime:<FIELD>:cpu<N>` (64 bit): /proc/stat's per-CPU ticks (USER_HZ; `user`, `system`, `idle`, `iowait`,
  `irq`, `softirq`, `steal`, ...).
- `ctxt`, `processes` (64 bit): /proc/stat's context switches (all CPUs) and forks since boot.
- `kvm:<VM>:<COUNTER>` (64 bit): /sys/kernel/debug/kvm/<pid>-<fd>/COUNTER, every file there holding a whole
  number (`exits`, `wfi_exit_stat`, `wfe_exit_stat`, `halt_wakeup`, `halt_successful_poll`, ...: the names as
  that kernel has them). VM is QEMU's `-name` (`rtguest`), or `<pid>-<fd>` without one; two VMs of one name are
  `<name>@<pid>-<fd>`. Read where the VMs run: on a host (root only: debugfs).
- `thread:<TID>:<COUNTER>` (64 bit): a thread asked for by TID (the vCPU threads of a QEMU):
  `voluntary_ctxt_switches`, `nonvoluntary_ctxt_switches` (/proc/TID/status, every kernel), `nr_switches`,
  `nr_voluntary_switches`, `nr_involuntary_switches`, `nr_migrations` (/proc/TID/sched: CONFIG_SCHED_DEBUG,
  which Debian's 6.1 and 6.12 have).
- `sysreg:<TID>:<REGISTER>` (64 bit): system-register accesses of thread TID that trapped to KVM, by register
  (`ICC_SGI1R_EL1`: the guest sent an IPI; other GIC CPU-interface registers by name or as `S3_0_C12_C<m>_<n>`),
  counted by a hist trigger on the host's `kvm:kvm_sys_access` tracepoint (arm64) in a private tracefs instance:
  `read_counters(sysreg="start")` creates it (every count is 0 then), `read_counters(sysreg="stop")` reads and
  removes it. The hist lists only what was hit, so a missing key between the two reads of one instance is 0, and
  the IPI registers of each thread read (`tids`) are always there. A snapshot with another instance (or none)
  makes the keys `reset`; a hist that dropped events gives no keys (`absent`).

Per key, `CounterDeltas` holds the count over the interval (`deltas`) or why there is none (`issues`):
`reset` (a reboot between the reads: the boot_id changed; or the VM or thread behind the key is another one: its
debugfs directory or thread name changed), `wrapped` (a 32-bit count went down without a reboot: it passed 2^32),
`backwards` (a 64-bit count went down without a reboot: e.g. /proc/stat's iowait on nohz kernels), `absent` (read
at one end only: an IRQ registered during the run, a CPU gone offline, a thread that exited, a section that did
not parse). A key read at neither end does not exist (that kernel does not have it). Nothing of this becomes a
negative or a zero count: `rate` returns None with the reason.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.core.errors import ParseError, TuneError
from orchestrator.facts.base import parse_boot_id
from orchestrator.facts.counters import (
    parse_proc_stat,
    parse_softirqs,
    parse_task_counters,
    parse_uptime,
)
from orchestrator.facts.irqs import parse_interrupts
from orchestrator.facts.kvm import SGI_SYSREGS, parse_hist, parse_kvm_vms, sysreg_traps
from orchestrator.remote.remote_scripts import MEASURE_RUN
from orchestrator.remote.transport import Transport

#: The sections of one snapshot, each named with the snapshot's suffix (0 before the run, 1 after).
SNAPSHOT_SECTIONS = ("uptime", "boot_id", "interrupts", "softirqs", "stat", "kvm", "threads")
#: Sections a snapshot has only when asked for (the system-register traps: `read_counters(sysreg=...)`).
OPTIONAL_SECTIONS = ("sysreg",)
#: Key prefixes whose counts the kernel keeps in 32 bits (they wrap at 2^32).
BITS32_PREFIXES = ("irq:", "softirq:")
#: Key prefixes counted per CPU (their keys end with `:cpu<N>`).
PER_CPU_PREFIXES = ("irq", "softirq", "cputime")
#: Every key prefix (the first field of a key).
PREFIXES = (*PER_CPU_PREFIXES, "ctxt", "processes", "kvm", "thread", "sysreg")
#: Thread counters asked for when a listed thread was not found (so a pattern on them sees it `absent`).
THREAD_COUNTERS = ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches", "nr_switches", "nr_voluntary_switches",
                   "nr_involuntary_switches", "nr_migrations")

IssueStatus = Literal["reset", "wrapped", "backwards", "absent"]
_CPU_SUFFIX = re.compile(r"(.*):cpu(\d+)")


def marker() -> str:
    """A fresh section marker for one round trip (never in the counters' own text)."""
    return "@@rt-tune-ctr-" + secrets.token_hex(8)


def split_key(key: str) -> tuple[str, int | None]:
    """`irq:IPI1:cpu3` -> (`irq:IPI1`, 3); `ctxt` -> (`ctxt`, None)."""
    m = _CPU_SUFFIX.fullmatch(key)
    return (m.group(1), int(m.group(2))) if m else (key, None)


def counter_bits(key: str) -> int:
    return 32 if key.startswith(BITS32_PREFIXES) else 64


class CounterSnapshot(BaseModel):
    """One read of the counters, parsed: flat keys (module docstring) -> counts as read."""

    model_config = ConfigDict(extra="forbid")

    boot_id: str | None
    #: seconds since boot (/proc/uptime), the clock of the interval between two snapshots
    uptime_s: float | None
    counters: dict[str, int]
    #: what a key's counts belong to: `kvm:<VM>` -> its debugfs directory `<pid>-<fd>`, `thread:<TID>` -> the
    #: thread's name (None: the thread was not there); a change between two reads is a `reset` of its keys
    identities: dict[str, str | None] = Field(default_factory=dict)
    #: numbered IRQs -> the handlers /proc/interrupts names for them ("27" -> ["kvm guest vtimer"]), so a caller can
    #: find e.g. arm64's local timer (`arch_timer`), which has a number, not a name
    irq_actions: dict[str, list[str]] = Field(default_factory=dict)
    #: section -> why it was not read (a parse error, or empty: not readable on this unit)
    errors: dict[str, str] = Field(default_factory=dict)
    #: the snapshot's text as the unit printed it (kept as an artifact, not in the JSON)
    raw: str = Field(default="", exclude=True, repr=False)


def split_sections(text: str, mark: str) -> tuple[str, dict[str, str]]:
    """(text before the first section, section name -> its text) of the script's `\\n<mark> NAME\\n` sections. A
    section's text is exactly what was printed in it (the marker line's leading newline is the marker's own)."""
    parts = re.split(rf"\n{re.escape(mark)} (\S+)\n", text)
    return parts[0], dict(zip(parts[1::2], parts[2::2], strict=True))


def _kvm_keys(text: str) -> tuple[dict[str, int], dict[str, str | None]]:
    vms = parse_kvm_vms(text)
    names = [vm.name for vm in vms.values()]
    counters: dict[str, int] = {}
    identities: dict[str, str | None] = {}
    for vm in vms.values():
        label = vm.vm if vm.name == "-" else vm.name if names.count(vm.name) == 1 else f"{vm.name}@{vm.vm}"
        identities[f"kvm:{label}"] = vm.vm
        counters.update({f"kvm:{label}:{name}": value for name, value in vm.counters.items()})
    return counters, identities


def parse_snapshot(sections: dict[str, str], suffix: str = "0", raw: str = "") -> CounterSnapshot:
    """One snapshot from the script's sections NAME+suffix. A section that is missing, empty or does not parse
    is named in `errors` and gives no keys (its keys are then `absent` in a delta): one kernel's odd file never
    costs the other counters."""
    errors: dict[str, str] = {}
    counters: dict[str, int] = {}
    identities: dict[str, str | None] = {}
    actions: dict[str, list[str]] = {}
    boot_id: str | None = None
    uptime: float | None = None

    def text_of(name: str, may_be_empty: bool = False) -> str | None:
        text = sections.get(name + suffix)
        if text is None:
            errors[name] = "not in the output"
        elif not text.strip() and not may_be_empty:
            errors[name] = "empty (not readable on this unit)"
        else:
            return text
        return None

    for name in (*SNAPSHOT_SECTIONS, *OPTIONAL_SECTIONS):
        if name in OPTIONAL_SECTIONS and name + suffix not in sections:
            continue
        text = text_of(name, may_be_empty=name in ("kvm", "threads"))
        if text is None:
            continue
        try:
            if name == "uptime":
                uptime = parse_uptime(text)
            elif name == "boot_id":
                boot_id = parse_boot_id(text)
            elif name == "interrupts":
                for irq in parse_interrupts(text):
                    if irq.per_cpu:
                        counters.update({f"irq:{irq.irq}:cpu{cpu}": n
                                         for cpu, n in zip(irq.cpus, irq.per_cpu_counts, strict=True)})
                    else:
                        counters[f"irq:{irq.irq}"] = irq.total
                    if irq.actions:
                        actions[irq.irq] = irq.actions
            elif name == "softirqs":
                for softirq, per_cpu in parse_softirqs(text).items():
                    counters.update({f"softirq:{softirq}:cpu{cpu}": n for cpu, n in per_cpu.items()})
            elif name == "stat":
                stat = parse_proc_stat(text)
                counters.update(stat.events)
                for cpu, fields in stat.cputime.items():
                    counters.update({f"cputime:{field}:cpu{cpu}": n for field, n in fields.items()})
            elif name == "kvm":
                kvm, ids = _kvm_keys(text)
                counters.update(kvm)
                identities.update(ids)
            elif name == "threads":
                for tid, task in parse_task_counters(text).items():
                    identities[f"thread:{tid}"] = task.name
                    counters.update({f"thread:{tid}:{c}": n for c, n in task.counters.items()})
            else:
                instance, traps = parse_sysreg_section(text)
                identities["sysreg"] = instance
                tids = [int(who.split(":")[1]) for who in identities if who.startswith("thread:")]
                counters.update({f"sysreg:{tid}:{reg}": 0 for tid in tids for reg in SGI_SYSREGS})
                counters.update({f"sysreg:{tid}:{reg}": n for (tid, reg), n in traps.items()})
        except ParseError as exc:
            errors[name] = str(exc)
    return CounterSnapshot(boot_id=boot_id, uptime_s=uptime, counters=counters, identities=identities,
                           irq_actions=actions, errors=errors, raw=raw)


def parse_sysreg_section(text: str) -> tuple[str, dict[tuple[int, str], int]]:
    """measure_run.sh's `sysreg` section -> (the tracefs instance, (thread id, register) -> traps): `started INST`
    (no traps yet) or `instance INST` and its hist. ParseError with the script's reason when there is no count
    (`none no kvm:kvm_sys_access tracepoint`: not an arm64 KVM host), when the hist dropped events, or when the
    text is neither."""
    lines = [ln for ln in text.split("\n") if ln.strip() and not ln.startswith("stale ")]
    head = lines[0].split(" ", 1) if lines else ["", ""]
    if head[0] == "none":
        raise ParseError(head[1] if len(head) > 1 else "no system-register counts")
    if head[0] == "started" and len(head) == 2 and len(lines) == 1:
        return head[1], {}
    if head[0] == "instance" and len(head) == 2:
        body = [ln for ln in lines[1:] if ln != "not-removed"]
        hist = parse_hist("\n".join(body))
        if hist.dropped:
            raise ParseError(f"the hist dropped {hist.dropped} events (its counts are short)")
        return head[1], sysreg_traps(hist)
    raise ParseError(f"expected `started INST` or `instance INST` and a hist, got {text.strip()[:160]!r}")


class CounterIssue(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: IssueStatus
    reason: str


class CounterDeltas(BaseModel):
    """Per counter key, its count over the interval between two snapshots, or the issue that leaves it without
    one (module docstring). Stored on LatencyResult.counters for the run's own target."""

    model_config = ConfigDict(extra="forbid")

    #: seconds between the two reads (/proc/uptime); None when the boot changed or the uptime was not read
    interval_s: float | None
    boot_id_before: str | None
    boot_id_after: str | None
    #: key -> after - before (>= 0)
    deltas: dict[str, int]
    #: key -> why it has no delta
    issues: dict[str, CounterIssue] = Field(default_factory=dict)
    #: sections not read at either end, and other remarks on the whole pair of reads
    notes: list[str] = Field(default_factory=list)
    #: numbered IRQ -> its handlers, as in the later snapshot (see CounterSnapshot.irq_actions)
    irq_actions: dict[str, list[str]] = Field(default_factory=dict)

    def status(self, key: str) -> str:
        """`ok`, an issue's status, or `unknown` (no such key)."""
        return "ok" if key in self.deltas else self.issues[key].status if key in self.issues else "unknown"


def _owner(key: str) -> str | None:
    """The identity a key's counts belong to (`kvm:<VM>`, `thread:<TID>`), if any."""
    if key.startswith(("kvm:", "thread:")):
        return key.rsplit(":", 1)[0]
    return "sysreg" if key.startswith("sysreg:") else None


def counter_deltas(before: CounterSnapshot, after: CounterSnapshot) -> CounterDeltas:
    """The counts between two snapshots of one unit, every key checked (module docstring)."""
    deltas: dict[str, int] = {}
    issues: dict[str, CounterIssue] = {}
    notes = [f"{section} {when}: {why}" for when, snap in (("before", before), ("after", after))
             for section, why in sorted(snap.errors.items())]
    interval: float | None = None
    up0, up1 = before.uptime_s, after.uptime_s
    if before.boot_id is not None and after.boot_id is not None:
        reboot = f"boot_id {before.boot_id} -> {after.boot_id}" if before.boot_id != after.boot_id else None
    else:  # only the uptime can tell: it goes back at a reboot (unless the second boot ran longer than the first)
        reboot = f"uptime {up0} -> {up1}" if up0 is not None and up1 is not None and up1 < up0 else None
        if reboot is None:
            notes.append("boot_id not read at both ends: a reboot between the reads is ruled out by the uptime only")
    rebooted = reboot is not None
    if rebooted:
        notes.append(f"rebooted between the reads ({reboot})")
    elif up0 is not None and up1 is not None:
        if up1 > up0:
            interval = round(up1 - up0, 2)
        else:
            notes.append(f"uptime did not advance ({up0} -> {up1})")
    # threads asked for but not there: their counters are absent, so a pattern over them does not skip them
    expected: dict[str, list[str]] = {}
    for snap in (before, after):
        for who, name in snap.identities.items():
            if who.startswith("thread:") and name is None:
                expected[who] = [f"{who}:{c}" for c in THREAD_COUNTERS]
    keys = set(before.counters) | set(after.counters) | {k for ks in expected.values() for k in ks}
    # one hist instance at both reads: a key it does not list at one read was not hit (0)
    one_hist = before.identities.get("sysreg") is not None and \
        before.identities.get("sysreg") == after.identities.get("sysreg")
    for key in sorted(keys):
        b, a = before.counters.get(key), after.counters.get(key)
        if one_hist and key.startswith("sysreg:") and not (b is None and a is None):
            b, a = b or 0, a or 0
        owner = _owner(key)
        if rebooted:
            issues[key] = CounterIssue(status="reset", reason=f"rebooted between the reads ({reboot})")
        elif b is None or a is None:
            section = _section_of(key)
            snap_missing = before if b is None else after
            why = snap_missing.errors.get(section)
            if owner and owner.startswith("thread:") and snap_missing.identities.get(owner, "") is None:
                why = "the thread was not there"
            when = "before or after" if a is None and b is None else "before" if b is None else "after"
            issues[key] = CounterIssue(status="absent", reason=f"not read {when} the run"
                                                               + (f" ({why})" if why else ""))
        elif owner and before.identities.get(owner) != after.identities.get(owner):
            issues[key] = CounterIssue(status="reset", reason=f"{owner} is another one after the run "
                                       f"({before.identities.get(owner)} -> {after.identities.get(owner)})")
        elif a >= b:
            deltas[key] = a - b
        elif counter_bits(key) == 32 and b < 2**32:
            issues[key] = CounterIssue(status="wrapped", reason=f"{b} -> {a}: the 32-bit count passed 2^32 "
                                       f"(+{(a - b) % 2**32} if it wrapped once)")
        else:
            issues[key] = CounterIssue(status="backwards", reason=f"{b} -> {a} without a reboot")
    return CounterDeltas(interval_s=interval, boot_id_before=before.boot_id, boot_id_after=after.boot_id,
                         deltas=deltas, issues=issues, notes=notes,
                         irq_actions=after.irq_actions or before.irq_actions)


def _section_of(key: str) -> str:
    prefix = key.split(":", 1)[0]
    return {"irq": "interrupts", "softirq": "softirqs", "cputime": "stat", "ctxt": "stat", "processes": "stat",
            "kvm": "kvm", "thread": "threads", "sysreg": "sysreg"}.get(prefix, prefix)


# --------------------------------------------------------------------------------------------------------
# The selector a decision reads


class Rate(BaseModel):
    """Counts per second of the keys a pattern selects, or None with the reason."""

    model_config = ConfigDict(extra="forbid")

    value: float | None
    #: the keys summed (or that would have been)
    keys: list[str]
    total: int | None
    interval_s: float | None
    reason: str | None = None


def _patterns(counters: str | Iterable[str]) -> list[str]:
    items = counters.split(",") if isinstance(counters, str) else list(counters)
    return [p.strip() for p in items if p.strip()]


def rate_of(deltas: CounterDeltas, counters: str | Iterable[str], cpus: Sequence[int] | None = None) -> Rate:
    """Sum of the deltas of the keys whose name without `:cpu<N>` matches one of `counters` (fnmatch patterns,
    a list or comma-separated: `irq:CAL,irq:IPI1`, `kvm:*:wfi_exit_stat`, `irq:[0-9]*`), on `cpus` (None: every
    CPU, and keys that are not per CPU), divided by the interval. None, with the reason, when nothing matches,
    a CPU asked for has no matching key, any matching key has an issue (reset, wrapped, backwards, absent), or the
    interval is unknown."""
    patterns = _patterns(counters)
    want = None if cpus is None else set(cpus)
    matched: list[str] = []
    seen_cpus: set[int] = set()
    for key in sorted({*deltas.deltas, *deltas.issues}):
        base, cpu = split_key(key)
        if not any(fnmatchcase(base, p) for p in patterns):
            continue
        if want is not None and (cpu is None or cpu not in want):
            continue
        matched.append(key)
        if cpu is not None:
            seen_cpus.add(cpu)

    def none(reason: str, total: int | None = None) -> Rate:
        return Rate(value=None, keys=matched, total=total, interval_s=deltas.interval_s, reason=reason)

    what = ",".join(patterns) + ("" if want is None else f" on CPU {','.join(map(str, sorted(want)))}")
    if not matched:
        return none(f"no counter matches {what}")
    if want is not None and want - seen_cpus:
        return none(f"no counter matches {','.join(patterns)} on CPU "
                    f"{','.join(map(str, sorted(want - seen_cpus)))}")
    bad = [k for k in matched if k in deltas.issues]
    if bad:
        shown = "; ".join(f"{k}: {deltas.issues[k].status} ({deltas.issues[k].reason})" for k in bad[:3])
        return none(f"{len(bad)} of the {len(matched)} counters of {what} have no count: {shown}"
                    + (" ..." if len(bad) > 3 else ""))
    total = sum(deltas.deltas[k] for k in matched)
    if not deltas.interval_s:
        return none("no interval: " + ("; ".join(deltas.notes) or "uptime not read"), total)
    return Rate(value=total / deltas.interval_s, keys=matched, total=total, interval_s=deltas.interval_s)


def rate(deltas: CounterDeltas, counters: str | Iterable[str], cpus: Sequence[int] | None = None) -> float | None:
    """Counts per second of the matching keys (see `rate_of`, which also says why when this is None)."""
    return rate_of(deltas, counters, cpus).value


# --------------------------------------------------------------------------------------------------------
# One snapshot alone (the host of a guest target, before and after the guest's run)


SysregStep = tuple[Literal["start", "stop"], str]


def sysreg_instance() -> str:
    """A fresh name for the tracefs instance that counts one run's system-register traps."""
    return "rt-tune-sysreg-" + secrets.token_hex(6)


def counters_argv(mark: str, tids: Sequence[int] = (), sysreg: SysregStep | None = None) -> list[str]:
    """measure_run.sh with no tools, no load and no command: it reads the counters once (`sysreg`: and starts
    or stops counting system-register traps in the named instance)."""
    step = "-"
    if sysreg is not None:
        mode, inst = sysreg
        if mode not in ("start", "stop") or not re.fullmatch(r"rt-tune-sysreg-[0-9a-f]{1,32}", inst):
            raise ValueError(f"a sysreg step is ('start' or 'stop', 'rt-tune-sysreg-<hex>'), not {sysreg!r}")
        step = f"{mode}:{inst}"
    return ["sh", "-c", MEASURE_RUN, "-", mark, "0", "0", "0", "-", str(len(tids)), step, *map(str, _tids(tids))]


def _tids(tids: Sequence[int]) -> list[int]:
    out = list(tids)
    for t in out:
        if type(t) is not int or t < 1:
            raise ValueError(f"a thread id is a positive integer, not {t!r}")
    return out


def parse_counters_output(text: str, mark: str, label: str = "unit") -> CounterSnapshot:
    """The output of `counters_argv(mark)` (tests: a recorded one) -> the snapshot."""
    parts = text.split("@@\n", 3)
    if len(parts) != 4:
        raise TuneError(f"{label}: unexpected output reading the counters: {text[-300:]!r}")
    _, sections = split_sections(parts[3], mark)
    if "end" not in sections:
        raise TuneError(f"{label}: the counters' output is cut (no end marker): {text[-300:]!r}")
    return parse_snapshot(sections, "0", raw=parts[3])


def read_counters(transport: Transport, tids: Sequence[int] = (), *, sysreg: SysregStep | None = None,
                  timeout_s: float = 30.0) -> CounterSnapshot:
    """One snapshot of the unit's counters in one round trip (run as the transport's default user: KVM debugfs
    and tracefs need root, so on a host reached as a user with `become`, sudo applies). `tids`: threads (e.g. the
    vCPU threads of a QEMU, facts/qemu.py) whose scheduling counters to read. `sysreg`: ("start", INSTANCE) before
    a run, ("stop", INSTANCE) after it: the system-register traps (module docstring). The raw text is
    `snapshot.raw`."""
    mark = marker()
    res = transport.run(counters_argv(mark, tids, sysreg), timeout_s=timeout_s, check=False)
    if res.exit_status != 0:
        raise TuneError(f"{transport.label}: reading the counters failed (exit {res.exit_status}): "
                        f"{(res.stderr or res.stdout)[-300:]!r}")
    return parse_counters_output(res.stdout, mark, transport.label)
