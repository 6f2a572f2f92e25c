"""Reads batched into one round trip (`read_files`, `gather_facts`): exact bytes, absent vs empty, failures
named, and each fact still parsed by its own parser. Real commands through LocalTransport."""

from __future__ import annotations

import pytest

from orchestrator.core.errors import ParseError
from orchestrator.facts.base import CPUS_ONLINE, HOSTNAME, Fact, gather_facts
from orchestrator.facts.cpus import CPU_COUNT
from orchestrator.remote.local import LocalTransport
from orchestrator.remote.transport import COMMAND_SEP, read_files, read_optional

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


def test_a_compound_fact_is_gathered_with_others_in_one_round_trip_its_shared_parts_once(tmp_path):
    """A change that reads in several commands (kernel threads: the threads, two files, a symlink) is one fact:
    a bundle reads all its members in one round trip. A part two compounds share runs once."""
    from orchestrator.facts.base import compound_fact, files_fact

    (tmp_path / "unit").write_bytes(b"[Unit]\n")
    files = files_fact("files", [str(tmp_path / "unit"), str(tmp_path / "missing")])
    one = compound_fact("one", [files, CPU_COUNT], lambda p: (p["files"], p["cpu_count"]))
    two = compound_fact("two", [CPU_COUNT, HOSTNAME], lambda p: f"{p['hostname']}:{p['cpu_count']}")
    t = CountingTransport()
    got = gather_facts(t, [one, two, CPUS_ONLINE])
    assert len(t.calls) == 1
    specs = t.calls[0][5:]  # sh -c SCRIPT - MARKER, then one spec (name SEP argv) per simple fact
    assert [s.split(COMMAND_SEP)[0] for s in specs] == ["files", "cpu_count", "hostname", "cpus_online"], specs
    (mine, cpus) = got["one"]
    assert mine == {str(tmp_path / "unit"): b"[Unit]\n", str(tmp_path / "missing"): None}
    assert cpus == len(got["cpus_online"]) and got["two"] == f"{got['hostname']}:{cpus}"
    t2 = CountingTransport()
    assert one.gather(t2) == got["one"] and len(t2.calls) == 1  # alone: still one round trip


def test_a_compound_fact_names_itself_when_combining_fails_and_refuses_a_name_for_two_commands(tmp_path):
    from orchestrator.facts.base import compound_fact

    def refuse(parts):
        raise ParseError(f"{parts['cpu_count']} CPUs is not what this fact can read")

    with pytest.raises(ParseError, match=r"fact picky: \d+ CPUs is not what"):
        gather_facts(LocalTransport(), [compound_fact("picky", [CPU_COUNT], refuse)])
    impostor = Fact("cpu_count", ("echo", "7"), int)  # the name of another command's fact
    with pytest.raises(ValueError, match="two different facts are named 'cpu_count'"):
        gather_facts(LocalTransport(), [compound_fact("a", [CPU_COUNT], len), impostor])
    with pytest.raises(ValueError, match="a compound of no facts"):
        compound_fact("empty", [], len)
