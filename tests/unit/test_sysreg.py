"""The system-register traps of a guest's vCPU threads, counted on the host around a run (issue #18 item 1): the
hist parser, the `sysreg` section of a counters read, the deltas and the mechanism's rate, on reads recorded from
the arm64 lab (tests/recorded/counters/sysreg: rt-tune's own reads with the hist trigger, 5 s of a busy and of a
quiet nested guest; and the first recording, a trigger keyed by register only)."""

from __future__ import annotations

import pytest

from orchestrator.changes.mechanism import mechanisms_for
from orchestrator.core.errors import ParseError
from orchestrator.facts.kvm import parse_hist, parse_sysreg_tracepoint, sysreg_name, sysreg_traps
from orchestrator.measure.counters import (
    counter_deltas,
    counters_argv,
    parse_counters_output,
    parse_sysreg_section,
    rate_of,
)
from tests.conftest import REPO

pytestmark = pytest.mark.unit

SYSREG = REPO / "tests" / "recorded" / "counters" / "sysreg"
SGI = "IPIs the guest sends (ICC_SGI1R_EL1 traps on the host)"


def meta(window: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in (SYSREG / f"reads-{window}-meta.txt").read_text().splitlines())


def read(window: str, step: str, text: str | None = None):
    m = meta(window)
    raw = (SYSREG / f"reads-{window}-{step}.txt").read_text() if text is None else text
    return parse_counters_output(raw, m[f"{step}-marker"])


def sgi_mechanism():
    return {m.label: m for m in mechanisms_for("service_disable", {"unit": "m.service"}, "guest")}[SGI]


def test_the_first_recording_parses_as_a_hist_keyed_by_register():
    text = (SYSREG / "arm64-host-6.12-kvm_sys_access.txt").read_text()
    hist = parse_hist(text.split("# --- hist ---\n")[1].split("# --- trace")[0])
    assert hist.hits == 90 and hist.dropped == 0 and "Op0 == 3 && Op1 == 0" in hist.trigger
    [entry] = hist.entries
    assert entry.keys == {"CRn": 12, "CRm": 11, "Op2": 5} and entry.hitcount == 90
    assert sysreg_name(3, 0, 12, 11, 5) == "ICC_SGI1R_EL1"  # the trace printed it by this name
    assert sysreg_name(3, 3, 0, 0, 1) == "S3_3_C0_C0_1"  # CTR_EL0, not a GIC register: the generic name
    with pytest.raises(ParseError, match="without common_pid"):
        sysreg_traps(hist)  # not rt-tune's trigger: no thread to attribute the traps to


def test_a_busy_guests_ipis_are_counted_per_vcpu_thread_between_the_start_and_the_stop_read():
    m = meta("busy")
    tids = [int(t) for t in m["tids"].split()]
    start, stop = read("busy", "start"), read("busy", "stop")
    assert start.identities["sysreg"] == stop.identities["sysreg"] == m["instance"]
    assert not start.errors and not stop.errors
    # every IPI register of each vCPU thread is there from the start (a hist lists only what was hit)
    assert {f"sysreg:{t}:ICC_SGI1R_EL1" for t in tids} <= {k for k, v in start.counters.items() if v == 0}
    d = counter_deltas(start, stop)
    per_thread = {t: d.deltas[f"sysreg:{t}:ICC_SGI1R_EL1"] for t in tids}
    hist = parse_sysreg_section(stop.raw.split(f"{m['stop-marker']} sysreg0\n")[1].split("\n@@")[0])[1]
    assert per_thread == {t: hist[(t, "ICC_SGI1R_EL1")] for t in tids} and all(n > 0 for n in per_thread.values())
    r = sgi_mechanism().rate(d, [], None, tids)
    assert r.value == pytest.approx(sum(per_thread.values()) / d.interval_s) and r.value > 5
    assert sgi_mechanism().rate(d, [], None, [999999]).value is None  # another VM's threads: not counted


