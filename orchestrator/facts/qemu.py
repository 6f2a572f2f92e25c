"""QEMU processes on a host, their vCPU threads and where each runs."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from orchestrator.core.cpulist import (
    parse_kernel_cpulist as parse_cpu_list,  # for kernel output
)
from orchestrator.core.errors import ParseError
from orchestrator.core.validation import validation_problems
from orchestrator.facts.base import Fact
from orchestrator.remote.remote_scripts import PIN_VCPUS, load_script

# For every process whose /proc/PID/exe basename starts with qemu-system: a block
#   process PID / exe BASE64(path) / cmdline BASE64(NUL-separated argv) /
#   (task TID / Name:<TAB>comm / Cpus_allowed_list:<TAB>list)... / end
# and, after all blocks, a final `done` line.
# A process or task that exits while it is read is left out (a block is only printed once complete).
QEMU_SCRIPT = load_script("qemu_processes.sh")

_VCPU_COMM = re.compile(r"CPU (\d+)/([A-Za-z]+)")


class QemuThread(BaseModel):
    tid: int
    comm: str
    cpus_allowed: list[int]


class VcpuThread(QemuThread):
    """A vCPU thread, named `CPU <index>/<ACCEL>` by QEMU with -name ...,debug-threads=on."""

    index: int
    #: KVM, TCG, ...
    accel: str


class QemuProcess(BaseModel):
    pid: int
    exe: str
    argv: list[str]
    #: -name's guest name (the value before the first comma, or guest=NAME); None without -name.
    name: str | None
    debug_threads: bool
    #: Unix socket paths of QMP monitors (-qmp/-qmp-pretty unix:PATH, or -chardev socket + -mon mode=control).
    qmp_sockets: list[str]
    #: Affinity of the main thread (tid == pid).
    cpus_allowed: list[int]
    #: Sorted by vCPU index.
    vcpus: list[VcpuThread]
    #: Every other thread, the main thread included, by tid.
    other_threads: list[QemuThread]


def split_qemu_opts(value: str) -> list[str]:
    """QemuOpts 'a,b=c,,d' -> ['a', 'b=c,d'] (',,' is a literal comma)."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == ",":
            if value[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def _qemu_opts_dict(value: str, implied: str) -> dict[str, str]:
    opts: dict[str, str] = {}
    for i, part in enumerate(split_qemu_opts(value)):
        key, sep, val = part.partition("=")
        if not sep:
            if i == 0:
                opts[implied] = part
            else:
                opts[key] = "on"  # QemuOpts boolean shorthand
        else:
            opts[key] = val
    return opts


def _qemu_options(argv: list[str]) -> list[tuple[str, str]]:
    wanted = {"-name", "-qmp", "-qmp-pretty", "-chardev", "-mon"}
    found: list[tuple[str, str]] = []
    i = 1
    while i < len(argv):
        opt = argv[i]
        if opt.startswith("--"):
            opt = opt[1:]
        if opt in wanted and i + 1 < len(argv):
            found.append((opt, argv[i + 1]))
            i += 2
        else:
            i += 1
    return found


def _unescape_status_name(value: str) -> str:
    # /proc/PID/status escapes '\n' and '\\' in Name.
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


class QemuArgs(BaseModel):
    """What rt-tune needs from a QEMU command line."""

    name: str | None
    debug_threads: bool
    qmp_sockets: list[str]


def parse_qemu_argv(argv: list[str]) -> QemuArgs:
    """-name NAME[,debug-threads=on] (or guest=NAME), and QMP unix sockets from -qmp/-qmp-pretty unix:PATH,...
    or from -chardev socket,id=ID,path=PATH with -mon chardev=ID,mode=control (libvirt's form)."""
    name: str | None = None
    debug_threads = False
    qmp: list[str] = []
    chardevs: dict[str, str] = {}
    monitors: list[str] = []
    for opt, value in _qemu_options(argv):
        if opt == "-name":
            opts = _qemu_opts_dict(value, "guest")
            name = opts.get("guest")
            debug_threads = opts.get("debug-threads", "off") in ("on", "yes", "true", "y")
        elif opt in ("-qmp", "-qmp-pretty"):
            first = split_qemu_opts(value)[0]
            if first.startswith("unix:"):
                qmp.append(first[len("unix:") :])
        elif opt == "-chardev":
            opts = _qemu_opts_dict(value, "backend")
            if opts.get("backend") == "socket" and "id" in opts and "path" in opts:
                chardevs[opts["id"]] = opts["path"]
        elif opt == "-mon":
            opts = _qemu_opts_dict(value, "chardev")
            if opts.get("mode") == "control" and "chardev" in opts:
                monitors.append(opts["chardev"])
    qmp += [chardevs[m] for m in monitors if m in chardevs]
    return QemuArgs(name=name, debug_threads=debug_threads, qmp_sockets=qmp)


def _qemu_process(pid: int, exe: str, argv: list[str], tasks: list[QemuThread]) -> QemuProcess:
    args = parse_qemu_argv(argv)
    main = [t for t in tasks if t.tid == pid]
    if not main:
        raise ParseError(f"expected the main thread (tid {pid}) among the tasks of QEMU process {pid}")
    vcpus: list[VcpuThread] = []
    others: list[QemuThread] = []
    for t in tasks:
        m = _VCPU_COMM.fullmatch(t.comm)
        if m:
            vcpus.append(VcpuThread(**t.model_dump(), index=int(m.group(1)), accel=m.group(2)))
        else:
            others.append(t)
    return QemuProcess(
        pid=pid,
        exe=exe,
        argv=argv,
        name=args.name,
        debug_threads=args.debug_threads,
        qmp_sockets=args.qmp_sockets,
        cpus_allowed=main[0].cpus_allowed,
        vcpus=sorted(vcpus, key=lambda v: (v.index, v.tid)),
        other_threads=sorted(others, key=lambda t: t.tid),
    )


def _b64(what: str, value: str) -> str:
    try:
        return base64.b64decode(value, validate=True).decode("utf-8", "surrogateescape")
    except (binascii.Error, ValueError):
        raise ParseError(f"expected base64 {what}, got {value[:200]!r}") from None


def parse_qemu_processes(text: str) -> list[QemuProcess]:
    """Output of QEMU_SCRIPT (see there for the framing)."""
    if not text.endswith("done\n") or (len(text) > 5 and not text.endswith("\ndone\n")):
        raise ParseError(f"expected QEMU process blocks and a final `done` line, got {text[-200:]!r}")
    text = text[: -len("done\n")]
    procs: list[QemuProcess] = []
    block: dict[str, Any] | None = None
    task: dict[str, Any] | None = None

    def close_task() -> None:
        nonlocal task
        if task is not None:
            if block is None or "comm" not in task or "cpus" not in task:
                raise ParseError(f"expected Name: and Cpus_allowed_list: lines for task {task['tid']}")
            block["tasks"].append(QemuThread(tid=task["tid"], comm=task["comm"], cpus_allowed=task["cpus"]))
            task = None

    for line in text.splitlines():
        word, _, rest = line.partition(" ")
        if block is None:
            if word != "process" or not rest.isdigit():
                raise ParseError(f"expected `process PID`, got {line[:200]!r}")
            block = {"pid": int(rest), "tasks": []}
        elif word in ("exe", "cmdline") and "tasks" in block and not block["tasks"] and task is None:
            if word in block:
                raise ParseError(f"`{word}` appears twice for QEMU process {block['pid']}")
            block[word] = _b64(word, rest)
        elif word == "task":
            if "exe" not in block or "cmdline" not in block:
                raise ParseError(f"expected `exe` and `cmdline` before tasks of QEMU process {block['pid']}")
            close_task()
            if not rest.isdigit():
                raise ParseError(f"expected `task TID`, got {line[:200]!r}")
            task = {"tid": int(rest)}
        elif task is not None and line.startswith("Name:\t") and "comm" not in task:
            task["comm"] = _unescape_status_name(line[len("Name:\t") :])
        elif task is not None and line.startswith("Cpus_allowed_list:\t") and "cpus" not in task:
            task["cpus"] = parse_cpu_list(line[len("Cpus_allowed_list:\t") :])
        elif line == "end":
            close_task()
            if not block["tasks"]:
                raise ParseError(f"expected at least one task for QEMU process {block['pid']}")
            argv = block["cmdline"].split("\0")
            if argv and argv[-1] == "":
                argv.pop()
            if not argv:
                raise ParseError(f"expected a command line for QEMU process {block['pid']}")
            procs.append(_qemu_process(block["pid"], block["exe"], argv, block["tasks"]))
            block = None
        else:
            raise ParseError(f"unexpected line in QEMU process listing: {line[:200]!r}")
    if block is not None:
        raise ParseError(f"expected `end` after QEMU process {block['pid']} (truncated output)")
    return sorted(procs, key=lambda p: p.pid)


# Reading another user's /proc/PID/exe needs root.
QEMU_PROCESSES = Fact("qemu_processes", ("sh", "-c", QEMU_SCRIPT), parse_qemu_processes, sudo=True)


class ThreadPlacement(BaseModel):
    """Where one thread may run and how it is scheduled (`rt-tune-pin-vcpus --list`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    cpus: str  # the kernel's cpulist form, e.g. "0-1"
    policy: str  # other, fifo, rr, batch, idle, deadline (or the number of an unknown one)
    prio: int


class QemuThreadListing(BaseModel):
    """Every thread of one QEMU: the main thread, each vCPU by index, the others grouped by name (worker threads
    come and go; their name is what is stable). `via`: how vCPU threads were found (thread names with
    debug-threads, else QMP's query-cpus-fast). A thread that exited while listed is None."""

    model_config = ConfigDict(extra="forbid", strict=True)

    via: str
    main: ThreadPlacement | None
    vcpus: dict[str, ThreadPlacement | None]
    threads: dict[str, list[ThreadPlacement]]


def parse_thread_listing(text: str) -> dict[str, Any]:
    """The JSON line `rt-tune-pin-vcpus --list PID` prints last, checked, as the plain dict a change journals
    ({"main", "vcpus", "threads"})."""
    lines = text.strip().splitlines()
    if not lines:
        raise ParseError("expected the thread listing's JSON line, got no output")
    try:
        listing = QemuThreadListing.model_validate_json(lines[-1])
    except ValidationError as exc:
        raise ParseError(f"not a thread listing: {validation_problems(exc)}: {lines[-1][:200]!r}") from None
    if any(not v.isdigit() for v in listing.vcpus):
        raise ParseError(f"vCPU indexes must be numbers, got {sorted(listing.vcpus)}")
    dumped: dict[str, Any] = listing.model_dump(include={"main", "vcpus", "threads"})
    return dumped


def thread_listing_fact(pid: int) -> Fact[dict[str, Any]]:
    """QEMU process `pid`'s threads, by the same helper that pins them (run in memory: nothing installed)."""
    if pid <= 0:
        raise ParseError(f"not a process id: {pid}")
    return Fact(f"qemu_threads:{pid}", ("python3", "-c", PIN_VCPUS, "--list", str(pid)), parse_thread_listing)
