# Can this host count its guests' system-register traps? yes / no (no kvm:kvm_sys_access: not an arm64 KVM
# host) / no-tracefs (no tracefs with instances, or not readable)
for d in /sys/kernel/tracing /sys/kernel/debug/tracing; do
  if [ -e "$d/instances" ]; then
    if [ -e "$d/events/kvm/kvm_sys_access" ]; then echo yes; else echo no; fi
    exit 0
  fi
done
echo no-tracefs
