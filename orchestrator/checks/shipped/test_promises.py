"""rt-tune's shipped checks: what the kept changes promise on the target under test, read back live.

Parametrized from the target's promise (orchestrator/checks/promises.py): one test per kernel argument, sysctl
and disabled service, so a JUnit report names exactly what drifted. Not checked here: IRQ affinities (a read-only
check cannot tell an IRQ the kernel refuses to move, which `tune verify` finds by writing its affinity back, from
one that drifted)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from orchestrator.core.cpulist import parse_cpulist

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


def test_service_disabled(host, disabled_unit):
    unit, masked = disabled_unit
    enabled = host.run("systemctl is-enabled %s", unit).stdout.strip()
    allowed = {"masked"} if masked else {"disabled", "masked", "static", "indirect"}
    assert enabled in allowed or (not enabled and not masked), f"{unit} is-enabled: {enabled!r}"
    active = host.run("systemctl is-active %s", unit).stdout.strip()
    assert active not in ("active", "activating", "reloading"), f"{unit} is {active}"


def test_vcpu_threads_on_their_cpus(host, promise):
    pin = promise.vcpu_pinning
    if pin is None:
        pytest.skip("no vCPU pinning promised on this target")
    pid = host.run("systemctl show -p MainPID --value %s", pin.service).stdout.strip()
    assert pid not in ("", "0"), f"{pin.service} has no main process"
    out = host.run("for t in /proc/%s/task/*; do printf '%%s\\t%%s\\n' \"$(cat $t/comm)\" "
                   "\"$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' $t/status)\"; done", pid).stdout
    wrong = []
    for line in out.splitlines():
        name, _, cpus = line.partition("\t")
        allowed = set(parse_cpulist(cpus)) if cpus else set()
        vcpu = name[4:-4] if name.startswith("CPU ") and name.endswith("/KVM") else None
        if vcpu is not None and vcpu in pin.vcpus:
            if allowed != {pin.vcpus[vcpu]}:
                wrong.append(f"{name} on {cpus}, want {pin.vcpus[vcpu]}")
        elif not allowed <= set(pin.housekeeping):
            wrong.append(f"{name} on {cpus}, want within housekeeping {pin.housekeeping}")
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
