"""Inventory: the units rt-tune manages, how to reach each unit's host and guest, and per-unit vars.

Every field is strictly typed: `port: true` or `port: "22"` is refused, not read as 1 or 22, and a switch
(`become`, `via_host`) is `true` or `false`, never "yes", "off" or 1. Names (units, groups, vars) are matched
whole-string, so a trailing newline is refused too.

vars: the known ones are typed and checked here, so a profile or a command never meets a bad one:
  cpus, guest_cpus                        CPU counts of host and guest, 1..8192
  rt_cpus, housekeeping_cpus              host CPU lists (kernel syntax, "1-3"), within 0..cpus-1 when `cpus`
                                          is given, not overlapping
  guest_rt_cpus, guest_housekeeping_cpus  guest CPU lists, within 0..guest_cpus-1 when `guest_cpus` is given
  qemu_service                            the systemd .service running the guest's QEMU (".service" may be
                                          left out)
  bootloader / guest_bootloader           a bootloader kind (BOOTLOADERS / GUEST_BOOTLOADERS)
  libvirt_domain                          a libvirt domain name
  lab                                     true for units `tune lab up` made
Other vars are free for a profile's ${name}: a name of [A-Za-z_][A-Za-z0-9_]*, a value that is a string, an
integer or a boolean (never null, a float, a list or a mapping).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from orchestrator.config.yamlio import load_model
from orchestrator.core.cpulist import (
    CPU_CEILING,
    CpuListError,
    format_cpulist,
    parse_cpulist,
)
from orchestrator.core.errors import InputError
from orchestrator.core.names import InvalidName, check_unit_name, with_unit_suffix
from orchestrator.remote import sshconfig
from orchestrator.remote.sshconfig import Hop, SSHClientConfig
from orchestrator.remote.transport import Endpoint

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*", re.ASCII)  # unit and group names, whole-string
NAME_MAX = 64
VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)  # what a profile's ${name} can reference
DOMAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+:-]*", re.ASCII)  # libvirt domain (also part of a file name)
MAX_CPUS = CPU_CEILING + 1
#: orchestrator/boot/registry.py BACKENDS (a unit test keeps them equal); qemu-append and libvirt edit a
#: guest's command line on its host, so they are guest-only.
GUEST_BOOTLOADERS = ("grub", "grub-bls", "systemd-boot", "extlinux", "u-boot", "qemu-append", "libvirt")
BOOTLOADERS = GUEST_BOOTLOADERS[:-2]
Target = Literal["host", "guest"]


def _error(kind: str, message: str, **ctx: Any) -> PydanticCustomError:
    return PydanticCustomError(kind, message, ctx)  # type: ignore[arg-type]


# ---- endpoints -----------------------------------------------------------------------------------------
_SHELL = "'\"`$;&|<>\\"


def _plain_name(v: str) -> str:
    if not v or not v.isprintable() or v.startswith("-") or any(c.isspace() or c in _SHELL for c in v):
        raise _error("plain_name", "must be a plain host or user name (no spaces, control characters, shell "
                                   "metacharacters or leading `-`)")
    return v


def _path_text(v: str) -> str:
    if not v or not v.isprintable():
        raise _error("path_text", "must be a file name without control characters")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class EndpointSpec(_Strict):
    address: Annotated[StrictStr, AfterValidator(_plain_name)]
    port: Annotated[int, Field(ge=1, le=65535)] = 22
    user: Annotated[StrictStr, AfterValidator(_plain_name)] = "root"
    key: Annotated[StrictStr, AfterValidator(_path_text)] | None = None  # private key file
    #: known_hosts file for this endpoint (host-key checking always stays on)
    known_hosts: Annotated[StrictStr, AfterValidator(_path_text)] | None = None
    become: StrictBool = False  # sudo for a non-root user
    via_host: StrictBool = False  # reach it through the unit's host as a jump host


# ---- vars ----------------------------------------------------------------------------------------------
def _cpu_text(v: Any) -> Any:
    """A CPU list var: a string, or an integer for one CPU (`rt_cpus: 1`)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    if not isinstance(v, str):
        raise _error("cpu_list", 'must be a CPU list string such as "1-3"')
    return v


def _cpus_are(cpus: list[int] | set[int]) -> str:
    return f"CPU {format_cpulist(cpus)} is" if len(cpus) == 1 else f"CPUs {format_cpulist(cpus)} are"


def _cpus_within(v: str, info: ValidationInfo, count_var: str) -> str:
    count = info.data.get(count_var)
    top = count - 1 if isinstance(count, int) else CPU_CEILING
    try:
        cpus = parse_cpulist(v, max_cpu=CPU_CEILING)
    except CpuListError as exc:
        raise _error("cpu_list", "{problem}", problem=str(exc)) from None
    if not cpus:
        raise _error("cpu_list", "must name at least one CPU")
    outside = [c for c in cpus if c > top]
    if outside:
        raise _error("cpu_list", "{cpus} outside the {n} CPUs of `{var}` (0-{top})",
                     cpus=_cpus_are(outside), n=top + 1, var=count_var, top=top)
    return v


