"""The safety net against secrets in the journal: keys that name secrets and PEM private keys are redacted."""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel

from orchestrator.journal.errors import JournalError

_SECRET_KEY = re.compile(
    r"(^|[_\-.])(stdin|password|passwd|passphrase|secret|secrets|token|private_?key|pkey|key_?material|"
    r"credentials?|authorization)($|[_\-.])",
    re.IGNORECASE,
)
_PEM_PRIVATE = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
REDACTED = "<redacted>"


def _scrub(value: Any) -> Any:
    """Event data made safe to store: secret-named keys and private keys redacted, bytes never stored."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): (REDACTED if _SECRET_KEY.search(str(k)) else _scrub(v)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(bytes(value))} bytes not stored>"
    if isinstance(value, str) and _PEM_PRIVATE.search(value):
        return REDACTED
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)  # Path, enum, datetime, ...


def _dump_strict(value: Any, what: str) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if not isinstance(value, dict):
        raise JournalError(f"{what} must be a JSON object (dict), not {type(value).__name__}")
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise JournalError(f"{what} is not JSON-serialisable: {exc}") from exc


def _load(text: str | None) -> Any:
    return None if text is None else json.loads(text)
