"""Tuning profiles: what to change on a unit's host and guest, checked before anything touches the unit.

A profile is a YAML 1.2 file (ruamel: `off`/`no`/`on` stay strings; only `true`/`false` are booleans)::

    name: rt-profile                # required (in the file or one it includes)
    description: free text          # optional
    include: [base.yaml]            # optional; paths relative to this file (see "Includes")
    host:
      cmdline:                      # kernel arguments rt-tune ADDS (it never removes others); one change
        isolcpus: "domain,managed_irq,${rt_cpus}"
        nohz_full: "${rt_cpus}"
        nosoftlockup:               # null / empty value: a bare flag
      sysctl:                       # one change per key; value: a string or an integer, never a boolean
        kernel.timer_migration: "0" # known sysctls are typed (config/knobs.py SYSCTL_TYPES)
      acknowledge: [rt_throttling_off]  # sched_rt_runtime_us -1 without stalld enabled here
      sysfs:                        # one change per knob of rt-tune's allow-list (config/knobs.py)
        transparent_hugepage: never
        workqueue_cpumask: "${housekeeping_cpus}"
        cpufreq_governor: {cpus: "${rt_cpus}", value: performance}
        cpuidle_disable: {cpus: "${rt_cpus}", states: "1-3"}
      kthreads:                     # one change: kernel threads by name pattern (changes/kthreads.py)
        - {match: "ksoftirqd/*", policy: fifo, priority: 2}
        - {match: "rcuop/*", cpus: "${housekeeping_cpus}"}
      services:
        disable: [foo.service]      # one change per unit: stop + disable (+ mask when `mask: true`)
        mask: false
        enable: [stalld]            # one change per unit: enable (+ start now unless `start: false`)
      vcpu_pinning:                 # the vCPU map (see VcpuPinning): guest RT vCPU vcpus[i] -> host CPU cpus[i]
        service: "${qemu_service}"  # the systemd unit running the guest's QEMU
        cpus: "${rt_cpus}"          # isolated host CPUs, one per guest RT vCPU
        vcpus: "${guest_rt_cpus}"   # the guest's RT vCPUs by index (this is the default)
        housekeeping: "${housekeeping_cpus}"  # every other vCPU and QEMU thread (this is the default)
        rt_priority: 1              # optional: SCHED_FIFO priority of the RT vCPU threads (default: none)
      irq_affinity:                 # move every movable IRQ to these CPUs
        housekeeping: "${housekeeping_cpus}"
      kernel:                       # optional: install and boot this host kernel (one change, host only)
        deb: kernels/linux-image-patched_arm64.deb  # a .deb on this machine, or:
        # package: linux-image-rt-arm64   # a package from the unit's own apt repositories
        release: "6.1.0-41-rt-arm64"        # optional: its `uname -r`, checked against the .deb
      wfx_notrap: true              # stop trapping guest WFI/WFE; the method is picked from facts later
      # wfx_notrap: {kernel: {deb: patched.deb}}  # ... naming a patched kernel for hosts older than Linux 6.11
    guest:                          # cmdline, sysctl, services and irq_affinity, as for the host
      cmdline: {isolcpus: "domain,managed_irq,${guest_rt_cpus}"}
    order: [guest.cmdline, ...]     # optional; see "Order"

Every mapping refuses unknown keys. `true`/`false` are accepted only where a switch is meant (`mask`,
`wfx_notrap`); a sysctl or cmdline value of `true`/`false` is refused with a hint to quote it.

Kernel artifacts (`host.kernel` and `wfx_notrap: {kernel: ...}`). Stopping WFI/WFE traps takes the boot
parameters `kvm-arm.wf{i,e}_trap_policy=notrap` on Linux >= 6.11 and a patched host kernel before that (field
notes §2), so a profile can name that kernel: exactly one of `deb: FILE` (a .deb on the controller, relative
to the directory of the profile file that names it; it must exist) or `package: NAME` (installed on the unit
from its own apt repositories; a Debian package name), plus optional `release: STRING`, the `uname -r` the
kernel boots as ([A-Za-z0-9._+-], at most 64 characters). The profile only checks these; the .deb itself is
inspected by orchestrator/boot/artifact.py and the method for WFx by orchestrator/boot/wfx.py, both from facts.
`wfx_notrap: true` names no kernel: on a host older than 6.11 it then fails with a hint to name one.
A `kernel:` under `guest:` is refused for now (the guest's kernel is the guest image's business).

Variables. `${name}` in any value (never in a key) is replaced by the unit's inventory `vars[name]` (a string
or an integer). An undefined variable, a non-scalar or boolean one, and any other `$` are errors. With no vars
(`load_profile(path)`), templated values are only checked for syntax; literal values are checked fully.
Special vars: `cpus` (host CPU count, an integer 1..8192: host CPU lists must lie in 0..cpus-1) and
`guest_cpus` (the same for guest CPU lists); without them CPU lists are bounded by CPU 8191 only (Linux's
largest NR_CPUS). `load_profile(unit_cpus=N)` overrides `cpus`. The inventory types its vars (inventory.py).

Checks (after substitution):
  Every name and value is checked whole-string (a trailing newline is never let through) and ASCII where a
  pattern is given.
  - sysctl names match [a-z0-9_.-]+ with at least one dot (and no empty part); values are non-empty strings or
    integers, printable (no control characters, tabs or line separators; spaces are fine, e.g.
    `net.ipv4.tcp_rmem`).
  - service names are systemd unit names (orchestrator/core/names.py: systemd's rules, no leading `-` or `.`);
    `.service` is appended when the name has no unit-type suffix. `services: disable:` takes .service,
    .socket, .timer and .path units, never a template (`foo@.service`): a .swap, .mount, .device, .target,
    .slice, .scope or .automount is not a service to stop and disable.
  - cmdline keys match [A-Za-z0-9_][A-Za-z0-9_.-]*; values use only [A-Za-z0-9_.,:/=+@%-] (no whitespace,
    quotes or shell metacharacters); `root*`, `init`, `rdinit`, `initrd`, `rw`, `ro`, `nfsroot` and
    `BOOT_IMAGE` are refused: they decide whether the unit boots at all, and rt-tune never owns them.
  - CPU lists (vcpu_pinning.cpus, irq_affinity.housekeeping, and the cmdline keys isolcpus (after its
    `nohz`/`domain`/`managed_irq` flags), nohz_full, rcu_nocbs, irqaffinity, kthread_cpus) parse as kernel CPU
    lists ("1-3,5", "0-7:1/2"; orchestrator/core/cpulist.py: ASCII digits, no spaces), are not empty and lie
    within the target's CPUs; isolcpus / nohz_full leave at least one CPU for housekeeping; the
    housekeeping set does not overlap the RT sets (vcpu_pinning.cpus, isolcpus, nohz_full) of the same
    target.
Every problem is reported at once, in one InputError, each as `FILE:LINE: key.path: message (got VALUE)`
(`(got VALUE from TEMPLATE)` for a substituted value); FILE is the file the value came from.

Includes. `include` files are applied first, in list order, each after its own includes; the including file
is applied last. Later files override earlier ones: mappings merge key by key, anything else (a list, a
scalar, null) replaces the earlier value (so `vcpu_pinning: null` drops an inherited pinning, and a
`services.disable` list replaces the inherited one). A file reached twice is applied once, at its first
place; a cycle is an error.
Where an include may point: a file named *.yaml or *.yml, given relative to the directory of the file that
includes it (an absolute path is taken as it is), which after resolving every symlink and `..` lies in that
directory or below it, or in rt-tune's own profiles/ directory (PROFILES_DIR). Anything else is refused
before it is opened. A file that does not read as a profile (not YAML, not a mapping, or a mapping with none
of the profile's top-level keys) is named in the error, never quoted: a profile run from an untrusted branch
cannot print a file of the machine it runs on.

Changes. `resolve(profile, unit, unit_spec)` turns a profile into ChangeSpecs, each one change that rt-tune
applies, measures and keeps or rolls back on its own. ids are stable: `host.cmdline`, `guest.cmdline`,
`host.sysctl.<name>`, `host.sysfs.<knob>`, `guest.service.<unit>`, `host.vcpu_pinning`, `host.irq_affinity`,
`guest.irq_affinity`, `host.kernel`, `host.wfx_notrap`. `wfx_notrap: false` (the default) means "leave as it
is", not "force trapping".
Params of the boot changes: cmdline {"add": {key: value-or-None}}; kernel {"deb": absolute path or None,
"package": NAME or None, "release": STRING or None}; wfx_notrap {"wfi": "notrap", "wfe": "notrap", "kernel":
the same artifact dict or None}.

Order. Default: by kind, guest before host within a kind (the guest runs the RT code and is measured; its
changes are cheaper to try), file order within a section:
  1. service_disable: a crash-looping service distorts every other measurement (field notes, do_nothing)
  2. service_enable (stalld before RT throttling goes off)
  3. sysctl  4. sysfs  5. vcpu_pinning  6. irq_affinity   (runtime changes, no reboot)
  7. cmdline  8. kernel  9. wfx_notrap           (boot changes last: each needs a reboot; a kernel named by
                                                 `host.kernel` is in place before wfx_notrap picks its method)
`order:` lists change ids to run first, in that order; the changes it does not name follow in the default
order. An id the profile does not produce for the unit, or listed twice, is an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictStr,
    ValidationError,
)
from pydantic_core import PydanticCustomError
from ruamel.yaml.scalarbool import ScalarBoolean

from orchestrator.config.knobs import (
    ACKNOWLEDGEMENTS,
    KNOBS,
    STALLD,
    SYSCTL_TYPES,
    check_hugepage_arg,
    check_knob,
    check_kthread_rule,
    check_sysctl_value,
)
from orchestrator.config.yamlio import key_path, line_of, plain, read_yaml
from orchestrator.config.yamlio import shown as short_repr
from orchestrator.core.cpulist import (
    CPU_CEILING,
    CpuListError,
    format_cpulist,
    parse_cpulist,
)
from orchestrator.core.errors import InputError
from orchestrator.core.names import (
    DISABLE_TYPES,
    SYSCTL_NAME,
    SYSCTL_NAME_MAX,
    SYSCTL_NAME_RULE,
    InvalidName,
    check_unit_name,
    service_to_disable,
    with_unit_suffix,
)
from orchestrator.core.paths import shipped

PROFILES_DIR = shipped("profiles")

Target = Literal["host", "guest"]
Kind = Literal["service_disable", "service_enable", "sysctl", "sysfs", "kthreads", "vcpu_pinning", "irqbalance",
               "irq_affinity", "cmdline", "kernel", "wfx_notrap", "bundle"]  # bundle: runtime ones measured together
KIND_ORDER: tuple[str, ...] = ("service_disable", "service_enable", "sysctl", "sysfs", "kthreads", "vcpu_pinning",
                               "irqbalance", "irq_affinity", "cmdline", "kernel", "wfx_notrap")
TARGET_ORDER: tuple[Target, ...] = ("guest", "host")
NEEDS_REBOOT = frozenset({"cmdline", "kernel", "wfx_notrap"})

VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Whole-string patterns, used with fullmatch (re.match with `$` also takes a trailing newline), ASCII only.
CMDLINE_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", re.ASCII)
CMDLINE_VALUE = re.compile(r"[A-Za-z0-9_.,:/=+@%-]+", re.ASCII)
CMDLINE_FORBIDDEN = {"init", "rdinit", "initrd", "rw", "ro", "nfsroot", "boot_image"}  # and root*
ISOLCPUS_FLAGS = {"nohz", "domain", "managed_irq"}
CPU_LIST_KEYS = {"isolcpus", "nohz_full", "rcu_nocbs", "irqaffinity", "kthread_cpus"}
RT_CMDLINE_KEYS = ("isolcpus", "nohz_full")  # CPUs these name are RT CPUs and must leave housekeeping CPUs
DEB_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+", re.ASCII)  # Debian policy 5.6.1
KERNEL_RELEASE = re.compile(r"[A-Za-z0-9._+-]+", re.ASCII)
KERNEL_RELEASE_MAX = 64  # __NEW_UTS_LEN: `uname -r` is never longer
ARTIFACT_SOURCES = ("deb", "package")


# ---- scalar types --------------------------------------------------------------------------------------
def _scalar_text(what: str, hint: str) -> Any:
    def conv(v: Any) -> Any:
        if isinstance(v, (bool, ScalarBoolean)):
            raise PydanticCustomError("boolean_value", "{what} cannot be a boolean: {hint}",
                                      {"what": what, "hint": hint})
        if isinstance(v, int):
            return str(int(v))
        if isinstance(v, str):
            return str(v)
        raise PydanticCustomError("scalar_value", "{what} must be a string or an integer",
                                  {"what": what})
    return conv


SysctlValue = Annotated[str, BeforeValidator(_scalar_text(
    "a sysctl value", 'quote the value you mean, e.g. "0" or "1"'))]
CmdlineValue = Annotated[str, BeforeValidator(_scalar_text(
    "a kernel argument value", 'quote the value you mean, e.g. "1" or "off"'))]
CpuText = Annotated[str, BeforeValidator(_scalar_text("a CPU list", 'write a CPU list such as "1-3"'))]


# ---- the profile model ---------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Services(_Strict):
    disable: list[StrictStr] = Field(default_factory=list)
    mask: StrictBool = False
    #: services to enable (e.g. stalld), started now too unless `start: false`
    enable: list[StrictStr] = Field(default_factory=list)
    start: StrictBool = True


class VcpuPinning(_Strict):
    """The vCPU map: each guest RT vCPU on its own isolated host CPU, everything else of QEMU on housekeeping.

    `cpus[i]` is the host CPU of guest vCPU `vcpus[i]` (both ascending, same count). `vcpus` defaults to the
    unit's `${guest_rt_cpus}` (a guest RT CPU is the vCPU of the same index), `housekeeping` to
    `${housekeeping_cpus}`. `rt_priority` (1..99) runs the RT vCPU threads SCHED_FIFO; the default is none
    (SCHED_OTHER): a FIFO vCPU that never blocks (a busy guest, or WFI/WFE not trapped) starves the kernel's
    per-CPU threads on its CPU unless that CPU is fully isolated (isolcpus, nohz_full, rcu_nocbs) and RT
    throttling is understood, so it is the user's decision, once the host cmdline is in place (Red Hat's
    realtime-virtual-host practice is FIFO 1)."""

    service: StrictStr
    cpus: CpuText
    vcpus: CpuText | None = None
    housekeeping: CpuText | None = None
    rt_priority: Annotated[int, Field(strict=True, ge=1, le=99)] | None = None


class IrqAffinity(_Strict):
    housekeeping: CpuText


class Irqbalance(_Strict):
    """irqbalance off the `banned` (RT) CPUs, or stopped (`stop: true`); new IRQs on `housekeeping`."""

    housekeeping: CpuText
    banned: CpuText | None = None
    stop: StrictBool = False


def _release_text(v: Any) -> Any:
    if not isinstance(v, str):
        raise PydanticCustomError("release_text", "a kernel release must be a quoted string: YAML reads 6.10 as the "
                                                  'number 6.1; write e.g. "6.10.0-1-arm64"')
    return v


class KernelArtifactSpec(_Strict):
    """A kernel to install and boot, as the profile names it (checked by the resolver, not here, so that the
    problems carry file and line)."""

    deb: StrictStr | None = None
    package: StrictStr | None = None
    release: Annotated[str, BeforeValidator(_release_text)] | None = None


class WfxNotrap(_Strict):
    """`wfx_notrap` switched on; `kernel` is the patched kernel for hosts older than Linux 6.11 (None: none)."""

    kernel: KernelArtifactSpec | None = None


def _wfx_switch(v: Any) -> Any:
    """`true` -> WfxNotrap(), `false` -> None, `{kernel: {...}}` -> validated as WfxNotrap; anything else is
    refused here, so one clear message replaces a union's two."""
    if isinstance(v, (bool, ScalarBoolean)):
        return {} if v else None
    if v is None:
        return None
    if isinstance(v, Mapping) and v.get("kernel") is not None:
        return v
    raise PydanticCustomError(
        "wfx_notrap", "must be true, false or a mapping naming a patched host kernel for Linux < 6.11: "
                      "{kernel: {deb: FILE}} or {kernel: {package: NAME}}")


