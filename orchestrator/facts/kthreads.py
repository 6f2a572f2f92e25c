"""Kernel threads: each one's name, scheduling policy and priority, allowed CPUs, and whether it may be moved.

Two reads in one command, no process per thread: every process's status lines (Name, PPid, Cpus_allowed_list)
and every /proc/PID/stat line; kernel threads are kthreadd (PID 2) and its children. A thread with
PF_NO_SETAFFINITY (per-CPU threads such as ksoftirqd/N) cannot be moved: `movable` says so.
"""

from __future__ import annotations

from pydantic import BaseModel

from orchestrator.core.errors import ParseError
from orchestrator.facts.base import Fact

KTHREADS_SCRIPT = ("grep -s -H -E '^(Name|PPid|Cpus_allowed_list):' /proc/[0-9]*/status; echo '@@ stat'; "
                   "cat /proc/[0-9]*/stat 2>/dev/null; true")

#: /proc/PID/stat policy numbers (sched.h) and the names rt-tune uses
POLICIES = {0: "other", 1: "fifo", 2: "rr", 3: "batch", 5: "idle", 6: "deadline"}
PF_NO_SETAFFINITY = 0x04000000


class Kthread(BaseModel):
    pid: int
    comm: str
    policy: str  # other, fifo, rr, batch, idle, deadline
    priority: int  # the RT priority (0 for the non-RT policies)
    cpus: str  # Cpus_allowed_list as the kernel prints it
    movable: bool  # False: PF_NO_SETAFFINITY (a per-CPU thread)


def parse_kthreads(text: str) -> list[Kthread]:
    """KTHREADS_SCRIPT's output -> the kernel threads, by PID. Processes that exit between the two reads are
    left out (a line of one read without the other)."""
    status_part, sep, stat_part = text.partition("@@ stat\n")
    if not sep:
        raise ParseError(f"expected the '@@ stat' separator, got {text[:200]!r}")
    status: dict[int, dict[str, str]] = {}
    for line in status_part.splitlines():
        # /proc/123/status:Name:\tksoftirqd/0
        path, _, rest = line.partition(":")
        key, _, value = rest.partition(":")
        parts = path.split("/")
        if len(parts) != 4 or not parts[2].isdigit() or key not in ("Name", "PPid", "Cpus_allowed_list"):
            raise ParseError(f"unexpected status line {line[:200]!r}")
        status.setdefault(int(parts[2]), {})[key] = value.strip()
    out = []
    for line in stat_part.splitlines():
        if not line.strip():
            continue
        head, close, tail = line.rpartition(")")
        pid_text, _, comm = head.partition(" (")
        fields = tail.split()
        if not close or not pid_text.isdigit() or len(fields) < 39:
            raise ParseError(f"unexpected /proc/PID/stat line {line[:200]!r}")
        pid = int(pid_text)
        st = status.get(pid)
        if st is None or "PPid" not in st or "Cpus_allowed_list" not in st:
            continue  # exited between the reads
        if pid != 2 and st["PPid"] != "2":
            continue  # not a kernel thread
        flags, rt_priority, policy = int(fields[6]), int(fields[37]), int(fields[38])
        out.append(Kthread(pid=pid, comm=comm, policy=POLICIES.get(policy, str(policy)), priority=rt_priority,
                           cpus=st["Cpus_allowed_list"], movable=not flags & PF_NO_SETAFFINITY))
    return sorted(out, key=lambda k: k.pid)


KTHREADS = Fact("kthreads", ("sh", "-c", KTHREADS_SCRIPT), parse_kthreads)
