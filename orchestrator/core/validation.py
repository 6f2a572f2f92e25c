"""pydantic's validation errors as one line a user can act on: where, what was wrong, what was received."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


def _got(e: Any) -> str:
    """' (got VALUE)' for a field's error, short; nothing for a missing field or a rule over a whole object."""
    if e["type"] == "missing" or isinstance(e.get("input"), (dict, list)):
        return ""
    text = repr(e.get("input"))
    return f" (got {text if len(text) <= 60 else text[:60] + '...'})"


def validation_problems(exc: ValidationError, prefix: str = "", limit: int = 5) -> str:
    errors = exc.errors()
    parts = []
    for e in errors[:limit]:
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        parts.append(f"{loc or '(top)'}: {e['msg'].removeprefix('Value error, ')}{_got(e)}")
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return "; ".join(parts) + more
