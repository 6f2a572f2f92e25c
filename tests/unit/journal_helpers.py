"""Helpers shared by the journal tests of both backends."""

from __future__ import annotations

import threading
import time

import pytest

from orchestrator.journal.journal import open_journal


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path) -> str:
    """Where a journal lives: a SQLite file path, or the URL of a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "state" / "journal.db")
    return request.getfixturevalue("pg_journal_url")


@pytest.fixture()
def j(target):
    with open_journal(target) as journal:
        yield journal


def is_pg(target: str) -> bool:
    return target.startswith("postgresql://")


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
