"""Helpers shared by the journal tests of both backends."""

from __future__ import annotations

import threading
import time


def in_thread(fn, *args, **kw) -> tuple[threading.Thread, dict]:
    """Run fn in a daemon thread; the box gets its value or error and how long it took."""
    box: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            box["value"] = fn(*args, **kw)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc
        box["seconds"] = time.monotonic() - t0

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box