def test_a_quiet_guest_sends_fewer_ipis_than_a_busy_one():
    def per_s(window: str) -> float:
        d = counter_deltas(read(window, "start"), read(window, "stop"))
        value = sgi_mechanism().rate(d, [], None, [int(t) for t in meta(window)["tids"].split()]).value
        assert value is not None
        return value
    assert 0 < per_s("quiet") < per_s("busy")


def replace_section(window: str, step: str, new: str) -> str:
    m = meta(window)
    raw = (SYSREG / f"reads-{window}-{step}.txt").read_text()
    head, rest = raw.split(f"{m[f'{step}-marker']} sysreg0\n", 1)
    return head + f"{m[f'{step}-marker']} sysreg0\n" + new + "\n" + rest[rest.index(f"\n{m[f'{step}-marker']} "):]


def test_an_instance_gone_or_another_one_or_a_hist_that_dropped_events_gives_no_rate():
    tids = [int(t) for t in meta("busy")["tids"].split()]
    start = read("busy", "start")
    gone = read("busy", "stop", replace_section("busy", "stop", "none the instance rt-tune-sysreg-0 is gone"))
    assert gone.errors["sysreg"] == "the instance rt-tune-sysreg-0 is gone"
    d = counter_deltas(start, gone)
    assert d.status(f"sysreg:{tids[0]}:ICC_SGI1R_EL1") == "absent"
    assert sgi_mechanism().rate(d, [], None, tids).value is None
    # another instance at the stop read (the first one was removed and made again): not one count
    stop_text = (SYSREG / "reads-busy-stop.txt").read_text()
    other = read("busy", "stop", stop_text.replace(meta("busy")["instance"], "rt-tune-sysreg-0abc"))
    d = counter_deltas(start, other)
    assert d.status(f"sysreg:{tids[0]}:ICC_SGI1R_EL1") == "reset"
    dropped = stop_text.replace("Dropped: 0", "Dropped: 7")
    assert "dropped 7 events" in read("busy", "stop", dropped).errors["sysreg"]
    cut = stop_text.replace("    Hits: 91\n", "    Hits: 90\n")
    assert "sum to 91" in read("busy", "stop", cut).errors["sysreg"]
    # the host could not count at all (an x86 host): the start read says why, the other counters are still read
    none = read("busy", "start", replace_section("busy", "start", "none no kvm:kvm_sys_access tracepoint"))
    assert none.errors == {"sysreg": "no kvm:kvm_sys_access tracepoint"} and "irq:IPI1:cpu0" in none.counters


def test_a_read_without_the_sysreg_step_has_no_sysreg_section_and_no_error():
    m = meta("busy")
    raw = (SYSREG / "reads-busy-stop.txt").read_text()
    head, rest = raw.split(f"{m['stop-marker']} sysreg0\n", 1)
    snap = parse_counters_output(head.removesuffix("\n") + rest[rest.index(f"\n{m['stop-marker']} "):],
                                 m["stop-marker"])
    assert "sysreg" not in snap.errors and not any(k.startswith("sysreg:") for k in snap.counters)
    assert rate_of(counter_deltas(snap, snap), "sysreg:*:ICC_SGI1R_EL1").value is None


@pytest.mark.parametrize("step", [("start", "rt-tune-sysreg-1; rm -rf /"), ("begin", "rt-tune-sysreg-1"),
                                  ("stop", "../../x"), ("stop", "rt-tune-sysreg-")])
def test_a_sysreg_step_is_one_of_two_words_and_an_instance_name_of_ours(step):
    with pytest.raises(ValueError, match="sysreg step"):
        counters_argv("@@m", [1], step)


def test_the_tracepoint_fact_says_why_a_host_cannot_count():
    assert parse_sysreg_tracepoint("yes\n") is None
    assert "not an arm64 KVM host" in (parse_sysreg_tracepoint("no\n") or "")
    assert "tracefs" in (parse_sysreg_tracepoint("no-tracefs\n") or "")
    with pytest.raises(ParseError):
        parse_sysreg_tracepoint("sh: 1: cannot create\n")