KnobValue = Annotated[str, BeforeValidator(_scalar_text(
    "a sysfs value", 'quote the value you mean, e.g. "never" or "0"'))]


class PerCpuKnob(_Strict):
    """A per-CPU sysfs knob's value on `cpus` (e.g. a cpufreq governor on the RT CPUs)."""

    cpus: CpuText
    value: KnobValue


class CpuidleDisable(_Strict):
    """Idle states `states` (their numbers under cpuidle/, e.g. "1-3": all but polling) disabled on `cpus`."""

    cpus: CpuText
    states: CpuText


class KthreadRuleSpec(_Strict):
    """Kernel threads whose name matches `match` (a shell pattern: `ksoftirqd/*`): `policy` (fifo, rr, other)
    with `priority` (1..99 for fifo/rr), and/or `cpus`."""

    match: StrictStr
    policy: StrictStr | None = None
    priority: Annotated[int, Field(strict=True)] | None = None
    cpus: CpuText | None = None


class Sysfs(_Strict):
    """Kernel knobs under /sys from rt-tune's allow-list (orchestrator/changes/sysfs.py, KNOBS), one change each."""

    transparent_hugepage: KnobValue | None = None
    transparent_hugepage_defrag: KnobValue | None = None
    workqueue_cpumask: CpuText | None = None
    writeback_cpumask: CpuText | None = None
    ksm_run: KnobValue | None = None
    cpufreq_governor: PerCpuKnob | None = None
    cpuidle_disable: CpuidleDisable | None = None


