"""Shared fixtures. The lab fixture boots one real unit (host VM + guest VM) once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.events import Event
from orchestrator.paths import Paths

REPO = Path(__file__).resolve().parent.parent
RECORDED = Path(__file__).resolve().parent / "recorded"


def _print_event(event: Event) -> None:
    print(f"[lab] {event.subject}: {event.message}", flush=True)


REUSE = os.environ.get("RT_TUNE_TEST_REUSE_STATE")  # a developer's running lab: reused, left running


@pytest.fixture(scope="session")
def lab_paths(tmp_path_factory) -> Paths:
    """The test lab's own state directory; the image cache is the user's (built once, shared with `tune lab`)."""
    state = Path(REUSE) if REUSE else tmp_path_factory.mktemp("rt-tune-state")
    return Paths(cache=Paths.from_env().cache, state=state)


@pytest.fixture(scope="session")
def lab(lab_paths):
    from orchestrator.lab.lab import Lab

    the_lab = Lab(lab_paths, events=_print_event)
    the_lab.up(units=1)  # leaves VMs that already run as they are
    yield the_lab
    if REUSE:
        return
    the_lab.down()
    assert the_lab.stray_qemu_pids() == [], "tune lab down left QEMU processes behind"


@pytest.fixture(scope="session")
def inventory(lab, lab_paths):
    from orchestrator.inventory import load_inventory

    return load_inventory(lab_paths.lab_inventory)


@pytest.fixture()
def host(inventory):
    from orchestrator.transport import SSHTransport

    with SSHTransport(inventory.endpoint("lab1", "host")) as t:
        yield t


@pytest.fixture()
def guest(inventory):
    from orchestrator.transport import SSHTransport

    with SSHTransport(inventory.endpoint("lab1", "guest")) as t:
        yield t


def tune_env(paths: Paths) -> dict[str, str]:
    return {**os.environ, "RT_TUNE_CACHE": str(paths.cache), "RT_TUNE_STATE": str(paths.state)}
