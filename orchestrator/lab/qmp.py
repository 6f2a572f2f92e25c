"""A minimal QMP client: the harness's power button, reset line and plug for each lab VM."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from orchestrator.core.errors import LabError


class QMP:
    """One QMP session over a unix socket. Use as a context manager; every call has a deadline."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""

    def __enter__(self) -> QMP:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise LabError(f"QMP socket {self.path} does not answer: {exc}") from exc
        self._sock = sock
        greeting = self._read()
        if "QMP" not in greeting:
            raise LabError(f"unexpected QMP greeting on {self.path}: {greeting}")
        self.command("qmp_capabilities")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sock:
            self._sock.close()
            self._sock = None

    def _read(self) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            try:
                chunk = self._sock.recv(65536)
            except OSError as exc:
                raise LabError(f"QMP {self.path}: {exc}") from exc
            if not chunk:
                raise LabError(f"QMP {self.path}: connection closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def command(self, name: str, **arguments: Any) -> Any:
        assert self._sock is not None, "use QMP as a context manager"
        msg: dict[str, Any] = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                continue
            if "error" in reply:
                raise LabError(f"QMP {name} failed: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")


def qmp_call(path: Path, name: str, timeout: float = 10.0, **arguments: Any) -> Any:
    with QMP(path, timeout=timeout) as q:
        return q.command(name, **arguments)
