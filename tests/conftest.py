"""Shared fixtures. The lab fixture boots one real x86 unit (host VM + guest VM) once for tests/lab; the arm64
unit is tests/arm64's own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.paths import Paths

REPO = Path(__file__).resolve().parent.parent
RECORDED = Path(__file__).resolve().parent / "recorded"


REUSE = os.environ.get("RT_TUNE_TEST_REUSE_STATE")  # a developer's running lab: reused, left running


def lab_state_paths(tmp_path_factory, reuse: str | None, name: str) -> Paths:
    """A test lab's own state directory; the image cache is the user's (built once, shared with `tune lab`)."""
    state = Path(reuse) if reuse else tmp_path_factory.mktemp(name)
    return Paths(cache=Paths.from_env().cache, state=state)


def running_lab(paths: Paths, *, arch: str, reuse: bool, label: str, units: int = 1, host_only: bool = False):
    """Boot a lab (one unit unless told; VMs already running are left as they are) for the tests; afterwards
    stop it, unless it is a developer's reused lab, and check that no QEMU process is left."""
    from orchestrator.lab.lab import Lab

    the_lab = Lab(paths, events=lambda e: print(f"[{label}] {e.subject}: {e.message}", flush=True))
    the_lab.up(units=units, arch=arch, host_only=host_only)
    yield the_lab
    if reuse:
        return
    the_lab.down()
    assert the_lab.stray_qemu_pids() == [], "tune lab down left QEMU processes behind"


@pytest.fixture(scope="session")
def lab_paths(tmp_path_factory) -> Paths:
    return lab_state_paths(tmp_path_factory, REUSE, "rt-tune-state")


@pytest.fixture(scope="package")  # down before the arm64 tests (tests/arm64, run last) boot their own lab
def lab(lab_paths):
    yield from running_lab(lab_paths, arch="amd64", reuse=bool(REUSE), label="lab")


@pytest.fixture(scope="package")
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


# ---- the arm64 lab: its images build in the background while the other tests run --------------------------
ARM64_BUILD_LOG = "arm64-image-build.log"


@pytest.hookimpl(trylast=True)  # after `-m` deselection: only what will run
def pytest_collection_modifyitems(session, config, items):
    """Run the arm64 lab tests last, and start building their images now, beside the other tests (the build
    runs under qemu-user for about 15 minutes; the arm64 fixture's own build waits for this one's lock)."""
    arm64 = [item for item in items if item.get_closest_marker("arm64")]
    if not arm64:
        return
    items[:] = [item for item in items if not item.get_closest_marker("arm64")] + arm64
    if os.environ.get("RT_TUNE_TEST_REUSE_ARM64_STATE") or config.option.collectonly:
        return
    from orchestrator.lab import images

    cache = Paths.from_env().cache
    if images.cached(images.ImageRecipe.default("arm64"), cache):
        return
    import signal
    import subprocess
    import sys

    cache.mkdir(parents=True, exist_ok=True)
    log = open(cache / ARM64_BUILD_LOG, "w")
    config._rt_tune_arm64_build = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "lab", "build", "--arch", "arm64"], stdout=log,
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO, start_new_session=True,
        env={**os.environ, "RT_TUNE_CACHE": str(cache)},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # SIGINT stops it (see sessionfinish)
    print(f"\n[arm64 lab] building its images in the background (log: {cache / ARM64_BUILD_LOG})", flush=True)


def pytest_sessionfinish(session, exitstatus):
    """Never leave the background build running past the session (a killed build leaves no half cache)."""
    import signal

    proc = getattr(session.config, "_rt_tune_arm64_build", None)
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C: the build removes its work directory
        try:
            proc.wait(timeout=60)
        except Exception:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