def _check_file_name(v: str) -> str:
    if not v or not v.isprintable() or not v.endswith(".py"):
        raise PydanticCustomError("check_file", "a check file is the path of a Python file (`test_*.py`), on one "
                                                "line, without control characters")
    return v


class GuestSection(_Strict):
    cmdline: dict[str, CmdlineValue | None] = Field(default_factory=dict)
    #: settings rt-tune refuses without an acknowledgement (config/knobs.py ACKNOWLEDGEMENTS)
    acknowledge: list[StrictStr] = Field(default_factory=list)
    #: the user's check files (pytest-testinfra modules) for this target, relative to the file that lists them
    checks: list[Annotated[StrictStr, AfterValidator(_check_file_name)]] = Field(default_factory=list)
    sysctl: dict[str, SysctlValue] = Field(default_factory=dict)
    sysfs: Sysfs = Field(default_factory=Sysfs)
    kthreads: list[KthreadRuleSpec] = Field(default_factory=list)
    services: Services = Field(default_factory=Services)
    irq_affinity: IrqAffinity | None = None
    irqbalance: Irqbalance | None = None
    kernel: KernelArtifactSpec | None = None  # accepted here only to refuse it with a clear message


class HostSection(GuestSection):
    vcpu_pinning: VcpuPinning | None = None
    wfx_notrap: Annotated[WfxNotrap | None, BeforeValidator(_wfx_switch)] = None


@dataclass
class _Source:
    """Where each value of a merged profile came from: for FILE:LINE in errors."""

    root: Path
    files: list[tuple[Path, Any]] = field(default_factory=list)  # (path as reached, its round-trip document)
    origin: dict[tuple, int] = field(default_factory=dict)  # key path -> index into files
    applied: list[int] = field(default_factory=list)  # indexes into files, in the order they were merged
    #: key path -> (index into files, value) of each earlier setting a later file replaced, oldest first
    overridden: dict[tuple, list[tuple[int, Any]]] = field(default_factory=dict)

    def where(self, loc: tuple) -> str:
        for n in range(len(loc), 0, -1):
            idx = self.origin.get(tuple(loc[:n]))
            if idx is not None:
                path, doc = self.files[idx]
                line = line_of(doc, loc)
                return f"{path}:{line}" if line else str(path)
        return str(self.root)

    def file_of(self, loc: tuple) -> Path:
        """The file the value at `loc` came from: relative paths in it are relative to its directory."""
        for n in range(len(loc), 0, -1):
            idx = self.origin.get(tuple(loc[:n]))
            if idx is not None:
                return self.files[idx][0]
        return self.root


class Profile(_Strict):
    name: StrictStr
    description: StrictStr = ""
    host: HostSection | None = None
    guest: GuestSection | None = None
    order: list[StrictStr] = Field(default_factory=list)

    _source: _Source | None = PrivateAttr(default=None)

    @property
    def files(self) -> list[Path]:
        """The files this profile was merged from, in the order they were applied."""
        return [self._source.files[i][0] for i in self._source.applied] if self._source else []

    def check_files(self, target: str) -> list[tuple[Path, str]]:
        """The user's check files for `target` (host or guest), each with where the profile lists it
        (FILE:LINE): relative paths are relative to the directory of the file that lists them."""
        sec = getattr(self, target, None)
        out = []
        for i, raw in enumerate(sec.checks if sec is not None else []):
            loc = (target, "checks", i)
            base = self._source.file_of(loc).parent if self._source else Path.cwd()
            path = Path(raw).expanduser()
            out.append(((path if path.is_absolute() else base / path).resolve(),
                        self._source.where(loc) if self._source else raw))
        return out


class ChangeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    target: Target
    kind: Kind
    params: dict[str, Any]
    needs_reboot: bool = False
    #: the user's check files for this target (absolute): part of a trial boot's health gate
    checks: list[str] = []


# ---- problems ------------------------------------------------------------------------------------------
_NO_VALUE = object()


class _Problems:
    def __init__(self, source: _Source | None):
        self.source = source
        self.items: list[str] = []
        self._keys: dict[str, tuple] = {}  # problem -> (file, line): reported in file and line order

    def add(self, loc: tuple, message: str, got: Any = _NO_VALUE, template: str | None = None,
            where: str | None = None) -> None:
        if where is None:
            where = self.source.where(loc) if self.source else "(profile)"
        text = f"{where}: {key_path(loc)}: {message}"
        if got is not _NO_VALUE:
            text += f" (got {short_repr(got)} from {short_repr(template)})" \
                if template is not None and template != got else f" (got {short_repr(got)})"
        self.items.append(text)
        file, _, line = where.rpartition(":")
        self._keys[text] = (file, int(line)) if line.isdigit() else (where, 0)

    def raise_if_any(self, header: str) -> None:
        if self.items:
            items = sorted(self.items, key=lambda t: self._keys.get(t, ("", 0)))
            raise InputError(f"{header}:\n  " + "\n  ".join(items))


