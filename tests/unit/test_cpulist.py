"""The one CPU-list parser: the kernel's grammar exactly (ASCII digits, no spaces, no Python int() extras),
every number bounded before any range is expanded."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from orchestrator.core.cpulist import (
    CPU_CEILING,
    MAX_TEXT,
    CpuListError,
    format_cpulist,
    parse_cpulist,
    parse_kernel_cpulist,
)
from orchestrator.core.errors import InputError, ParseError
from orchestrator.facts import base as facts_base
from orchestrator.facts import cpus as facts_cpus
from tests.conftest import RECORDED

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("text, cpus", [
    ("", []),
    ("0", [0]),
    ("1-3,5", [1, 2, 3, 5]),
    ("5,1-3,2", [1, 2, 3, 5]),  # order and repeats are the kernel's business: a set
    ("007", [7]),  # the kernel's _parse_integer takes leading zeros
    ("0-7:1/2", [0, 2, 4, 6]),
    ("0-9:2/4", [0, 1, 4, 5, 8, 9]),
    ("0-1023:2/256", [0, 1, 256, 257, 512, 513, 768, 769]),  # lib/bitmap-str.c's own example
    ("0-7:0/4", []),
    ("8191", [8191]),
])
def test_the_kernel_grammar(text, cpus):
    assert parse_cpulist(text) == cpus


@pytest.mark.parametrize("text", [
    "1_0", "+1", "-1", " 1 , 2 ", "1 ", " 1", "1, 2", "١", "１", "²", "1,,2", ",1", "1,", "3-1", "1-", "-",
    "1--2",
    "all", "N", "0-N", "0x1", "1.0", "1e3", "1 2", "0-7:3/2", "0-7:1/0", "0-7:1", "0-7:/2", "0-7:1/", "1:1/1",
    "1\n", "1\r", "1\t", "1\x00", "1\u2028", "\n", "1\n2",
])
def test_what_the_kernel_or_rt_tune_refuses(text):
    with pytest.raises(CpuListError, match="not a kernel CPU list") as exc:
        parse_cpulist(text)
    assert isinstance(exc.value, InputError) and isinstance(exc.value, ValueError)  # CLI exit 2, pydantic


def test_a_cpu_above_the_bound_is_refused_before_expanding():
    tracemalloc.start()
    try:
        start = time.monotonic()
        with pytest.raises(CpuListError, match="CPU 99999999999 is above the highest CPU number 8191") as exc:
            parse_cpulist("0-99999999999")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert exc.value.cpu == 99999999999
    assert peak < 1 << 20 and time.monotonic() - start < 1
    with pytest.raises(CpuListError, match=r"\(5000 digits\) is above 8191") as exc:
        parse_cpulist("9" * 5000)  # never int()-converted (Python itself refuses more than 4300 digits)
    assert exc.value.cpu is None


def test_the_bound_is_the_units_highest_cpu_when_known():
    assert parse_cpulist("0-3", max_cpu=3) == [0, 1, 2, 3]
    with pytest.raises(CpuListError, match="CPU 4 is above the highest CPU number 3") as exc:
        parse_cpulist("0-4", max_cpu=3)
    assert exc.value.cpu == 4
    with pytest.raises(CpuListError, match="used size 9000 is above 8192"):
        parse_cpulist("0-1:9000/9000")
    assert parse_cpulist("0-99", max_cpu=10 ** 6) == list(range(100))  # never above the ceiling
    with pytest.raises(CpuListError, match="is above the highest CPU number 8191"):
        parse_cpulist("8192", max_cpu=10 ** 6)


def test_many_large_groups_cost_little():
    """The expansion is slices of a bitmap of CPU_CEILING + 1 entries, not a set of ints per group."""
    text = ",".join(["0-8191:90/91"] * 4000 + ["0-8191:1/1"] * 1000)
    assert len(text) <= MAX_TEXT
    start = time.monotonic()
    assert len(parse_cpulist(text)) == CPU_CEILING + 1
    assert time.monotonic() - start < 10
    with pytest.raises(CpuListError, match=f"longer than {MAX_TEXT}"):
        parse_cpulist("0," * MAX_TEXT)


def test_kernel_output_parser_drops_the_newline_and_null():
    assert parse_kernel_cpulist("0-3,5,8-9\n") == [0, 1, 2, 3, 5, 8, 9]
    assert parse_kernel_cpulist("(null)\n") == []
    assert parse_kernel_cpulist("\n") == []
    assert facts_base.parse_cpu_list is facts_cpus.parse_cpu_list is parse_kernel_cpulist  # no parser of their own
    assert facts_base.CPUS_ONLINE.parse((RECORDED / "lab-x86" / "host-cpu-online.txt").read_text()) == [0, 1]
    for bad in ("0-99999999999\n", "1_0\n", "1,,2"):
        with pytest.raises(ParseError):
            parse_kernel_cpulist(bad)


def test_format_is_the_kernels_and_round_trips():
    assert format_cpulist([5, 0, 1, 2, 2]) == "0-2,5"
    assert format_cpulist([]) == ""
    for text in ("0", "0-2,5", "1,3,5-7"):
        assert format_cpulist(parse_cpulist(text)) == text
