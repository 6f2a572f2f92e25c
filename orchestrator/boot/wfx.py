"""Guest WFI/WFE traps on arm64 KVM hosts: how to stop them on a given host, and how to see that they stopped.

Why (field notes §2): with WFI/WFE trapping on, a guest's idle `wfi` traps into KVM, and a signal to the vCPU
thread (QEMU's vfio interrupt path kicks every vCPU) makes that trap path long. Clearing HCR_EL2.TWI/TWE for
the guest's vCPUs removes it. Linux >= 6.11 does this with the boot parameters
`kvm-arm.wfi_trap_policy=notrap kvm-arm.wfe_trap_policy=notrap`; older kernels hard-code the policy, so they
need a patched host kernel (named in the profile: `wfx_notrap: {kernel: {deb: FILE}}`).

Evidence: KVM's debugfs counters `/sys/kernel/debug/kvm/wfi_exit_stat` and `wfe_exit_stat` (the sum over all
VMs; each VM's directory `/sys/kernel/debug/kvm/<pid>-<fd>/` holds the same names for that VM alone). While the
guest idles, trapped WFIs make `wfi_exit_stat` grow; with no-trap in effect it stops growing. The lab notes
(../shared/lab-notes.md, a nested arm64 KVM guest idling under TCG) saw it grow from 6600 to 6732 in 5 s,
i.e. 26.4 WFI exits/s with trapping on. There is no arm64 hardware here: nothing below was measured with
no-trap in effect, and the 90 % / near-zero thresholds are a decision rule, not a recorded figure.
"""

from __future__ import annotations

import re
import shlex
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from orchestrator.core.errors import InputError, ParseError, TuneError
from orchestrator.facts.base import Fact

ARM64_ARCHES = ("aarch64", "arm64")
POLICY_SINCE = (6, 11)  # first Linux with kvm-arm.wfi_trap_policy / wfe_trap_policy
NOTRAP_ARGS: tuple[tuple[str, str], ...] = (("kvm-arm.wfi_trap_policy", "notrap"),
                                            ("kvm-arm.wfe_trap_policy", "notrap"))
DEBUGFS = "/sys/kernel/debug"
KVM_DEBUGFS = f"{DEBUGFS}/kvm"
STAT_FILES = ("wfi_exit_stat", "wfe_exit_stat")
MIN_DROP = 0.9  # no-trap is in effect when the idle WFI exit rate drops by at least this fraction ...
NEAR_ZERO_PER_S = 1.0  # ... or to at most this many exits per second

_RELEASE = re.compile(r"([0-9]+)\.([0-9]+)(?:\.([0-9]+))?(?:\.[0-9]+)*(?=\Z|[^0-9.])")
_VM_DIR = re.compile(r"[0-9]+-[0-9]+")  # fullmatch
_HEAD = ("uptime", "debugfs", "access", "kvm")


class WfxNeedsKernelError(InputError):
    """The host kernel is older than 6.11 and the profile names no patched kernel: nothing rt-tune can do."""


class WfxEvidenceError(TuneError):
    """The WFx exit counters cannot give a rate (a counter went backwards: a VM restarted or exited)."""