# ---- loading -------------------------------------------------------------------------------------------
_plain = plain  # a round-trip YAML value as plain Python (orchestrator.config.yamlio)
INCLUDE_SUFFIXES = (".yaml", ".yml")
PROFILE_KEYS = frozenset(Profile.model_fields) | {"include"}


def _include_target(including: Path, name: str) -> tuple[Path | None, str]:
    """(the file `name` names, "") when `including` may include it, else (None, why not): see "Includes"."""
    rule = (f"an include names a *.yaml or *.yml file in the directory of the file that includes it "
            f"({including.parent.resolve()}) or below, or in rt-tune's profiles directory ({PROFILES_DIR})")
    if not name.isprintable() or not name.endswith(INCLUDE_SUFFIXES):
        return None, rule
    target = including.parent / name
    try:
        real = target.resolve()
        target.is_file()  # ENAMETOOLONG and the like surface here, not in the caller's is_file()
    except OSError as exc:
        return None, f"{rule}; this one cannot be looked up: {exc.strerror}"
    roots = (including.parent.resolve(), PROFILES_DIR.resolve())
    if not any(real.is_relative_to(root) for root in roots):
        return None, f"{rule}; this one is {real}"
    if not real.name.endswith(INCLUDE_SUFFIXES):
        return None, f"{rule}; this one is a link to {real}"
    return target, ""


def _kind_of(doc: Any) -> str:
    return {str: "a string", list: "a list", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(_plain(doc)), "a scalar")


def _mark(v: Any, loc: tuple, idx: int, origin: dict[tuple, int]) -> None:
    origin[loc] = idx
    if isinstance(v, Mapping):
        for k, x in v.items():
            _mark(x, loc + (k,), idx, origin)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _mark(x, loc + (i,), idx, origin)


def _merge(dst: dict, src: Mapping, prefix: tuple, idx: int, origin: dict[tuple, int],
           overridden: dict[tuple, list[tuple[int, Any]]] | None = None) -> None:
    for k, v in src.items():
        if not prefix and k == "include":
            continue
        loc = prefix + (k,)
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            origin[loc] = idx
            _merge(dst[k], v, loc, idx, origin, overridden)
            continue
        if overridden is not None and k in dst and loc in origin:
            overridden.setdefault(loc, []).append((origin[loc], dst[k]))
        for stale in [o for o in origin if o[:len(loc)] == loc]:
            del origin[stale]
        dst[k] = _plain(v)
        _mark(v, loc, idx, origin)


def _read_tree(path: Path) -> tuple[dict, _Source, _Problems]:
    source = _Source(root=path)
    problems = _Problems(source)
    merged: dict = {}
    applied: set[Path] = set()

    def here(idx: int, loc: tuple) -> str:
        p, doc = source.files[idx]
        line = line_of(doc, loc)
        return f"{p}:{line}" if line else str(p)

    def visit(p: Path, stack: list[tuple[Path, Path]], via: tuple[int, tuple, str] | None) -> None:
        real = p.resolve()
        if any(real == r for r, _ in stack):
            chain = " -> ".join(str(shown) for _, shown in stack) + f" -> {p}"
            idx, loc, raw = via  # type: ignore[misc]
            problems.add(loc, f"include cycle: {chain}", raw, where=here(idx, loc))
            return
        if real in applied:
            return
        if not p.is_file() and via is not None:
            idx, loc, raw = via
            problems.add(loc, f"included file {p} does not exist", raw, where=here(idx, loc))
            return
        try:
            doc = read_yaml(p)
        except InputError as exc:
            problems.items.append(str(exc))
            return
        if doc is None:
            doc = {}
        # A file that is not a profile is named, never quoted: it may be anything readable (see "Includes").
        if not isinstance(doc, Mapping):
            problems.add((), "not a profile: a profile is a YAML mapping (name:, host:, guest:, ...), this "
                             f"file holds {_kind_of(doc)}", where=str(p))
            return
        if doc and not any(isinstance(k, str) and k in PROFILE_KEYS for k in doc):
            problems.add((), "not a profile: none of its top-level keys is one of "
                             f"{', '.join(sorted(PROFILE_KEYS))}", where=str(p))
            return
        idx = len(source.files)
        source.files.append((p, doc))
        includes = doc.get("include", [])
        if not isinstance(includes, list):
            problems.add(("include",), "must be a list of file names", _plain(includes),
                         where=here(idx, ("include",)))
            includes = []
        for i, name in enumerate(includes):
            if not isinstance(name, str) or not name.strip():
                problems.add(("include", i), "must be a file name", _plain(name), where=here(idx, ("include", i)))
                continue
            target, why = _include_target(p, name)
            if target is None:
                problems.add(("include", i), why, str(name), where=here(idx, ("include", i)))
                continue
            visit(target, stack + [(real, p)], (idx, ("include", i), str(name)))
        applied.add(real)
        source.applied.append(idx)
        _merge(merged, doc, (), idx, source.origin, source.overridden)

    visit(path, [], None)
    return merged, source, problems


def load_profile(path: Path, unit_vars: dict | None = None, unit_cpus: int | None = None) -> Profile:
    """Load, merge and check a profile. With `unit_vars`, also substitute and check every value for that unit
    (`unit_cpus`, else `unit_vars["cpus"]`, bounds host CPU lists). Raises one InputError listing every problem.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"profile {path} does not exist")
    merged, source, problems = _read_tree(path)
    problems.raise_if_any(f"invalid profile {path}")
    try:
        profile = Profile.model_validate(merged)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            got = _NO_VALUE if err["type"] == "missing" else err.get("input")
            problems.add(loc, err["msg"], got)
        problems.raise_if_any(f"invalid profile {path}")
        raise  # pragma: no cover - errors() is never empty
    profile._source = source
    for target in ("host", "guest"):
        for i, (check, _) in enumerate(profile.check_files(target)):
            if not check.is_file():
                problems.add((target, "checks", i), f"check file {check} does not exist (a pytest-testinfra "
                             "module; relative paths are relative to this profile file)", str(check))

    host_cpus = unit_cpus
    guest_cpus = None
    if unit_vars is not None:
        if host_cpus is None:
            host_cpus = _count_var(unit_vars, "cpus", problems, "unit vars")
        guest_cpus = _count_var(unit_vars, "guest_cpus", problems, "unit vars")
    _Resolver(profile, problems, unit_vars, "the unit's vars", host_cpus, guest_cpus).changes()
    problems.raise_if_any(f"invalid profile {path}")
    return profile


def find_profile(name: str, search: tuple[Path, ...] | None = None) -> Path:
    """A profile argument -> its file: an existing path as is, else NAME(.yaml) in ./profiles, then the
    checkout's profiles/."""
    def is_file(p: Path) -> bool:
        try:
            return p.is_file()
        except OSError:  # a name the OS cannot look up (too long): not a profile file either
            return False

    given = Path(name)
    if is_file(given):
        return given
    dirs = search if search is not None else (Path.cwd() / "profiles", PROFILES_DIR)
    dirs = tuple(dict.fromkeys(d.absolute() for d in dirs))  # run from the checkout: one directory, named once
    for d in dirs:
        for candidate in (d / name, d / f"{name}.yaml"):
            if is_file(candidate):
                return candidate
    raise InputError(f"no profile {short_repr(name)}: not a file, and not in {', '.join(str(d) for d in dirs)}")


# ---- resolving -----------------------------------------------------------------------------------------
def _count_var(vars: Mapping, name: str, problems: _Problems, whose: str) -> int | None:
    if name not in vars or vars[name] is None:
        return None
    v = vars[name]
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= CPU_CEILING + 1:
        problems.add(("vars", name), f"a CPU count must be a positive integer (at most {CPU_CEILING + 1}, "
                                     "unquoted)", v, where=whose)
        return None
    return int(v)


