"""systemd: a unit's state, and the core dumps systemd-coredump recorded (crash loops)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from orchestrator.core.errors import ParseError
from orchestrator.core.names import UNIT_TYPES, check_unit_name
from orchestrator.facts.base import Fact

_UNIT_PROPS = (
    "Id",
    "LoadState",
    "UnitFileState",
    "ActiveState",
    "SubState",
    "NRestarts",
    "MainPID",
    "ExecMainStatus",
)


def validate_unit_name(unit: str) -> str:
    """`unit` when systemd would take it (orchestrator.core.names: any unit type, no template); else InvalidName, a
    ValueError."""
    return check_unit_name(unit, types=UNIT_TYPES)


class UnitState(BaseModel):
    """`systemctl show` of one unit. A unit that does not exist has load_state 'not-found'."""

    name: str
    load_state: str
    #: enabled / disabled / masked / static / ... as reported; "" when systemd has no unit file state (not-found).
    unit_file_state: str
    active_state: str
    sub_state: str
    #: Times systemd restarted the service (Restart=); None when systemd reports none (non-service units).
    n_restarts: int | None
    #: None when no main process runs (systemd reports 0).
    main_pid: int | None
    #: Exit status or signal number of the last main process.
    exec_main_status: int

    @property
    def exists(self) -> bool:
        return self.load_state != "not-found"


def _int_field(what: str, value: str) -> int:
    if not re.fullmatch(r"-?[0-9]+", value):
        raise ParseError(f"expected an integer for {what}, got {value!r}")
    return int(value)


def parse_unit_state(text: str) -> UnitState:
    """`systemctl show -p Id,LoadState,...` output: one `Key=Value` line per property, in systemd's order."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or key not in _UNIT_PROPS:
            raise ParseError(f"expected `Key=Value` lines for {', '.join(_UNIT_PROPS)}, got {line[:200]!r}")
        if key in values:
            raise ParseError(f"property {key} appears twice in systemctl show output")
        values[key] = value
    missing = [p for p in _UNIT_PROPS if p not in values]
    if missing:
        raise ParseError(
            f"expected properties {', '.join(missing)} in systemctl show output, got {text[:200]!r}"
        )
    for key in ("Id", "LoadState", "ActiveState", "SubState"):
        if not values[key]:
            raise ParseError(f"expected a non-empty {key} in systemctl show output")
    main_pid = _int_field("MainPID", values["MainPID"])
    return UnitState(
        name=values["Id"],
        load_state=values["LoadState"],
        unit_file_state=values["UnitFileState"],
        active_state=values["ActiveState"],
        sub_state=values["SubState"],
        n_restarts=_int_field("NRestarts", values["NRestarts"]) if values["NRestarts"] else None,
        main_pid=main_pid or None,
        exec_main_status=_int_field("ExecMainStatus", values["ExecMainStatus"]),
    )


def unit_state_fact(unit: str) -> Fact[UnitState]:
    validate_unit_name(unit)
    return Fact(
        f"unit_state:{unit}",
        ("systemctl", "show", "-p", ",".join(_UNIT_PROPS), "--no-pager", "--", unit),
        parse_unit_state,
    )



COREDUMP_MESSAGE_ID = "fc2e22bc6ee647b6b90729ab34a250b1"
_COREDUMP_FIELDS = (
    "COREDUMP_UNIT",
    "COREDUMP_PID",
    "COREDUMP_SIGNAL",
    "COREDUMP_SIGNAL_NAME",
    "COREDUMP_TIMESTAMP",
    "COREDUMP_EXE",
    "COREDUMP_COMM",
    "COREDUMP_FILENAME",
)


class Coredump(BaseModel):
    """One core dump recorded by systemd-coredump."""

    #: The system unit the crashed process belonged to (None outside a unit).
    unit: str | None
    pid: int
    signal: int
    signal_name: str | None
    #: When the process crashed (COREDUMP_TIMESTAMP), UTC.
    timestamp: datetime
    exe: str | None
    comm: str | None
    #: Where the core was stored (None when it was not kept).
    filename: str | None
    boot_id: str | None


def _journal_value(entry: dict[str, Any], key: str, *, required: bool) -> str | None:
    value = entry.get(key)
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(b, int) and 0 <= b < 256 for b in value):
        return bytes(value).decode("utf-8", "replace")  # journalctl's form for non-UTF-8 data
    if value is None and not required:
        return None
    raise ParseError(f"expected journal field {key} as a string, got {value!r}")


def parse_coredumps(text: str) -> list[Coredump]:
    """`journalctl -o json` output: one JSON object per line; sorted by crash time."""
    dumps: list[Coredump] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise ParseError(
                f"expected one JSON object per line from journalctl, got {line[:200]!r}"
            ) from None
        if not isinstance(entry, dict):
            raise ParseError(f"expected a JSON object per journal entry, got {line[:200]!r}")
        ts = _int_field(
            "COREDUMP_TIMESTAMP", _journal_value(entry, "COREDUMP_TIMESTAMP", required=True) or ""
        )
        dumps.append(
            Coredump(
                unit=_journal_value(entry, "COREDUMP_UNIT", required=False),
                pid=_int_field("COREDUMP_PID", _journal_value(entry, "COREDUMP_PID", required=True) or ""),
                signal=_int_field(
                    "COREDUMP_SIGNAL", _journal_value(entry, "COREDUMP_SIGNAL", required=True) or ""
                ),
                signal_name=_journal_value(entry, "COREDUMP_SIGNAL_NAME", required=False),
                timestamp=datetime.fromtimestamp(ts / 1_000_000, tz=UTC),
                exe=_journal_value(entry, "COREDUMP_EXE", required=False),
                comm=_journal_value(entry, "COREDUMP_COMM", required=False),
                filename=_journal_value(entry, "COREDUMP_FILENAME", required=False),
                boot_id=_journal_value(entry, "_BOOT_ID", required=False),
            )
        )
    dumps.sort(key=lambda d: (d.timestamp, d.pid))
    return dumps


def coredumps_fact(since_s: int = 3600, unit: str | None = None) -> Fact[list[Coredump]]:
    """Core dumps of the last `since_s` seconds (by the unit's clock), optionally of one unit only."""
    if isinstance(since_s, bool) or not isinstance(since_s, int) or since_s <= 0:
        raise ValueError(f"since_s must be a positive number of seconds, not {since_s!r}")
    argv = [
        "journalctl", "-o", "json", "--no-pager", "-q",
        "--output-fields=" + ",".join(_COREDUMP_FIELDS),
        f"--since=-{since_s}s",
        f"MESSAGE_ID={COREDUMP_MESSAGE_ID}",
    ]  # fmt: skip
    if unit is not None:
        argv.append(f"COREDUMP_UNIT={validate_unit_name(unit)}")
    # The system journal is readable by root and the adm/systemd-journal groups only.
    return Fact("coredumps" if unit is None else f"coredumps:{unit}", tuple(argv), parse_coredumps, sudo=True)


COREDUMPS = coredumps_fact()


def parse_symlink(text: str) -> str | None:
    """`readlink` output: the target, or None when the path is no symlink (no output)."""
    value = text.strip()
    return value or None


def symlink_fact(path: str) -> Fact[str | None]:
    """Where the symlink `path` points (e.g. a unit's link in a target's .wants/, i.e. whether it is enabled)."""
    return Fact(f"symlink:{path}", ("sh", "-c", 'if [ -L "$1" ]; then readlink "$1"; fi', "-", path),
                parse_symlink)
