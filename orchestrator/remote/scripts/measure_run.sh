nt=$1 nl=$2 settle=$3 lu=$4; shift 4
missing=
while [ "$nt" -gt 0 ]; do command -v "$1" >/dev/null 2>&1 || missing="$missing $1"; shift; nt=$((nt - 1)); done
if [ -n "$missing" ]; then echo "missing$missing"; exit 0; fi
echo @@; cat /proc/sys/kernel/random/boot_id; echo @@; cat /proc/cmdline; echo @@
if [ "$nl" -gt 0 ]; then
  trap 'systemctl stop "$lu.service" >/dev/null 2>&1' EXIT
  trap 'exit 143' HUP INT TERM
  words= i=1
  while [ "$i" -le "$nl" ]; do words="$words \"\${$i}\""; i=$((i + 1)); done
  eval "$words" >&2 || { echo "load-failed $?"; exit 0; }
  shift "$nl"
  sleep "$settle"
fi
"$@"
