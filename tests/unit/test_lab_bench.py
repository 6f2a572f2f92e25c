"""benchmarks/lab_bench.py's idle-CPU figure reads a QEMU process's CPU time from /proc/PID/stat."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.lab_bench import cpu_seconds

pytestmark = pytest.mark.unit


def test_cpu_seconds_of_a_real_process_match_what_the_kernel_reports_to_it():
    """A child burns CPU, then reports its own os.times(); the stat line read just before it exits agrees."""
    code = ("import os, sys, time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass\n"
            "t = os.times(); print(t.user + t.system, flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        reported = float(child.stdout.readline())
        time.sleep(0.05)
        stat = Path(f"/proc/{child.pid}/stat").read_text()
    finally:
        child.communicate("")
    seconds = cpu_seconds(stat, os.sysconf("SC_CLK_TCK"))
    assert reported >= 0.5 and abs(seconds - reported) <= 0.05, (seconds, reported)


def test_a_command_name_with_spaces_and_parentheses_does_not_shift_the_fields():
    line = Path("/proc/self/stat").read_text()
    tail = line.rsplit(")", 1)[1]
    hostile = f"1234 (CPU 0/KVM) (x){tail}"
    assert cpu_seconds(hostile, 100) == cpu_seconds(line, 100)
