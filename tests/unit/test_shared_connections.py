"""A boot change's steps share one connection per unit and target between reboots (each SSH handshake costs
1-2 s on a small unit): opened once, reused, closed before a reboot and at the end, a failed close ignored."""

from __future__ import annotations

import pytest

from orchestrator.core.errors import TransportError
from orchestrator.remote.local import LocalTransport
from orchestrator.run.context import SharedConnections

pytestmark = pytest.mark.unit


class Counted(LocalTransport):
    def __init__(self, log: list[str], name: str, fail_close: bool = False) -> None:
        super().__init__(label=name)
        self.log, self.fail_close = log, fail_close
        log.append(f"open {name}")

    def close(self) -> None:
        self.log.append(f"close {self.label}")
        if self.fail_close:
            raise TransportError("the unit went down under this connection")


def test_one_connection_per_target_until_dropped():
    log: list[str] = []
    shared = SharedConnections(lambda unit, target: Counted(log, f"{unit}.{target}",
                                                            fail_close=target == "guest"))
    with shared.use("u1", "host") as a:
        assert a.run(["true"]).ok
    with shared.use("u1", "host") as b:  # leaving the block does not close it
        assert b is a
    guest = shared.get("u1", "guest")
    assert shared.get("u1", "guest") is guest and shared.get("u2", "host") is not a
    assert log == ["open u1.host", "open u1.guest", "open u2.host"]

    shared.drop()  # the guest's close fails (it rebooted): ignored, the others still closed
    assert sorted(log[3:]) == ["close u1.guest", "close u1.host", "close u2.host"]
    assert shared.get("u1", "host") is not a  # after a reboot: a new connection
    assert log[-1] == "open u1.host"
