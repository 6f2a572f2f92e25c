"""The fleet lab: three host-only x86 units (real VMs, real sshd, systemd and sysctl) for the rollout and A/B
tests. It boots after tests/lab's unit is down (package scope) and before the arm64 tests."""

from __future__ import annotations

import os

import pytest

from tests.conftest import lab_state_paths, running_lab

REUSE = os.environ.get("RT_TUNE_TEST_REUSE_FLEET_STATE")  # a developer's running 3-unit lab: reused, left running


@pytest.fixture(scope="package")
def fleet_paths(tmp_path_factory):
    return lab_state_paths(tmp_path_factory, REUSE, "rt-tune-fleet")


@pytest.fixture(scope="package")
def fleet_lab(fleet_paths):
    yield from running_lab(fleet_paths, arch="amd64", reuse=bool(REUSE), label="fleet", units=3, host_only=True)


@pytest.fixture(scope="package")
def postgres():
    """A real PostgreSQL server (tests/postgres.py) for the two-controller rollout."""
    from tests.postgres import PostgresError, postgres_server

    try:
        with postgres_server() as server:
            yield server
    except PostgresError as exc:
        pytest.fail(f"cannot start the test PostgreSQL server: {exc}", pytrace=False)
