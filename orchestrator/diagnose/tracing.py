"""The diagnosis trace, parsed and aggregated: who sends IPIs to which CPU and why, which cross-call callbacks
run where, which timers fire where, why the tick did not stop, and what ran on each CPU.

Input is the text of a tracefs `trace` file (tracepoint lines and, on kernels without the csd/ipi send events,
function-tracer lines `func <-parent`). Pure functions, tested on traces recorded from the lab's kernels.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator

from pydantic import BaseModel

from orchestrator.core.cpulist import cpus_of_mask
from orchestrator.core.cpulist import parse_kernel_cpulist as parse_cpu_list
from orchestrator.core.errors import ParseError
from orchestrator.diagnose.probe import CALLBACK_FUNCTIONS, SEND_FUNCTIONS

# `<comm>-<pid> [<cpu>] <flags> <ts>: <rest>`; comm may hold spaces and dashes ("CPU 0/KVM-325").
_LINE = re.compile(r"\s*(?P<comm>.*)-(?P<pid>\d+)\s+(?:\(\s*[\d-]+\)\s+)?\[(?P<cpu>\d{3,})\]\s+"
                   r"(?:(?P<flags>[a-zA-Z.0-9]{4,6})\s+)?(?P<ts>\d+\.\d+):\s(?P<rest>.*)")
_EVENT = re.compile(r"(?P<event>[a-z_0-9]+): ?(?P<args>.*)")
_FUNC = re.compile(r"(?P<func>[\w.$]+) <-(?P<parent>[\w.$]+)")
_LOST = re.compile(r"CPU:(\d+) \[LOST (\d+) EVENTS\]")

#: The functions that deliver cross-calls on the receiving CPU: a callback whose parent is one of these ran
#: because of an IPI (x86 `__sysvec_call_function_single`, generic `__flush_smp_call_function_queue`).
IPI_ENTRY_PARENTS = frozenset({"__flush_smp_call_function_queue", "flush_smp_call_function_queue",
                               "generic_smp_call_function_single_interrupt", "__sysvec_call_function_single",
                               "__sysvec_call_function", "do_handle_IPI", "ipi_handler", "smp_ipi_demux"})


class TraceRecord(BaseModel):
    comm: str
    pid: int
    cpu: int
    ts: float
    event: str  # tracepoint name, or "function" for function-tracer lines
    args: str  # the event's printed arguments; for "function": "func <-parent"


def strip_offset(symbol: str) -> str:
    """`kick_all_cpus_sync+0x20/0x48` -> `kick_all_cpus_sync`; `0x0` (no callback: a reschedule IPI) -> `-`."""
    symbol = symbol.strip().rstrip(",")
    if re.fullmatch(r"0x0+|\(null\)|0", symbol):
        return "-"
    return symbol.split("+", 1)[0]


def parse_trace(text: str) -> tuple[list[TraceRecord], dict[int, int]]:
    """The trace file -> records and lost events per CPU (`CPU:N [LOST M EVENTS]`). Comment lines are skipped;
    any other line that is not a trace record is an error (a format this parser does not know)."""
    records: list[TraceRecord] = []
    lost: Counter[int] = Counter()
    for line in text.split("\n"):
        if not line.strip() or line.startswith("#"):
            continue
        m = _LOST.fullmatch(line.strip())
        if m:
            lost[int(m.group(1))] += int(m.group(2))
            continue
        m = _LINE.fullmatch(line)
        if not m:
            raise ParseError(f"expected a trace line `TASK-PID [CPU] FLAGS TS: EVENT: ARGS`, got {line[:200]!r}")
        rest = m.group("rest")
        f = _FUNC.fullmatch(rest)
        e = _EVENT.fullmatch(rest) if f is None else None
        if f is not None:
            event, args = "function", rest
        elif e is not None:
            event, args = e.group("event"), e.group("args")
        else:
            raise ParseError(f"expected `EVENT: ARGS` or `FUNC <-PARENT` in a trace line, got {line[:200]!r}")
        records.append(TraceRecord(comm=m.group("comm").strip(), pid=int(m.group("pid")), cpu=int(m.group("cpu")),
                                   ts=float(m.group("ts")), event=event, args=args))
    return records, dict(lost)


def fields(args: str) -> dict[str, str]:
    """`cpu=1 callsite=x+0x1/0x2 callback=0x0` -> dict; values end at the next ` key=` (cpumask lists too)."""
    out: dict[str, str] = {}
    for m in re.finditer(r"(?:^|\s)([a-z_]+)=(.*?)(?=,?\s+[a-z_]+=|$)", args):
        out[m.group(1)] = m.group(2).rstrip(",")
    return out


class IpiSend(BaseModel):
    """IPIs to one target CPU from one sender (task on a CPU) for one reason, counted over the window."""

    target_cpu: int
    callback: str  # the cross-call function ("do_nothing"), "-" for a plain reschedule/kick IPI
    callsite: str  # the kernel function that sent it ("kick_all_cpus_sync", "ttwu_queue_wakelist")
    sender: str  # comm of the task that sent it
    sender_cpu: int
    count: int


class CallbackRun(BaseModel):
    """A cross-call callback that ran on a CPU: from csd:csd_function_entry, or the function tracer."""

    cpu: int
    function: str
    via: str  # "csd" (csd_function_entry), or the function tracer's parent ("__flush_smp_call_function_queue")
    from_ipi: bool  # ran because of an IPI (not the sender running it locally)
    count: int
    interrupted: str  # the task it interrupted most often on that CPU


class SendCall(BaseModel):
    """Function tracer fallback: a cross-call send path entered by a task (target CPUs are not in this data)."""

    cpu: int
    function: str
    caller: str
    sender: str
    count: int


class TimerFire(BaseModel):
    cpu: int
    function: str
    kind: str  # "hrtimer" or "timer"
    count: int


class TickStop(BaseModel):
    """timer:tick_stop on a CPU: the tick stopped (`dependency=NONE`) or why it could not (SCHED, POSIX_TIMER,
    PERF_EVENTS, RCU, CLOCK_UNSTABLE, RCU_EXP)."""

    cpu: int
    success: bool
    dependency: str
    count: int


class TaskRun(BaseModel):
    cpu: int
    comm: str
    pid: int
    switches_in: int


class TraceSummary(BaseModel):
    records: int
    lost: dict[int, int]
    sources: list[str]  # which data the summary rests on: "ipi_send", "ipi_raise", "csd", "function", ...
    ipi_sends: list[IpiSend]
    callbacks: list[CallbackRun]
    send_calls: list[SendCall]
    timers: list[TimerFire]
    tick_stops: list[TickStop]
    tasks: list[TaskRun]


def _count(keys: Iterable[tuple]) -> Iterator[tuple[tuple, int]]:
    return iter(Counter(keys).most_common())


def summarize_trace(records: list[TraceRecord], lost: dict[int, int]) -> TraceSummary:
    """Aggregate the records per target CPU (IPI sends), per running CPU (callbacks, timers, ticks, tasks)."""
    sends: list[tuple] = []
    cb: list[tuple] = []
    interrupted: dict[tuple[int, str], Counter[str]] = {}
    send_calls: list[tuple] = []
    timers: list[tuple] = []
    ticks: list[tuple] = []
    tasks: list[tuple] = []
    sources: set[str] = set()
    for r in records:
        if r.event in ("ipi_send_cpu", "ipi_send_cpumask"):
            f = fields(r.args)
            targets = [int(f["cpu"])] if r.event == "ipi_send_cpu" else parse_cpu_list(f.get("cpumask", ""))
            for cpu in targets:
                sends.append((cpu, strip_offset(f.get("callback", "-")), strip_offset(f.get("callsite", "-")),
                              r.comm, r.cpu))
            sources.add("ipi_send")
        elif r.event == "ipi_raise":
            m = re.fullmatch(r"target_mask=([0-9a-f,]+) \((.*)\)", r.args)
            if not m:
                raise ParseError(f"expected `target_mask=HEX (reason)` in ipi_raise, got {r.args[:200]!r}")
            for cpu in cpus_of_mask(m.group(1)) or []:  # `00000000,00000002` -> [1]
                sends.append((cpu, m.group(2), "-", r.comm, r.cpu))
            sources.add("ipi_raise")
        elif r.event == "csd_function_entry":
            f = fields(r.args)
            func = strip_offset(f.get("func", "?"))
            # csd=0: the kernel ran the function locally (csd_do_func(func, info, NULL)), not from an IPI
            cb.append((r.cpu, func, "csd", not re.fullmatch(r"0+", f.get("csd", "").removeprefix("0x"))))
            interrupted.setdefault((r.cpu, func), Counter())[r.comm] += 1
            sources.add("csd")
        elif r.event == "function":
            m = _FUNC.fullmatch(r.args)
            assert m is not None
            func, parent = m.group("func"), m.group("parent")
            if func in CALLBACK_FUNCTIONS:
                cb.append((r.cpu, func, parent, parent in IPI_ENTRY_PARENTS))
                interrupted.setdefault((r.cpu, func), Counter())[r.comm] += 1
            elif func in SEND_FUNCTIONS:
                send_calls.append((r.cpu, func, parent, r.comm))
            sources.add("function")
        elif r.event in ("hrtimer_expire_entry", "timer_expire_entry"):
            func = strip_offset(fields(r.args).get("function", "?"))
            timers.append((r.cpu, func, "hrtimer" if r.event.startswith("hr") else "timer"))
            sources.add("timers")
        elif r.event == "tick_stop":
            f = fields(r.args)
            ticks.append((r.cpu, f.get("success") == "1", f.get("dependency", "?")))
            sources.add("tick_stop")
        elif r.event == "sched_switch":
            m = re.search(r"==> next_comm=(.*) next_pid=(\d+) next_prio=", r.args)
            if not m:
                raise ParseError(f"expected `==> next_comm=... next_pid=N` in sched_switch, got {r.args[:200]!r}")
            tasks.append((r.cpu, m.group(1), int(m.group(2))))
            sources.add("sched_switch")
    return TraceSummary(
        records=len(records), lost=lost, sources=sorted(sources),
        ipi_sends=[IpiSend(target_cpu=k[0], callback=k[1], callsite=k[2], sender=k[3], sender_cpu=k[4], count=n)
                   for k, n in _count(sends)],
        callbacks=[CallbackRun(cpu=k[0], function=k[1], via=k[2], from_ipi=k[3], count=n,
                               interrupted=interrupted[(k[0], k[1])].most_common(1)[0][0])
                   for k, n in _count(cb)],
        send_calls=[SendCall(cpu=k[0], function=k[1], caller=k[2], sender=k[3], count=n)
                    for k, n in _count(send_calls)],
        timers=[TimerFire(cpu=k[0], function=k[1], kind=k[2], count=n) for k, n in _count(timers)],
        tick_stops=[TickStop(cpu=k[0], success=k[1], dependency=k[2], count=n) for k, n in _count(ticks)],
        tasks=[TaskRun(cpu=k[0], comm=k[1], pid=k[2], switches_in=n) for k, n in _count(tasks) if k[2] != 0])