def _service(v: str) -> str:
    try:
        check_unit_name(with_unit_suffix(v), types=("service",), what="QEMU service")
    except InvalidName as exc:
        raise _error("unit_name", "{problem}", problem=exc.reason) from None
    return v


def _domain(v: str) -> str:
    if not DOMAIN.fullmatch(v) or len(v) > 128:
        raise _error("domain", "must be a libvirt domain name ([A-Za-z0-9_.+:-], at most 128 characters, "
                               "starting with a letter or digit)")
    return v


def _var_name(name: str) -> str:
    if not VAR_NAME.fullmatch(name):
        raise _error("var_name", "a var name must match [A-Za-z_][A-Za-z0-9_]* (a profile references it as "
                                 "${name})")
    return name


def _free_var(v: Any) -> Any:
    if isinstance(v, (str, int)) and not isinstance(v, float):  # bool is an int
        return v
    raise _error("var_value", "a var must be a string, an integer or a boolean (quote a number such as "
                              "6.10; lists, mappings and null are not substituted into a profile)")


VarName = Annotated[str, AfterValidator(_var_name)]
FreeVar = Annotated[Any, BeforeValidator(_free_var)]
CpuCount = Annotated[int, Field(strict=True, ge=1, le=MAX_CPUS)]
CpuListVar = Annotated[str, BeforeValidator(_cpu_text)]


class UnitVars(BaseModel):
    """A unit's vars (see the module docstring); `cpus` and `guest_cpus` come first so the CPU lists after
    them are checked against them."""

    model_config = ConfigDict(extra="allow", strict=True)
    __pydantic_extra__: dict[VarName, FreeVar]

    cpus: CpuCount = None  # type: ignore[assignment]  # absent: None (an explicit null is refused)
    guest_cpus: CpuCount = None  # type: ignore[assignment]
    rt_cpus: CpuListVar = None  # type: ignore[assignment]
    housekeeping_cpus: CpuListVar = None  # type: ignore[assignment]
    guest_rt_cpus: CpuListVar = None  # type: ignore[assignment]
    guest_housekeeping_cpus: CpuListVar = None  # type: ignore[assignment]
    qemu_service: Annotated[StrictStr, AfterValidator(_service)] = None  # type: ignore[assignment]
    bootloader: Literal[BOOTLOADERS] = None  # type: ignore[assignment,valid-type]
    guest_bootloader: Literal[GUEST_BOOTLOADERS] = None  # type: ignore[assignment,valid-type]
    libvirt_domain: Annotated[StrictStr, AfterValidator(_domain)] = None  # type: ignore[assignment]
    lab: StrictBool = None  # type: ignore[assignment]

    @field_validator("rt_cpus", "housekeeping_cpus")
    @classmethod
    def _host_cpus(cls, v: str, info: ValidationInfo) -> str:
        return _cpus_within(v, info, "cpus")

    @field_validator("guest_rt_cpus", "guest_housekeeping_cpus")
    @classmethod
    def _guest_cpus(cls, v: str, info: ValidationInfo) -> str:
        return _cpus_within(v, info, "guest_cpus")

    @field_validator("housekeeping_cpus")
    @classmethod
    def _apart(cls, v: str, info: ValidationInfo) -> str:
        return _apart_from(v, info, "rt_cpus")

    @field_validator("guest_housekeeping_cpus")
    @classmethod
    def _guest_apart(cls, v: str, info: ValidationInfo) -> str:
        return _apart_from(v, info, "guest_rt_cpus")


def _apart_from(v: str, info: ValidationInfo, rt_key: str) -> str:
    """`v` (housekeeping CPUs) when it shares no CPU with the RT CPUs of `rt_key`."""
    rt = info.data.get(rt_key)
    if rt is not None:
        both = set(parse_cpulist(rt)) & set(parse_cpulist(v))
        if both:
            raise _error("cpu_overlap", "{cpus} also in {key} ({rt}): housekeeping and RT CPUs must not overlap",
                         cpus=_cpus_are(both), key=rt_key, rt=rt)
    return v


def _vars_dict(v: UnitVars) -> dict[str, Any]:
    """The validated vars as the plain dict the rest of rt-tune reads (only the vars the file sets)."""
    return v.model_dump(exclude_unset=True)


def _argv(v: list[str] | None) -> list[str] | None:
    if v is None:
        return None
    if not v or not v[0]:
        raise _error("argv", "must be a command as a non-empty list, its first element the program")
    if any("\0" in a for a in v):
        raise _error("argv", "an argument cannot contain a NUL character")
    return v


Argv = Annotated[list[StrictStr] | None, AfterValidator(_argv)]


if TYPE_CHECKING:
    VarsField = dict[str, Any]  # what the field holds once validated
else:
    VarsField = Annotated[UnitVars, AfterValidator(_vars_dict)]


