
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
