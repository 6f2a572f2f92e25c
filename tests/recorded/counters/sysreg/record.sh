set -eu
T=/sys/kernel/tracing
I=$T/instances/rt-tune-probe
mkdir $I
echo 'hist:keys=CRn,CRm,Op2 if Op0 == 3 && Op1 == 0' > $I/events/kvm/kvm_sys_access/trigger
echo "# uname -r: $(uname -r)"
echo "# date: $(date -u +%FT%TZ)"
echo "# hist trigger on kvm:kvm_sys_access in a private instance, 5 s while the nested guest runs stress-ng"
sleep 5
echo '# --- hist ---'
cat $I/events/kvm/kvm_sys_access/hist
echo "!hist:keys=CRn,CRm,Op2 if Op0 == 3 && Op1 == 0" > $I/events/kvm/kvm_sys_access/trigger || echo "# could not remove the trigger"
echo 1 > $I/events/kvm/kvm_sys_access/enable
sleep 1
echo 0 > $I/events/kvm/kvm_sys_access/enable
echo '# --- trace (1 s, first 40 lines) ---'
head -40 $I/trace
rmdir $I
echo '# instance removed'
