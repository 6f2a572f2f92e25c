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
# one counter snapshot: sections NAME$1 (measure/counters.py parses them); one-line files read by the shell itself
snap() {
  sec "uptime$1"; read -r l < /proc/uptime && printf '%s\n' "$l"
  sec "boot_id$1"; read -r l < /proc/sys/kernel/random/boot_id && printf '%s\n' "$l"
  sec "interrupts$1"; cat /proc/interrupts
  sec "softirqs$1"; cat /proc/softirqs
  sec "stat$1"; cat /proc/stat
  sec "kvm$1"
  for v in /sys/kernel/debug/kvm/[0-9]*-[0-9]*; do
    [ -d "$v" ] || continue
    pid=${v##*/}; pid=${pid%%-*}
    name=$(tr '\0' '\n' < "/proc/$pid/cmdline" 2>/dev/null | grep -A1 -x -e -name | tail -n 1)
    read -r comm 2>/dev/null < "/proc/$pid/comm" || comm=-
    printf 'vm %s %s %s\n' "${v##*/}" "$comm" "${name:--}"
    for f in "$v"/*; do
      [ -f "$f" ] && read -r x 2>/dev/null < "$f" || continue
      case $x in ''|*[!0-9]*) continue;; esac
      printf '%s %s\n' "${f##*/}" "$x"
    done
  done
  sec "threads$1"
  for t in $tids; do
    printf 'thread %s\n' "$t"
    grep -h -E -e '^(Name|voluntary_ctxt_switches|nonvoluntary_ctxt_switches):' \
      -e '^(se\.nr_migrations|nr_switches|nr_voluntary_switches|nr_involuntary_switches) +:' \
      "/proc/$t/status" "/proc/$t/sched" 2>/dev/null
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
