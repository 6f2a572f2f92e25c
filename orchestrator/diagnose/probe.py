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

WINDOW_SCRIPT = r"""
M=$1; dur=$2; inst=$3; pidf=$4; kb=$5; cdcmd=$6; events=$7; funcs=$8
sec() { printf '\n%s %s\n' "$M" "$1"; }
echo $$ > "$pidf"
# run on CPU 0 (the kernel keeps it a housekeeping CPU): the probe's own cat must not be the task it finds
# running on a nohz_full CPU
taskset -pc 0 $$ > /dev/null 2>&1
T=
for d in /sys/kernel/tracing /sys/kernel/debug/tracing; do
  if [ -e "$d/instances" ]; then T=$d; break; fi
done
I=
cleanup() {
  if [ -n "$I" ] && [ -d "$I" ]; then
    echo 0 > "$I/tracing_on" 2>/dev/null
    echo nop > "$I/current_tracer" 2>/dev/null
    echo > "$I/set_ftrace_filter" 2>/dev/null
    echo 0 > "$I/events/enable" 2>/dev/null
    rmdir "$I" 2>/dev/null
  fi
  rm -f "$pidf"
}
slept=
trap '{STOP}; cleanup; exit 130' INT TERM HUP
sample() {
  sec "uptime$1"; cat /proc/uptime
  sec "interrupts$1"; cat /proc/interrupts
  sec "units$1"
  systemctl show --no-pager -p Id,NRestarts,ActiveState,SubState,UnitFileState,Result,ExecMainPID \
    '*.service' 2>/dev/null
  sec "kvm$1"
  for v in /sys/kernel/debug/kvm/[0-9]*-[0-9]*; do
    [ -d "$v" ] || continue
    pid=${v##*/}; pid=${pid%%-*}
    name=$(tr '\0' '\n' < "/proc/$pid/cmdline" 2>/dev/null | grep -A1 -x -e -name | tail -n 1)
    printf 'vm %s %s %s\n' "${v##*/}" "$(cat "/proc/$pid/comm" 2>/dev/null || echo -)" "${name:--}"
    for f in wfi_exit_stat wfe_exit_stat exits signal_exits; do
      [ -r "$v/$f" ] && printf '%s %s\n' "$f" "$(cat "$v/$f")"
    done
  done
}
sec meta
printf 'kernel %s\narch %s\ntracefs %s\n' "$(uname -r)" "$(uname -m)" "${T:--}"
sample 0
sec setup
if [ -n "$T" ] && mkdir "$T/instances/$inst"; then
  I=$T/instances/$inst
  echo 0 > "$I/tracing_on"
  for e in $events; do
    if [ -e "$I/events/$e/enable" ] && echo 1 > "$I/events/$e/enable"; then echo "event $e"; fi
  done
  echo "$kb" > "$I/buffer_size_kb" && echo "buffer_kb $kb"
  if [ ! -e "$I/events/ipi/ipi_send_cpu" ] && [ -e "$I/events/ipi/ipi_raise" ] \
     && echo 1 > "$I/events/ipi/ipi_raise/enable"; then echo "event ipi/ipi_raise"; fi
  if [ ! -e "$I/events/csd/csd_function_entry" ] && [ -e "$I/set_ftrace_filter" ]; then
    n=0
    for f in $(printf '%s\n' $funcs | grep -x -F -f /dev/stdin "$T/available_filter_functions" | sort -u); do
      if echo "$f" >> "$I/set_ftrace_filter"; then echo "function $f"; n=$((n+1)); fi
    done
    if [ $n -gt 0 ] && echo function > "$I/current_tracer"; then echo "tracer function"; fi
  fi
  echo 1 > "$I/tracing_on" && echo "tracing on"
else
  echo "no-instance ${T:--}"
fi
sleep "$dur" &
wait "$!"
slept=1
[ -n "$I" ] && echo 0 > "$I/tracing_on"
sample 1
sec timer_list; cat /proc/timer_list 2>/dev/null
sec sched_debug; cat /sys/kernel/debug/sched/debug 2>/dev/null
sec nohz_full; cat /sys/devices/system/cpu/nohz_full 2>/dev/null
sec isolated; cat /sys/devices/system/cpu/isolated 2>/dev/null
sec online; cat /sys/devices/system/cpu/online
sec timer_migration; cat /proc/sys/kernel/timer_migration 2>/dev/null
sec cmdline; cat /proc/cmdline
sec coredumps; eval "$cdcmd" 2>/dev/null
if [ -n "$I" ]; then
  sec trace_stats
  for c in "$I"/per_cpu/cpu*; do printf 'cpu %s\n' "${c##*cpu}"; cat "$c/stats"; done
  sec trace; gzip -1 < "$I/trace" 2>/dev/null | base64 | tr -d '\n'
fi
cleanup
sec end
""".replace("{STOP}", STOP_SLEEP)

