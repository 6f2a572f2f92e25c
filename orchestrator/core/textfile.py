"""Reading a small text file the user gives (a YAML file, an SSH config): regular files only, size-limited,
UTF-8, every problem an InputError naming the file (and the line, for bad UTF-8)."""

from __future__ import annotations

import stat
from pathlib import Path

from orchestrator.core.errors import InputError


def read_text_file(path: Path, max_bytes: int, what: str) -> str:
    """The text of `path`; a FIFO or device is refused before it is opened (it would block or never end)."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{path}: not a regular file")
        if st.st_size > max_bytes:
            raise InputError(f"{path}: {st.st_size} bytes is larger than the {max_bytes} bytes rt-tune reads "
                             f"from {what}")
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from exc
    if len(data) > max_bytes:
        raise InputError(f"{path}: larger than the {max_bytes} bytes rt-tune reads from {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (byte {exc.start})") from None
