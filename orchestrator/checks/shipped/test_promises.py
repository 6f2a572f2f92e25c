"""rt-tune's shipped checks: what the kept changes promise on the target under test, read back live.

Parametrized from the target's promise (orchestrator/checks/promises.py): one test per kernel argument, sysctl
and disabled service, so a JUnit report names exactly what drifted.

IRQ affinity, read-only: an IRQ can be told movable only by writing its affinity (what `tune verify` does), so
the check is of what reading can show: rt-tune's boot-time unit is enabled and did not fail at this boot, and
every IRQ moved at apply time is on the housekeeping CPUs or back on its own earlier CPUs (after a reboot the
kernel may manage it: its call, as `tune verify` accepts too). An IRQ on any other CPUs was moved by someone
else (irqbalance, a script) and fails."""

from __future__ import annotations

import fnmatch
import json
import re
import time
from pathlib import Path

import pytest

from orchestrator.config.knobs import KNOBS, normal_value
from orchestrator.core.cpulist import cpus_of_mask, parse_cpulist
from orchestrator.facts.kthreads import KTHREADS_SCRIPT, parse_kthreads
from orchestrator.remote.remote_scripts import PIN_SCRIPT

#: Seconds a crash loop is watched for: samples at the start, middle and end.
CRASH_LOOP_WINDOW_S = 5.0


def _promise(config: pytest.Config) -> dict:
    spec = config.getoption("--rt-tune-spec", default=None)
    return json.loads(Path(spec).read_text())["promise"] if spec else {}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    p = _promise(metafunc.config)
    if "cmdline_arg" in metafunc.fixturenames:
        args = [k if v is None else f"{k}={v}" for k, v in p.get("cmdline", {}).items()]
        metafunc.parametrize("cmdline_arg", args)
    if "sysctl_item" in metafunc.fixturenames:
        metafunc.parametrize("sysctl_item", sorted(p.get("sysctl", {}).items()), ids=lambda kv: kv[0])
    if "sysfs_knob" in metafunc.fixturenames:
        metafunc.parametrize("sysfs_knob", p.get("sysfs", []), ids=lambda k: k["knob"])
    if "enabled_unit" in metafunc.fixturenames:
        metafunc.parametrize("enabled_unit", sorted(p.get("services_enabled", {}).items()), ids=lambda kv: kv[0])
    if "disabled_unit" in metafunc.fixturenames:
        metafunc.parametrize("disabled_unit", sorted(p.get("services_disabled", {}).items()), ids=lambda kv: kv[0])


def _cmdline(host) -> list[str]:
    return host.file("/proc/cmdline").content_string.split()


def test_cmdline_argument(host, cmdline_arg):
    assert cmdline_arg in _cmdline(host), f"{cmdline_arg} is not in /proc/cmdline"


def _cpus_of(arg: str | None) -> set[int]:
    """The CPU list of an isolcpus/nohz_full value ("domain,managed_irq,1-3" -> {1, 2, 3})."""
    parts = [x for x in (arg or "").split(",") if x and not x.replace("_", "").isalpha()]
    return set(parse_cpulist(",".join(parts))) if parts else set()


@pytest.mark.parametrize("arg, sysfs", [("isolcpus", "isolated"), ("nohz_full", "nohz_full")])
def test_the_kernel_isolates_the_cpus_the_cmdline_names(host, promise, arg, sysfs):
    if arg not in promise.cmdline:
        pytest.skip(f"no {arg} promised on this target")
    want = _cpus_of(promise.cmdline[arg])
    live = host.file(f"/sys/devices/system/cpu/{sysfs}").content_string.strip()
    assert want <= set(parse_cpulist(live) if live else []), \
        f"/sys/devices/system/cpu/{sysfs} is {live!r}, not the CPUs of {arg}={promise.cmdline[arg]}"


def test_sysctl(host, sysctl_item):
    name, value = sysctl_item
    live = host.file("/proc/sys/" + name.replace(".", "/")).content_string
    assert live.split() == value.split(), f"{name} is {live.strip()!r}, not {value!r}"


def test_sysfs_knob(host, sysfs_knob):
    """Each file of the knob reads as what rt-tune wrote (in the knob's terms: a cpumask's CPUs, a choice's
    selected word)."""
    spec = KNOBS[sysfs_knob["knob"]]
    wrong = []
    for path, want in sysfs_knob["values"].items():
        f = host.file(path)
        live = f.content_string if f.exists else None
        if normal_value(spec, live) != normal_value(spec, want):
            wrong.append(f"{path} is {live.strip() if live is not None else 'missing'!r}, not {want!r}")
    assert not wrong, "; ".join(wrong)


def test_service_enabled(host, enabled_unit):
    unit, started = enabled_unit
    enabled = host.run("systemctl is-enabled %s", unit).stdout.strip()
    assert enabled == "enabled", f"{unit} is-enabled: {enabled!r}"
    if started:
        active = host.run("systemctl is-active %s", unit).stdout.strip()
        assert active == "active", f"{unit} is {active}"


