"""The pytest plugin of a check run (`python -m pytest -p orchestrator.checks.plugin --rt-tune-spec FILE ...`):
the fixtures a check receives, and each test's outcome written to the spec's results file.

Fixtures: `host` (a testinfra Host for the target under test, connected with rt-tune's settings), `promise`
(what rt-tune's kept changes promise on that target: orchestrator/checks/promises.py), `rt_vars` (the unit's and
the profile's variables), `rt_target` ("host" or "guest") and `rt_unit`."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from orchestrator.checks.promises import TargetPromise
from orchestrator.remote.transport import Endpoint


class CheckSpec(BaseModel):
    """Everything a check run needs, written by the runner: no secret in it (keys stay files, named)."""

    unit: str
    target: str
    endpoint: dict[str, Any]
    promise: TargetPromise
    vars: dict[str, Any]
    command_timeout_s: float = 60.0
    read_only: bool = True
    #: the longest the run can take: the read-only namespace's holder ends by itself after it
    lifetime_s: float = 3600.0
    results: str


def endpoint_to_dict(e: Endpoint) -> dict[str, Any]:
    return asdict(e)


def endpoint_from_dict(d: dict[str, Any]) -> Endpoint:
    jump = d.get("jump")
    return Endpoint(**{**d, "jump": endpoint_from_dict(jump) if jump else None})


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--rt-tune-spec", default=None, help="the check run's spec (JSON), written by rt-tune")


@pytest.fixture(scope="session")
def rt_spec(request: pytest.FixtureRequest) -> CheckSpec:
    path = request.config.getoption("--rt-tune-spec")
    if not path:
        pytest.fail("a check run needs --rt-tune-spec (run checks with `tune check`)")
    return CheckSpec.model_validate_json(Path(path).read_text())


@pytest.fixture(scope="session")
def host(rt_spec: CheckSpec):
    from testinfra.host import Host

    from orchestrator.checks.backend import RtTuneBackend
    from orchestrator.remote.ssh import SSHTransport

    with SSHTransport(endpoint_from_dict(rt_spec.endpoint), connect_deadline_s=30) as t:
        backend = RtTuneBackend(t, command_timeout_s=rt_spec.command_timeout_s, read_only=rt_spec.read_only,
                                lifetime_s=rt_spec.lifetime_s)
        the_host = Host(backend)
        backend.set_host(the_host)
        with open(rt_spec.results, "a") as f:  # whether the commands ran read-only: the report says it
            f.write(json.dumps({"read_only": backend.read_only}) + "\n")
        try:
            yield the_host
        finally:
            backend.close()


@pytest.fixture(scope="session")
def promise(rt_spec: CheckSpec) -> TargetPromise:
    return rt_spec.promise


@pytest.fixture(scope="session")
def rt_vars(rt_spec: CheckSpec) -> dict[str, Any]:
    return dict(rt_spec.vars)


@pytest.fixture(scope="session")
def rt_target(rt_spec: CheckSpec) -> str:
    return rt_spec.target


@pytest.fixture(scope="session")
def rt_unit(rt_spec: CheckSpec) -> str:
    return rt_spec.unit


class _ResultWriter:
    """Writes one JSON line per test call (and per setup or teardown that did not pass): the runner reads them."""

    def __init__(self, path: str) -> None:
        self.path = path

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call" and report.passed:
            return
        message = _short(report) if report.failed or report.skipped else ""
        with open(self.path, "a") as f:
            f.write(json.dumps({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                                "duration_s": round(report.duration, 3), "message": message}) + "\n")


def pytest_configure(config: pytest.Config) -> None:
    spec = config.getoption("--rt-tune-spec", default=None)
    if spec:
        config.pluginmanager.register(_ResultWriter(json.loads(Path(spec).read_text())["results"]),
                                      "rt-tune-results")


def _short(report: pytest.TestReport) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])[:500]
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return str(crash.message)[:1000]
    return str(report.longrepr)[-1000:]