class UnitSpec(_Strict):
    host: EndpointSpec
    guest: EndpointSpec | None = None
    power_cycle: Argv = None  # argv run on the controller when the unit does not come back
    #: The same for the guest alone (e.g. restart its QEMU, or a lab VM's reset); None: wait for its watchdog.
    guest_power_cycle: Argv = None
    #: The guest is a VM of this unit's host (as on a robot). False when it runs elsewhere (the x86 lab's guest is
    #: a sibling VM of its host): a host change then cannot act on the guest's latency, so that latency is not
    #: evidence about it; the decision rests on the host's own counters.
    guest_on_host: StrictBool = True
    #: validated as UnitVars, kept as the plain dict of the vars the file sets
    vars: VarsField = Field(default_factory=dict)


def _name(what: str) -> Any:
    def check(name: str) -> str:
        if not NAME.fullmatch(name) or len(name) > NAME_MAX:
            raise _error("name", "a {what} name must match [A-Za-z0-9][A-Za-z0-9_.-]* (at most {n} characters)",
                         what=what, n=NAME_MAX)
        if what == "unit" and name.endswith((".host", ".guest")):
            raise _error("name", "a unit name cannot end in .host or .guest: commands take UNIT.host and "
                                 "UNIT.guest, so {name}'s own host could not be named", name=name)
        return name
    return AfterValidator(check)


UnitName = Annotated[str, _name("unit")]
GroupName = Annotated[str, _name("group")]


class Inventory(_Strict):
    units: Annotated[dict[UnitName, UnitSpec], Field(min_length=1)]  # an empty one is a mistake, never "done"
    groups: dict[GroupName, list[StrictStr]] = Field(default_factory=dict)

    @field_validator("groups")
    @classmethod
    def _members(cls, v: dict[str, list[str]], info: ValidationInfo) -> dict[str, list[str]]:
        units = info.data.get("units")
        if units is None:  # refused already
            return v
        for group, members in v.items():
            unknown = [m for m in members if m not in units]
            if unknown:
                raise _error("group", "group {group}: no unit {unknown} in the inventory; units: {units}",
                             group=group, unknown=", ".join(map(repr, unknown))[:200],
                             units=", ".join(sorted(units))[:200])
        return v

    def unit(self, name: str) -> UnitSpec:
        try:
            return self.units[name]
        except KeyError:
            raise InputError(f"no unit {name!r} in the inventory; units: {', '.join(sorted(self.units))}") from None

    def endpoint(self, unit: str, target: Target = "host") -> Endpoint:
        spec = self.unit(unit)
        host = _endpoint(spec.host, None)
        if target == "host":
            return host
        if spec.guest is None:
            raise InputError(f"unit {unit!r} has no guest endpoint in the inventory")
        return _endpoint(spec.guest, host if spec.guest.via_host else None)


def _endpoint(spec: EndpointSpec, jump: Endpoint | None, ssh_config: Path | None = None) -> Endpoint:
    """The inventory's explicit settings win; what it leaves out comes from the user's SSH config (~/.ssh/config
    and /etc/ssh/ssh_config, or only `ssh_config`), then the defaults. `jump` (the unit's host, for a guest with
    `via_host`) replaces the config's ProxyJump; otherwise the config's ProxyJump chain is the endpoint's."""
    config = sshconfig.load(ssh_config)
    given = spec.model_fields_set
    hop = sshconfig.resolve(config, spec.address, port=spec.port if "port" in given else None,
                            user=spec.user if "user" in given else None, jump=jump is None)
    return _hop_endpoint(config, hop, spec, jump)


def _hop_endpoint(config: SSHClientConfig, hop: Hop, spec: EndpointSpec | None, jump: Endpoint | None) -> Endpoint:
    """An Endpoint for a resolved hop, with its jump chain unless `jump` is given: the inventory's `spec` (the
    target's) wins where it says something."""
    if jump is None and hop.jump is not None:
        jump = _hop_endpoint(config, hop.jump, None, None)
    key = spec.key if spec is not None and spec.key else hop.key_file
    known = spec.known_hosts if spec is not None and spec.known_hosts else hop.known_hosts
    try:
        endpoint = Endpoint(host=hop.host, port=hop.port, user=hop.user or "root", key_file=key,
                            known_hosts=known, become=spec.become if spec is not None else False, jump=jump)
        return replace(endpoint, connect_timeout=hop.connect_timeout) if hop.connect_timeout else endpoint
    except ValueError as exc:  # the inventory's values are checked already: a bad one came from the SSH config
        raise InputError(f"{config.where}: for {hop.alias}: {exc}") from None


def load_inventory(path: Path) -> Inventory:
    if not path.exists():
        raise InputError(f"inventory {path} does not exist; `tune lab up` writes one for the local lab")
    return load_model(Inventory, path, "inventory")


def split_target(ref: str) -> tuple[str, Target]:
    """'lab1.guest' -> ('lab1', 'guest'); a bare unit name means its host."""
    unit, _, target = ref.rpartition(".")
    if not unit:
        return ref, "host"
    if target not in ("host", "guest"):
        raise InputError(f"target {ref!r}: expected UNIT, UNIT.host or UNIT.guest")
    return unit, target  # type: ignore[return-value]