def test_service_disabled(host, disabled_unit):
    unit, masked = disabled_unit
    enabled = host.run("systemctl is-enabled %s", unit).stdout.strip()
    allowed = {"masked"} if masked else {"disabled", "masked", "static", "indirect"}
    assert enabled in allowed or (not enabled and not masked), f"{unit} is-enabled: {enabled!r}"
    active = host.run("systemctl is-active %s", unit).stdout.strip()
    assert active not in ("active", "activating", "reloading"), f"{unit} is {active}"


#: vCPU thread names with QEMU's debug-threads=on, as rt-tune's pin helper reads them
VCPU_THREAD = re.compile(r"CPU (\d+)/(KVM|TCG|HVF|WHPX)")


def test_vcpu_threads_on_their_cpus(host, promise):
    pin = promise.vcpu_pinning
    if pin is None:
        pytest.skip("no vCPU pinning promised on this target")
    pid = host.run("systemctl show -p MainPID --value %s", pin.service).stdout.strip()
    assert pid not in ("", "0"), f"{pin.service} has no main process"
    out = host.run("for t in /proc/%s/task/*; do printf '%%s\\t%%s\\n' \"$(cat $t/comm)\" "
                   "\"$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' $t/status)\"; done", pid).stdout
    threads = [(name, set(parse_cpulist(cpus)) if cpus else set(), cpus)
               for name, _, cpus in (line.partition("\t") for line in out.splitlines())]
    vcpus = {m[1]: (allowed, cpus) for name, allowed, cpus in threads if (m := VCPU_THREAD.fullmatch(name))}
    others = [(name, allowed, cpus) for name, allowed, cpus in threads if not VCPU_THREAD.fullmatch(name)]
    if not vcpus:  # no debug-threads names: rt-tune's helper finds the vCPUs through QMP (read-only --list)
        listing = json.loads(host.check_output("%s --list %s", PIN_SCRIPT, pid))
        vcpus = {v: (set(parse_cpulist(st["cpus"])), st["cpus"]) for v, st in listing["vcpus"].items()}
        others = [(name, set(parse_cpulist(st["cpus"])), st["cpus"])
                  for name, states in listing["threads"].items() for st in states]
    wrong = [f"CPU {v}: not found" for v in pin.vcpus if v not in vcpus]
    wrong += [f"CPU {v} on {vcpus[v][1]}, want {c}" for v, c in pin.vcpus.items()
              if v in vcpus and vcpus[v][0] != {c}]
    wrong += [f"{name} on {cpus}, want within housekeeping {pin.housekeeping}"
              for name, allowed, cpus in others + [(f"CPU {v}", a, c) for v, (a, c) in vcpus.items()
                                                  if v not in pin.vcpus]
              if not allowed <= set(pin.housekeeping)]
    assert not wrong, "; ".join(wrong)


def _restarts(host) -> dict[str, tuple[int, str]]:
    listing = host.run("systemctl list-units --type=service --all --plain --no-legend --no-pager")
    if listing.rc != 0:
        pytest.skip(f"no systemd to ask: {listing.stderr.strip()[:200]}")
    units = listing.stdout
    names = [line.split()[0] for line in units.splitlines() if line.split() and line.split()[0].endswith(".service")]
    if not names:
        return {}
    out = host.run("systemctl show -p Id -p NRestarts -p SubState --no-pager -- " + " ".join(
        host.backend.quote("%s", n) for n in names)).stdout
    seen: dict[str, tuple[int, str]] = {}
    for block in out.split("\n\n"):
        kv = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if "Id" in kv:
            seen[kv["Id"]] = (int(kv.get("NRestarts") or 0), kv.get("SubState", ""))
    return seen


def test_no_crash_loop(host):
    """No service restarted by systemd during the window, and none waiting to be (SubState auto-restart)."""
    samples = [_restarts(host)]
    for _ in range(2):
        time.sleep(CRASH_LOOP_WINDOW_S / 2)
        samples.append(_restarts(host))
    first, last = samples[0], samples[-1]
    looping = sorted({u for sample in samples for u, (_, sub) in sample.items() if sub == "auto-restart"}
                     | {u for u, (n, _) in last.items() if n > first.get(u, (n, ""))[0]})
    assert not looping, f"crash-looping (restarting, or waiting to restart): {', '.join(looping)}"


def test_wfi_exits_low_where_untrapped(host, promise):
    if not promise.wfx_notrap:
        pytest.skip("WFI/WFE no-trap not promised on this target")
    path = "/sys/kernel/debug/kvm/wfi_exit_stat"
    if not host.file(path).exists:
        pytest.skip(f"{path} is not readable here (debugfs not mounted, or no KVM on arm64)")
    a, t0 = int(host.file(path).content_string), time.monotonic()
    time.sleep(2.0)
    b, t1 = int(host.file(path).content_string), time.monotonic()
    assert (b - a) / (t1 - t0) <= 1.0, f"{(b - a) / (t1 - t0):.1f} WFI exits/s: WFI still traps"