class WfxMethod(BaseModel):
    """How to stop WFI/WFE traps on one host. `method`:
    - "cmdline": add `add` to the host's kernel command line (Linux >= 6.11);
    - "kernel": install and boot `artifact` (the profile's dict: deb/package/release); `running` says
      the host already runs that release, so only the evidence is left to check;
    - "not_applicable": nothing to do (`reason` says why)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["cmdline", "kernel", "not_applicable"]
    arch: str
    kernel_release: str
    reason: str
    add: dict[str, str] = {}
    artifact: dict[str, Any] | None = None
    running: bool = False


def parse_kernel_version(release: str) -> tuple[int, int, int]:
    """`uname -r` -> (major, minor, patch): "6.1.0-41-arm64" -> (6, 1, 0), "6.12.9+bpo-arm64" -> (6, 12, 9),
    "6.11" -> (6, 11, 0), "5.10.120-rt70" -> (5, 10, 120). Anything else is a ParseError, never a guess."""
    m = _RELEASE.match(release.strip())
    if not m:
        raise ParseError(f"not a kernel release (expected MAJOR.MINOR[.PATCH][suffix], e.g. 6.1.0-41-arm64), "
                         f"got {release!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def choose_method(arch: str, kernel_release: str, params: dict[str, Any]) -> WfxMethod:
    """The way to apply a `wfx_notrap` change (its ChangeSpec params) on a host with this `uname -m` and
    `uname -r`. Prefers the boot parameters whenever the kernel has them, even if the profile names a kernel.
    Raises WfxNeedsKernelError on arm64 < 6.11 without a kernel in `params`."""
    if arch not in ARM64_ARCHES:
        return WfxMethod(method="not_applicable", arch=arch, kernel_release=kernel_release,
                         reason=f"WFI/WFE are arm64 instructions and KVM traps them only on arm64; on {arch} "
                                "there is nothing to untrap")
    version = parse_kernel_version(kernel_release)
    since = ".".join(map(str, POLICY_SINCE))
    artifact = params.get("kernel")
    if version[:2] >= POLICY_SINCE:
        note = " (the patched kernel the profile names is not needed)" if artifact else ""
        return WfxMethod(method="cmdline", arch=arch, kernel_release=kernel_release, add=dict(NOTRAP_ARGS),
                         reason=f"Linux {kernel_release} >= {since} has kvm-arm.wfi_trap_policy and "
                                f"kvm-arm.wfe_trap_policy{note}")
    found = f"{version[0]}.{version[1]}"
    if not artifact:
        raise WfxNeedsKernelError(
            f"host kernel {kernel_release} (Linux {found}) cannot stop trapping guest WFI/WFE: the boot parameters "
            f"kvm-arm.wfi_trap_policy=notrap / kvm-arm.wfe_trap_policy=notrap need Linux >= {since}, and older "
            "kernels need a patched host kernel. Either boot a >= 6.11 kernel on the host (e.g. from "
            "bookworm-backports), or name the patched kernel in the profile: "
            "`wfx_notrap: {kernel: {deb: linux-image-....deb, release: \"UNAME-R\"}}` (a .deb next to the profile) "
            "or `wfx_notrap: {kernel: {package: NAME}}` (from the unit's apt repositories)")
    running = artifact.get("release") == kernel_release
    what = artifact.get("deb") or f"package {artifact.get('package')}"
    return WfxMethod(method="kernel", arch=arch, kernel_release=kernel_release, artifact=dict(artifact),
                     running=running,
                     reason=f"Linux {kernel_release} < {since} has no trap-policy parameters; "
                            + (f"it already runs the patched kernel {what}" if running
                               else f"install and boot the patched kernel {what}"))


# ---- evidence: KVM's debugfs WFx exit counters -----------------------------------------------------------
class WfxExits(BaseModel):
    """One reading of KVM's WFx exit counters. `available` False (and `reason`) when debugfs is not mounted,
    KVM has no debugfs directory (module not loaded) or a counter file is absent; counts are then None."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scope: str  # "global" (all VMs) or a VM directory "<pid>-<fd>"
    available: bool
    reason: str = ""
    wfi: int | None = None
    wfe: int | None = None
    uptime_s: float  # /proc/uptime when read: the unit's own clock for rates
    vms: list[str] = []  # the per-VM directories present ("<pid>-<fd>")


def parse_stat_file(text: str) -> int:
    """A KVM debugfs stat file: one decimal integer and a newline ("6600\\n")."""
    if not re.fullmatch(r"[0-9]+\n", text):
        raise ParseError(f"expected one decimal integer and a newline (a KVM debugfs stat file), got {text[:200]!r}")
    return int(text)


