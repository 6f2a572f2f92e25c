"""Reads batched into one round trip (`read_files`, `gather_facts`): exact bytes, absent vs empty, failures
named, and each fact still parsed by its own parser. Real commands through LocalTransport."""

from __future__ import annotations

import pytest

from orchestrator.core.errors import ParseError
from orchestrator.facts.base import CPUS_ONLINE, HOSTNAME, Fact, gather_facts
from orchestrator.facts.cpus import CPU_COUNT
from orchestrator.remote.local import LocalTransport
from orchestrator.remote.transport import read_files, read_optional

pytestmark = pytest.mark.unit


class CountingTransport(LocalTransport):
    def __init__(self):
        super().__init__()
        object.__setattr__(self, "calls", [])

    def run(self, argv, **kw):
        self.calls.append(list(argv))
        return super().run(argv, **kw)


def test_read_files_exact_bytes_absent_and_empty_in_one_command(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "odd").write_bytes(b"present x\nabsent\n\n\x00\xff trailing  \n\n")
    t = CountingTransport()
    paths = [str(tmp_path / "empty"), str(tmp_path / "odd"), str(tmp_path / "missing"), str(tmp_path / "a b;$(x)")]
    got = read_files(t, paths)
    assert got == {paths[0]: b"", paths[1]: b"present x\nabsent\n\n\x00\xff trailing  \n\n", paths[2]: None,
                   paths[3]: None}
    assert len(t.calls) == 1
    assert read_optional(t, paths[1]) == got[paths[1]]


def test_gather_facts_one_round_trip_each_parser_applied():
    t = CountingTransport()
    facts = gather_facts(t, [CPU_COUNT, CPUS_ONLINE, HOSTNAME])
    assert len(t.calls) == 1
    online = open("/sys/devices/system/cpu/online").read()
    assert facts["cpu_count"] == len(facts["cpus_online"]) >= 1
    assert online.strip().startswith(str(facts["cpus_online"][0]))
    assert facts["hostname"] == open("/proc/sys/kernel/hostname").read().strip()


def test_gather_facts_names_a_failing_command_and_a_parse_error(tmp_path):
    missing = Fact("nothing", ("cat", str(tmp_path / "nope")), str)
    with pytest.raises(ParseError, match=r"fact nothing: `cat .*nope` exited with status 1"):
        gather_facts(LocalTransport(), [CPU_COUNT, missing])
    (tmp_path / "two").write_text("0-1\nextra\n")
    strict = Fact("strict_count", ("cat", str(tmp_path / "two")), CPU_COUNT.parse)
    with pytest.raises(ParseError, match="fact strict_count"):  # trailing lines kept exactly: the parser sees them
        gather_facts(LocalTransport(), [strict])


def test_gather_facts_keeps_each_output_exact():
    """Outputs without a final newline, with empty lines, or empty: each fact gets exactly its command's stdout."""
    got = gather_facts(LocalTransport(), [Fact("bare", ("printf", "abc"), str),
                                          Fact("lines", ("printf", "a\\n\\nb\\n\\n"), str),
                                          Fact("empty", ("true",), str)])
    assert got == {"bare": "abc", "lines": "a\n\nb\n\n", "empty": ""}
