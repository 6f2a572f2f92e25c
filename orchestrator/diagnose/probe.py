"""The diagnosis window: one remote script that samples a target, traces it in a private tracefs instance for
`duration` seconds, samples it again, and removes everything it made.

Why one script: on a nested guest every round trip goes through the host, and the two samples must bracket the
trace window exactly. Why a private instance (`instances/rt-tune-diag-<token>`, like trace-cmd's `-B`): the
events, tracer, filters and buffers rt-tune sets live in that instance only, so the top-level tracing state the
user or another tool set up is never written; rmdir of the instance is the whole undo. One kernel side effect
remains on older kernels (the lab's 6.1; not its 6.12): the first event enabled anywhere makes the kernel
allocate the top-level buffer it had deferred (`7 (expanded: 1408)` -> `1408`), as any first use of tracing
does. Events are enabled before the
instance's buffer is resized, because resizing first would mark the top-level buffer expanded without
allocating it (stuck at 7 KB for the next user). The script removes it on
exit and on INT/TERM/HUP; the controller checks the target's tracing state before and after (`tracing_state`)
and, on error, timeout or Ctrl-C, kills the script by its pid file and removes the instance itself.

The output is framed: `\\n<marker> <section>\\n` lines with a random marker, each followed by one command's raw
output. The parsers of each section are pure functions (orchestrator/diagnose/kstate.py,
orchestrator/diagnose/tracing.py) tested on recorded real output.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import re
import secrets
import shlex
import zlib

from orchestrator.core.errors import ParseError
from orchestrator.facts.systemd import coredumps_fact
from orchestrator.remote.remote_scripts import load_script

TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
INSTANCE_PREFIX = "rt-tune-diag-"
PIDFILE_DIR = "/run"

#: Tracepoints enabled in the instance when the kernel has them (reference.md, field notes §1, §3, §4).
#: `ipi/ipi_raise` (arm/arm64 before the 6.5 send events) only when `ipi_send_cpu` is absent.
EVENTS = ("ipi/ipi_send_cpu", "ipi/ipi_send_cpumask", "csd/csd_function_entry", "timer/hrtimer_expire_entry",
          "timer/timer_expire_entry", "timer/tick_stop", "sched/sched_switch")
OLD_IPI_EVENT = "ipi/ipi_raise"

#: Without the csd tracepoint (Linux < 6.3, e.g. bookworm's 6.1): the function tracer, in the instance, on the
#: cross-call paths. Senders show the caller (`kick_all_cpus_sync <-bpf_int_jit_compile`) and the sending task;
#: callbacks show on the CPU that runs them (`do_nothing`, `tlb_remove_table_smp_sync`, `sched_ttwu_pending`).
#: Names the running kernel does not have (available_filter_functions) are skipped.
SEND_FUNCTIONS = ("kick_all_cpus_sync", "tlb_remove_table_sync_one", "smp_call_function_many_cond",
                  "smp_call_function_single", "smp_call_function_single_async", "native_smp_send_reschedule",
                  "arch_smp_send_reschedule", "smp_send_reschedule", "irq_work_queue_on")
CALLBACK_FUNCTIONS = ("do_nothing", "tlb_remove_table_smp_sync", "sched_ttwu_pending", "flush_tlb_func",
                      "nohz_csd_func", "rcu_exp_handler", "ipi_mb", "do_sync_core", "remote_function",
                      "nohz_full_kick_func", "retrigger_next_event", "__blk_mq_complete_request_remote",
                      "ipi_sync_rq_state", "kvm_flush_remote_tlbs", "ack_kick")
FALLBACK_FUNCTIONS = SEND_FUNCTIONS + CALLBACK_FUNCTIONS

BUFFER_KB = 4096  # per CPU, in the instance only

# $1 marker $2 duration (s) $3 instance name $4 pid file $5 buffer KB $6 coredump argv (shell-quoted)
# $7 events (space separated) $8 fallback functions (space separated)
# The window's wait is a `sleep` in the background, so that a signal runs the trap at once. The trap KILLs
# `$!` rather than a variable set after the fork: dash may run a trap between `cmd &` and the next command
# (measured: 43 of 300 signalled loops left their `sleep` behind that way; the CI lost one `sleep 30`), and a
# TERM that reaches the child before it has exec'd `sleep` is lost (dash's handler is still installed there).
# `$!` is empty before the fork; after the wait `slept` keeps a reused pid from being signalled.
STOP_SLEEP = 'if [ -z "$slept" ] && [ -n "$!" ]; then kill -KILL "$!" 2>/dev/null; fi'

WINDOW_SCRIPT = load_script("diagnose_window.sh").replace('{STOP}', STOP_SLEEP)

# Removes a window's leftovers after the controller lost it (error, timeout, Ctrl-C): kills the script (its
# sleep included) and removes the instance. $1 instance name $2 pid file.
CLEANUP_SCRIPT = load_script("diagnose_cleanup.sh")

#: What "the tracing state" is: the top-level files that select what is traced and how, plus the instance
#: list, kprobes/uprobes and every event with a filter or trigger set. Compared before and after a window.
STATE_FILES = ("current_tracer", "tracing_on", "buffer_size_kb", "trace_clock", "set_event", "set_ftrace_filter",
               "set_ftrace_notrace", "set_graph_function", "set_ftrace_pid", "set_event_pid", "tracing_cpumask",
               "trace_options", "kprobe_events", "uprobe_events", "dynamic_events")
STATE_SCRIPT = load_script("tracing_state.sh")


def new_instance_name() -> str:
    return INSTANCE_PREFIX + secrets.token_hex(6)


def _check_instance(instance: str) -> None:
    """Only names new_instance_name() makes: the scripts remove `instances/<name>`, never another tool's."""
    if not re.fullmatch(re.escape(INSTANCE_PREFIX) + r"[0-9a-f]{12}", instance):
        raise ValueError(f"not an rt-tune diagnosis instance name: {instance!r}")