def wfx_exits_script(vm: str | None = None, debugfs: str = DEBUGFS) -> str:
    """The probe WFX_EXITS runs (`debugfs` is only moved by tests, to read real files in a temporary tree)."""
    lines = [
        f"g={shlex.quote(debugfs)}; k=\"$g/kvm\"; d=\"$k\"" + (f"/{vm}" if vm else ""),
        "cut -d' ' -f1 /proc/uptime | sed 's/^/uptime /'",
        ("if awk -v g=\"$g\" '$2 == g && $3 == \"debugfs\" {f=1} END {exit !f}' /proc/mounts; then echo 'debugfs yes'; "
        "else echo 'debugfs no'; fi"),
        "if [ -r \"$g\" ] && [ -x \"$g\" ]; then echo 'access yes'; else echo 'access no'; fi",
        "if [ -d \"$k\" ]; then echo 'kvm yes'; else echo 'kvm no'; fi",
        "for v in \"$k\"/*-*; do [ -d \"$v\" ] && echo \"vm ${v##*/}\"; done",
    ]
    for name in STAT_FILES:
        lines.append(f"if [ -f \"$d/{name}\" ]; then echo '@@ {name}'; cat \"$d/{name}\"; "
                     f"else echo 'absent {name}'; fi")
    lines.append("echo end")
    return "\n".join(lines) + "\n"


def parse_wfx_exits(text: str, scope: str = "global") -> WfxExits:
    """Output of the WFX_EXITS script: `uptime S`, `debugfs|access|kvm yes|no`, `vm NAME` lines, then per
    counter `@@ NAME` + the file's raw content or `absent NAME`, then `end`."""
    lines = text.split("\n")
    if lines[-2:] != ["end", ""]:
        raise ParseError(f"expected WFx exit probe lines and a final `end`, got {text[-200:]!r}")
    lines = lines[:-2]
    head: dict[str, str] = {}
    vms: list[str] = []
    counts: dict[str, int | None] = {}
    i = 0
    while i < len(lines):
        word, _, rest = lines[i].partition(" ")
        if word in _HEAD and rest and word not in head:
            head[word] = rest
        elif word == "vm" and _VM_DIR.fullmatch(rest):
            vms.append(rest)
        elif word == "absent" and rest in STAT_FILES and rest not in counts:
            counts[rest] = None
        elif word == "@@" and rest in STAT_FILES and rest not in counts and i + 1 < len(lines):
            counts[rest] = parse_stat_file(lines[i + 1] + "\n")
            i += 1
        else:
            raise ParseError(f"unexpected line in WFx exit probe output: {lines[i][:200]!r}")
        i += 1
    missing = [w for w in _HEAD if w not in head] + [n for n in STAT_FILES if n not in counts]
    if missing:
        raise ParseError(f"expected probe lines for {', '.join(missing)} (truncated output?)")
    try:
        uptime = float(head["uptime"])
    except ValueError:
        raise ParseError(f"expected seconds from /proc/uptime, got {head['uptime']!r}") from None
    if head["debugfs"] != "yes":
        reason = "debugfs is not mounted on /sys/kernel/debug (mount -t debugfs none /sys/kernel/debug)"
    elif head["access"] != "yes":
        reason = "/sys/kernel/debug is readable by root only: read the counters with sudo"
    elif head["kvm"] != "yes":
        reason = f"{KVM_DEBUGFS} does not exist: KVM is not loaded, or not built with debugfs stats"
    elif any(counts[n] is None for n in STAT_FILES):
        where = KVM_DEBUGFS if scope == "global" else f"{KVM_DEBUGFS}/{scope}"
        absent = ", ".join(n for n in STAT_FILES if counts[n] is None)
        reason = f"{absent} absent in {where}" + (" (that VM is gone, or this KVM is not arm64's)"
                                                   if scope != "global" else " (this KVM is not arm64's)")
    else:
        reason = ""
    ok = not reason  # counts only from a readable, mounted debugfs: never figures the unit did not give
    return WfxExits(scope=scope, available=ok, reason=reason, wfi=counts["wfi_exit_stat"] if ok else None,
                    wfe=counts["wfe_exit_stat"] if ok else None, uptime_s=uptime, vms=vms if ok else [])


