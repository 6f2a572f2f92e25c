"""The threads of a unit's QEMU and their allowed CPUs, read with plain shell (not rt-tune's listing): what the
vCPU-map lab tests check rt-tune's pinning against."""

from __future__ import annotations


def qemu_threads(t, service: str = "rt-guest-vm.service") -> dict[str, list[str]]:
    """thread name -> the Cpus_allowed_list of each thread of that name, for the QEMU run by `service`."""
    pid = t.run(["systemctl", "show", "-p", "MainPID", "--value", service]).stdout.strip()
    out = t.run(["sh", "-c", f'for d in /proc/{pid}/task/*; do printf "%s\\t%s\\n" "$(cat $d/comm)" '
                             f'"$(grep Cpus_allowed_list $d/status | cut -f2)"; done']).stdout
    threads: dict[str, list[str]] = {}
    for line in out.splitlines():
        name, allowed = line.split("\t")
        if not allowed:  # a thread that ended between the listing and the read of its status (QEMU's workers
            continue     # come and go; its name may or may not have been read before it went)
        threads.setdefault(name, []).append(allowed)
    return threads


def assert_vcpu_map(threads: dict[str, list[str]], rt_vcpu: str, rt_cpu: str, hk: str) -> None:
    """The RT vCPU's thread alone on its isolated CPU; every other thread of QEMU (the other vCPU, the main
    loop, call_rcu, workers) allowed only on the housekeeping CPUs, so none is allowed on the RT CPU."""
    assert threads[rt_vcpu] == [rt_cpu], threads
    others = {name: cpus for name, cpus in threads.items() if name != rt_vcpu}
    assert all(c == hk for cpus in others.values() for c in cpus), threads
    assert any(name.startswith("CPU 0/") for name in others) and len(others) >= 3, threads
