"""Names rt-tune hands to systemd and sysctl: one validator each, used by profile, changes and facts.

Every check is whole-string (`\\A...\\Z` or fullmatch, ASCII only): `re.match` with `$` also matches before
a final newline, and a newline in a name becomes a second command or a second line of a drop-in file.

Unit names follow systemd's unit_name_is_valid() (src/basic/unit-name.c): at most 255 characters; before
the last dot the characters [A-Za-z0-9:_.\\-@], a name part that does not start with `@`, then an optional
`@` and an instance (empty: a template such as `getty@.service`); after the last dot one of the unit types.
rt-tune is stricter in three ways: a backslash only as systemd-escape writes it (`\\xNN`, as in
`dev-disk-by\\x2duuid-1.swap`), no leading `-` (it would read as an option of systemctl) and no leading `.`
(systemd skips hidden unit files).
"""

from __future__ import annotations

import re

from orchestrator.core.errors import InputError

#: systemd's unit types (unit_type_table).
UNIT_TYPES = ("service", "socket", "target", "device", "mount", "automount", "swap", "timer", "path", "slice",
              "scope")
#: What `services: disable:` acts on: units that start something and that `systemctl disable --now` stops
#: for good. A .mount or .swap would unmount or swapoff; a .target/.slice/.scope/.device is not a service.
DISABLE_TYPES = ("service", "socket", "timer", "path")
UNIT_NAME_MAX = 255

_C = r"(?:[A-Za-z0-9:_.-]|\\x[0-9a-fA-F]{2})"  # a character of the name part
_CI = r"(?:[A-Za-z0-9:_.@-]|\\x[0-9a-fA-F]{2})"  # ... of the instance part (which may hold `@`)
#: A valid unit name, template or instance included; `.match()` is whole-string too (\A ... \Z).
UNIT_NAME = re.compile(
    rf"\A(?=.{{1,{UNIT_NAME_MAX}}}\Z)(?![-.]){_C}+(?:@{_CI}*)?\.(?:{'|'.join(UNIT_TYPES)})\Z", re.ASCII)
UNIT_NAME_RULE = ("letters, digits and `:_.@-` (a backslash only as \\xNN), at most 255 characters, not "
                  "starting with `-` or `.`, ending in a unit type such as .service")

#: A sysctl name as dotted [a-z0-9_-] words, at least two (a single word is a /proc/sys directory).
SYSCTL_NAME = re.compile(r"\A[a-z0-9_-]+(?:\.[a-z0-9_-]+)+\Z", re.ASCII)
SYSCTL_NAME_MAX = 200
SYSCTL_NAME_RULE = "[a-z0-9_.-]+ with at least one dot and no empty part, e.g. kernel.timer_migration"


class InvalidName(InputError, ValueError):
    """A name systemd or sysctl would not take (an InputError for the CLI, a ValueError for pydantic).
    `reason` is the message without the name, for callers that show the value themselves."""

    def __init__(self, name: object, reason: str, what: str = "name"):
        super().__init__(f"{what} {_show(name)}: {reason}")
        self.reason = reason


def _show(name: object) -> str:
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."


def unit_type(name: str) -> str | None:
    """The unit type of `name` (its suffix after the last dot) when systemd knows it, else None."""
    _, dot, suffix = name.rpartition(".")
    return suffix if dot and suffix in UNIT_TYPES else None


def with_unit_suffix(name: str) -> str:
    """`name` as systemctl reads it: `.service` appended without a unit-type suffix ("foo" -> foo.service)."""
    return name if unit_type(name) else f"{name}.service"


def check_unit_name(name: object, *, types: tuple[str, ...] = UNIT_TYPES, template: bool = False,
                    what: str = "systemd unit name") -> str:
    """`name` when it is a valid unit name of one of `types` (a template only with `template=True`); else
    InvalidName saying what is wrong."""
    if not isinstance(name, str) or not UNIT_NAME.match(name):
        raise InvalidName(name, f"not a valid {what}: {UNIT_NAME_RULE}", what)
    kind = unit_type(name)
    if kind not in types:
        raise InvalidName(name, f"a .{kind} unit; expected {', '.join('.' + t for t in types)}", what)
    base = name[: -len(kind) - 1]
    if not template and base.endswith("@") and "@" not in base[:-1]:
        raise InvalidName(name, f"a template: name an instance such as {base}NAME.{kind}", what)
    return name


def service_to_disable(name: object) -> str:
    """The unit `services: disable:` acts on: `.service` appended when `name` has no unit-type suffix, then
    one of DISABLE_TYPES, never a template. InvalidName otherwise, saying what `disable` takes."""
    what = "service to disable"
    if not isinstance(name, str) or not name:
        raise InvalidName(name, "must be a unit name", what)
    unit = with_unit_suffix(name)
    if not UNIT_NAME.match(unit):
        raise InvalidName(name, f"not a systemd unit name ({UNIT_NAME_RULE})", what)
    kind = unit_type(unit)
    if kind not in DISABLE_TYPES:
        takes = ", ".join("." + t for t in DISABLE_TYPES)
        raise InvalidName(name, f"a .{kind} unit is not a service to disable: `services: disable:` takes "
                                f"{takes} units (no suffix means .service)", what)
    return check_unit_name(unit, types=DISABLE_TYPES, what=what)


def check_sysctl_name(name: object) -> str:
    """`name` when it is a dotted sysctl name (SYSCTL_NAME, at most SYSCTL_NAME_MAX characters)."""
    if not isinstance(name, str) or len(name) > SYSCTL_NAME_MAX or not SYSCTL_NAME.match(name):
        raise InvalidName(name, f"not a sysctl name ({SYSCTL_NAME_RULE})", "sysctl")
    return name