class _Resolver:
    """Substitutes vars into a profile and checks every value; collects problems instead of raising."""

    def __init__(self, profile: Profile, problems: _Problems, vars: Mapping | None, whose: str,
                 host_cpus: int | None, guest_cpus: int | None):
        self.profile = profile
        self.p = problems
        self.vars = vars
        self.whose = whose
        self.bound = {"host": host_cpus, "guest": guest_cpus}
        self.unknown = False  # some value could not be substituted (no vars given): ids may be missing

    # -- values --
    def sub(self, loc: tuple, raw: str) -> str | None:
        """`raw` with ${vars} replaced; None when it cannot be (a problem is recorded unless vars are unknown)."""
        for m in re.finditer(r"\$", raw):
            if not VAR.match(raw, m.start()):
                self.p.add(loc, "a `$` must start a variable reference ${name}", raw)
                return None
        names = VAR.findall(raw)
        if not names:
            return raw
        if self.vars is None:
            self.unknown = True
            return None
        ok = True
        for name in dict.fromkeys(names):
            if name not in self.vars:
                known = ", ".join(sorted(map(str, self.vars))) or "none"
                self.p.add(loc, f"undefined variable ${{{name}}}: {self.whose} define {known}", raw)
                ok = False
            elif isinstance(self.vars[name], bool) or not isinstance(self.vars[name], (str, int)):
                self.p.add(loc, f"variable ${{{name}}} is {self.vars[name]!r}; only strings and integers "
                                "can be substituted", raw)
                ok = False
        if not ok:
            return None
        return VAR.sub(lambda m: str(self.vars[m.group(1)]), raw)  # type: ignore[index]

    def cpus(self, target: str, loc: tuple, text: str, raw: str, what: str = "CPU list",
             shown: str | None = None) -> list[int] | None:
        """`text` as a CPU list inside the target's CPUs; `shown` is the whole value it came from. Bounded
        before it is expanded (orchestrator.core.cpulist): a CPU above CPU_CEILING is refused unexpanded."""
        shown = text if shown is None else shown
        n = self.bound[target]
        try:
            cpus = parse_cpulist(text, max_cpu=CPU_CEILING)
        except CpuListError as exc:
            if exc.cpu is not None and n is not None:
                rng = "0" if n == 1 else f"0-{n - 1}"
                self.p.add(loc, f"CPU {exc.cpu} outside the unit's {target} CPUs {rng} ({n} CPUs)", shown,
                           raw)
            elif exc.cpu is not None:
                self.p.add(loc, f"CPU {exc.cpu} is above {CPU_CEILING}, the highest CPU number Linux has",
                           shown, raw)
            else:
                self.p.add(loc, f"not a kernel {what}: comma-separated N, N-M or N-M:A/B of ASCII digits, no "
                                f"spaces (e.g. \"1-3,5\")", shown, raw)
            return None
        if not cpus:
            self.p.add(loc, f"the {what} is empty", shown, raw)
            return None
        if n is not None:
            outside = [c for c in cpus if c >= n]
            if outside:
                rng = "0" if n == 1 else f"0-{n - 1}"
                self.p.add(loc, f"CPU{'s' if len(outside) > 1 else ''} {format_cpulist(outside)} outside the unit's "
                                f"{target} CPUs {rng} ({n} CPUs)", shown, raw)
                return None
        return cpus

    def vcpu_map(self, t: Target, pin: VcpuPinning) -> tuple[list[tuple[str, list[int], str]], dict | None]:
        """The vCPU map's RT set (for the overlap checks) and its change params: {service, vcpus: {guest vCPU:
        host CPU}, housekeeping, rt_priority}; None when any part is wrong (every problem is reported)."""
        base = (t, "vcpu_pinning")
        unit = self.service(base + ("service",), pin.service)

        def cpulist(key: str, raw: str, target: str, what: str) -> tuple[list[int] | None, str | None]:
            text = self.sub(base + (key,), raw)
            return (self.cpus(target, base + (key,), text, raw, what) if text is not None else None), text

        cpus, text = cpulist("cpus", pin.cpus, t, "CPU list")
        defaults = {"vcpus": (pin.vcpus, "guest_rt_cpus", "the guest's RT vCPUs"),
                    "housekeeping": (pin.housekeeping, "housekeeping_cpus", "the host CPUs for QEMU's other threads")}
        for key, (given, var, what) in defaults.items():
            if given is None and self.vars is not None and var not in self.vars:
                self.p.add(base, f"`{key}` is not set and there is no `{var}` var to default it to ({self.whose} "
                                 f"define {', '.join(sorted(self.vars)) or 'none'}): name {what}, e.g. {key}: \"1\"")
                return [], None
        vcpus, _ = cpulist("vcpus", "${guest_rt_cpus}" if pin.vcpus is None else pin.vcpus, "guest", "vCPU list")
        hk_raw = "${housekeeping_cpus}" if pin.housekeeping is None else pin.housekeeping
        hk, hk_text = cpulist("housekeeping", hk_raw, t, "CPU list")
        rt_sets = [(".".join(base + ("cpus",)), cpus, text)] if cpus and text is not None else []
        if cpus and vcpus and len(cpus) != len(vcpus):
            self.p.add(base + ("cpus",), f"{len(vcpus)} guest RT vCPU{'s' if len(vcpus) > 1 else ''} "
                       f"({format_cpulist(vcpus)}) need as many isolated host CPUs, one each; got {len(cpus)}", text,
                       pin.cpus)
            return rt_sets, None
        if cpus and hk:
            both = sorted(set(hk) & set(cpus))
            if both:
                self.p.add(base + ("housekeeping",), f"housekeeping CPU{'s' if len(both) > 1 else ''} "
                           f"{format_cpulist(both)} also in vcpu_pinning.cpus ({text}): QEMU's other threads must "
                           "not share the RT vCPUs' CPUs", hk_text, hk_raw)
                return rt_sets, None
        if not (unit and cpus and vcpus and hk):
            return rt_sets, None
        return rt_sets, {"service": unit, "vcpus": {str(v): c for v, c in zip(vcpus, cpus, strict=False)},
                         "housekeeping": hk, "rt_priority": pin.rt_priority}

    def service(self, loc: tuple, raw: str, kinds: tuple[str, ...] = ("service",)) -> str | None:
        """The unit `raw` names (".service" appended without a unit-type suffix), of one of `kinds`; None when
        it is not valid (recorded) or waits for vars. One validator: orchestrator.core.names."""
        text = self.sub(loc, raw)
        if text is None:
            return None
        try:
            if kinds == DISABLE_TYPES:
                return service_to_disable(text)
            return check_unit_name(with_unit_suffix(text), types=kinds)
        except InvalidName as exc:
            self.p.add(loc, exc.reason, text, raw)
            return None

    # -- sections --
    def changes(self) -> list[ChangeSpec]:
        by_kind: dict[str, list[ChangeSpec]] = {k: [] for k in KIND_ORDER}
        for target in TARGET_ORDER:
            section = getattr(self.profile, target)
            if section is not None:
                for spec in self.section(target, section):
                    by_kind[spec.kind].append(spec)
        default = [s for k in KIND_ORDER for s in by_kind[k]]
        return self.ordered(default)

    def section(self, t: Target, sec: GuestSection) -> list[ChangeSpec]:
        out: list[ChangeSpec] = []
        seen: set[str] = set()

        def change(loc: tuple, id: str, kind: str, params: dict) -> None:
            if id in seen:
                self.p.add(loc, f"change {id} is listed twice", loc[-1])
                return
            seen.add(id)
            out.append(ChangeSpec(id=id, target=t, kind=kind, params=params,  # type: ignore[arg-type]
                                  needs_reboot=kind in NEEDS_REBOOT))

        loc: tuple[Any, ...]
        for i, raw in enumerate(sec.services.disable):
            loc = (t, "services", "disable", i)
            unit = self.service(loc, raw, DISABLE_TYPES)
            if unit:
                change(loc, f"{t}.service.{unit}", "service_disable", {"unit": unit, "mask": sec.services.mask})
        for i, raw in enumerate(sec.services.enable):
            loc = (t, "services", "enable", i)
            unit = self.service(loc, raw, DISABLE_TYPES)
            if unit:
                change(loc, f"{t}.service.{unit}", "service_enable", {"unit": unit, "start": sec.services.start})

        for name, raw in sec.sysctl.items():
            loc = (t, "sysctl", name)
            if not SYSCTL_NAME.match(name) or len(name) > SYSCTL_NAME_MAX:
                self.p.add(loc, f"not a sysctl name ({SYSCTL_NAME_RULE})", name)
                continue
            value = self.sub(loc, raw)
            if value is None:
                continue
            if not value.strip() or not value.isprintable():
                self.p.add(loc, "a sysctl value must be non-empty, on one line, without control characters "
                                "(a printable string; spaces are fine)", value, raw)
                continue
            typed = SYSCTL_TYPES.get(name)
            if typed is not None and typed.type == "cpulist":
                cpus = self.cpus(t, loc, value, raw)
                if cpus is None:
                    continue
                value = format_cpulist(cpus)
            problem = check_sysctl_value(name, value)
            if problem:
                self.p.add(loc, problem, value, raw)
                continue
            if name == "kernel.sched_rt_runtime_us" and int(value) == -1 \
                    and "rt_throttling_off" not in sec.acknowledge \
                    and not any(with_unit_suffix(u) == STALLD for u in sec.services.enable):
                self.p.add(loc, "-1 turns RT throttling off: a runaway SCHED_FIFO task then starves this CPU's "
                                "kernel threads for good. Enable stalld in the same section (services: enable: "
                                "[stalld]) or acknowledge it (acknowledge: [rt_throttling_off])", value, raw)
                continue
            change(loc, f"{t}.sysctl.{name}", "sysctl", {"name": name, "value": value})

        for i, ack in enumerate(sec.acknowledge):
            if ack not in ACKNOWLEDGEMENTS:
                self.p.add((t, "acknowledge", i), "not an acknowledgement rt-tune knows; known: "
                           + "; ".join(f"{k} ({v})" for k, v in ACKNOWLEDGEMENTS.items()), ack)
        for knob, params in self.sysfs(t, sec.sysfs):
            change((t, "sysfs", knob), f"{t}.sysfs.{knob}", "sysfs", params)

        rules = []
        for i, rule in enumerate(sec.kthreads):
            loc = (t, "kthreads", i)
            r: dict[str, Any] = {"match": rule.match, "policy": rule.policy, "priority": rule.priority, "cpus": None}
            if rule.cpus is not None:
                text = self.sub(loc + ("cpus",), rule.cpus)
                r["cpus"] = self.cpus(t, loc + ("cpus",), text, rule.cpus) if text is not None else None
                if r["cpus"] is None:
                    continue
            problem = check_kthread_rule(r)
            if problem:
                self.p.add(loc, problem, {k: v for k, v in r.items() if v is not None})
                continue
            rules.append(r)
        if rules and len(rules) == len(sec.kthreads):
            change((t, "kthreads"), f"{t}.kthreads", "kthreads", {"rules": rules})

        rt_sets: list[tuple[str, list[int], str]] = []  # (key path, cpus, text) of RT CPU sets
        pin = getattr(sec, "vcpu_pinning", None)
        pin_params = None
        if pin is not None:
            rt_sets, pin_params = self.vcpu_map(t, pin)

        add, cmdline_ok = self.cmdline(t, sec.cmdline, rt_sets)

        if sec.irq_affinity is not None:
            loc = (t, "irq_affinity", "housekeeping")
            raw = sec.irq_affinity.housekeeping
            text = self.sub(loc, raw)
            hk = self.cpus(t, loc, text, raw) if text is not None else None
            if hk:
                for key, cpus, rt_text in rt_sets:
                    both = sorted(set(hk) & set(cpus))
                    if both:
                        self.p.add(loc, f"housekeeping CPU{'s' if len(both) > 1 else ''} {format_cpulist(both)} also "
                                        f"in the RT CPUs of {key} ({rt_text}); housekeeping and RT CPU sets must "
                                        "not overlap", text, raw)
                        hk = None
                        break
            if hk:
                change(loc[:2], f"{t}.irq_affinity", "irq_affinity", {"housekeeping": hk})
        if sec.irqbalance is not None:
            balance = self.irqbalance(t, sec.irqbalance)
            if balance is not None:
                change((t, "irqbalance"), f"{t}.irqbalance", "irqbalance", balance)
        if pin_params:
            change((t, "vcpu_pinning"), f"{t}.vcpu_pinning", "vcpu_pinning", pin_params)
        if add and cmdline_ok:
            change((t, "cmdline"), f"{t}.cmdline", "cmdline", {"add": add})
        if sec.kernel is not None:
            loc = (t, "kernel")
            if t == "guest":
                self.p.add(loc, "rt-tune cannot install a guest kernel yet (only host.kernel): build the guest "
                                "image with the kernel you want", sec.kernel.model_dump(exclude_none=True))
            else:
                artifact = self.artifact(loc, sec.kernel)
                if artifact is not None:
                    change(loc, f"{t}.kernel", "kernel", artifact)
        wfx = getattr(sec, "wfx_notrap", None)
        if wfx is not None:
            artifact = None
            if wfx.kernel is not None:
                artifact = self.artifact((t, "wfx_notrap", "kernel"), wfx.kernel)
            if wfx.kernel is None or artifact is not None:
                change((t, "wfx_notrap"), f"{t}.wfx_notrap", "wfx_notrap",
                       {"wfi": "notrap", "wfe": "notrap", "kernel": artifact})
        return out

    def irqbalance(self, t: Target, sec: Irqbalance) -> dict[str, Any] | None:
        """{housekeeping, rt, stop} or None (problems recorded): the banned CPUs are needed unless irqbalance is
        stopped, and never overlap the housekeeping CPUs."""
        loc = (t, "irqbalance")
        text = self.sub(loc + ("housekeeping",), sec.housekeeping)
        hk = self.cpus(t, loc + ("housekeeping",), text, sec.housekeeping) if text is not None else None
        rt: list[int] | None = []
        if sec.banned is not None:
            btext = self.sub(loc + ("banned",), sec.banned)
            rt = self.cpus(t, loc + ("banned",), btext, sec.banned) if btext is not None else None
        elif not sec.stop:
            self.p.add(loc, "name the RT CPUs irqbalance must not use (banned: \"${rt_cpus}\"), or stop it "
                            "(stop: true)")
            return None
        if hk is None or rt is None:
            return None
        if set(hk) & set(rt):
            self.p.add(loc + ("banned",), f"CPUs {format_cpulist(sorted(set(hk) & set(rt)))} are both banned and "
                                          "housekeeping", sec.banned)
            return None
        return {"housekeeping": hk, "rt": rt, "stop": sec.stop}

    def sysfs(self, t: Target, sec: Sysfs) -> list[tuple[str, dict[str, Any]]]:
        """(knob, params) of each sysfs knob set, checked against its type (changes/sysfs.py); problems recorded."""
        out: list[tuple[str, dict[str, Any]]] = []
        for knob in KNOBS:
            raw = getattr(sec, knob)
            if raw is None:
                continue
            loc = (t, "sysfs", knob)
            params: dict[str, Any] = {"knob": knob}
            if isinstance(raw, PerCpuKnob | CpuidleDisable):
                text = self.sub(loc + ("cpus",), raw.cpus)
                cpus = self.cpus(t, loc + ("cpus",), text, raw.cpus) if text is not None else None
                if cpus is None:
                    continue
                params["cpus"] = cpus
                if isinstance(raw, CpuidleDisable):
                    states_text = self.sub(loc + ("states",), raw.states)
                    try:
                        params["states"] = parse_cpulist(states_text or "", max_cpu=63)
                    except CpuListError:
                        self.p.add(loc + ("states",), "not a list of idle state numbers 0..63 (e.g. \"1-3\")",
                                   states_text, raw.states)
                        continue
                    params["value"] = "1"
                else:
                    value = self.sub(loc + ("value",), raw.value)
                    if value is None:
                        continue
                    params["value"] = value
            else:
                value = self.sub(loc, raw)
                if value is None:
                    continue
                if KNOBS[knob].type == "cpumask":
                    cpus = self.cpus(t, loc, value, raw)
                    if cpus is None:
                        continue
                    value = format_cpulist(cpus)
                params["value"] = value
            problem = check_knob(knob, params["value"], params.get("cpus", ()), params.get("states", ()))
            if problem:
                self.p.add(loc, problem, params["value"])
                continue
            out.append((knob, params))
        return out

    def artifact(self, loc: tuple, spec: KernelArtifactSpec) -> dict[str, str | None] | None:
        """The params of a kernel artifact ({"deb": absolute path, "package", "release"}, unset ones None), or
        None when it has a problem (recorded) or a value waits for vars."""
        given = [k for k in ARTIFACT_SOURCES if getattr(spec, k) is not None]
        if len(given) != 1:
            self.p.add(loc, "name exactly one of `deb: FILE` (a .deb on this machine) or `package: NAME` (a "
                            "package in the unit's apt repositories)", spec.model_dump(exclude_none=True))
        out: dict[str, str | None] = {"deb": None, "package": None, "release": None}
        ok = len(given) == 1  # the values are still checked, so that every problem shows at once
        if spec.deb is not None:
            dloc = loc + ("deb",)
            text = self.sub(dloc, spec.deb)
            if text is None:
                ok = False
            else:
                source = self.profile._source
                base = source.file_of(dloc).parent if source else Path.cwd()
                path = (base / text).resolve()
                if not text.endswith(".deb"):
                    self.p.add(dloc, "must name a Debian package file (*.deb)", text, spec.deb)
                    ok = False
                elif not path.is_file():
                    self.p.add(dloc, f"no such file {path} (a relative path is relative to the directory of the "
                                     f"profile file that names it, {base.resolve()})", text, spec.deb)
                    ok = False
                else:
                    out["deb"] = str(path)
        if spec.package is not None:
            ploc = loc + ("package",)
            text = self.sub(ploc, spec.package)
            if text is None:
                ok = False
            elif not DEB_PACKAGE.fullmatch(text):
                self.p.add(ploc, "not a Debian package name (lowercase letters, digits and `+.-`, at least 2 "
                                 "characters, starting with a letter or digit)", text, spec.package)
                ok = False
            else:
                out["package"] = text
        if spec.release is not None:
            rloc = loc + ("release",)
            text = self.sub(rloc, spec.release)
            if text is None:
                ok = False
            elif not KERNEL_RELEASE.fullmatch(text) or len(text) > KERNEL_RELEASE_MAX:
                self.p.add(rloc, f"not a kernel release as `uname -r` prints it ([A-Za-z0-9._+-], at most "
                                 f"{KERNEL_RELEASE_MAX} characters, e.g. 6.1.0-41-rt-arm64)", text, spec.release)
                ok = False
            else:
                out["release"] = text
        return out if ok else None

    def cmdline(self, t: Target, args: dict[str, str | None], rt_sets: list) -> tuple[dict, bool]:
        add: dict[str, str | None] = {}
        ok = True
        for key, raw in args.items():
            loc = (t, "cmdline", key)
            if not isinstance(key, str) or not CMDLINE_KEY.fullmatch(key):
                self.p.add(loc, "not a kernel argument name ([A-Za-z0-9_.-], no whitespace, quotes or shell "
                                "metacharacters)", key)
                ok = False
                continue
            norm = key.lower().replace("-", "_")
            if norm.startswith("root") or norm in CMDLINE_FORBIDDEN:
                self.p.add(loc, "rt-tune never sets root, init, initrd or rw/ro arguments: they decide whether "
                                "the unit boots at all", key if raw is None else f"{key}={raw}")
                ok = False
                continue
            if raw is None:
                add[key] = None
                continue
            value = self.sub(loc, raw)
            if value is None:
                ok = False
                continue
            bad = sorted({c for c in value if not CMDLINE_VALUE.fullmatch(c)})
            if not value or bad:
                self.p.add(loc, "a kernel argument value must be non-empty and use only [A-Za-z0-9_.,:/=+@%-] "
                                f"(no whitespace, quotes or shell metacharacters; found {''.join(bad)!r})",
                           value, raw)
                ok = False
                continue
            add[key] = value
            problem = check_hugepage_arg(norm, value)
            if problem:
                self.p.add(loc, problem, value, raw)
                ok = False
                continue
            if norm in CPU_LIST_KEYS:
                text = value
                if norm == "isolcpus":
                    parts = value.split(",")
                    while parts and parts[0] in ISOLCPUS_FLAGS:
                        parts.pop(0)
                    text = ",".join(parts)
                cpus = self.cpus(t, loc, text, raw, what=f"{key} CPU list", shown=value)
                if cpus is None:
                    ok = False
                    continue
                n = self.bound[t]
                if norm in RT_CMDLINE_KEYS:
                    if n is not None and len(cpus) >= n:
                        self.p.add(loc, f"leaves no housekeeping CPU: the unit's {t} has only CPUs "
                                        f"{format_cpulist(range(n))}", value, raw)
                        ok = False
                        continue
                    rt_sets.append((".".join(loc), cpus, text))
        return add, ok

    def ordered(self, default: list[ChangeSpec]) -> list[ChangeSpec]:
        by_id = {s.id: s for s in default}
        first: list[ChangeSpec] = []
        for i, cid in enumerate(self.profile.order):
            loc = ("order", i)
            if cid in {s.id for s in first}:
                self.p.add(loc, "change id listed twice", cid)
            elif cid in by_id:
                first.append(by_id[cid])
            elif not self.unknown:
                self.p.add(loc, f"no such change in this profile; its changes are: {', '.join(by_id) or 'none'}",
                           cid)
        return first + [s for s in default if s not in first]


