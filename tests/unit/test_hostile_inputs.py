"""Hostile and careless inputs beyond the ones listed in issue #15, found by red-teaming the CLI after items
5-19 landed. Each class is fed through the real entry point (`python -m orchestrator` in a subprocess with a
2 GiB address-space limit and a timeout, as tests/unit/test_cli_no_traceback.py does) or through the core
where that is clearer; each test checks the exit status, the message and that nothing secret is shown."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.unit.cli_inputs import unit_yaml

pytestmark = pytest.mark.unit

INVENTORY = "units:\n" + unit_yaml("lab1")
HASH = "$6$Q7zX9$SECRETHASHk3Jd0"  # a recognisable secret that must never reach the terminal
#: a file shaped like /etc/shadow: YAML reads it as a mapping whose keys are its lines
SHADOW = "".join(f"{user}:{HASH}:20228:0:99999:7:::\n" for user in ("root", "daemon", "bin", "sys"))


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def tune(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`tune ARGS` in tmp_path, with its own state directory and HOME there; never a traceback."""
    env = {"RT_TUNE_STATE": str(tmp_path / "state"), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "orchestrator", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=90, preexec_fn=_limits, check=False)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return proc


@pytest.fixture()
def d(tmp_path) -> Path:
    (tmp_path / "inventory.yaml").write_text(INVENTORY)
    (tmp_path / "shadow").write_text(SHADOW)
    return tmp_path


# ---- a file of another kind given where a config file is expected: named, never quoted --------------------
@pytest.mark.parametrize("argv, what", [
    (["status", "-i", "{d}/shadow"], "inventory"),
    (["apply", "rt-profile", "--dry-run", "-i", "{d}/inventory.yaml", "--playbook", "{d}/shadow"],
     "measurement plan"),
    (["rollout", "rt-profile", "-i", "{d}/inventory.yaml", "--playbook", "{d}/shadow"], "rollout playbook"),
    (["rollout", "rt-profile", "-i", "{d}/inventory.yaml", "--playbook", "{d}/ro.yaml"], "measurement plan"),
    (["ab", "rt-profile", "rt-profile", "--unit", "lab1", "-i", "{d}/inventory.yaml", "--playbook",
      "{d}/shadow"], "measurement plan"),
])
def test_a_secret_file_read_as_a_config_file_is_named_never_quoted(d, argv, what):
    """Before: each of the file's lines was printed as an unknown key (`root:$6$...: Extra inputs are
    not permitted`), the whole file on the terminal, also through a rollout playbook's `measurement:`."""
    (d / "ro.yaml").write_text(f"canary: 1\nbatch: 1\nmeasurement: {d}/shadow\n")
    proc = tune(d, *[a.replace("{d}", str(d)) for a in argv])
    assert proc.returncode == 2, proc.stderr
    assert f"{d}/shadow: not a valid {what}: none of its 4 top-level keys is one of" in proc.stderr
    assert "SECRETHASH" not in proc.stdout + proc.stderr and "daemon" not in proc.stderr


def test_unknown_keys_that_are_not_plain_names_are_not_quoted_and_the_list_is_bounded(d):
    """An inventory with a pasted secret line among its keys: the plain typo is named, the line is not, and
    a file with hundreds of unknown keys lists 20 problems, not hundreds."""
    many = "".join(f"bogus{i}: 1\n" for i in range(300))
    (d / "inv.yaml").write_text(INVENTORY + f"root:{HASH}:20228:0:99999:7:::\ntypo_key: 1\n" + many)
    proc = tune(d, "status", "-i", str(d / "inv.yaml"))
    assert proc.returncode == 2
    assert "inv.yaml:6: (a key that is not a plain name): Extra inputs are not permitted" in proc.stderr
    assert "inv.yaml:7: typo_key: Extra inputs are not permitted" in proc.stderr
    assert "SECRETHASH" not in proc.stderr
    assert proc.stderr.count("Extra inputs") == 20 and "... and 282 more problems" in proc.stderr


