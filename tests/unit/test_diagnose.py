"""`tune diagnose`: the window's framing, the kernel/systemd/trace parsers and the analysis, on windows
recorded from the lab (tests/recorded/diagnose/, written by record.py with the argv `tune diagnose` runs).

Every parser input is a recorded file, a section of one, or a line taken from one. Error cases start from a
real line or section and break it in one stated way (cut short, a character dropped, a column shifted); the
comment at each one says what was changed. Expected values were read from the recordings (the /proc/interrupts
rows, the `cpu: N` blocks of timer_list, the `runnable tasks:` tables of sched/debug, the KVM counters, the
decoded trace), never from the code under test.

The four recordings:
- x86-guest: Linux 6.1 x86 guest (function-tracer fallback, no ipi/csd send events), crash-looping
  mirobot_teleoperate.service;
- x86-guest-nohz-busy: the same guest booted with nohz_full=1 and two busy `sh` loops (PIDs 360, 362) on
  CPU 1;
- arm64-host: Linux 6.12 arm64 host (ipi/csd tracepoints) running the nested VM "rtguest" (WFI exit counters);
- arm64-guest: that nested guest: kick_all_cpus_sync IPIs sent while systemd-coredump handles the crashes.
"""

from __future__ import annotations

import base64
import functools
import gzip
import os
import re
import secrets
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from orchestrator.core.errors import InputError, ParseError
from orchestrator.diagnose import tracing
from orchestrator.diagnose.analysis import analyse, state_differences, tracing_state_notes
from orchestrator.diagnose.findings import findings
from orchestrator.diagnose.kstate import (
    SchedTask,
    ServiceState,
    VmCounters,
    parse_kvm_vms,
    parse_sched_debug,
    parse_service_states,
    parse_timer_list,
)
from orchestrator.diagnose.model import CrashLoop, TargetDiagnosis
from orchestrator.diagnose.probe import (
    BUFFER_KB,
    CLEANUP_SCRIPT,
    EVENTS,
    FALLBACK_FUNCTIONS,
    STATE_FILES,
    STOP_SLEEP,
    WINDOW_SCRIPT,
    cleanup_argv,
    decode_trace,
    new_instance_name,
    parse_tracing_state,
    split_sections,
    window_argv,
)
from orchestrator.diagnose.tracing import (
    CallbackRun,
    IpiSend,
    SendCall,
    TaskRun,
    TickStop,
    TimerFire,
    TraceRecord,
    fields,
    parse_trace,
    strip_offset,
    summarize_trace,
)
from orchestrator.diagnose.window import MAX_DURATION_S, parse_duration, rt_hints_from_vars
from orchestrator.facts.systemd import parse_coredumps

pytestmark = pytest.mark.unit

REC = Path(__file__).resolve().parents[1] / "recorded" / "diagnose"
PREFIXES = ("x86-guest", "x86-guest-nohz-busy", "arm64-host", "arm64-guest", "arm64-host-6.1")
CRASH_UNIT = "mirobot_teleoperate.service"

#: The window script's sections, in the order it prints them (every recording has all of them).
SECTIONS = ["meta", "uptime0", "interrupts0", "units0", "kvm0", "setup", "uptime1", "interrupts1", "units1",
            "kvm1", "timer_list", "sched_debug", "nohz_full", "isolated", "online", "timer_migration",
            "cmdline", "coredumps", "trace_stats", "trace", "end"]

#: `meta` of each recording (uname -r, uname -m).
KERNELS = {"x86-guest": ("6.1.0-50-amd64", "x86_64"),
           "x86-guest-nohz-busy": ("6.1.0-50-amd64", "x86_64"),
           "arm64-host": ("6.12.95+deb12-arm64", "aarch64"),
           "arm64-guest": ("6.12.95+deb12-arm64", "aarch64"),
           "arm64-host-6.1": ("6.1.0-50-arm64", "aarch64")}

#: /proc/uptime before and after the window (the `uptime0`/`uptime1` sections).
UPTIMES = {"x86-guest": ("38.08 27.23", "59.60 53.31"), "x86-guest-nohz-busy": ("46.45 16.34", "69.63 23.93"),
           "arm64-host": ("232.72 81.80", "246.34 94.57"), "arm64-guest": ("162.95 113.47", "177.43 132.27"),
           "arm64-host-6.1": ("165.37 87.69", "193.52 109.82")}

#: The UTC time each window was recorded: the latest COREDUMP_TIMESTAMP of its `coredumps` section plus a
#: minute (checked by test_now_is_the_last_core_dump_plus_a_minute). The arm64 host had no core dumps; it was
#: recorded in the same lab session just before its guest, so it uses the guest's time (nothing of it depends
#: on the time).
NOW = {"x86-guest": datetime(2026, 11, 30, 1, 4, 59, tzinfo=UTC),
       "x86-guest-nohz-busy": datetime(2026, 11, 30, 1, 7, 55, tzinfo=UTC),
       "arm64-guest": datetime(2026, 11, 30, 1, 1, 19, tzinfo=UTC)}
NOW["arm64-host"] = NOW["arm64-guest"]
NOW["arm64-host-6.1"] = datetime(2026, 11, 30, 3, 5, 25, tzinfo=UTC)  # recorded 03:05 UTC; no core dumps


def _read(prefix: str, part: str) -> str:
    return (REC / f"{prefix}-{part}.txt").read_text()


def _marker(prefix: str) -> str:
    return _read(prefix, "marker").strip()


@functools.cache
def _window(prefix: str) -> str:
    return _read(prefix, "window")


@functools.cache
def _sections_cached(prefix: str) -> dict[str, str]:
    return split_sections(_window(prefix), _marker(prefix))


def _sections(prefix: str) -> dict[str, str]:
    return dict(_sections_cached(prefix))  # a copy: tests may derive variants


@functools.cache
def _trace(prefix: str) -> str:
    return decode_trace(_sections_cached(prefix)["trace"])


@functools.cache
def _summary(prefix: str) -> tracing.TraceSummary:
    return summarize_trace(*parse_trace(_trace(prefix)))


def _line(text: str, pattern: str) -> str:
    """The first line of recorded text that matches `pattern` (a real line, for deriving variants)."""
    for line in text.split("\n"):
        if re.search(pattern, line):
            return line
    raise AssertionError(f"no line matching {pattern!r} in the recording")


def _trace_stats_entries(prefix: str) -> int:
    """The `entries:` of every CPU in the trace_stats section: what the instance's buffer held."""
    stats = _sections_cached(prefix)["trace_stats"]
    return sum(int(n) for n in re.findall(r"^entries: (\d+)$", stats, re.MULTILINE))


def _state(prefix: str, which: str) -> dict[str, str]:
    return parse_tracing_state(_read(prefix, f"state-{which}"))


@functools.cache
def _analysed(prefix: str, target: str | None = None, rt_hint: tuple[int, ...] = (),
              now: datetime | None = None) -> TargetDiagnosis:
    return analyse(_sections(prefix), target=target or ("host" if "-host" in prefix else "guest"),
                   label=prefix, rt_hint=list(rt_hint), state_before=_state(prefix, "before"),
                   state_after=_state(prefix, "after"), now=now or NOW[prefix])


def _kinds(d: TargetDiagnosis) -> list[str]:
    return [f.kind for f in d.findings]


# --------------------------------------------------------------------------------------------------------
# split_sections: the window's framed output


@pytest.mark.parametrize("prefix", PREFIXES)
def test_split_sections_finds_every_section_in_order(prefix):
    sections = split_sections(_window(prefix), _marker(prefix))
    assert list(sections) == SECTIONS
    kernel, arch = KERNELS[prefix]
    assert sections["meta"] == f"kernel {kernel}\narch {arch}\ntracefs /sys/kernel/tracing\n"
    assert sections["uptime0"] == UPTIMES[prefix][0] + "\n"
    assert sections["uptime1"] == UPTIMES[prefix][1] + "\n"
    assert sections["online"] == "0-1\n"
    assert sections["timer_migration"] == "1\n"
    assert sections["end"] == ""
    assert sections["trace"].startswith("H4sI")  # gzip magic, base64'ed
    assert sections["timer_list"].startswith("Timer List Version:")
    assert sections["sched_debug"].startswith("Sched Debug Version:")


def test_split_sections_keeps_each_body_raw():
    s = _sections("x86-guest-nohz-busy")
    assert s["nohz_full"] == "1\n"
    assert s["isolated"] == "\n"
    assert s["cmdline"].endswith(" panic=10 nohz_full=1\n")
    assert s["kvm0"] == "" and s["kvm1"] == ""
    assert _sections("arm64-host")["kvm0"].startswith("vm 316-10 qemu-system-aar rtguest,debug-threads=on\n")