IRQ_UNIT = "rt-tune-irq-affinity.service"


def test_irq_affinity_boot_unit_enabled_and_not_failed(host, promise):
    """Enabled, so the next boot moves the IRQs again; not failed at this boot. (Not necessarily run at this
    boot: the apply moves the IRQs itself and only enables the unit.)"""
    if promise.irq_affinity is None:
        pytest.skip("no IRQ affinity promised on this target")
    out = host.run("systemctl show -p UnitFileState -p ActiveState -p Result --no-pager %s", IRQ_UNIT).stdout
    kv = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert kv.get("UnitFileState") == "enabled", f"{IRQ_UNIT} is {kv.get('UnitFileState') or 'missing'}"
    assert kv.get("ActiveState") != "failed" and kv.get("Result") == "success", \
        f"{IRQ_UNIT} failed at this boot: {kv.get('ActiveState')}, {kv.get('Result')}"


def test_irqs_on_the_housekeeping_cpus(host, promise):
    irq = promise.irq_affinity
    if irq is None or not irq.moved:
        pytest.skip("no IRQ affinity promised on this target" if irq is None else "no IRQ was movable at apply")
    script = ('for n in "$@"; do f=/proc/irq/$n/smp_affinity_list; '
              '[ -r "$f" ] && printf "%s %s\\n" "$n" "$(cat "$f")"; done; true')
    numbers = sorted(irq.moved, key=int)
    out = host.run("sh -c %s -" + " %s" * len(numbers), script, *numbers).stdout
    want = set(irq.housekeeping)
    elsewhere = []
    for line in out.splitlines():
        n, _, cpus = line.partition(" ")
        live = set(parse_cpulist(cpus)) if cpus else set()
        earlier = set(parse_cpulist(irq.moved[n])) if irq.moved.get(n) else set()
        if live not in (want, earlier):
            elsewhere.append(f"IRQ {n} on {cpus}")
    assert not elsewhere, (f"moved off the housekeeping CPUs {format_cpus(want)} by someone else: "
                           + ", ".join(elsewhere))


def format_cpus(cpus: set[int]) -> str:
    return ",".join(map(str, sorted(cpus)))


def test_kernel_threads_as_the_rules_say(host, promise):
    """Every kernel thread a rule matches (by name) has its policy and priority, and its CPUs where it can move."""
    if not promise.kthreads:
        pytest.skip("no kernel thread rules promised on this target")
    threads = parse_kthreads(host.check_output("sh -c %s", KTHREADS_SCRIPT) + "\n")
    wrong = []
    for k in threads:
        want: dict = {}
        for r in promise.kthreads:
            if fnmatch.fnmatchcase(k.comm, r["match"]):
                if r.get("policy"):
                    want.update(policy=r["policy"], priority=r.get("priority") or 0)
                if r.get("cpus") is not None and k.movable:
                    want["cpus"] = set(r["cpus"])
        if "policy" in want and (k.policy, k.priority) != (want["policy"], want["priority"]):
            wrong.append(f"{k.comm} ({k.pid}) is {k.policy} {k.priority}, not {want['policy']} {want['priority']}")
        if "cpus" in want and set(parse_cpulist(k.cpus)) != want["cpus"]:
            wrong.append(f"{k.comm} ({k.pid}) on CPUs {k.cpus}, not {format_cpus(want['cpus'])}")
    assert not wrong, "; ".join(wrong)


def test_irqbalance_off_the_rt_cpus_and_new_irqs_on_housekeeping(host, promise):
    ib = promise.irqbalance
    if ib is None:
        pytest.skip("no irqbalance promise on this target")
    mask = host.file("/proc/irq/default_smp_affinity").content_string.strip()
    assert cpus_of_mask(mask) == sorted(ib["housekeeping"]), \
        f"/proc/irq/default_smp_affinity is {mask}, not the housekeeping CPUs {format_cpus(set(ib['housekeeping']))}"
    show = host.run("systemctl show -p LoadState -p ActiveState -p Environment irqbalance.service").stdout
    kv = dict(line.split("=", 1) for line in show.splitlines() if "=" in line)
    if kv.get("LoadState", "not-found") == "not-found":
        return  # no irqbalance on this target: the default affinity is the whole promise
    if ib["stop"]:
        assert kv.get("ActiveState") != "active", "irqbalance runs, though rt-tune stopped it"
    else:
        banned = format_cpus(set(ib["rt"]))
        assert f"IRQBALANCE_BANNED_CPULIST={banned}" in kv.get("Environment", "").split(), \
            f"irqbalance's environment does not ban the RT CPUs {banned}: {kv.get('Environment', '')!r}"
