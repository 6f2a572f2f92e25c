"""The x86 lab unit of tests/lab: one host VM and one guest VM, booted once for these files.

Its fixtures live here, not in tests/conftest.py: a package-scoped fixture belongs to the package of the
conftest that defines it, so defined at the top it lived until the whole session ended, two idle x86 VMs beside
whatever ran after tests/lab in the same process. From here it is stopped as soon as tests/lab is done."""

from __future__ import annotations

import pytest

from orchestrator.core.paths import Paths
from tests.conftest import REUSE, lab_state_paths, running_lab


@pytest.fixture(scope="session")
def lab_paths(tmp_path_factory) -> Paths:
    return lab_state_paths(tmp_path_factory, REUSE, "rt-tune-state")


@pytest.fixture(scope="package")  # down when the lane leaves tests/lab
def lab(lab_paths):
    yield from running_lab(lab_paths, arch="amd64", reuse=bool(REUSE), label="lab")


@pytest.fixture(scope="package")
def inventory(lab, lab_paths):
    from orchestrator.config.inventory import load_inventory

    return load_inventory(lab_paths.lab_inventory)


@pytest.fixture()
def host(inventory):
    from orchestrator.remote.ssh import SSHTransport

    with SSHTransport(inventory.endpoint("lab1", "host")) as t:
        yield t


@pytest.fixture()
def guest(inventory):
    from orchestrator.remote.ssh import SSHTransport

    with SSHTransport(inventory.endpoint("lab1", "guest")) as t:
        yield t