@pytest.mark.parametrize("prefix", PREFIXES)
def test_split_sections_refuses_output_cut_short(prefix):
    text, marker = _window(prefix), _marker(prefix)
    end = f"\n{marker} end\n"
    assert text.endswith(end)
    with pytest.raises(ParseError, match="no `end` section: it was cut short"):
        split_sections(text[: -len(end)], marker)  # the recorded output without its final `end` section
    cut = text[: text.index(f"\n{marker} timer_list\n")]  # cut off in the middle, after kvm1
    with pytest.raises(ParseError, match="cut short"):
        split_sections(cut, marker)


def test_split_sections_refuses_output_before_the_first_marker():
    text, marker = _window("x86-guest"), _marker("x86-guest")
    stray = _line(text, r"^kernel ")  # a real line of the recording, printed before the first section
    with pytest.raises(ParseError, match="unexpected output before the first section"):
        split_sections(stray + "\n" + text, marker)


def test_split_sections_refuses_a_duplicated_section():
    text, marker = _window("arm64-guest"), _marker("arm64-guest")
    s = _sections("arm64-guest")
    block = f"\n{marker} uptime1\n{s['uptime1']}"
    assert block in text
    with pytest.raises(ParseError, match="unexpected section header 'uptime1'"):
        split_sections(text.replace(block, block + block, 1), marker)  # the recorded uptime1 section twice


def test_split_sections_with_another_windows_marker_is_an_error():
    # the x86 window split with the arm64 host's marker: no section found, everything is "before the first"
    with pytest.raises(ParseError, match="before the first section"):
        split_sections(_window("x86-guest"), _marker("arm64-host"))


# --------------------------------------------------------------------------------------------------------
# decode_trace


@pytest.mark.parametrize(("prefix", "tracer"), [("x86-guest", "function"),
                                                ("x86-guest-nohz-busy", "function"),
                                                ("arm64-host", "nop"), ("arm64-guest", "nop")])
def test_decode_trace_gives_the_instance_trace_file(prefix, tracer):
    text = decode_trace(_sections_cached(prefix)["trace"])
    lines = text.split("\n")
    assert lines[0] == f"# tracer: {tracer}"
    # x86-guest 1710+1548, nohz-busy 4875+6129, arm64 host 3822+4501, arm64 guest 2250+1894
    n = _trace_stats_entries(prefix)
    assert lines[2] == f"# entries-in-buffer/entries-written: {n}/{n}   #P:2"
    assert len([x for x in lines if x and not x.startswith("#")]) == n


def _blob() -> str:
    return _sections_cached("arm64-guest")["trace"].strip()