def wfx_exits_fact(vm: str | None = None) -> Fact[WfxExits]:
    """The WFx exit counters of all VMs (`vm` None), or of one VM's debugfs directory "<pid>-<fd>" (pick it
    from `WfxExits.vms` by the guest's QEMU pid). debugfs is root-only, hence sudo."""
    if vm is not None and not _VM_DIR.fullmatch(vm):
        raise ValueError(f"invalid KVM debugfs VM directory {vm!r}: expected <pid>-<fd>, e.g. 1234-11")
    scope = "global" if vm is None else vm

    def parse(text: str) -> WfxExits:
        return parse_wfx_exits(text, scope)

    return Fact("wfx_exits" if vm is None else f"wfx_exits:{vm}", ("sh", "-c", wfx_exits_script(vm)), parse,
                sudo=True)


WFX_EXITS = wfx_exits_fact()


def vm_dirs_of(exits: WfxExits, qemu_pid: int) -> list[str]:
    """The debugfs VM directories a QEMU process owns (their name starts with its pid)."""
    return [d for d in exits.vms if d.split("-", 1)[0] == str(qemu_pid)]


def wfi_exit_rate(before: int, after: int, seconds: float) -> float:
    """WFI exits per second between two readings of a counter. Lab notes: 6600 -> 6732 in 5 s = 26.4/s."""
    if seconds <= 0:
        raise ValueError(f"the interval between two counter readings must be positive, got {seconds} s")
    if after < before:
        raise WfxEvidenceError(f"the WFI exit counter went down from {before} to {after}: a VM restarted or exited "
                               "between the readings; read both again")
    return (after - before) / seconds


class NotrapVerdict(BaseModel):
    """Whether no-trap is in effect, judged from idle WFI exit rates before and after the change."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    in_effect: bool
    rate_before: float  # WFI exits/s during guest idle, before
    rate_after: float
    drop: float | None  # fraction the rate fell by (1.0 = to zero); None when it was 0 before
    already_untrapped: bool  # the rate was near zero before too: the change cannot take the credit
    reason: str


def verify_notrap(rate_before: float, rate_after: float, *, min_drop: float = MIN_DROP,
                  near_zero_per_s: float = NEAR_ZERO_PER_S) -> NotrapVerdict:
    """No-trap is in effect when the idle WFI exit rate falls to near zero (<= `near_zero_per_s`) or by at least
    `min_drop`: with TWI clear, an idle guest's WFI no longer exits to KVM at all."""
    if rate_before < 0 or rate_after < 0:
        raise ValueError(f"exit rates cannot be negative, got {rate_before} and {rate_after}")
    drop = None if rate_before == 0 else (rate_before - rate_after) / rate_before
    figures = f"{rate_before:.1f} -> {rate_after:.1f} WFI exits/s during guest idle"
    already = rate_before <= near_zero_per_s
    if already:
        ok = rate_after <= near_zero_per_s
        reason = (f"{figures}: WFI did not trap before the change either (GICv4 direct injection with the vCPU "
                  "alone on its CPU, or an idle guest that never executes WFI?), so this proves nothing about "
                  "the change" if ok else f"{figures}: WFI exits appeared after the change")
        return NotrapVerdict(in_effect=ok, rate_before=rate_before, rate_after=rate_after, drop=drop,
                             already_untrapped=True, reason=reason)
    if rate_after <= near_zero_per_s:
        reason = f"{figures}: near zero (<= {near_zero_per_s:g}/s), no-trap is in effect"
        ok = True
    elif drop is not None and drop >= min_drop:
        reason = f"{figures}: down {drop:.0%} (>= {min_drop:.0%}), no-trap is in effect"
        ok = True
    else:
        moved = f"down only {drop:.0%}" if drop is not None and drop >= 0 else f"up {-(drop or 0):.0%}"
        reason = (f"{figures}: {moved} (needs down >= {min_drop:.0%} or <= {near_zero_per_s:g}/s): WFI still "
                  "traps; the boot parameter or the patched kernel did not take effect")
        ok = False
    return NotrapVerdict(in_effect=ok, rate_before=rate_before, rate_after=rate_after, drop=drop,
                         already_untrapped=False, reason=reason)