# Removes a window's leftovers after the controller lost it (error, timeout, Ctrl-C): kills the script (its
# sleep included) and removes the instance. $1 instance name $2 pid file.
CLEANUP_SCRIPT = r"""
inst=$1; pidf=$2
if [ -r "$pidf" ]; then
  p=$(cat "$pidf")
  case $p in (*[!0-9]*|'') ;; (*) pkill -TERM -P "$p" 2>/dev/null; kill -TERM "$p" 2>/dev/null;; esac
  sleep 1
fi
for d in /sys/kernel/tracing /sys/kernel/debug/tracing; do
  I=$d/instances/$inst
  if [ -d "$I" ]; then
    echo 0 > "$I/tracing_on"; echo nop > "$I/current_tracer"; echo > "$I/set_ftrace_filter"
    echo 0 > "$I/events/enable"; rmdir "$I" && echo "removed $I"
  fi
done
rm -f "$pidf"
echo done
"""

#: What "the tracing state" is: the top-level files that select what is traced and how, plus the instance
#: list, kprobes/uprobes and every event with a filter or trigger set. Compared before and after a window.
STATE_FILES = ("current_tracer", "tracing_on", "buffer_size_kb", "trace_clock", "set_event", "set_ftrace_filter",
               "set_ftrace_notrace", "set_graph_function", "set_ftrace_pid", "set_event_pid", "tracing_cpumask",
               "trace_options", "kprobe_events", "uprobe_events", "dynamic_events")
STATE_SCRIPT = r"""
raw=" current_tracer tracing_on buffer_size_kb trace_clock tracing_cpumask "
T=
for d in /sys/kernel/tracing /sys/kernel/debug/tracing; do
  if [ -e "$d/instances" ]; then T=$d; break; fi
done
[ -n "$T" ] || { echo "tracefs -"; exit 0; }
echo "tracefs $T"
cd "$T" || exit 1
firsts= sums=
for f in "$@"; do
  [ -r "$f" ] || continue
  case $raw in (*" $f "*) firsts="$firsts $f";; (*) sums="$sums $f";; esac
done
[ -z "$firsts" ] || awk 'BEGIN { for (i = 1; i < ARGC; i++) v[ARGV[i]] = "" }
  FNR == 1 { v[FILENAME] = substr($0, 1, 200) }
  END { for (i = 1; i < ARGC; i++) printf "@@ %s %s\n", ARGV[i], v[ARGV[i]] }' $firsts
[ -z "$sums" ] || cksum $sums | while read -r crc size name; do printf '@@ %s %s-%s\n' "$name" "$crc" "$size"; done
printf '@@ instances %s\n' "$(ls instances | tr '\n' ' ')"
set -- $(grep -l -v -x -e none -e '#.*' events/*/*/filter events/*/*/trigger 2>/dev/null)
filters= triggers=
for h in "$@"; do
  case $h in (*/filter) filters="$filters $h";; (*) triggers="$triggers $h";; esac
done
printf '@@ filters %s\n' "$(printf '%s' "$filters" | cksum | tr ' ' '-')"
printf '@@ triggers %s\n' "$(printf '%s' "$triggers" | cksum | tr ' ' '-')"
echo end
"""


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
