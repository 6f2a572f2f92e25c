"""YAML in and out, with errors that name the file, line and key.

ruamel.yaml reads YAML 1.2, so `off`, `no` and `on` stay strings instead of silently becoming booleans.

Every YAML file rt-tune reads (profile, inventory, playbook) is a config file a person writes, so read_yaml
refuses, each with an InputError naming the file, the line and the limit:
  - a file larger than MAX_BYTES (1 MiB; a fleet's inventory is a few hundred KiB at most), or not a regular
    file, or not UTF-8;
  - collections nested deeper than MAX_DEPTH (64; a profile needs 5);
  - anchors and aliases (`&name`, `*name`, `<<: *name`): an alias expands to a copy of what it names, so a
    few hundred bytes of aliases expand to billions of nodes ("billion laughs");
  - explicit tags (`!!binary`, `!!set`, `!foo`): they build values no config field takes;
  - a plain number of more than MAX_NUMBER_DIGITS digits.
These are checked on ruamel's event stream, which its parser produces iteratively, before the (recursive)
composer builds anything; only a document that passes is loaded.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    CollectionStartEvent,
    NodeEvent,
    ScalarEvent,
)
from ruamel.yaml.reader import ReaderError
from ruamel.yaml.scalarbool import ScalarBoolean

from orchestrator.core.errors import InputError
from orchestrator.core.textfile import read_text_file

M = TypeVar("M", bound=BaseModel)

MAX_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_NUMBER_DIGITS = 1000
_SHOWN = 200  # characters of a value quoted in an error
_DECIMAL = re.compile(r"[-+]?[0-9_]+", re.ASCII)
_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", re.ASCII)  # an unknown key quoted in an error
_MAX_PROBLEMS = 20  # problems listed for one file: a file of another kind must not fill the terminal


def _loader() -> YAML:
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    return yaml


def shown(value: Any) -> str:
    """repr(value), cut to a length an error message can carry."""
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def key_path(loc: tuple[Any, ...]) -> str:
    """`host.sysctl.kernel.x` for error messages; a key that is empty or not printable (a newline in it) is
    quoted, so it cannot break the message's lines."""
    parts = [p if isinstance(p, str) and p and p.isprintable() else repr(p) if isinstance(p, str) else str(p)
             for p in loc]
    return ".".join(parts) or "(top level)"


def _check_events(yaml: YAML, text: str, path: Path, max_depth: int) -> None:
    """Refuse what would make the composer recurse too deep or expand without bound (module docstring).
    Parse errors surface here too, as MarkedYAMLError."""
    depth = 0
    for ev in yaml.parse(text):
        line = ev.start_mark.line + 1 if ev.start_mark is not None else 0
        where = f"{path}:{line}" if line else str(path)
        if isinstance(ev, AliasEvent) or (isinstance(ev, NodeEvent) and ev.anchor is not None):
            raise InputError(f"{where}: YAML anchors and aliases (&name, *name, <<: *name) are not allowed "
                             "in rt-tune's config files: write the value out")
        if isinstance(ev, (ScalarEvent, CollectionStartEvent)) and ev.tag is not None:
            tag = str(ev.tag).replace("tag:yaml.org,2002:", "!!")
            raise InputError(f"{where}: YAML tags ({tag[:40]}) are not allowed in rt-tune's config files: "
                             "write a plain value (quote a string)")
        if isinstance(ev, CollectionStartEvent):
            depth += 1
            if depth > max_depth:
                raise InputError(f"{where}: nested deeper than {max_depth} levels, the limit for a config "
                                 "file")
        elif isinstance(ev, CollectionEndEvent):
            depth -= 1
        elif isinstance(ev, ScalarEvent) and ev.style is None and len(ev.value) > MAX_NUMBER_DIGITS \
                and _DECIMAL.fullmatch(ev.value):
            raise InputError(f"{where}: a number of {len(ev.value)} digits; the limit is {MAX_NUMBER_DIGITS}")


