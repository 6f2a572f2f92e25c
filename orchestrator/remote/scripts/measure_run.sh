M=$1 nt=$2 nl=$3 settle=$4 lu=$5 nx=$6 sr=$7; shift 7
missing=
while [ "$nt" -gt 0 ]; do command -v "$1" >/dev/null 2>&1 || missing="$missing $1"; shift; nt=$((nt - 1)); done
if [ -n "$missing" ]; then echo "missing$missing"; exit 0; fi
tids=
while [ "$nx" -gt 0 ]; do
  case $1 in ''|*[!0-9]*) echo "bad-tid"; exit 2;; esac
  tids="$tids $1"; shift; nx=$((nx - 1))
done
echo @@; cat /proc/sys/kernel/random/boot_id; echo @@; cat /proc/cmdline; echo @@
sec() { printf '\n%s %s\n' "$M" "$1"; }
# a file's lines, read by the shell itself: on a small or emulated unit a fork costs more than the read (the x86
# lab's TCG guest: 13 ms for /proc/interrupts, softirqs and stat this way, 160 ms with a cat each)
rd() { while IFS= read -r l || [ -n "$l" ]; do printf '%s\n' "$l"; done 2>/dev/null < "$1"; }
# the host's system-register traps of its guests (sr `start:INST` / `stop:INST`, `-`: none): a hist trigger on
# kvm:kvm_sys_access per trapping thread and GIC CPU-interface register (a hist takes at most 3 keys, so Op0, Op1
# and CRn are the filter), in a private tracefs instance created by `start` and read and removed by `stop`
SRT='hist:keys=common_pid,CRm,Op2 if Op0 == 3 && Op1 == 0 && CRn == 12'
sysreg() {
  T=
  for d in /sys/kernel/tracing /sys/kernel/debug/tracing; do [ -e "$d/instances" ] && { T=$d; break; }; done
  [ -n "$T" ] || { echo "none no tracefs with instances"; return; }
  mode=${1%%:*} inst=${1#*:} ev=events/kvm/kvm_sys_access
  case $inst in rt-tune-sysreg-*) ;; *) echo "none bad instance name"; return;; esac
  I=$T/instances/$inst
  if [ "$mode" = start ]; then
    # one left by an rt-tune that died mid-run (the unit lock makes this run the only one on the unit)
    for o in "$T"/instances/rt-tune-sysreg-*; do
      [ -d "$o" ] || continue
      echo "!$SRT" > "$o/$ev/trigger" 2>/dev/null; rmdir "$o" 2>/dev/null && echo "stale ${o##*/}"
    done
    [ -e "$T/$ev" ] || { echo "none no kvm:kvm_sys_access tracepoint"; return; }
    mkdir "$I" 2>/dev/null || { echo "none could not create $I"; return; }
    if echo "$SRT" > "$I/$ev/trigger" 2>/dev/null; then echo "started $inst"
    else rmdir "$I"; echo "none the hist trigger was refused"; fi
  elif [ -d "$I" ]; then
    # paused first: a live hist read races the events still counted (CI, 2026-12-07: "hitcounts sum to 2123,
    # its totals say 2124"); the pause must name the trigger as it was set, filter included
    echo "${SRT%% if *}:pause if ${SRT#* if }" >> "$I/$ev/trigger" 2>/dev/null
    echo "instance $inst"; rd "$I/$ev/hist"
    echo "!$SRT" > "$I/$ev/trigger" 2>/dev/null; rmdir "$I" 2>/dev/null || echo "not-removed"
  else
    echo "none the instance $inst is gone"
  fi
}
# one counter snapshot: sections NAME$1 (measure/counters.py parses them)
snap() {
  if [ "$sr" != - ]; then sec "sysreg$1"; sysreg "$sr"; fi
  sec "uptime$1"; rd /proc/uptime
  sec "boot_id$1"; rd /proc/sys/kernel/random/boot_id
  sec "interrupts$1"; rd /proc/interrupts
  sec "softirqs$1"; rd /proc/softirqs
  sec "stat$1"; rd /proc/stat
  sec "kvm$1"
  for v in /sys/kernel/debug/kvm/[0-9]*-[0-9]*; do
    [ -d "$v" ] || continue
    pid=${v##*/}; pid=${pid%%-*}
    # QEMU's -name: the word after `-name` in its NUL-separated cmdline
    name=- prev=
    while IFS= read -r w; do
      if [ "$prev" = -name ]; then name=$w; break; fi
      prev=$w
    done <<END
$(tr '\0' '\n' 2>/dev/null < "/proc/$pid/cmdline")
END
    read -r comm 2>/dev/null < "/proc/$pid/comm" || comm=-
    printf 'vm %s %s %s\n' "${v##*/}" "$comm" "${name:--}"
    for f in "$v"/*; do
      # x86's mmu_rmaps_stat is a table, computed by walking every rmap under the VM's MMU lock: never read
      case ${f##*/} in mmu_rmaps_stat) continue;; esac
      [ -f "$f" ] && read -r x 2>/dev/null < "$f" || continue
      case $x in ''|*[!0-9]*) continue;; esac
      printf '%s %s\n' "${f##*/}" "$x"
    done
  done
  sec "threads$1"
  for t in $tids; do
    printf 'thread %s\n' "$t"
    for f in status sched; do
      while IFS= read -r l; do
        case $l in
          Name:*|voluntary_ctxt_switches:*|nonvoluntary_ctxt_switches:*) printf '%s\n' "$l";;
          'se.nr_migrations '*|'nr_switches '*|'nr_voluntary_switches '*|'nr_involuntary_switches '*)
            printf '%s\n' "$l";;
        esac
      done 2>/dev/null < "/proc/$t/$f"
    done
  done
}
if [ "$nl" -gt 0 ]; then
  trap 'systemctl stop "$lu.service" >/dev/null 2>&1' EXIT
  trap 'exit 143' HUP INT TERM
  words= i=1
  while [ "$i" -le "$nl" ]; do words="$words \"\${$i}\""; i=$((i + 1)); done
  eval "$words" >&2 || { echo "load-failed $?"; exit 0; }
  shift "$nl"
  sleep "$settle"
fi
snap 0
if [ "$#" -eq 0 ]; then sec end; exit 0; fi
sec run
"$@"
rc=$?
snap 1
sec end
exit "$rc"
