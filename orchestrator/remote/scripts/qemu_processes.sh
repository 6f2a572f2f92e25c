for d in /proc/[0-9]*; do
  exe=$(readlink "$d/exe" 2>/dev/null) || continue
  case "${exe##*/}" in qemu-system*) ;; *) continue ;; esac
  cmdline=$(base64 -w0 "$d/cmdline" 2>/dev/null) || continue
  [ -n "$cmdline" ] || continue
  tasks=
  for t in "$d"/task/[0-9]*; do
    st=$(grep -E '^(Name|Cpus_allowed_list):' "$t/status" 2>/dev/null) || continue
    tasks="$tasks
task ${t##*/}
$st"
  done
  [ -n "$tasks" ] || continue
  printf 'process %s\nexe %s\ncmdline %s%s\nend\n' "${d#/proc/}" "$(printf %s "$exe" | base64 -w0)" "$cmdline" "$tasks"
done
echo done