def resolve(profile: Profile, unit_name: str, unit_spec: Any) -> list[ChangeSpec]:
    """The profile's changes for one unit (its inventory `vars` substituted), in the profile's order.

    `unit_spec` is an inventory UnitSpec (only `vars` and `guest` are used). Pure: no SSH. Raises one
    InputError listing every problem, each with the file and line it comes from.
    """
    problems = _Problems(profile._source)
    vars = dict(unit_spec.vars or {})
    whose = f"unit {unit_name}'s inventory vars"
    host_cpus = _count_var(vars, "cpus", problems, whose)
    guest_cpus = _count_var(vars, "guest_cpus", problems, whose)
    specs = _Resolver(profile, problems, vars, whose, host_cpus, guest_cpus).changes()
    if getattr(unit_spec, "guest", None) is None and any(s.target == "guest" for s in specs):
        problems.add(("guest",), f"unit {unit_name} has no guest endpoint in the inventory, but the profile "
                                 "changes the guest")
    problems.raise_if_any(f"profile {profile.name} cannot be applied to unit {unit_name}")
    return specs


def _describe_artifact(a: Mapping[str, Any]) -> str:
    what = Path(a["deb"]).name if a.get("deb") else f"package {a.get('package')}"
    return what + (f" ({a['release']})" if a.get("release") else "")


