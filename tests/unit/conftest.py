"""Unit-test fixtures: a throwaway PostgreSQL server (tests/postgres.py) for the journal's PostgreSQL backend.

The server starts once per session, only when a test asks for it. If it cannot start, those tests fail (they
are never skipped): CI must run them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.postgres import PostgresError, PostgresServer, postgres_server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    try:
        with postgres_server() as server:
            yield server
    except PostgresError as exc:
        pytest.fail(f"cannot start the test PostgreSQL server: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def postgres_url(postgres: PostgresServer) -> str:
    """The test server's URL (superuser, with its password; database `postgres`)."""
    return postgres.url()


@pytest.fixture()
def pg_journal_url(postgres: PostgresServer) -> Iterator[str]:
    """A fresh, empty database of its own for one test (dropped afterwards); its URL."""
    url = postgres.create_database()
    yield url
    postgres.drop_database(url)
