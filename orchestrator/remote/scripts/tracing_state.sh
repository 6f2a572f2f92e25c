
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