def test_cyclictest_parse_of_a_file_in_no_cyclictest_form_does_not_quote_it(d):
    """Before: `tune cyclictest-parse /etc/shadow` printed its first line."""
    proc = tune(d, "cyclictest-parse", str(d / "shadow"))
    assert proc.returncode == 6
    assert "found 4 lines of other text (not quoted)" in proc.stderr and "SECRETHASH" not in proc.stderr


def test_cyclictest_output_of_a_unit_in_no_cyclictest_form_is_still_quoted():
    """What a unit answered instead of cyclictest output (its error message) is worth reading: quoted."""
    from orchestrator.measure.parse import ParseError, parse_cyclictest

    with pytest.raises(ParseError, match="found 'cyclictest: command not found'"):
        parse_cyclictest("cyclictest: command not found\n")


# ---- a journal that is no file: a device, a pipe, a socket (directly or through a symlink) --------------------
@pytest.mark.parametrize("kind, argv", [
    ("a character device", ["status", "-i", "{d}/inventory.yaml", "--db", "/dev/null"]),
    ("a character device", ["rollback", "lab1", "--all", "-i", "{d}/inventory.yaml", "--db", "/dev/zero"]),
    ("a named pipe", ["status", "-i", "{d}/inventory.yaml", "--db", "{d}/fifo"]),
    ("a named pipe", ["rollback", "lab1", "--all", "-i", "{d}/inventory.yaml", "--db", "{d}/fifo"]),
    ("a character device", ["status", "-i", "{d}/inventory.yaml"]),  # the default journal, a link to /dev/null
])
def test_a_journal_that_is_a_device_or_a_pipe_is_refused_as_such_never_called_damaged(d, kind, argv):
    """Before: 'the journal /dev/null is damaged (it is empty)', with advice to move /dev/null aside and to
    rebuild it with sqlite3."""
    os.mkfifo(d / "fifo")
    (d / "state").mkdir()
    (d / "state" / "journal.sqlite").symlink_to("/dev/null")
    proc = tune(d, *[a.replace("{d}", str(d)) for a in argv])
    assert proc.returncode == 1, proc.stderr
    assert f"is {kind}, not a SQLite file" in proc.stderr
    assert "damaged" not in proc.stderr and "aside" not in proc.stderr
    assert not (d / "fifo").is_file() and (d / "state" / "journal.sqlite").resolve() == Path("/dev/null")


# ---- a journal URL after a space or a quote: never a SQLite file named after the URL and its password --------
@pytest.mark.parametrize("url, message", [
    (" postgresql://tuner:QX7pw@db.lan/j", "white space or a control character"),
    ("postgresql://tuner:QX7pw@db.lan/j\n", "white space or a control character"),
    ('"postgresql://tuner:QX7pw@db.lan/j"', "not a journal"),
    ("x/postgresql://tuner:QX7pw@db.lan/j", "not a journal"),
])
@pytest.mark.parametrize("argv", [["status", "-i", "{d}/inventory.yaml", "--db", "{url}"],
                                  ["rollback", "lab1", "--all", "-i", "{d}/inventory.yaml", "--db", "{url}"]])
def test_a_journal_url_that_does_not_start_with_its_scheme_is_refused(d, url, message, argv):
    """Before: ' postgresql://...' (a space pasted in front) was taken as a SQLite path: `tune rollback` made
    the directories ' postgresql:/tuner:QX7pw@db.lan/' and a journal file in them, the password in a file
    name; `tune status` read the missing file as an empty journal and exited 0."""
    proc = tune(d, *[a.replace("{d}", str(d)).replace("{url}", url) for a in argv])
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "tuner:***@db.lan" in proc.stderr and "QX7pw" not in proc.stderr
    assert sorted(p.name for p in d.iterdir() if p.name != "state") == ["inventory.yaml", "shadow"]