def _yaml_error(path: Path, text: str, exc: YAMLError) -> InputError:
    """A parse error as `FILE:LINE: not valid YAML: PROBLEM`, without quoting the file's values: the file may
    not be a config file at all (an include: pointing at a secret)."""
    if isinstance(exc, ReaderError):
        line = text[: exc.position].count("\n") + 1
        return InputError(f"{path}:{line}: not valid YAML: unacceptable character #x{exc.character:04x}: "
                          "special characters are not allowed")
    if isinstance(exc, MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        if isinstance(exc, DuplicateKeyError):
            return InputError(f"{where}: not valid YAML: duplicate key (a key may appear once in a mapping)")
        problem = str(exc.problem or exc.context or "unreadable")
        problem = problem if len(problem) <= _SHOWN else problem[:_SHOWN] + "..."
        return InputError(f"{where}: not valid YAML: {problem}")
    return InputError(f"{path}: not valid YAML: {type(exc).__name__}")


def read_yaml(path: Path, *, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """The round-trip document of a config file (CommentedMap/Seq: they know their lines), within the
    limits of the module docstring; any problem is an InputError naming the file (and line)."""
    path = Path(path)
    text = read_text_file(path, max_bytes, "a YAML file")
    yaml = _loader()
    try:
        _check_events(yaml, text, path, max_depth)
        return _loader().load(text)
    except YAMLError as exc:
        raise _yaml_error(path, text, exc) from None
    except (ValueError, OverflowError) as exc:  # a constructor refusing a value, e.g. a date 2001-13-45
        raise InputError(f"{path}: not valid YAML: {str(exc)[:_SHOWN]}") from None


def plain(v: Any) -> Any:
    """A round-trip YAML value as plain Python: ruamel's scalar subclasses (ScalarBoolean is an int, not a
    bool), CommentedMap/Seq -> bool, int, float, str, dict, list; anything else is left as it is."""
    if isinstance(v, ScalarBoolean):
        return bool(v)
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, Mapping):
        return {plain(k): plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    if isinstance(v, str):
        return str(v)
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v)
    return v


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
    """Validate a loaded document (as plain Python: strict models see bool, int, str, dict, list); on failure
    one InputError listing every problem as file:line: key: message (got VALUE)."""
    fields = set(model.model_fields)
    if isinstance(doc, Mapping) and doc and not any(isinstance(k, str) and k in fields for k in doc):
        # a mapping with none of the model's keys is another kind of file (/etc/shadow reads as a mapping
        # whose keys are its lines): named, its keys never quoted
        raise InputError(f"invalid {what} {path}:\n  {path}: not a valid {what}: none of its {len(doc)} "
                         f"top-level keys is one of {', '.join(sorted(fields))}")
    try:
        return model.model_validate(plain(doc) if doc is not None else {})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            key = key_path(loc)
            line = line_of(doc, loc)
            where = f"{path}:{line}" if line else str(path)
            got = err.get("input")
            # a whole mapping is not quoted: the key names it (and it may be large); nor is a whole file that is
            # not a mapping at all: it may be any file of the controller's (/etc/passwd), never to be echoed
            if not loc or (len(loc) == 1 and isinstance(loc[0], str) and loc[0].startswith(model.__name__)):
                problems.append(f"{path}: not a valid {what}: the file holds {_kind_of(got)}, not a mapping of keys")
                continue
            # an unknown key's value is not quoted either: the file may not be what it was given as (a secret)
            unquoted = err["type"] in ("missing", "extra_forbidden") or isinstance(got, Mapping)
            got_text = "" if unquoted else f" (got {shown(got)})"
            plain_key = isinstance(loc[-1], str) and _KEY.fullmatch(loc[-1])
            if err["type"] == "extra_forbidden" and not plain_key:
                # nor an unknown key that is not a plain name: it may be a line of a secret file
                key = key_path(loc[:-1] + ("(a key that is not a plain name)",))
            problems.append(f"{where}: {key}: {err['msg']}{got_text}")
        more = len(problems) - _MAX_PROBLEMS
        problems = problems[:_MAX_PROBLEMS] + ([f"... and {more} more problems"] if more > 0 else [])
        raise InputError(f"invalid {what} {path}:\n  " + "\n  ".join(problems)) from exc


def _kind_of(value: Any) -> str:
    """What a document is, without its content."""
    if isinstance(value, str):
        return f"a text of {len(value)} characters"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    return "nothing" if value is None else f"a {type(value).__name__}"


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
