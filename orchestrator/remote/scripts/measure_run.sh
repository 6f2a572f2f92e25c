M=$1 nt=$2 nl=$3 settle=$4 lu=$5 nx=$6; shift 6
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
# one counter snapshot: sections NAME$1 (measure/counters.py parses them)
snap() {
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