# ---- an output path that cannot be written: refused before anything runs, not after the run ----------------
@pytest.mark.parametrize("argv, message", [
    (["ab", "{d}/s.yaml", "{d}/s.yaml", "--unit", "lab1", "-i", "{d}/inventory.yaml", "--html",
      "{d}/shadow/x.html"], "--html {d}/shadow/x.html: {d}/shadow is not a directory"),
    (["diagnose", "lab1", "-i", "{d}/inventory.yaml", "--html", "/dev/null"],
     "--html /dev/null: exists and is not a regular file"),
    (["measure", "lab1.guest", "-i", "{d}/inventory.yaml", "--out", "{d}/shadow"],
     "--out {d}/shadow: exists and is not a directory"),
    (["measure", "lab1.guest", "-i", "{d}/inventory.yaml", "--out", "/dev/null"],
     "--out /dev/null: exists and is not a directory"),
    (["report", "{d}/result.json", "--html", "{d}/shadow/r.html"], "{d}/shadow is not a directory"),
])
def test_an_output_that_cannot_be_written_is_refused_before_connecting(d, argv, message):
    """Before: `tune ab --html` and `tune diagnose --html` ran the whole experiment or tracing window (the
    inventory's unit here is unreachable: exit 5 after 30 s of retries) and only then failed to write; `tune
    measure --out FILE` likewise, after the measurement."""
    (d / "s.yaml").write_text('name: s\nguest:\n  sysctl:\n    kernel.timer_migration: "0"\n')
    (d / "result.json").write_text("{}")  # --html is checked before the result is read
    proc = tune(d, *[a.replace("{d}", str(d)) for a in argv])
    assert proc.returncode == 2, proc.stderr
    assert message.replace("{d}", str(d)) in proc.stderr
    assert "cannot connect" not in proc.stderr


def test_an_html_report_into_a_directory_that_does_not_exist_yet_is_written(d):
    """The up-front check creates nothing; the writer makes the missing directories (it did not for `tune
    report --html` and `tune ab --html`: the run ended in 'No such file or directory')."""
    from orchestrator.measure.parse import parse_cyclictest_file

    run = parse_cyclictest_file(REPO / "tests/recorded/cyclictest/lab/guest-idle-h20000-run2.json")
    (d / "result.json").write_text(run.model_dump_json())  # what `tune measure` writes
    proc = tune(d, "report", str(d / "result.json"), "--html", str(d / "new" / "dir" / "r.html"))
    assert proc.returncode == 0, proc.stderr
    assert (d / "new" / "dir" / "r.html").read_text().startswith("<!DOCTYPE html>")


# ---- ~/.ssh/config: what it gives an endpoint is checked like the inventory's own values ---------------------
@pytest.mark.parametrize("config, message", [
    ("Host 127.0.0.1\n  Port abc\n", "Port 'abc' for 127.0.0.1: expected a port number 1..65535"),
    ("Host 127.0.0.1\n  Port \u0662\u0662\n", "expected a port number 1..65535"),  # Arabic-Indic "22"
    ("Host 127.0.0.1\n  Port 99999\n", "invalid SSH port 99999"),
    ('Host 127.0.0.1\n  HostName "evil host"\n', "invalid SSH host 'evil host'"),
    (b"\xff\xfe Host x\n", ":1: not UTF-8 text"),
])
def test_a_bad_value_from_the_users_ssh_config_is_an_input_error_naming_it(tmp_path, config, message):
    """Before: ValueError/UnicodeDecodeError from int() or paramiko, an internal error (exit 70)."""
    from orchestrator.config.inventory import EndpointSpec, _endpoint
    from orchestrator.core.errors import InputError

    path = tmp_path / "config"
    path.write_bytes(config if isinstance(config, bytes) else config.encode())
    with pytest.raises(InputError) as exc:
        _endpoint(EndpointSpec(address="127.0.0.1"), None, ssh_config=path)
    assert str(exc.value).startswith(f"{path}") and message in str(exc.value)


def test_a_bad_port_in_the_users_ssh_config_is_exit_2_through_the_cli(d):
    (d / ".ssh").mkdir()
    (d / ".ssh" / "config").write_text("Host 127.0.0.1\n  Port abc\n")
    (d / "inv.yaml").write_text("units:\n  lab1:\n    host: {address: 127.0.0.1}\n")
    proc = tune(d, "facts", "lab1", "-i", str(d / "inv.yaml"))
    assert proc.returncode == 2, proc.stderr
    assert f"{d}/.ssh/config line 2: Port 'abc' for 127.0.0.1" in proc.stderr and "internal error" not in proc.stderr


