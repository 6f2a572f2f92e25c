"""Who holds a lock or a claim: host and pid, and whether that process is still alive."""

from __future__ import annotations

import os
import socket
from datetime import datetime


def this_host() -> str:
    return socket.gethostname()


def default_owner() -> str:
    """This process as a lock owner: "host:pid"."""
    return f"{this_host()}:{os.getpid()}"


def _parse_owner(owner: str) -> tuple[str, int | None]:
    host, sep, pid = owner.rpartition(":")
    if not sep or not pid.isdigit():
        return owner, None
    return host, int(pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    # a zombie (killed, not yet reaped by its parent) is gone for our purposes
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


def _pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (with the boot id), to detect a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rpartition(")")[2].split()
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        return f"{boot}:{fields[19]}"  # field 22 of stat; fields[0] is field 3
    except (OSError, IndexError):
        return None


def _when(t: float) -> str:
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _judge_owner(owner: str, owner_start: str | None) -> tuple[bool | None, str]:
    host, pid = _parse_owner(owner)
    if pid is None:
        return None, f"its owner {owner!r} is not host:pid, so whether it is stale is unknown"
    if host != this_host():
        return None, f"it is held from another host ({host}): whether it is stale cannot be told from here"
    if not _pid_alive(pid):
        return True, f"it looks stale: process {pid} is no longer running on this host"
    if owner_start is not None and _pid_start(pid) not in (None, owner_start):
        return True, f"it looks stale: process {pid} on this host is a different process now (pid reused)"
    return False, f"process {pid} is still running on this host"


def _owner_start(owner: str) -> str | None:
    """The owner's process start time if it runs on this host (to tell a reused pid later), else None."""
    host, pid = _parse_owner(owner)
    return _pid_start(pid) if pid is not None and host == this_host() and _pid_alive(pid) else None
