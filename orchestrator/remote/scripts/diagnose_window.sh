
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
  sec "vmstat$1"
  grep -E '^(compact_stall|compact_fail|compact_success|thp_fault_alloc|thp_collapse_alloc|thp_split_page) ' \
    /proc/vmstat 2>/dev/null
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
# issue #20's kinds: kernel threads (the format of orchestrator/facts/kthreads.py), irqbalance, RT throttling, THP
sec kthreads
grep -s -H -E '^(Name|PPid|Cpus_allowed_list):' /proc/[0-9]*/status; echo '@@ stat'; cat /proc/[0-9]*/stat 2>/dev/null
sec irqbalance
systemctl show --no-pager -p LoadState -p ActiveState -p Environment irqbalance.service 2>/dev/null
grep -h '^IRQBALANCE_BANNED' /etc/default/irqbalance /etc/sysconfig/irqbalance 2>/dev/null
sec rt_throttling
printf 'runtime_us %s\n' "$(cat /proc/sys/kernel/sched_rt_runtime_us 2>/dev/null)"
printf 'throttled %s\n' "$(dmesg 2>/dev/null | grep -c 'RT throttling activated')"
sec thp; cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null
if [ -n "$I" ]; then
  sec trace_stats
  for c in "$I"/per_cpu/cpu*; do printf 'cpu %s\n' "${c##*cpu}"; cat "$c/stats"; done
  sec trace; gzip -1 < "$I/trace" 2>/dev/null | base64 | tr -d '\n'
fi
cleanup
sec end
