"""YAML in and out, with errors that name the file, line and key.

ruamel.yaml reads YAML 1.2, so `off`, `no` and `on` stay strings instead of silently becoming booleans.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError

from orchestrator.errors import InputError

M = TypeVar("M", bound=BaseModel)


def _loader() -> YAML:
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    return yaml


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        return _loader().load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise InputError(f"{where}: not valid YAML: {exc.problem}") from exc


def line_of(doc: Any, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the deepest key in `loc` that the round-trip document knows."""
    line = None
    node = doc
    for part in loc:
        lc = getattr(node, "lc", None)
        try:
            if lc is not None:
                if isinstance(part, str) and hasattr(node, "keys") and part in node:
                    line = lc.key(part)[0] + 1
                elif isinstance(part, int) and isinstance(node, list) and part < len(node):
                    line = lc.item(part)[0] + 1
            node = node[part]
        except (KeyError, IndexError, TypeError):
            break
    return line


def validate(model: type[M], doc: Any, path: Path, what: str) -> M:
    """Validate a loaded document; on failure one InputError listing every problem as file:line: key: ..."""
    try:
        return model.model_validate(doc if doc is not None else {})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            key = ".".join(str(p) for p in loc) or "(top level)"
            line = line_of(doc, loc)
            where = f"{path}:{line}" if line else str(path)
            got = err.get("input")
            got_text = "" if err["type"] == "missing" else f" (got {got!r})"
            problems.append(f"{where}: {key}: {err['msg']}{got_text}")
        raise InputError(f"invalid {what} {path}:\n  " + "\n  ".join(problems)) from exc


def load_model(model: type[M], path: Path, what: str) -> M:
    return validate(model, read_yaml(path), path, what)


def dump_yaml(data: Any, header: str = "") -> str:
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    buf = io.StringIO()
    if header:
        buf.write("".join(f"# {line}\n" for line in header.splitlines()))
    yaml.dump(data, buf)
    return buf.getvalue()