def window_argv(marker: str, duration_s: float, instance: str, pidfile: str,
                buffer_kb: int = BUFFER_KB) -> list[str]:
    """The window script's argv (`sh -c SCRIPT - ARGS...`); the transport quotes it, as every command."""
    _check_instance(instance)
    coredumps = shlex.join(coredumps_fact(3600).argv)
    return ["sh", "-c", WINDOW_SCRIPT, "-", marker, f"{duration_s:g}", instance, pidfile, str(buffer_kb),
            coredumps, " ".join(EVENTS), " ".join(FALLBACK_FUNCTIONS)]


def cleanup_argv(instance: str, pidfile: str) -> list[str]:
    _check_instance(instance)
    return ["sh", "-c", CLEANUP_SCRIPT, "-", instance, pidfile]


def state_argv() -> list[str]:
    return ["sh", "-c", STATE_SCRIPT, "-", *STATE_FILES]


def parse_tracing_state(text: str) -> dict[str, str]:
    """STATE_SCRIPT's output -> {item: checksum or listing}; `tracefs -` alone when tracefs is not mounted."""
    lines = text.rstrip("\n").split("\n")
    if not lines or not lines[0].startswith("tracefs "):
        raise ParseError(f"expected `tracefs PATH` first in the tracing state probe, got {text[:200]!r}")
    state = {"tracefs": lines[0].split(" ", 1)[1]}
    if state["tracefs"] == "-":
        return state
    if lines[-1] != "end":
        raise ParseError(f"expected the tracing state probe to end with `end` (truncated?), got {text[-200:]!r}")
    for line in lines[1:-1]:
        m = re.fullmatch(r"@@ (\S+) ?(.*)", line)
        if not m:
            raise ParseError(f"unexpected line in the tracing state probe: {line[:200]!r}")
        state[m.group(1)] = m.group(2).strip()
    if "instances" not in state:
        raise ParseError("expected an `@@ instances` line in the tracing state probe")
    return state


def split_sections(text: str, marker: str) -> dict[str, str]:
    """The window script's framed output -> {section: raw output}. Requires the final `end` section: a window
    that was cut short is an error, never a partial diagnosis."""
    chunks = text.split("\n" + marker + " ")
    if chunks[0].strip():
        raise ParseError(f"unexpected output before the first section: {chunks[0][:200]!r}")
    sections: dict[str, str] = {}
    for chunk in chunks[1:]:
        name, _, body = chunk.partition("\n")
        if not re.fullmatch(r"[a-z_]+[01]?", name) or name in sections:
            raise ParseError(f"unexpected section header {name[:80]!r} in the diagnosis window's output")
        sections[name] = body
    if "end" not in sections:
        raise ParseError("the diagnosis window's output has no `end` section: it was cut short")
    return sections


def decode_trace(blob: str) -> str:
    """The `trace` section: the instance's trace file, gzip'ed and base64'ed on the target."""
    blob = blob.strip()
    if not blob:
        return ""
    try:
        return gzip.decompress(base64.b64decode(blob, validate=True)).decode("utf-8", "replace")
    except (binascii.Error, OSError, EOFError, zlib.error) as exc:
        raise ParseError(f"the trace section is not gzip+base64 ({exc}); starts {blob[:80]!r}") from None
