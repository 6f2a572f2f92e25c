"""benchmarks/fleet/scale.py, small: the fleet simulation runs `tune rollout`'s real code on rt-tune's own fake
transport (orchestrator/remote/fake.py) and every simulated unit ends changed."""

from __future__ import annotations

import pytest

from benchmarks.fleet.scale import run_scale

pytestmark = pytest.mark.unit


def test_a_small_simulated_rollout_changes_every_unit():
    out = run_scale(6, max_in_flight=3, rtt_ms=0.5, connect_ms=1, cyclictest_s=0.0)
    assert out["done"] == 6 and out["changed_on_units"] == 6 and out["status"] == "done"
    assert out["cpu_ms_per_unit"] > 0 and out["journal_kib_per_unit"] > 0
