"""JSON in with limits, JSON out always valid: the one place rt-tune reads and writes JSON documents.

Every JSON file rt-tune reads (cyclictest's --json output, reports, A/B results) goes through `loads` or
`read_json`, so a hostile file is refused with its limit named instead of ending in a traceback:

- size: the caller's bound, checked before the file is read (a 2 GB file is never loaded);
- depth: counted on the text before the parser recurses (deep nesting would end in RecursionError);
- numbers: `NaN`/`Infinity` (which Python's json accepts but JSON does not have), floats that overflow to
  infinity (`1e999`) and integers beyond 64 bits are refused, with the key that holds them;
- duplicate keys in one object are refused (json.loads would silently keep the last one).

`json_safe`/`dumps` make output valid JSON: a non-finite float (an interval bound that is infinite because
there were too few runs) becomes null instead of the `Infinity` token that no JSON parser accepts.
"""

from __future__ import annotations

import json
import math
import os
import re
from itertools import accumulate
from pathlib import Path
from typing import Any

from orchestrator.core.errors import InputError, TuneError

__all__ = ["MAX_DEPTH", "MAX_INT", "dumps", "json_safe", "loads", "read_json", "read_limited"]

MAX_DEPTH = 64  # rt-tune's own documents nest about 6 levels; 64 leaves room, far below recursion limits
MAX_INT = 2**63 - 1  # counts and microseconds fit in 64 bits; cyclictest prints unsigned long at most

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


class _Refused:
    """Stands in for a value the parser met but rt-tune will not take; reported with its key path."""

    __slots__ = ("got", "why")

    def __init__(self, got: str, why: str):
        self.got, self.why = got, why


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


def read_limited(path: Path, max_bytes: int, what: str, *, error: type[TuneError] = InputError) -> bytes:
    """The bytes of `path`, refusing a file larger than `max_bytes` (checked before and while reading, so a
    device or a growing file cannot exhaust memory either)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size  # 0 for pipes and devices: those are bounded by the read
            data = b"" if size > max_bytes else f.read(max_bytes + 1)
    except OSError as exc:
        raise InputError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    except ValueError as exc:  # e.g. an embedded NUL in the path
        raise InputError(f"{path!r}: cannot read {what}: {exc}") from None
    if size > max_bytes or len(data) > max_bytes:
        raise error(f"{path}: {what} is larger than {_mib(max_bytes)}, the most rt-tune reads (a legitimate "
                    "one is far smaller); refused")
    return data


def _depth(text: str) -> int:
    """Deepest nesting of arrays/objects, counted without recursion (string contents do not count)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def _path(parts: list[Any]) -> str:
    return ".".join(str(p) for p in parts) or "(top level)"


def _find_refused(doc: Any) -> tuple[str, _Refused] | None:
    """The key path and value of the first refused value in `doc` (iterative: depth is bounded anyway)."""
    stack: list[tuple[list[Any], Any]] = [([], doc)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, _Refused):
            return _path(where), node
        if isinstance(node, dict):
            stack.extend((where + [k], v) for k, v in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend((where + [i], v) for i, v in reversed(list(enumerate(node))))
    return None


def loads(text: str, *, source: str, error: type[TuneError] = InputError, max_depth: int = MAX_DEPTH,
          expected: str = "") -> Any:
    """Parse one JSON document with the limits of the module docstring; `error(...)` names `source`, the key
    path and the value on refusal. `expected` (what the file should have been) is added to syntax errors."""
    hint = f": {expected}" if expected else ""
    depth = _depth(text)
    if depth > max_depth:
        raise error(f"{source}: JSON nested {depth} levels deep, more than the {max_depth} rt-tune accepts"
                    f"{hint}")
    refused: list[bool] = []  # set by the hooks below; walked only when something was refused

    def refuse(got: str, why: str) -> _Refused:
        refused.append(True)
        return _Refused(got, why)

    def constant(token: str) -> _Refused:
        return refuse(token, "not a finite number (JSON has no NaN or Infinity)")

    def number(token: str) -> float | _Refused:
        value = float(token)
        if not math.isfinite(value):
            return refuse(token[:40], "a number too large for a float (it would become infinity)")
        return value

    def integer(token: str) -> int | _Refused:
        value = int(token) if len(token.lstrip("-")) <= 19 else None  # no int() of a 10,000-digit token
        if value is None or abs(value) > MAX_INT:
            shown = token if len(token) <= 40 else f"{token[:20]}... ({len(token)} digits)"
            return refuse(shown, "an integer beyond 64 bits")
        return value

    def obj(pairs: list[tuple[str, Any]]) -> dict[str, Any] | _Refused:
        d = dict(pairs)
        if len(d) != len(pairs):
            keys = [k for k, _ in pairs]
            dup = next(k for i, k in enumerate(keys) if k in keys[:i])
            return refuse(repr(dup), "an object with a duplicate key (which one counts is ambiguous)")
        return d

    try:
        doc = json.loads(text, parse_constant=constant, parse_float=number, parse_int=integer,
                         object_pairs_hook=obj)
    except json.JSONDecodeError as exc:
        raise error(f"{source}: not valid JSON, truncated or invalid ({exc.msg} at line {exc.lineno} column "
                    f"{exc.colno}){hint}") from None
    except RecursionError:  # not reached after the depth check; kept so that no input can end in a traceback
        raise error(f"{source}: JSON nested too deeply{hint}") from None
    if refused:
        found = _find_refused(doc)
        if found is not None:
            where, bad = found
            raise error(f"{source}: {where}: {bad.why} (got {bad.got})")
    return doc


def read_json(path: Path, *, what: str, max_bytes: int, error: type[TuneError] = InputError,
              expected: str = "") -> Any:
    """`loads` on a UTF-8 file of at most `max_bytes` (a leading byte-order mark, as Windows editors write,
    is skipped); every refusal names the file."""
    data = read_limited(path, max_bytes, what, error=error)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: {what} is not UTF-8 text ({exc.reason} at byte {exc.start})"
                    + (f": {expected}" if expected else "")) from None
    return loads(text, source=str(path), error=error, expected=expected)


def json_safe(data: Any) -> Any:
    """A copy of `data` that `json.dumps(..., allow_nan=False)` accepts: non-finite floats become None."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    return data


def dumps(data: Any, **kwargs: Any) -> str:
    """Valid JSON always: non-finite floats as null (see `json_safe`), never the `NaN`/`Infinity` tokens."""
    return json.dumps(json_safe(data), allow_nan=False, **kwargs)
