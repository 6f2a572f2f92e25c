"""Shared helpers and the lanes. tests/lab/conftest.py boots one real x86 unit (host VM + guest VM) for tests/lab;
the fleet's and the arm64 unit are tests/fleet's and tests/arm64's own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.core.paths import Paths

REPO = Path(__file__).resolve().parent.parent
RECORDED = Path(__file__).resolve().parent / "recorded"

pytest_plugins = ["tests.lab_cpu"]  # CPU time per test, QEMU included, printed at the end


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


def tune_env(paths: Paths) -> dict[str, str]:
    return {**os.environ, "RT_TUNE_CACHE": str(paths.cache), "RT_TUNE_STATE": str(paths.state)}


# ---- two lanes: the x86 lab tests beside the rest; the images build in the background -------------------
BUILD_LOG = "{arch}-image-build.log"


def lane(nodeid: str) -> str:
    """README command (b) runs two pytest-xdist workers, one lane each, each in collection order: the x86 lab
    tests (tests/lab), and beside them the unit tests, then the fleet lab, then the arm64 lab. A TCG lab keeps
    about two thirds of this machine's two CPUs busy, the unit tests one CPU: two lanes fill both. (Moving three
    x86 lab files to the other lane on an x86 lab of its own balanced a warm run, but a cold one, where that lane
    also waits for the arm64 images, took 72 minutes, not 47: 2026-12-05. The kernel test needs only a host: it
    runs on the fleet lab, already up in the other lane.) Without xdist everything runs in one
    process, in the same order."""
    return "x86-lab" if nodeid.startswith("tests/lab/") else "unit-fleet-arm64"


def pytest_xdist_make_scheduler(config, log):
    """Each lane is one unit of work for one worker (xdist's scope scheduling, scoped by lane)."""
    from xdist.scheduler import LoadScopeScheduling

    class LaneScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return lane(nodeid)

    return LaneScheduling(config, log)


def _stage(item) -> int:
    return 3 if item.get_closest_marker("arm64") else 2 if lane(item.nodeid) == "x86-lab" \
        else 1 if item.get_closest_marker("lab") else 0


@pytest.hookimpl(trylast=True)  # after `-m` deselection: only what will run
def pytest_collection_modifyitems(session, config, items):
    """Order: the unit tests, the x86 lab tests, the fleet lab, the arm64 lab last (within each lane: units,
    fleet, arm64). And start building the lab images now: the x86 images (about 1.5 minutes) for tests/lab and
    tests/fleet, the arm64 ones (about 12 minutes, under qemu-user) for tests/arm64. A lab fixture's own build
    waits for the background one's lock. Under xdist only the first worker starts them."""
    items.sort(key=_stage)  # stable: the files' own order within each stage
    arm64 = [item for item in items if _stage(item) == 3]
    if config.option.collectonly or os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0":
        return
    wanted = []
    if any(item.get_closest_marker("lab") and not item.get_closest_marker("arm64") for item in items) \
            and not REUSE:
        wanted.append("amd64")
    if arm64 and not os.environ.get("RT_TUNE_TEST_REUSE_ARM64_STATE"):
        wanted.append("arm64")
    from orchestrator.lab import images

    cache = Paths.from_env().cache
    config._rt_tune_builds = []
    for arch in wanted:
        if images.cached(images.ImageRecipe.default(arch), cache):
            continue
        config._rt_tune_builds.append(_background_build(arch, cache))


def _background_build(arch: str, cache: Path):
    import signal
    import subprocess
    import sys

    cache.mkdir(parents=True, exist_ok=True)
    log_path = cache / BUILD_LOG.format(arch=arch)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "lab", "build", "--arch", arch], stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO, start_new_session=True,
            env={**os.environ, "RT_TUNE_CACHE": str(cache)},
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # SIGINT stops it (sessionfinish)
    print(f"\n[{arch} lab] building its images in the background (log: {log_path})", flush=True)
    return proc


def pytest_sessionfinish(session, exitstatus):
    """Never leave a background build running past the session (a killed build leaves no half cache)."""
    import signal

    for proc in getattr(session.config, "_rt_tune_builds", []):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C: the build removes its work directory
            try:
                proc.wait(timeout=60)
            except Exception:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