def describe_vcpu_map(p: Mapping[str, Any], other_vcpus: list[int] | None = None) -> str:
    """"vCPU 1 (guest RT CPU 1) -> host CPU 1 (SCHED_FIFO 1); vCPU 0, main loop, I/O threads -> 0"; the other
    vCPUs by number when they are known (read from the unit), else "other vCPUs"."""
    fifo = f" (SCHED_FIFO {p['rt_priority']})" if p.get("rt_priority") else ""
    rt = "; ".join(f"vCPU {v} (guest RT CPU {v}) -> host CPU {c}{fifo}" for v, c in p["vcpus"].items())
    if p.get("housekeeping") is None:  # a map journaled by an older rt-tune: the other threads were left alone
        return rt
    others = "other vCPUs" if other_vcpus is None else ", ".join(f"vCPU {v}" for v in other_vcpus) or "no other vCPU"
    return f"{rt}; {others}, main loop, I/O threads -> {format_cpulist(p['housekeeping'])}"


def describe(spec: ChangeSpec) -> str:
    """One line for humans."""
    p = spec.params
    if spec.kind == "sysctl":
        text = f"sysctl {p['name']}={p['value']}"
    elif spec.kind == "service_disable":
        text = f"stop, disable{' and mask' if p.get('mask') else ''} {p['unit']}"
    elif spec.kind == "irqbalance":
        ban = "stop irqbalance" if p.get("stop") else f"irqbalance off CPUs {format_cpulist(p['rt'])}"
        text = f"{ban}; new IRQs on CPUs {format_cpulist(p['housekeeping'])}"
    elif spec.kind == "kthreads":
        text = "kernel threads: " + "; ".join(
            f"{r['match']} -> " + ", ".join(x for x in (
                f"{r['policy']}{' ' + str(r['priority']) if r.get('priority') else ''}" if r.get("policy") else "",
                f"CPUs {format_cpulist(r['cpus'])}" if r.get("cpus") is not None else "") if x)
            for r in p["rules"])
    elif spec.kind == "service_enable":
        text = f"enable{' and start' if p.get('start', True) else ''} {p['unit']}"
    elif spec.kind == "vcpu_pinning":
        text = f"pin the threads of {p['service']}: {describe_vcpu_map(p)}"
    elif spec.kind == "irq_affinity":
        text = f"move IRQs to housekeeping CPUs {format_cpulist(p['housekeeping'])}"
    elif spec.kind == "sysfs":
        where = f" on CPUs {format_cpulist(p['cpus'])}" if p.get("cpus") else ""
        states = f" (idle states {format_cpulist(p['states'])})" if p.get("states") else ""
        text = f"sysfs {p['knob']} = {p['value']}{where}{states}"
    elif spec.kind == "cmdline":
        text = "add kernel arguments " + " ".join(k if v is None else f"{k}={v}" for k, v in p["add"].items())
    elif spec.kind == "kernel":
        text = f"install and boot kernel {_describe_artifact(p)}"
    elif spec.kind == "wfx_notrap":
        text = "stop trapping guest WFI/WFE"
        if p.get("kernel"):
            text += f" (Linux < 6.11: with patched kernel {_describe_artifact(p['kernel'])})"
    elif spec.kind == "bundle":
        text = f"{len(p['members'])} changes together: " + " | ".join(
            describe(ChangeSpec(id=m["id"], target=spec.target, kind=m["kind"], params=m["params"])).split(": ", 1)[1]
            for m in p["members"])
    else:  # pragma: no cover - Kind is closed
        text = f"{spec.kind} {p}"
    return f"{spec.target}: {text}" + (" (reboot)" if spec.needs_reboot else "")