@pytest.mark.parametrize("corrupt", [
    pytest.param(lambda b: b[: len(b) // 2 // 4 * 4], id="truncated-on-a-base64-boundary"),  # gzip stream cut
    pytest.param(lambda b: b[:-1], id="last-character-dropped"),  # not a multiple of 4 base64 characters
    pytest.param(lambda b: b[:40] + "*" + b[41:], id="non-base64-character"),
    pytest.param(lambda b: b[:2000] + ("A" if b[2000] != "A" else "B") + b[2001:],
                 id="one-character-changed"),
    # the recorded trace_stats section, base64'ed but not gzip'ed
    pytest.param(lambda b: base64.b64encode(_sections_cached("arm64-guest")["trace_stats"].encode()).decode(),
                 id="base64-of-plain-text"),
])
def test_decode_trace_refuses_a_corrupted_blob(corrupt):
    with pytest.raises(ParseError, match=r"not gzip\+base64"):
        decode_trace(corrupt(_blob()))


def test_decode_trace_round_trips_the_recorded_blob():
    # the blob is exactly gzip(trace) base64'ed: re-encoding the decoded text decodes to the same text
    text = decode_trace(_blob())
    assert decode_trace(base64.b64encode(gzip.compress(text.encode())).decode()) == text


# --------------------------------------------------------------------------------------------------------
# parse_tracing_state, tracing_state_notes, state_differences


def test_parse_tracing_state_x86_before_and_after():
    before, after = _state("x86-guest", "before"), _state("x86-guest", "after")
    assert set(before) == {"tracefs", *STATE_FILES, "instances", "filters", "triggers"}
    assert before["tracefs"] == "/sys/kernel/tracing"
    assert before["current_tracer"] == "nop"
    assert before["tracing_on"] == "1"
    assert before["buffer_size_kb"] == "7 (expanded: 1408)"
    assert after["buffer_size_kb"] == "1410"
    assert before["trace_clock"] == "local [global] counter uptime perf mono mono_raw boot tai x86-tsc"
    assert before["tracing_cpumask"] == "3"
    assert before["set_ftrace_filter"] == "1218747745-32"
    assert before["instances"] == ""  # `@@ instances ` with no instance
    assert {k: v for k, v in before.items() if k != "buffer_size_kb"} == \
        {k: v for k, v in after.items() if k != "buffer_size_kb"}


@pytest.mark.parametrize("prefix", ["arm64-host", "arm64-guest"])
def test_parse_tracing_state_arm64_unchanged(prefix):
    before, after = _state(prefix, "before"), _state(prefix, "after")
    assert before == after
    assert before["buffer_size_kb"] == "7 (expanded: 1408)"  # 6.12 leaves the top-level buffer alone
    assert before["trace_clock"] == "[local] global counter uptime perf mono mono_raw boot tai"


def test_parse_tracing_state_errors():
    text = _read("x86-guest", "state-after")
    assert text.endswith("\nend\n")
    with pytest.raises(ParseError, match="to end with `end`"):
        parse_tracing_state(text[: -len("end\n")])  # the recorded probe output without its final `end`
    with pytest.raises(ParseError, match="expected `tracefs PATH` first"):
        parse_tracing_state(text.split("\n", 1)[1])  # without its first line
    line = _line(text, r"^@@ current_tracer ")
    with pytest.raises(ParseError, match="unexpected line"):
        parse_tracing_state(text.replace(line, line.removeprefix("@@ ")))  # a line lost its `@@ `
    line = _line(text, r"^@@ instances")
    with pytest.raises(ParseError, match="`@@ instances` line"):
        parse_tracing_state(text.replace(line + "\n", ""))  # the instances line dropped


@pytest.mark.parametrize("prefix", ["x86-guest", "x86-guest-nohz-busy"])
def test_x86_deferred_buffer_allocation_is_a_note_not_a_difference(prefix):
    before, after = _state(prefix, "before"), _state(prefix, "after")
    notes = tracing_state_notes(before, after)
    assert len(notes) == 1
    assert notes[0].startswith("top-level buffer_size_kb '7 (expanded: 1408)' -> '1410': ")
    assert "(1410 KB per CPU)" in notes[0]
    assert state_differences(before, after) == []


@pytest.mark.parametrize("prefix", ["arm64-host", "arm64-guest"])
def test_arm64_state_no_notes_no_differences(prefix):
    before, after = _state(prefix, "before"), _state(prefix, "after")
    assert tracing_state_notes(before, after) == []
    assert state_differences(before, after) == []


def _derived_after(prefix: str, old: str, new: str) -> dict[str, str]:
    text = _read(prefix, "state-after")
    assert old in text
    return parse_tracing_state(text.replace(old, new, 1))


def test_state_difference_current_tracer_named():
    before = _state("x86-guest", "before")
    after = _derived_after("x86-guest", "@@ current_tracer nop\n", "@@ current_tracer function\n")  # derived
    assert state_differences(before, after) == ["current_tracer: 'nop' -> 'function'"]
    assert len(tracing_state_notes(before, after)) == 1  # the buffer allocation is still only a note


def test_state_difference_stuck_unallocated_buffer_is_not_excused():
    # derived: the top-level buffer marked expanded without being allocated (resizing before enabling events)
    before = _state("x86-guest", "before")
    after = _derived_after("x86-guest", "@@ buffer_size_kb 1410\n", "@@ buffer_size_kb 7\n")
    assert tracing_state_notes(before, after) == []
    assert state_differences(before, after) == ["buffer_size_kb: '7 (expanded: 1408)' -> '7'"]


def test_state_difference_leftover_instance_and_vanished_item():
    before = _state("arm64-host", "before")
    name = "rt-tune-diag-0123456789ab"
    after = _derived_after("arm64-host", "@@ instances \n", f"@@ instances {name} \n")  # derived: left over
    assert state_differences(before, after) == [f"instances: '' -> '{name}'"]
    after = _derived_after("arm64-host", "@@ kprobe_events 4294967295-0\n", "")  # derived: the item vanished
    assert state_differences(before, after) == ["kprobe_events: '4294967295-0' -> None"]


# --------------------------------------------------------------------------------------------------------
# parse_timer_list


def test_timer_list_x86_61():
    tl = parse_timer_list(_sections_cached("x86-guest")["timer_list"])
    assert sorted(tl) == [0, 1]
    assert tl[0].active == ["tick_sched_timer", "watchdog_timer_fn", "timerfd_tmrproc",  # clock 0
                            "timerfd_tmrproc"]  # clock 1
    assert tl[1].active == ["tick_sched_timer", "watchdog_timer_fn", "hrtimer_wakeup", "hrtimer_wakeup",
                            "watchdog_hrtimer_pretimeout",  # printed "watchdog_hrtimer_pretimeout [watchdog]"
                            "timerfd_tmrproc", "timerfd_tmrproc", "timerfd_tmrproc", "timerfd_tmrproc",
                            "posix_timer_fn", "timerfd_tmrproc",  # clock 0 #0..#10
                            "timerfd_tmrproc",  # clock 1
                            "timerfd_tmrproc"]  # clock 2
    for cpu, idle_calls, nr_events in ((0, "1385", "9532"), (1, "6044", "9027")):
        assert tl[cpu].cpu == cpu
        assert tl[cpu].tick_stopped is False
        assert tl[cpu].tick["tick_stopped"] == "0"
        assert tl[cpu].tick["nohz_mode"] == "2"
        assert tl[cpu].tick["idle_calls"] == idle_calls
        assert tl[cpu].tick["nr_events"] == nr_events
        assert tl[cpu].tick["iowait_sleeptime"].endswith(" nsecs")
        for clock_field in ("base", "index", "resolution", "get_time", "offset"):
            assert clock_field not in tl[cpu].tick  # per clock base, not tick-sched fields


def test_timer_list_x86_nohz_busy_cpu1_tick_not_stopped():
    tl = parse_timer_list(_sections_cached("x86-guest-nohz-busy")["timer_list"])
    assert tl[1].active == ["tick_sched_timer"]
    assert tl[1].tick_stopped is False
    assert tl[1].tick["idle_calls"] == "4411"
    assert tl[1].tick["last_tick"] == "33236000000 nsecs"
    assert tl[0].active == ["tick_sched_timer", "timerfd_tmrproc", "watchdog_timer_fn", "timerfd_tmrproc",
                            "hrtimer_wakeup", "watchdog_hrtimer_pretimeout", "timerfd_tmrproc",
                            "timerfd_tmrproc", "timerfd_tmrproc", "timerfd_tmrproc",
                            "posix_timer_fn",  # clock 0
                            "timerfd_tmrproc", "timerfd_tmrproc",  # clock 1
                            "timerfd_tmrproc"]  # clock 2
    assert tl[0].tick["idle_calls"] == "0"


def test_timer_list_arm64_612_host():
    tl = parse_timer_list(_sections_cached("arm64-host")["timer_list"])
    assert sorted(tl) == [0, 1]
    assert tl[0].active == ["tick_nohz_handler", "watchdog_timer_fn", "kvm_bg_timer_expire", "dl_task_timer",
                            "timerfd_tmrproc", "timerfd_tmrproc", "sched_clock_poll",  # clock 0
                            "hrtimer_wakeup", "timerfd_tmrproc",  # clock 1
                            "timerfd_tmrproc"]  # clock 2
    assert tl[1].active == ["tick_nohz_handler", "kvm_bg_timer_expire", "hrtimer_wakeup", "watchdog_timer_fn",
                            "dl_task_timer", "timerfd_tmrproc", "hrtimer_wakeup", "timerfd_tmrproc",
                            "timerfd_tmrproc", "posix_timer_fn",  # clock 0
                            "hrtimer_wakeup", "hrtimer_wakeup", "hrtimer_wakeup",
                            "timerfd_tmrproc"]  # clock 1
    for cpu, idle_calls in ((0, "3633"), (1, "4508")):
        assert tl[cpu].tick_stopped is False
        assert tl[cpu].tick["nohz"] == "1"  # 6.12 prints .nohz/.highres instead of 6.1's .nohz_mode
        assert tl[cpu].tick["highres"] == "1"
        assert "nohz_mode" not in tl[cpu].tick
        assert tl[cpu].tick["idle_calls"] == idle_calls
    assert tl[1].tick["next_timer"] == "9223372036854775807"


def test_timer_list_arm64_612_guest():
    tl = parse_timer_list(_sections_cached("arm64-guest")["timer_list"])
    assert tl[0].active == ["tick_nohz_handler", "dl_task_timer", "watchdog_timer_fn", "hrtimer_wakeup",
                            "timerfd_tmrproc", "timerfd_tmrproc", "sched_clock_poll", "timerfd_tmrproc"]
    assert tl[1].active == ["tick_nohz_handler", "dl_task_timer", "watchdog_timer_fn", "hrtimer_wakeup",
                            "timerfd_tmrproc", "timerfd_tmrproc", "timerfd_tmrproc", "posix_timer_fn",
                            "timerfd_tmrproc", "timerfd_tmrproc"]
    assert [tl[c].tick_stopped for c in (0, 1)] == [False, False]


def test_timer_list_errors():
    with pytest.raises(ParseError, match="expected /proc/timer_list"):
        parse_timer_list(_sections_cached("x86-guest")["sched_debug"])  # another file's output
    text = _sections_cached("x86-guest")["timer_list"]
    head = text[: text.index("\ncpu: 0\n")]  # only the header lines: cut before the first CPU
    with pytest.raises(ParseError, match="no `cpu: N` section"):
        parse_timer_list(head)


# --------------------------------------------------------------------------------------------------------
# parse_sched_debug


def _runnable(cpu) -> list[tuple[str, bool, str, int]]:
    return [(t.state, t.current, t.comm, t.pid) for t in cpu.runnable]


def test_sched_debug_x86_guest():
    sd = parse_sched_debug(_sections_cached("x86-guest")["sched_debug"])
    assert sorted(sd) == [0, 1]
    assert (sd[0].nr_running, sd[0].curr_pid, len(sd[0].tasks)) == (1, 504, 49)
    assert (sd[1].nr_running, sd[1].curr_pid, len(sd[1].tasks)) == (0, 0, 44)
    assert _runnable(sd[0]) == [("R", True, "cat", 504)]
    assert _runnable(sd[1]) == []
    assert sd[0].tasks[0] == SchedTask(state="S", current=False, comm="kthreadd", pid=2)
    assert sd[0].tasks[1] == SchedTask(state="I", current=False, comm="rcu_gp", pid=3)
    assert SchedTask(state="S", current=False, comm="mirobot_teleope", pid=498) in sd[0].tasks
    # a comm filling its 15 columns
    assert SchedTask(state="I", current=False, comm="rcu_tasks_kthre", pid=11) in sd[0].tasks
    assert sd[1].tasks[-1] == SchedTask(state="S", current=False, comm="sleep", pid=499)


def test_sched_debug_nohz_busy_two_sh_on_cpu1():
    sd = parse_sched_debug(_sections_cached("x86-guest-nohz-busy")["sched_debug"])
    assert (sd[1].nr_running, sd[1].curr_pid, len(sd[1].tasks)) == (2, 362, 14)
    assert _runnable(sd[1]) == [("R", False, "sh", 360), ("R", True, "sh", 362)]
    assert (sd[0].nr_running, sd[0].curr_pid, len(sd[0].tasks)) == (1, 512, 82)
    assert _runnable(sd[0]) == [("R", True, "cat", 512)]


def test_sched_debug_arm64_host_comm_with_spaces():
    sd = parse_sched_debug(_sections_cached("arm64-host")["sched_debug"])
    assert (sd[0].nr_running, sd[0].curr_pid, len(sd[0].tasks)) == (1, 520, 48)
    assert (sd[1].nr_running, sd[1].curr_pid, len(sd[1].tasks)) == (4, 325, 41)
    assert _runnable(sd[1]) == [("R", True, "CPU 0/KVM", 325), ("R", False, "sshd", 409)]
    assert SchedTask(state="S", current=False, comm="CPU 1/KVM", pid=326) in sd[1].tasks
    assert SchedTask(state="S", current=False, comm="IO mon_iothread", pid=324) in sd[1].tasks
    assert SchedTask(state="S", current=False, comm="qemu-system-aar", pid=316) in sd[1].tasks


def test_sched_debug_arm64_guest():
    sd = parse_sched_debug(_sections_cached("arm64-guest")["sched_debug"])
    # as recorded: `.curr->pid : 0` while the table (read later) marks sshd 418 current; nr_running 3
    assert (sd[0].nr_running, sd[0].curr_pid, len(sd[0].tasks)) == (3, 0, 49)
    assert _runnable(sd[0]) == [("R", False, "rcu_sched", 17), ("R", True, "sshd", 418)]
    assert (sd[1].nr_running, sd[1].curr_pid, len(sd[1].tasks)) == (1, 527, 30)
    assert _runnable(sd[1]) == [("R", True, "cat", 527)]


def test_sched_debug_malformed_rows():
    text = _sections_cached("x86-guest")["sched_debug"]
    row = _line(text, r"^ I rcu_tasks_kthre +11 ")
    with pytest.raises(ParseError, match="runnable tasks:"):
        parse_sched_debug(text.replace(row, row[:17]))  # the row cut after 17 characters
    with pytest.raises(ParseError, match="runnable tasks:"):
        parse_sched_debug(text.replace(row, row[1:]))  # the row shifted one column left: comm in column 2
    row = _line(text, r"^ S +kthreadd +2 ")
    with pytest.raises(ParseError, match="expected the PID after the 15-column comm"):
        parse_sched_debug(text.replace(row, row[:19] + row[24:]))  # the PID column (19..23) removed
    with pytest.raises(ParseError, match="expected /sys/kernel/debug/sched/debug"):
        parse_sched_debug(_sections_cached("x86-guest")["timer_list"])  # another file's output
    with pytest.raises(ParseError, match="no `cpu#N` section"):
        parse_sched_debug(text[: text.index("\ncpu#0")])  # cut before the first CPU


# --------------------------------------------------------------------------------------------------------
# parse_service_states


@pytest.mark.parametrize(("prefix", "n0", "n1", "before", "after"), [
    ("x86-guest", 26, 25, (1, "activating", "auto-restart", "core-dump", 357),
     (3, "active", "running", "success", 498)),
    ("x86-guest-nohz-busy", 28, 27, (1, "active", "running", "success", 425),
     (2, "activating", "auto-restart", "core-dump", 498)),
    ("arm64-guest", 25, 25, (6, "active", "running", "success", 503),
     (7, "active", "running", "success", 521)),
])
def test_service_states_crash_looping_unit(prefix, n0, n1, before, after):
    s = _sections_cached(prefix)
    units0, units1 = parse_service_states(s["units0"]), parse_service_states(s["units1"])
    assert (len(units0), len(units1)) == (n0, n1)
    for units, (restarts, active, sub, result, pid) in ((units0, before), (units1, after)):
        assert units[CRASH_UNIT] == ServiceState(id=CRASH_UNIT, n_restarts=restarts, active_state=active,
                                                 sub_state=sub, unit_file_state="enabled", result=result,
                                                 main_pid=pid)


def test_service_states_other_units_and_host():
    units = parse_service_states(_sections_cached("x86-guest")["units0"])
    assert units["systemd-sysusers.service"] == ServiceState(
        id="systemd-sysusers.service", n_restarts=0, active_state="active", sub_state="exited",
        unit_file_state="static", result="success", main_pid=218)
    host = parse_service_states(_sections_cached("arm64-host")["units1"])
    assert len(host) == 25 and CRASH_UNIT not in host


def test_service_states_line_without_equals():
    text = _sections_cached("x86-guest")["units1"]
    first = text.split("\n", 1)[0]
    assert first == "Result=success"
    with pytest.raises(ParseError, match="expected KEY=VALUE"):
        parse_service_states(text.replace(first, "Resultsuccess", 1))  # the `=` dropped from a real line
    with pytest.raises(ParseError, match="expected numbers in NRestarts"):
        parse_service_states(text.replace("NRestarts=3\n", "NRestarts=3x\n", 1))  # derived: not a number
    block = text.split("\n\n", 1)[0]
    id_line = _line(block, r"^Id=")
    with pytest.raises(ParseError, match="without Id="):
        parse_service_states(text.replace(id_line + "\n", "", 1))  # the first block's Id= line dropped


# --------------------------------------------------------------------------------------------------------
# parse_kvm_vms


def test_kvm_vms_arm64_host():
    s = _sections_cached("arm64-host")
    k0, k1 = parse_kvm_vms(s["kvm0"]), parse_kvm_vms(s["kvm1"])
    assert k0 == {"316-10": VmCounters(vm="316-10", pid=316, comm="qemu-system-aar", name="rtguest",
                                       counters={"wfi_exit_stat": 7146, "wfe_exit_stat": 0, "exits": 200297,
                                                 "signal_exits": 0})}
    assert k1 == {"316-10": VmCounters(vm="316-10", pid=316, comm="qemu-system-aar", name="rtguest",
                                       counters={"wfi_exit_stat": 8038, "wfe_exit_stat": 0, "exits": 204578,
                                                 "signal_exits": 0})}


@pytest.mark.parametrize("prefix", ["x86-guest", "x86-guest-nohz-busy", "arm64-guest"])
def test_kvm_vms_guests_run_no_vm(prefix):
    assert parse_kvm_vms(_sections_cached(prefix)["kvm0"]) == {}
    assert parse_kvm_vms(_sections_cached(prefix)["kvm1"]) == {}


def test_kvm_vms_errors():
    text = _sections_cached("arm64-host")["kvm1"]
    with pytest.raises(ParseError, match="unexpected line in the KVM counters section"):
        parse_kvm_vms(text.replace("wfi_exit_stat 8038", "wfi_exit_stat", 1))  # the value cut off
    vm_line = _line(text, r"^vm ")
    with pytest.raises(ParseError, match="unexpected line"):
        parse_kvm_vms(text.replace(vm_line + "\n", ""))  # counters without their `vm` line


# --------------------------------------------------------------------------------------------------------
# parse_trace, fields, strip_offset, summarize_trace


@pytest.mark.parametrize(("prefix", "sources"), [
    ("x86-guest", ["function", "sched_switch", "tick_stop", "timers"]),
    ("x86-guest-nohz-busy", ["function", "sched_switch", "tick_stop", "timers"]),
    ("arm64-host", ["csd", "ipi_send", "sched_switch", "tick_stop", "timers"]),
    ("arm64-guest", ["csd", "ipi_send", "sched_switch", "tick_stop", "timers"]),
])
def test_trace_records_and_sources(prefix, sources):
    records, lost = parse_trace(_trace(prefix))
    assert len(records) == _trace_stats_entries(prefix)  # 3258, 11004, 8323, 4144
    assert lost == {}  # trace_stats: overrun 0, dropped 0
    s = summarize_trace(records, lost)
    assert s.records == len(records)
    assert s.sources == sources


def test_trace_record_fields_x86_function_line():
    records, _ = parse_trace(_trace("x86-guest"))
    # the first line:
    # `          <idle>-0       [000] d.h1.    49.741374: sched_ttwu_pending <-__sysvec_call_function_single`
    assert records[0] == TraceRecord(comm="<idle>", pid=0, cpu=0, ts=49.741374, event="function",
                                     args="sched_ttwu_pending <-__sysvec_call_function_single")
    assert records[1].event == "sched_switch"
    assert records[1].args.endswith("==> next_comm=sshd next_pid=365 next_prio=120")


def test_trace_record_comm_with_spaces_arm64():
    records, _ = parse_trace(_trace("arm64-host"))
    # `       CPU 0/KVM-325     [001] d.h..   236.832701: hrtimer_expire_entry: hrtimer=00000000d23a742c ...`
    assert records[2] == TraceRecord(
        comm="CPU 0/KVM", pid=325, cpu=1, ts=236.832701, event="hrtimer_expire_entry",
        args="hrtimer=00000000d23a742c function=tick_nohz_handler now=236152170144")


def test_trace_arm64_guest_kick_all_cpus_sync_and_do_nothing():
    s = _summary("arm64-guest")
    kicks = [x for x in s.ipi_sends if x.callsite == "kick_all_cpus_sync"]
    cb = "generic_smp_call_function_single_interrupt"  # 6.12 arm64 queues every cross-call through it
    kick = "kick_all_cpus_sync"
    assert kicks == [
        IpiSend(target_cpu=0, callback=cb, callsite=kick, sender="systemd-coredum", sender_cpu=1, count=39),
        IpiSend(target_cpu=0, callback=cb, callsite=kick, sender="kworker/1:0", sender_cpu=1, count=20),
        IpiSend(target_cpu=0, callback=cb, callsite=kick, sender="systemd", sender_cpu=1, count=6),
        IpiSend(target_cpu=1, callback=cb, callsite=kick, sender="kworker/0:3", sender_cpu=0, count=3)]
    assert [c for c in s.callbacks if c.function == "do_nothing"] == [
        CallbackRun(cpu=0, function="do_nothing", via="csd", from_ipi=True, count=66, interrupted="<idle>"),
        CallbackRun(cpu=1, function="do_nothing", via="csd", from_ipi=True, count=3, interrupted="<idle>")]
    # reschedule IPIs carry no callback: `callback=0x0` -> "-"
    assert IpiSend(target_cpu=1, callback="-", callsite="check_preempt_wakeup_fair", sender="systemd",
                   sender_cpu=0, count=7) in s.ipi_sends
    assert s.send_calls == []  # no function tracer on 6.12


def test_trace_arm64_host_callbacks_and_sends():
    s = _summary("arm64-host")
    def csd(cpu: int, function: str, count: int) -> CallbackRun:
        return CallbackRun(cpu=cpu, function=function, via="csd", from_ipi=True, count=count,
                           interrupted="<idle>")

    assert s.callbacks == [csd(1, "sched_ttwu_pending", 446), csd(0, "sched_ttwu_pending", 278),
                           csd(1, "nohz_csd_func", 94), csd(0, "nohz_csd_func", 84)]
    assert s.ipi_sends[0] == IpiSend(target_cpu=1, callback="generic_smp_call_function_single_interrupt",
                                     callsite="ttwu_queue_wakelist", sender="CPU 1/KVM", sender_cpu=0,
                                     count=334)
    assert sum(x.count for x in s.ipi_sends) == 1031  # every ipi_send_cpu line (one target each)
    assert s.tick_stops == [TickStop(cpu=1, success=True, dependency="NONE", count=369),
                            TickStop(cpu=0, success=True, dependency="NONE", count=249)]


def test_trace_x86_function_tracer_callbacks_from_ipi():
    s = _summary("x86-guest")
    assert s.ipi_sends == []  # 6.1: no ipi send events
    sysvec = "__sysvec_call_function_single"
    assert CallbackRun(cpu=1, function="sched_ttwu_pending", via=sysvec, from_ipi=True, count=94,
                       interrupted="<idle>") in s.callbacks
    assert CallbackRun(cpu=0, function="sched_ttwu_pending", via=sysvec, from_ipi=True, count=34,
                       interrupted="<idle>") in s.callbacks
    assert CallbackRun(cpu=1, function="nohz_csd_func", via="__flush_smp_call_function_queue", from_ipi=True,
                       count=37, interrupted="<idle>") in s.callbacks
    # the sender flushing its own TLB runs the callback locally: not from an IPI
    assert s.callbacks[0] == CallbackRun(cpu=0, function="flush_tlb_func", via="flush_tlb_mm_range",
                                         from_ipi=False, count=412, interrupted="systemd-coredum")
    assert s.send_calls[0] == SendCall(cpu=0, function="smp_call_function_many_cond",
                                       caller="on_each_cpu_cond_mask", sender="systemd-coredum", count=79)
    assert SendCall(cpu=0, function="tlb_remove_table_sync_one", caller="collapse_huge_page",
                    sender="khugepaged", count=1) in s.send_calls


@pytest.mark.parametrize(("prefix", "function_lines"), [("x86-guest", 1046), ("x86-guest-nohz-busy", 847)])
def test_trace_every_recorded_function_line_is_a_send_or_a_callback(prefix, function_lines):
    records, _ = parse_trace(_trace(prefix))
    assert sum(r.event == "function" for r in records) == function_lines
    s = _summary(prefix)
    assert sum(c.count for c in s.callbacks) + sum(c.count for c in s.send_calls) == function_lines


def test_trace_function_lines_neither_send_nor_callback_are_ignored(monkeypatch):
    # No recording holds a function-tracer line outside SEND_FUNCTIONS/CALLBACK_FUNCTIONS (the instance's
    # filter lets only those through), so take flush_tlb_func off the callback list: its 696 real lines become
    # lines of a function that is neither.
    records, lost = parse_trace(_trace("x86-guest"))
    flush = sum(r.event == "function" and r.args.startswith("flush_tlb_func <-") for r in records)
    assert flush == 696
    monkeypatch.setattr(tracing, "CALLBACK_FUNCTIONS",
                        tuple(f for f in tracing.CALLBACK_FUNCTIONS if f != "flush_tlb_func"))
    s = summarize_trace(records, lost)
    assert s.records == 3258
    assert "function" in s.sources
    assert [c for c in s.callbacks if c.function == "flush_tlb_func"] == []
    assert [c for c in s.send_calls if c.function == "flush_tlb_func"] == []
    assert sum(c.count for c in s.callbacks) + sum(c.count for c in s.send_calls) == 1046 - 696
    assert [c for c in s.callbacks if c.function == "sched_ttwu_pending"] == \
        [c for c in _summary("x86-guest").callbacks if c.function == "sched_ttwu_pending"]


def test_trace_nohz_busy_tick_timers_tasks():
    s = _summary("x86-guest-nohz-busy")
    assert s.tick_stops == [TickStop(cpu=1, success=False, dependency="SCHED", count=2442)]
    assert [t for t in s.timers if t.cpu == 1] == [
        TimerFire(cpu=1, function="tick_sched_timer", kind="hrtimer", count=2460),
        TimerFire(cpu=1, function="mix_interrupt_randomness", kind="timer", count=1),
        TimerFire(cpu=1, function="delayed_work_timer_fn", kind="timer", count=1)]
    assert [t for t in s.tasks if t.cpu == 1][:2] == [TaskRun(cpu=1, comm="sh", pid=362, switches_in=591),
                                                      TaskRun(cpu=1, comm="sh", pid=360, switches_in=590)]
    assert all(t.pid != 0 for t in s.tasks)  # the idle task is left out


@pytest.mark.parametrize(("prefix", "pattern", "cut"), [
    # a real function-tracer line cut after its timestamp (no `: ` and rest)
    ("x86-guest", r"sched_ttwu_pending <-__sysvec_call_function_single", lambda line: line[: line.index(": ")]),
    # a real sched_switch line cut right after the event name (no `: ARGS`)
    ("x86-guest", r": sched_switch: ", lambda line: line[: line.index(": sched_switch") + len(": sched_switch")]),
    # a real function-tracer line cut after ` <-` (no parent)
    ("x86-guest", r"native_smp_send_reschedule <-", lambda line: line[: line.index("<-") + 2]),
    # a real arm64 line without its `[CPU]` column
    ("arm64-host", r"ipi_send_cpu: ", lambda line: re.sub(r"\[\d{3}\] ", "", line, count=1)),
])
def test_parse_trace_refuses_an_unknown_line_format(prefix, pattern, cut):
    text = _trace(prefix)
    line = _line(text, pattern)
    with pytest.raises(ParseError, match="expected"):
        parse_trace(text.replace(line, cut(line), 1))


def test_fields_on_real_args():
    text = _trace("arm64-guest")
    line = _line(text, r"callsite=kick_all_cpus_sync")
    args = line.split(": ipi_send_cpu: ", 1)[1]
    assert args == ("cpu=0 callsite=kick_all_cpus_sync+0x38/0x48 "
                    "callback=generic_smp_call_function_single_interrupt+0x0/0x30")
    assert fields(args) == {"cpu": "0", "callsite": "kick_all_cpus_sync+0x38/0x48",
                            "callback": "generic_smp_call_function_single_interrupt+0x0/0x30"}
    csd = _line(text, r"csd_function_entry: func=do_nothing").split(": csd_function_entry: ", 1)[1]
    assert fields(csd) == {"func": "do_nothing", "csd": "00000000ddcd4ca6"}  # `func=do_nothing, csd=...`
    resched = _line(text, r"callback=0x0$").split(": ipi_send_cpu: ", 1)[1]
    assert fields(resched) == {"cpu": "1", "callsite": "check_preempt_wakeup_fair+0x1f4/0x250",
                               "callback": "0x0"}
    tick = _line(_trace("x86-guest-nohz-busy"), r"tick_stop: ").split(": tick_stop: ", 1)[1]
    assert fields(tick) == {"success": "0", "dependency": "SCHED"}
    switch = _line(_trace("arm64-host"), r"prev_comm=CPU 0/KVM ").split(": sched_switch: ", 1)[1]
    assert fields(switch)["prev_comm"] == "CPU 0/KVM"  # a value with a space ends at the next ` key=`


def test_strip_offset():
    # symbols as printed in the arm64 guest's trace
    assert strip_offset("kick_all_cpus_sync+0x38/0x48") == "kick_all_cpus_sync"
    assert strip_offset("generic_smp_call_function_single_interrupt+0x0/0x30") == \
        "generic_smp_call_function_single_interrupt"
    assert strip_offset("check_preempt_wakeup_fair+0x1f4/0x250") == "check_preempt_wakeup_fair"
    assert strip_offset("0x0") == "-"  # no callback: a reschedule IPI
    assert strip_offset("do_nothing") == "do_nothing"


def test_trace_local_csd_callback_is_not_from_an_ipi():
    text = _trace("arm64-guest")
    # `    kworker/u8:3-51      [000] d....   171.013162: csd_function_entry: func=rcu_barrier_handler,
    #  csd=0000000000000000` (twice; no hardirq flag): rcu_barrier() running rcu_barrier_handler on its own
    #  CPU
    local = [x for x in text.split("\n") if "csd_function_entry" in x and "csd=0000000000000000" in x]
    assert len(local) == 2 and all("func=rcu_barrier_handler" in x and "[000]" in x for x in local)
    run = next(c for c in _summary("arm64-guest").callbacks
               if c.cpu == 0 and c.function == "rcu_barrier_handler")
    assert run.from_ipi is False


# --------------------------------------------------------------------------------------------------------
# analyse + findings


@pytest.mark.parametrize("prefix", ["x86-guest", "x86-guest-nohz-busy", "arm64-guest"])
def test_now_is_the_last_core_dump_plus_a_minute(prefix):
    dumps = parse_coredumps(_sections_cached(prefix)["coredumps"])
    assert dumps and {d.unit for d in dumps} == {CRASH_UNIT}
    assert NOW[prefix] == max(d.timestamp for d in dumps) + timedelta(minutes=1)
    assert parse_coredumps(_sections_cached("arm64-host")["coredumps"]) == []


def _ipi_counts(d: TargetDiagnosis) -> dict[str, dict[int, int]]:
    return {r.row: r.counts for r in d.ipis}


def test_analyse_x86_guest_crash_loop():
    d = _analysed("x86-guest")
    assert (d.kernel, d.arch, d.cpus, d.nohz_full, d.isolated, d.rt_cpus, d.timer_migration) == \
        ("6.1.0-50-amd64", "x86_64", [0, 1], [], [], [], 1)
    assert d.duration_s == pytest.approx(59.60 - 38.08)
    assert d.tracing == ("function tracer on the cross-call paths "
                         "(this kernel has no ipi/csd send tracepoints)")
    # interrupts1 - interrupts0: RES 1161-1057, 968-917; CAL 2204-1720, 10288-9474; TLB 5-4, 5-2; IWI 3-0, 3-0
    assert _ipi_counts(d) == {"IWI": {0: 3, 1: 3}, "RES": {0: 104, 1: 51}, "CAL": {0: 484, 1: 814},
                              "TLB": {0: 1, 1: 3}}
    cal = next(r for r in d.ipis if r.row == "CAL")
    assert cal.description == "Function call interrupts"
    assert cal.per_cpu == pytest.approx({0: 484 / 21.52, 1: 814 / 21.52})
    assert d.timer_irq_per_s == pytest.approx({0: (9595 - 6829) / 21.52, 1: (9049 - 6779) / 21.52})  # LOC
    assert d.crash_loops == [CrashLoop(unit=CRASH_UNIT, restarts_total=3, restarts_in_window=2,
                                       coredumps_last_hour=35, last_signal="SIGSEGV", exe="/usr/bin/bash",
                                       state="active/running", unit_file_state="enabled")]
    assert d.nohz == [] and d.wfx == []
    assert _kinds(d) == ["crash_loop", "page_table_teardown"]
    f = d.findings[0]
    assert (f.target, f.severity, f.change) == ("guest", "high", "guest.service.mirobot_teleoperate.service")
    assert f.title == "mirobot_teleoperate.service is crash-looping"
    assert f.evidence == [
        ("mirobot_teleoperate.service: NRestarts=3, 2 restart(s) during the 22 s window, "
         "state active/running, unit file enabled"),
        "35 core dump(s) in the last hour, last SIGSEGV of /usr/bin/bash"]
    assert f.profile == "guest:\n  services:\n    disable: [mirobot_teleoperate.service]\n"
    teardown = d.findings[1]
    assert (teardown.severity, teardown.change) == ("info", None)
    assert teardown.evidence == ["processes unmapping: khugepaged (1)", "received on CPUs 1"]
    assert len(d.tracing_state_notes) == 1 and "'7 (expanded: 1408)' -> '1410'" in d.tracing_state_notes[0]


def test_analyse_core_dumps_counted_in_the_last_hour_only():
    d = _analysed("x86-guest", now=NOW["x86-guest"] + timedelta(hours=2))
    # no dump in the last hour now, but NRestarts rose 1 -> 3 during the window: still a crash loop
    assert d.crash_loops == [CrashLoop(unit=CRASH_UNIT, restarts_total=3, restarts_in_window=2,
                                       coredumps_last_hour=0, last_signal=None, exe=None,
                                       state="active/running", unit_file_state="enabled")]
    assert len(d.findings[0].evidence) == 1


def test_analyse_nohz_busy_tick_finding():
    d = _analysed("x86-guest-nohz-busy")
    assert (d.nohz_full, d.rt_cpus, d.cmdline.endswith(" nohz_full=1")) == ([1], [1], True)
    assert d.duration_s == pytest.approx(69.63 - 46.45)
    assert _ipi_counts(d) == {"IWI": {0: 6, 1: 0}, "RES": {0: 22, 1: 19}, "CAL": {0: 12, 1: 95},
                              "TLB": {0: 0, 1: 0}}
    assert len(d.nohz) == 1
    assert d.nohz[0].model_dump() == {
        "cpu": 1, "tick_stopped": False, "nr_running": 2, "current": "sh 362",
        "runnable": ["sh 360", "sh 362"],
        "active_timers": ["tick_sched_timer"],
        "timers_fired": {"tick_sched_timer": 2460, "mix_interrupt_randomness": 1, "delayed_work_timer_fn": 1},
        "tick_dependencies": {"SCHED": 2442}, "tick_stops": 0,
        "timer_irq_per_s": pytest.approx((11383 - 5834) / (69.63 - 46.45)),  # LOC on CPU 1
        "busy": True, "tick_ok": False}
    assert _kinds(d) == ["crash_loop", "nohz_tick", "timer_migration", "page_table_teardown"]
    f = next(x for x in d.findings if x.kind == "nohz_tick")
    assert (f.target, f.severity, f.change) == ("guest", "high", "guest.cmdline")
    assert f.title == "nohz_full CPU 1: the tick did not stop while a task runs there"
    assert f.evidence == [
        "CPU 1: /proc/timer_list tick_stopped=0 while sh 362 runs (sched/debug nr_running=2)",
        "runnable on CPU 1: sh 360, sh 362",
        "tick_stop refused: SCHED 2442x",
        "local timer interrupts on CPU 1: 239/s",
        "timers fired there: tick_sched_timer 2460, mix_interrupt_randomness 1, delayed_work_timer_fn 1"]
    assert "more than one runnable task keeps the tick on" in f.advice
    assert f.profile == 'guest:\n  cmdline:\n    isolcpus: "domain,managed_irq,1"\n    rcu_nocbs: "1"\n'
    loop = d.crash_loops[0]
    assert (loop.restarts_total, loop.restarts_in_window, loop.coredumps_last_hour, loop.state) == \
        (2, 1, 45, "activating/auto-restart")
    tm = next(x for x in d.findings if x.kind == "timer_migration")
    assert tm.change == "guest.sysctl.kernel.timer_migration"
    assert tm.evidence == ["/proc/sys/kernel/timer_migration = 1; RT CPUs 1"]
    assert "rt_cpu_ipis" not in _kinds(d)  # CPU 1: RES 19 + CAL 95 in 23.18 s = 4.9/s, under 5/s


def test_analyse_arm64_host_wfx_traps():
    d = _analysed("arm64-host")
    assert (d.target, d.kernel, d.arch) == ("host", "6.12.95+deb12-arm64", "aarch64")
    assert d.tracing == "tracepoints ipi:ipi_send_cpu/ipi_send_cpumask, csd:csd_function_entry"
    seconds = 246.34 - 232.72
    assert d.duration_s == pytest.approx(seconds)
    assert _ipi_counts(d)["IPI0"] == {0: 4284 - 4198, 1: 4567 - 4451}
    assert _ipi_counts(d)["IPI1"] == {0: 4694 - 4232, 1: 5462 - 4803}
    assert _ipi_counts(d)["IPI5"] == {0: 3, 1: 3}
    assert d.timer_irq_per_s == pytest.approx({0: (45101 - 42742) / seconds, 1: (44339 - 41898) / seconds})
    # kvm1 - kvm0 of VM 316-10 over uptime1 - uptime0
    assert [w.model_dump() for w in d.wfx] == [{"vm": "316-10", "pid": 316, "name": "rtguest",
                                                "wfi_per_s": pytest.approx((8038 - 7146) / seconds),
                                                "wfe_per_s": 0.0,
                                                "exits_per_s": pytest.approx((204578 - 200297) / seconds)}]
    assert d.crash_loops == [] and d.nohz == []
    assert _kinds(d) == ["vcpu_wakeup_ipis", "wfx_traps"]
    f = next(x for x in d.findings if x.kind == "wfx_traps")
    assert (f.target, f.severity, f.change) == ("host", "medium", "host.wfx_notrap")
    assert f.title == "VM rtguest: guest WFI traps to KVM 65/s"  # 892 / 13.62
    assert f.evidence == ["316-10 (rtguest): wfi_exit_stat 65.5/s, wfe_exit_stat 0.0/s, all exits 314/s"]
    assert "kvm-arm.wfi_trap_policy=notrap kvm-arm.wfe_trap_policy=notrap" in f.advice
    assert "(Linux 6.12.95+deb12-arm64 >= 6.11)" in f.advice
    wake = next(x for x in d.findings if x.kind == "vcpu_wakeup_ipis")
    assert wake.title == "sched_ttwu_pending cross-calls on the host: 724 in 14 s"  # 446 + 278
    assert wake.evidence == ["CPU 1: 446 (interrupting <idle>)", "CPU 0: 278 (interrupting <idle>)"]
    assert wake.change == "host.vcpu_pinning"
    assert d.tracing_state_notes == []


def test_findings_wfx_on_a_kernel_before_611():
    # the recorded host diagnosis with the kernel release of the lab's 6.1 (x86-guest's meta): no trap policy
    d = _analysed("arm64-host").model_copy(update={"kernel": KERNELS["x86-guest"][0]})
    f = next(x for x in findings(d) if x.kind == "wfx_traps")
    assert "a patched host kernel (Linux 6.1.0-50-amd64 < 6.11 has no trap policy parameter)" in f.advice
    assert "wfi_trap_policy" not in f.advice


def test_analyse_wfx_findings_only_for_a_host_target():
    d = _analysed("arm64-host", target="guest")
    assert len(d.wfx) == 1  # measured, but only a host can stop trapping its guests' WFI
    assert "wfx_traps" not in _kinds(d) and "vcpu_wakeup_ipis" not in _kinds(d)


def test_analyse_arm64_guest_crash_loop_with_kicks():
    d = _analysed("arm64-guest")
    assert d.duration_s == pytest.approx(177.43 - 162.95)
    assert _ipi_counts(d)["IPI1"] == {0: 2609 - 2138, 1: 2219 - 2046}
    assert d.crash_loops == [CrashLoop(unit=CRASH_UNIT, restarts_total=7, restarts_in_window=1,
                                       coredumps_last_hour=7, last_signal="SIGSEGV", exe="/usr/bin/bash",
                                       state="active/running", unit_file_state="enabled")]
    assert _kinds(d) == ["crash_loop"]  # kick_all_cpus is folded into the crash loop; no RT CPU findings
    f = d.findings[0]
    assert (f.severity, f.change) == ("high", "guest.service.mirobot_teleoperate.service")
    assert f.evidence[2] == (
        "kick_all_cpus_sync IPIs during the window (field notes §1: core dump handling JIT-compiles BPF, "
        "each compile kicks every CPU): 39 sent by systemd-coredum, 20 sent by kworker/1:0, 6 sent by "
        "systemd; do_nothing ran on CPUs 0,1 (69x)")


@pytest.mark.parametrize("prefix", PREFIXES)
def test_analyse_no_rt_cpu_findings_without_rt_cpus(prefix):
    d = _analysed(prefix)
    rt_kinds = {"no_nohz_full", "rt_cpu_ipis"}
    if not d.nohz_full:
        rt_kinds |= {"nohz_tick", "timer_migration"}
    assert not rt_kinds & set(_kinds(d))
    severities = [f.severity for f in d.findings]
    assert severities == sorted(severities, key=["high", "medium", "info"].index)


def test_analyse_rt_hint_marks_rt_cpus():
    d = _analysed("arm64-guest", rt_hint=(1,))
    assert d.rt_cpus == [1]
    assert _kinds(d) == ["crash_loop", "no_nohz_full", "timer_migration", "rt_cpu_ipis"]
    ipis = next(x for x in d.findings if x.kind == "rt_cpu_ipis")
    # CPU 1: IPI0 2052-2003 + IPI1 2219-2046 over 177.43-162.95 s
    rate = (49 + 173) / (177.43 - 162.95)
    assert ipis.title == f"RT CPU 1 is not isolated and takes {rate:.0f} reschedule/function-call IPIs/s"
    assert ipis.title == "RT CPU 1 is not isolated and takes 15 reschedule/function-call IPIs/s"
    assert ipis.change == "guest.cmdline"
    nohz = next(x for x in d.findings if x.kind == "no_nohz_full")
    assert nohz.title == "RT CPU(s) 1 not nohz_full: the tick runs there"
    assert nohz.profile == 'guest:\n  cmdline:\n    nohz_full: "1"\n    rcu_nocbs: "1"\n'
    assert _analysed("arm64-guest", rt_hint=(5,)).rt_cpus == []  # not an online CPU (online 0-1)


def test_analyse_uptime_not_advancing_is_an_error():
    s = _sections("x86-guest")
    s["uptime1"] = s["uptime0"]  # derived: the second sample equal to the first
    with pytest.raises(ParseError, match="uptime did not advance"):
        analyse(s, target="guest", label="x86-guest", rt_hint=[], state_before=_state("x86-guest", "before"),
                state_after=_state("x86-guest", "after"), now=NOW["x86-guest"])


# --------------------------------------------------------------------------------------------------------
# parse_duration, rt_hints_from_vars


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30.0), ("2m", 120.0), ("45", 45.0), ("1.5m", 90.0),
                                               ("2", 2.0), ("60min", 3600.0), (" 10 sec ", 10.0)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0s", "abc", "2h", "5000s", "1.9s", "61m", "", "-5s"])
def test_parse_duration_errors(text):
    with pytest.raises(InputError, match="--duration"):
        parse_duration(text)
    assert MAX_DURATION_S == 3600.0


def test_rt_hints_from_vars():
    assert rt_hints_from_vars({"rt_cpus": "1-3", "guest_rt_cpus": "1"}) == {"host": [1, 2, 3], "guest": [1]}
    assert rt_hints_from_vars({"guest_rt_cpus": 1, "other": "x"}) == {"guest": [1]}
    assert rt_hints_from_vars({}) == {}


@pytest.mark.parametrize(("vars_", "name"), [({"rt_cpus": "1-x"}, "rt_cpus"), ({"rt_cpus": "3-1"}, "rt_cpus"),
                                             ({"rt_cpus": "1", "guest_rt_cpus": "one"}, "guest_rt_cpus")])
def test_rt_hints_from_vars_bad_value(vars_, name):
    with pytest.raises(InputError, match=f"inventory var {name}: expected a CPU list"):
        rt_hints_from_vars(vars_)


# --------------------------------------------------------------------------------------------------------
# window_argv, cleanup_argv


def test_window_argv():
    inst = new_instance_name()
    assert re.fullmatch(r"rt-tune-diag-[0-9a-f]{12}", inst)
    argv = window_argv("@@rt-tune-diag-7bcb4f419cf0e399", 10, inst, f"/run/{inst}.pid")
    assert argv[:4] == ["sh", "-c", WINDOW_SCRIPT, "-"]
    assert argv[4:9] == ["@@rt-tune-diag-7bcb4f419cf0e399", "10", inst, f"/run/{inst}.pid", str(BUFFER_KB)]
    assert argv[9].startswith("journalctl -o json ")
    assert argv[10:] == [" ".join(EVENTS), " ".join(FALLBACK_FUNCTIONS)]
    assert window_argv("m", 1.5, inst, "/run/p")[5] == "1.5"
    pidfile = f"/run/{inst}.pid"
    assert cleanup_argv(inst, pidfile) == ["sh", "-c", CLEANUP_SCRIPT, "-", inst, pidfile]


def test_window_script_signal_between_fork_and_wait_leaves_no_sleep(tmp_path):
    """A signal that dash handles right after `sleep &` (before any later command could record the pid) must
    not orphan the sleep: the trap kills `$!`. The old trap killed `$sp`, set one command later: the CI found
    its `sleep 30` left on the guest after a window timed out. Here the shell signals itself at that point."""
    import subprocess

    assert "trap '" + STOP_SLEEP + "; cleanup; exit 130' INT TERM HUP" in WINDOW_SCRIPT
    assert 'sleep "$dur" &\nwait "$!"\nslept=1\n' in WINDOW_SCRIPT
    tag = f"{os.getpid() % 1000 + 1000}.{secrets.randbelow(10**6):06d}"  # a duration no other process sleeps
    script = ("trap '" + STOP_SLEEP + "; exit 130' TERM\nslept=\n"
              f"sleep {tag} &\nkill -TERM $$\nwait \"$!\"\nslept=1\necho not reached\n")
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout) == (130, "")
    time.sleep(0.2)
    left = subprocess.run(["pgrep", "-f", f"^sleep {tag}$"], capture_output=True, text=True).stdout
    assert left == "", left
    # and once the wait is over, a late signal leaves alone whatever now has that pid
    script = ("trap 'echo trapped; " + STOP_SLEEP + "; exit 130' TERM\nslept=\n"
              "sleep 0.01 &\nwait \"$!\"\nslept=1\nkill -TERM $$\n")
    done = subprocess.run(["sh", "-xc", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 130 and "trapped" in done.stdout
    assert "+ kill -KILL" not in done.stderr, done.stderr


@pytest.mark.parametrize("name", ["mine", "", "rt-tune-diag-", "rt-tune-diag-0123456789AB",
                                  "rt-tune-diag-0123456789a", "rt-tune-diag-0123456789abc",
                                  "../rt-tune-diag-0123456789ab", "rt-tune-diag-0123456789ab/../victim",
                                  "rt-tune-diag-0123456789ab\n"])
def test_window_argv_refuses_foreign_instance_names(name):
    with pytest.raises(ValueError, match="not an rt-tune diagnosis instance name"):
        window_argv("@@m", 10, name, "/run/x.pid")


@pytest.mark.parametrize("name", ["mine", "", "../rt-tune-diag-0123456789ab",
                                  "instances/rt-tune-diag-0123456789ab"])
def test_cleanup_argv_refuses_foreign_instance_names(name):
    with pytest.raises(ValueError, match="not an rt-tune diagnosis instance name"):
        cleanup_argv(name, "/run/x.pid")


@pytest.mark.parametrize("name", ["rt-tune-diag-0123456789ab/../victim", "rt-tune-diag-mine",
                                  "rt-tune-diag-"])
def test_cleanup_argv_refuses_names_new_instance_name_cannot_make(name):
    with pytest.raises(ValueError, match="not an rt-tune diagnosis instance name"):
        cleanup_argv(name, "/run/x.pid")


def test_trace_overruns_from_the_recorded_per_cpu_stats():
    """`trace_stats` of the recordings: every CPU listed, nothing lost (overrun 0, dropped events 0); a copy of
    a real block with its overrun count raised is counted as lost events of that CPU."""
    from orchestrator.diagnose.analysis import parse_trace_overruns

    for prefix in ("x86-guest", "arm64-host", "arm64-guest", "x86-guest-nohz-busy"):
        stats = _sections(prefix)["trace_stats"]
        assert parse_trace_overruns(stats) == {0: 0, 1: 0}, prefix
    stats = _sections("arm64-host")["trace_stats"]
    raised = stats.replace("overrun: 0", "overrun: 17", 1)  # derived: cpu 0's block with 17 overruns
    assert parse_trace_overruns(raised) == {0: 17, 1: 0}


def test_vcpu_wakeup_finding_counts_only_the_rt_cpus_when_they_are_known():
    """arm64-host with rt_cpus=1 (the lab's inventory): only CPU 1's 446 IPI-delivered sched_ttwu_pending."""
    d = _analysed("arm64-host", rt_hint=(1,))
    wake = next(x for x in d.findings if x.kind == "vcpu_wakeup_ipis")
    assert wake.title == "sched_ttwu_pending cross-calls on the host: 446 in 14 s"
    assert wake.evidence == ["CPU 1: 446 (interrupting <idle>)"]


# --------------------------------------------------------------------------------------------------------
# arm64 host on Linux 6.1 (recorded: the arm64 lab host booted once into bookworm's 6.1.0-50-arm64 with
# grub-reboot): no ipi_send/csd tracepoints, so ipi:ipi_raise plus the function tracer on the cross-call paths


def test_arm64_61_ipi_raise_and_function_fallback():
    text = _trace("arm64-host-6.1")
    raises = [line for line in text.split("\n") if ": ipi_raise: " in line]
    assert len(raises) == 845
    assert raises[0].endswith("ipi_raise: target_mask=00000000,00000002 (Function call interrupts)")
    s = _summary("arm64-host-6.1")
    assert {"ipi_raise", "function"} <= set(s.sources) and "ipi_send" not in s.sources
    assert sum(x.count for x in s.ipi_sends) == 845  # each raise here targets one CPU
    top = s.ipi_sends[0]  # mask ...0002 -> CPU 1, the reason as the kernel prints it, no callsite on 6.1
    assert (top.target_cpu, top.callback, top.callsite, top.sender) == (1, "Function call interrupts", "-",
                                                                         "CPU 1/KVM")
    # the senders' call paths from the function tracer: vCPU kicks by the KVM vCPU threads
    kicks = [c for c in s.send_calls if c.function == "smp_send_reschedule" and c.caller == "kvm_vcpu_kick"]
    assert kicks and {"CPU 0/KVM", "CPU 1/KVM"} <= {c.sender for c in kicks}
    cb = {(c.cpu, c.function): c for c in s.callbacks}
    assert cb[(1, "sched_ttwu_pending")].via == "__flush_smp_call_function_queue"
    assert cb[(1, "sched_ttwu_pending")].from_ipi and cb[(1, "sched_ttwu_pending")].count == 362


def test_arm64_61_host_findings_name_the_patched_kernel_method():
    d = _analysed("arm64-host-6.1", target="host", rt_hint=(1,))
    assert d.kernel == "6.1.0-50-arm64"
    assert d.tracing == ("tracepoint ipi:ipi_raise (no send callsites on this kernel); function tracer on the "
                         "cross-call paths")
    [vm] = d.wfx
    assert vm.name == "rtguest" and vm.wfi_per_s > 5
    f = next(x for x in d.findings if x.kind == "wfx_traps")
    assert f.change == "host.wfx_notrap" and "a patched host kernel (Linux 6.1.0-50-arm64 < 6.11" in f.advice
    assert d.tracing_state_notes and "'7 (expanded: 1408)' -> '1410'" in d.tracing_state_notes[0]


# --------------------------------------------------------------------------------------------------------
# Window: an abort (Ctrl-C, another target's error) before the window starts means it never starts


class _StateOnlyTransport:
    """Answers the tracing state probe with a recorded state; records every other command it is asked to run."""

    label = "recorded"

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    def run(self, argv, **kwargs):
        from orchestrator.remote.transport import CommandResult

        self.commands.append(list(argv))
        out = _read("arm64-host", "state-before") if argv[2].lstrip().startswith("raw=") else ""
        return CommandResult(argv=tuple(argv), exit_status=0, stdout=out, stderr="", duration_s=0.0)


def test_a_window_aborted_before_it_started_never_starts_and_needs_no_cleanup():
    from orchestrator.diagnose.window import DiagnosisCancelled, Window

    t = _StateOnlyTransport()
    w = Window(t, "lab1.host", 10, lambda e: None)
    w.abort()  # before run(): nothing ran on the target, so nothing to clean
    assert t.commands == []
    with pytest.raises(DiagnosisCancelled):
        w.run()
    assert len(t.commands) == 1 and "raw=" in t.commands[0][2]  # only the read-only state probe ran


def test_a_window_aborted_after_its_state_was_read_is_cleaned_up_twice():
    from orchestrator.diagnose.window import Window

    t = _StateOnlyTransport()
    w = Window(t, "lab1.host", 10, lambda e: None)
    w.before = w.state()  # as run() does first
    w.abort()
    w.abort()  # idempotent
    cleanups = [c for c in t.commands if w.instance in c and "pkill" in c[2]]
    assert len(cleanups) == 2 and all(c[-1] == w.pidfile for c in cleanups)
