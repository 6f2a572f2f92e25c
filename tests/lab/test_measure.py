"""cyclictest in the lab guest VM under stress-ng: exact percentiles from the histogram, load always stopped."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from orchestrator.core.errors import TuneError
from orchestrator.measure.model import CyclictestSettings, LoadSpec
from orchestrator.measure.parse import parse_cyclictest_file
from orchestrator.measure.runner import measure
from tests.conftest import tune_env

pytestmark = pytest.mark.lab


def _brute_percentile(hist: dict[int, int], overflows: int, fraction: float) -> int | None:
    samples = sorted(b for b, n in hist.items() for _ in range(n))
    total = len(samples) + overflows
    need = fraction * total
    for i, value in enumerate(samples, start=1):
        if i >= need:
            return value
    return None


def _leftovers(t) -> str:
    out = t.run(["sh", "-c", "pgrep -a 'stress-ng|cyclictest'; systemctl list-units --no-legend 'rt-tune-*'"],
                check=False)
    return out.stdout.strip()


def test_guest_measured_10s_under_stress_ng(guest, tmp_path):
    settings = CyclictestSettings(cpus=[1], duration_s=10, histogram_us=20000)
    result = measure(guest, settings, LoadSpec(kind="stress-ng", args=["--cpu", "1"]), target="lab1.guest",
                     artifacts=tmp_path)
    a = result.all
    # 10 s at 1 ms is 10,000 cycles at most; under TCG and stress-ng the loop overruns and completes fewer
    # (10,500 to 19,500 per 20 s in the recorded runs, tests/recorded/cyclictest/lab)
    assert 2500 <= a.samples <= 10200, a.samples
    assert sum(a.histogram.values()) + a.overflows == a.samples
    for key, fraction in (("p50_us", 0.5), ("p99_us", 0.99), ("p999_us", 0.999)):
        assert getattr(a, key) == _brute_percentile(a.histogram, a.overflows, fraction), key
    # a percentile among the overflows (beyond the 20 ms histogram: seen when this machine is overloaded) is
    # unknown, never guessed; the known ones are ordered
    known = [v for v in (a.min_us, a.p50_us, a.p99_us, a.p999_us, a.max_us) if v is not None]
    assert known == sorted(known) and a.min_us is not None and a.max_us is not None
    for key, fraction in (("p50_us", 0.5), ("p99_us", 0.99), ("p999_us", 0.999)):
        if getattr(a, key) is None:
            assert a.overflows > a.samples * (1 - fraction) - 1, (key, a.overflows, a.samples)
    assert result.load.kind == "stress-ng" and result.settings.cpus == [1]
    assert result.boot_id and "panic=10" in result.cmdline
    again = parse_cyclictest_file(tmp_path / result.raw_artifact.split("/")[-1])
    assert again.public() == result.public()  # the raw artifact is the whole truth
    assert _leftovers(guest) == ""


def test_failed_measurement_still_stops_the_load(guest, tmp_path):
    with pytest.raises(TuneError, match="cyclictest failed"):
        measure(guest, CyclictestSettings(cpus=[7], duration_s=5), LoadSpec(kind="stress-ng"), target="lab1.guest",
                artifacts=tmp_path)  # the guest has CPUs 0-1 only
    assert _leftovers(guest) == ""


def test_cli_measure_json(lab, lab_paths, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "measure", "lab1.guest", "--duration", "5s",
                           "--out", str(tmp_path), "--json"], env=tune_env(lab_paths), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["target"] == "lab1.guest" and len(data["threads"]) == 1
    assert 1000 <= data["all"]["samples"] <= 5100
    assert (tmp_path / data["raw_artifact"].split("/")[-1]).exists()
