"""The one duration parser: every duration a user types (`--duration`, a playbook's `duration`) is read here."""

from __future__ import annotations

import re

from orchestrator.core.errors import InputError

_UNITS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_DURATION = re.compile(r"[ \t]*([0-9]{1,12}(?:\.[0-9]{1,12})?)[ \t]*(ms|sec|s|min|m|h)?[ \t]*")


def parse_duration(text: object, *, what: str = "duration", minimum_s: float = 0.0,
                   maximum_s: float | None = None, why_minimum: str = "") -> float:
    """'60', '60s', '10 sec', '500ms', '1.5m', '2min', '1h' -> seconds, within [minimum_s, maximum_s]. ASCII digits
    only (float() would also take '١٠'); InputError naming `what`, the value and what was expected."""
    m = _DURATION.fullmatch(str(text))
    if not m:
        raise InputError(f"{what} {text!r}: expected a number with an optional unit ms, s, m or h (e.g. 60s)")
    seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if maximum_s is not None and not minimum_s <= seconds <= maximum_s:
        raise InputError(f"{what} {text!r}: expected {minimum_s:g}s to {maximum_s:g}s")
    if seconds < minimum_s or seconds <= 0:
        raise InputError(f"{what} {text!r}: at least {max(minimum_s, 0):g} s{why_minimum}")
    return seconds