# ---- provenance: `tune profile show` ----------------------------------------------------------------------
class ProfileLine(BaseModel):
    """One value of a merged profile: where it was set, what it replaced, and the change it becomes."""

    key: str  # dotted key path, e.g. host.sysctl.kernel.timer_migration
    value: Any  # as written (variables not substituted)
    source: str  # FILE:LINE of the file that set it (the last one, after includes and overrides)
    overrides: list[str] = Field(default_factory=list)  # "FILE:LINE: VALUE" of each earlier setting, oldest first
    change: str | None = None  # the change id it becomes (None: not a change, e.g. name, checks, order)
    kind: str | None = None
    resolved: str | None = None  # for a unit: the change as resolved (`describe`)


_SECTION_KINDS = {"sysctl": "sysctl", "sysfs": "sysfs", "kthreads": "kthreads", "irqbalance": "irqbalance",
                  "cmdline": "cmdline",
                  "services": "service", "vcpu_pinning": "vcpu_pinning", "irq_affinity": "irq_affinity",
                  "kernel": "kernel", "wfx_notrap": "wfx_notrap"}


def _section_kind(loc: tuple) -> str | None:
    kind = _SECTION_KINDS.get(loc[1])
    return f"service_{loc[2]}" if kind == "service" else kind


def _change_id(loc: tuple, value: Any) -> str | None:
    if len(loc) < 2 or loc[0] not in ("host", "guest") or loc[1] not in _SECTION_KINDS:
        return None
    t, sec = loc[0], loc[1]
    if sec in ("sysctl", "sysfs"):
        return f"{t}.{sec}.{loc[2]}" if len(loc) > 2 else None
    if sec == "services":
        if loc[2] in ("disable", "enable") and len(loc) == 4 and isinstance(value, str):
            try:
                return f"{t}.service.{with_unit_suffix(value)}"
            except InvalidName:
                return None
        return None  # `mask` applies to every disabled service of the section
    return f"{t}.{sec}"


def _leaves(v: Any, loc: tuple) -> list[tuple[tuple, Any]]:
    if isinstance(v, Mapping) and v:
        return [leaf for k, x in v.items() for leaf in _leaves(x, loc + (k,))]
    if isinstance(v, list) and v:
        return [leaf for i, x in enumerate(v) for leaf in _leaves(x, loc + (i,))]
    return [(loc, v)]


def profile_lines(profile: Profile, specs: list[ChangeSpec] | None = None) -> list[ProfileLine]:
    """Every value of `profile` with its provenance (sections in the order of the profile format); `specs` (the profile
    resolved for a unit) adds each line's change as resolved."""
    source = profile._source
    by_id = {s.id: s for s in specs or []}
    lines = []
    for loc, value in _leaves(profile.model_dump(exclude_unset=True), ()):
        cid = _change_id(loc, value)
        spec = by_id.get(cid) if cid else None
        overrides = []
        for n in range(len(loc), 0, -1):  # a replaced value, or the replaced list or mapping it was part of
            for idx, old in (source.overridden.get(loc[:n], []) if source else []):
                path, doc = source.files[idx]  # type: ignore[union-attr]
                line = line_of(doc, loc[:n])
                overrides.append(f"{path}:{line}: {short_repr(old)}" if line else f"{path}: {short_repr(old)}")
            if overrides:
                break
        lines.append(ProfileLine(
            key=".".join(str(k) for k in loc), value=value, source=source.where(loc) if source else "",
            overrides=overrides, change=cid if (spec or specs is None) else None,
            kind=(spec.kind if spec else _section_kind(loc) if cid and specs is None else None),
            resolved=describe(spec) if spec else None))
    return lines