# ---- inventories that can only be mistakes --------------------------------------------------------------------
@pytest.mark.parametrize("text, argv, message", [
    ("units: {}\n", ["plan", "rt-profile"], "units: Dictionary should have at least 1 item"),
    ("units: {}\n", ["apply", "rt-profile", "--dry-run"], "units: Dictionary should have at least 1 item"),
    ("units:\n  a.guest:\n    host: {address: 127.0.0.1, port: 1}\n", ["facts", "a.guest"],
     "a unit name cannot end in .host or .guest"),
    ("units:\n  r1.host:\n    host: {address: 127.0.0.1, port: 1}\n", ["status"],
     "a unit name cannot end in .host or .guest"),
])
def test_an_inventory_that_can_only_be_a_mistake_is_refused(d, text, argv, message):
    """Before: `units: {}` made `tune plan`/`apply` exit 0 having done nothing (an empty table); a unit named
    `a.guest` could never be reached (`tune facts a.guest` said "no unit 'a'; units: a.guest")."""
    (d / "inv.yaml").write_text(text)
    proc = tune(d, *argv, "-i", str(d / "inv.yaml"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and f"{d}/inv.yaml:" in proc.stderr


# ---- a profile name or include the OS cannot look up (too long) ---------------------------------------------
def test_a_profile_name_or_include_too_long_for_the_os_is_an_input_error_with_its_place(d):
    """Before: 'error: File name too long: aaaa...' (the whole name), exit 74, without the include's file and
    line."""
    long = "a" * 5000
    (d / "p.yaml").write_text(f"name: x\ninclude: [{long}.yaml]\n")
    proc = tune(d, "profile", "validate", str(d / "p.yaml"))
    assert proc.returncode == 2, proc.stderr
    assert f"{d}/p.yaml:2: include.0: " in proc.stderr and "cannot be looked up: File name too long" in proc.stderr
    proc = tune(d, "apply", long, "--dry-run", "-i", str(d / "inventory.yaml"))
    assert proc.returncode == 2 and "no profile 'aaa" in proc.stderr and len(proc.stderr) < 400, proc.stderr


# ---- a byte-order mark (a file saved by a Windows editor), as YAML already takes it --------------------------
def test_a_byte_order_mark_is_skipped_in_cyclictest_output_and_json(d):
    """Before: a cyclictest summary or --json file starting with a BOM was 'not in any cyclictest form', a
    report 'not valid JSON (Unexpected UTF-8 BOM)'; the YAML files took it all along."""
    from orchestrator.measure.parse import parse_cyclictest_file

    summary = "T: 0 ( 1234) P:95 I:1000 C:  10000 Min:      1 Act:    2 Avg:    2 Max:       5\n"
    js = '{"thread": {"0": {"histogram": {"0": 5}, "cycles": 5, "min": 0, "avg": 0, "max": 0}}}'
    for name, text in (("s.txt", summary), ("j.json", js), ("crlf.txt", summary.replace("\n", "\r\n"))):
        (d / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert parse_cyclictest_file(d / name).all.samples in (10000, 5)
    (d / "r.json").write_bytes(b"\xef\xbb\xbf" + parse_cyclictest_file(d / "j.json").model_dump_json().encode())
    proc = tune(d, "report", str(d / "r.json"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["rows"]
    (d / "one.txt").write_text("hello\n")
    proc = tune(d, "cyclictest-parse", str(d / "one.txt"))
    assert proc.returncode == 6 and "found 1 line of other text (not quoted)" in proc.stderr


def test_a_bad_var_name_message_shows_the_reference_syntax_once_braced(d):
    (d / "inv.yaml").write_text('units:\n  lab1:\n    host: {address: 127.0.0.1, port: 1}\n    vars: {"c d": 1}\n')
    proc = tune(d, "status", "-i", str(d / "inv.yaml"))
    assert proc.returncode == 2 and "(a profile references it as ${name}) (got 'c d')" in proc.stderr
