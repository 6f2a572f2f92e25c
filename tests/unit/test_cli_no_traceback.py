"""Issue #15 item 19: no input a user can give makes `tune` print a Python traceback.

The real entry point (`python -m orchestrator`, as `.venv/bin/tune` runs `orchestrator.cli.main:main`) runs in a
subprocess over a table of hostile inputs of every class of the issue; each row checks the exit status, the
message and that no traceback reached stdout or stderr. The processes run with a 2 GiB address-space limit and a
timeout, so a memory or CPU bomb that got through fails its row instead of the machine. An unexpected exception
(injected in-process through `main()`) is an internal error: exit 70, a one-line message, and the traceback in a
log file under the state directory (or the temp directory when that is not writable), passwords redacted."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import click
import pytest

from orchestrator.cli import common as cli_common
from orchestrator.cli import main as cli
from orchestrator.core.errors import InputError, TuneError
from orchestrator.journal.errors import LockedError
from tests.conftest import REPO
from tests.unit.cli_inputs import unit_yaml

pytestmark = pytest.mark.unit

INVENTORY = "units:\n" + unit_yaml("lab1") + unit_yaml("lab2", guest=False)
BOMB = "\n".join([
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
    *(f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi", strict=True)),
]) + "\n"

FILES: dict[str, str | bytes] = {
    "inventory.yaml": INVENTORY,
    # profiles
    "p-syntax.yaml": "name: x\nhost: [unclosed\n",
    "p-bomb.yaml": BOMB,  # "billion laughs": 565 bytes, 9^9 strings once expanded
    "p-deep.yaml": "[" * 100_000 + "]" * 100_000,
    "p-shadow.yaml": "name: x\ninclude: [/etc/shadow]\n",
    "p-cpus.yaml": 'name: x\nhost:\n  cmdline:\n    nohz_full: "0-99999999999"\n',
    "p-newline.yaml": 'name: x\nhost:\n  cmdline:\n    "quiet\\n": ""\n',
    "p-binary.yaml": b"\xff\xfe\x00garbage\x80\x81",
    "p-empty.yaml": "",
    "p-list.yaml": "- a\n- b\n",
    # inventories
    "i-syntax.yaml": "units: {lab1: [\n",
    "i-port.yaml": "units:\n  lab1:\n    host: {address: 127.0.0.1, port: true}\n",
    "i-name.yaml": 'units:\n  "lab1\\n":\n    host: {address: 127.0.0.1}\n',
    "i-become.yaml": 'units:\n  lab1:\n    host: {address: 127.0.0.1, port: 1, become: "yes"}\n',
    "i-vars.yaml": 'units:\n  lab1:\n    host: {address: 127.0.0.1, port: 1}\n    vars: {cpus: "abc"}\n',
    "i-list.yaml": "- a\n",
    "i-binary.yaml": b"\x00\x01\x02\xff",
    "i-empty.yaml": "",
    "i-bomb.yaml": BOMB,
    # playbooks
    "pb-zero.yaml": "cyclictest: {interval_us: 0, histogram_us: -1}\n",
    "pb-cpus.yaml": "cyclictest: {cpus: [99999999999, -1], priority: 1000}\n",
    "pb-syntax.yaml": "cyclictest: [\n",
    "ro-canary.yaml": "canary: -1\n",
    # cyclictest output and report JSON
    "ct-garbage.txt": "hello world\n" * 10,
    "ct-inf.json": '{"thread": {"0": {"histogram": {"1": Infinity}, "cycles": Infinity, "min": 1, "avg": 1, '
                   '"max": 2}}}',
    "ct-deep.json": "[" * 100_000 + "]" * 100_000,
    "ct-empty.txt": "",
    "ct-binary.txt": b"\x00\xff" * 100,
    "rep-nan.json": '{"avg": NaN}',
    "rep-garbage.json": "not json",
}

# (id, argv with {d} for the files' directory, exit status, a piece of the message)
CASES: list[tuple[str, list[str], int, str]] = [
    # bad profile
    ("profile syntax", ["profile", "validate", "{d}/p-syntax.yaml"], 2, "not valid YAML"),
    ("profile alias bomb", ["profile", "validate", "{d}/p-bomb.yaml"], 2, "p-bomb.yaml"),
    ("profile 100000 deep", ["profile", "validate", "{d}/p-deep.yaml"], 2, "p-deep.yaml"),
    ("profile include /etc/shadow", ["profile", "validate", "{d}/p-shadow.yaml"], 2, "/etc/shadow"),
    ("profile huge cpu list", ["profile", "validate", "{d}/p-cpus.yaml", "-i", "{d}/inventory.yaml"], 2,
     "99999999999"),
    ("profile newline key", ["profile", "validate", "{d}/p-newline.yaml"], 2, "quiet"),
    ("profile binary", ["profile", "validate", "{d}/p-binary.yaml"], 2, "p-binary.yaml"),
    ("profile empty", ["profile", "validate", "{d}/p-empty.yaml"], 2, "p-empty.yaml"),
    ("profile a list", ["profile", "validate", "{d}/p-list.yaml"], 2, "p-list.yaml"),
    ("profile a directory", ["profile", "validate", "{d}"], 2, "no profile"),
    ("profile missing", ["apply", "nope", "--dry-run", "-i", "{d}/inventory.yaml"], 2, "no profile 'nope'"),
    # bad inventory
    ("inventory syntax", ["status", "-i", "{d}/i-syntax.yaml"], 2, "not valid YAML"),
    ("inventory port: true", ["status", "-i", "{d}/i-port.yaml"], 2, "port"),
    ("inventory unit name with newline", ["status", "-i", "{d}/i-name.yaml"], 2, "'lab1\\n'"),
    ("inventory become: yes", ["status", "-i", "{d}/i-become.yaml"], 2, "become"),
    ("inventory cpus: abc", ["plan", "rt-profile", "-i", "{d}/i-vars.yaml"], 2, "cpus"),
    ("inventory a list", ["status", "-i", "{d}/i-list.yaml"], 2, "i-list.yaml"),
    ("inventory binary", ["facts", "lab1.host", "-i", "{d}/i-binary.yaml"], 2, "i-binary.yaml"),
    ("inventory empty", ["status", "-i", "{d}/i-empty.yaml"], 2, "i-empty.yaml"),
    ("inventory alias bomb", ["status", "-i", "{d}/i-bomb.yaml"], 2, "i-bomb.yaml"),
    ("inventory missing", ["status", "-i", "{d}/nope.yaml"], 2, "does not exist"),
    ("inventory a directory", ["status", "-i", "{d}"], 2, "{d}"),
    # bad playbook
    ("playbook zeros", ["apply", "rt-profile", "--dry-run", "--unit", "lab1", "-i", "{d}/inventory.yaml",
                        "--playbook", "{d}/pb-zero.yaml"], 2, "interval_us"),
    ("playbook huge cpus", ["apply", "rt-profile", "--dry-run", "--unit", "lab1", "-i", "{d}/inventory.yaml",
                            "--playbook", "{d}/pb-cpus.yaml"], 2, "99999999999"),
    ("playbook syntax", ["apply", "rt-profile", "--dry-run", "--unit", "lab1", "-i", "{d}/inventory.yaml",
                         "--playbook", "{d}/pb-syntax.yaml"], 2, "pb-syntax.yaml"),
    ("rollout playbook", ["rollout", "rt-profile", "-i", "{d}/inventory.yaml", "--playbook",
                          "{d}/ro-canary.yaml"], 2, "canary"),
    # bad cyclictest output and report JSON
    ("cyclictest garbage", ["cyclictest-parse", "{d}/ct-garbage.txt"], 6, "ct-garbage.txt"),
    ("cyclictest Infinity", ["cyclictest-parse", "{d}/ct-inf.json"], 6, "Infinity"),
    ("cyclictest 100000 deep", ["cyclictest-parse", "{d}/ct-deep.json"], 6, "ct-deep.json"),
    ("cyclictest empty", ["cyclictest-parse", "{d}/ct-empty.txt"], 6, "ct-empty.txt"),
    ("cyclictest binary", ["cyclictest-parse", "{d}/ct-binary.txt"], 6, "ct-binary.txt"),
    ("report NaN", ["report", "{d}/rep-nan.json"], 2, "NaN"),
    ("report garbage", ["report", "{d}/rep-garbage.json"], 2, "rep-garbage.json"),
    ("report 100000 deep", ["report", "{d}/ct-deep.json"], 2, "ct-deep.json"),
    # damaged journal (the state directory holds one: see `state`)
    ("journal garbage pages: status", ["status", "-i", "{d}/inventory.yaml"], 1, "is damaged"),
    ("journal garbage pages: rollback", ["rollback", "lab1", "--all", "-i", "{d}/inventory.yaml"], 1,
     "is damaged"),
    ("journal empty: rollout --status", ["rollout", "--status", "0"], 1, "is damaged"),
    ("journal a directory", ["status", "-i", "{d}/inventory.yaml", "--db", "{d}"], 1, "is a directory"),
    # unknown unit
    ("unknown unit: status", ["status", "--unit", "nope", "-i", "{d}/inventory.yaml"], 2, "no unit 'nope'"),
    ("unknown unit: rollback", ["rollback", "nope", "--all", "-i", "{d}/inventory.yaml"], 2, "no unit 'nope'"),
    ("unknown unit: verify", ["verify", "nope", "-i", "{d}/inventory.yaml"], 2, "no unit 'nope'"),
    ("unknown unit: facts", ["facts", "nope.guest", "-i", "{d}/inventory.yaml"], 2, "no unit 'nope'"),
    ("unknown unit: measure", ["measure", "nope.host", "-i", "{d}/inventory.yaml"], 2, "no unit 'nope'"),
    ("unknown unit: diagnose", ["diagnose", "nope", "-i", "{d}/inventory.yaml"], 2, "no unit 'nope'"),
    ("bad target", ["facts", "lab1.bogus", "-i", "{d}/inventory.yaml"], 2, "UNIT.guest"),
    ("unit without a guest", ["facts", "lab2.guest", "-i", "{d}/inventory.yaml"], 2, "no guest"),
    # bad journal URL
    ("db url @ / % in the password", ["status", "-i", "{d}/inventory.yaml", "--db",
                                      "postgresql://tuner:QX7@ZJ9:KW/2%VY8@db.lan/j"], 2, "percent-encode"),
    ("db url another scheme", ["status", "-i", "{d}/inventory.yaml", "--db", "mysql://u:QX7ZJ9@h/db"], 2,
     "not a journal"),
    ("db url bad port", ["status", "-i", "{d}/inventory.yaml", "--db",
                         "postgresql://u:QX7ZJ9@127.0.0.1:notaport/db"], 1, "notaport"),
    ("db file missing", ["status", "-i", "{d}/inventory.yaml", "--db", "{d}/nope/j.db"], 2, "does not exist"),
    # bad flags
    ("unknown option", ["status", "--bogus"], 2, "No such option"),
    ("unknown command", ["nosuchcommand"], 2, "No such command"),
    ("option without its value", ["status", "--unit"], 2, "requires an argument"),
    ("rollout without a mode", ["rollout"], 2, "give exactly one of"),
    ("rollback without --all", ["rollback", "lab1", "-i", "{d}/inventory.yaml"], 2, "--all"),
    ("boot timeout too small", ["apply", "rt-profile", "--boot-timeout", "5"], 2, "--boot-timeout"),
    ("rollback boot timeout not a number", ["rollback", "lab1", "--all", "--boot-timeout", "soon"], 2,
     "Invalid value for '--boot-timeout'"),
    ("rollout workers 0", ["rollout", "rt-profile", "--workers", "0"], 2, "--workers"),
    ("rollout status not a number", ["rollout", "--status", "abc"], 2, "--status"),
    ("measure zero histogram and interval", ["measure", "lab1.host", "--histogram", "0", "--interval", "0",
                                             "-i", "{d}/inventory.yaml"], 2, "--interval"),
    ("measure huge cpu list", ["measure", "lab1.host", "--cpus", "0-99999999999", "-i", "{d}/inventory.yaml"],
     2, "99999999999"),
    ("measure bad duration", ["measure", "lab1.host", "--duration", "xyz", "-i", "{d}/inventory.yaml"], 2,
     "--duration"),
    ("diagnose bad duration", ["diagnose", "lab1", "--duration", "abc", "-i", "{d}/inventory.yaml"], 2,
     "--duration"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hostile")
    for name, content in FILES.items():
        path = d / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return d


@pytest.fixture()
def state(tmp_path, request) -> Path:
    """The row's own state directory; for the journal rows, with the damaged journal they name."""
    st = tmp_path / "state"
    case = request.node.callspec.params["case"][0]
    if case.startswith("journal garbage pages"):
        st.mkdir()
        from orchestrator.journal.journal import Journal

        with Journal(st / "journal.sqlite") as j:
            for i in range(200):
                j.set_unit_state(f"unit{i}", "done", "x" * 100)
        good = (st / "journal.sqlite").read_bytes()
        (st / "journal.sqlite").write_bytes(good[:4096] + b"\xa5" * (len(good) - 4096))
    elif case.startswith("journal empty"):
        st.mkdir()
        (st / "journal.sqlite").write_bytes(b"")
    return st


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def run_tune(args: list[str], state: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {"RT_TUNE_STATE": str(state), "HOME": str(cwd), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=90, preexec_fn=_limits)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_a_message_and_an_exit_status_never_a_traceback(files, state, tmp_path, case):
    _name, argv, status, piece = case
    args = [a.replace("{d}", str(files)) for a in argv]
    proc = run_tune(args, state, tmp_path)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out and "internal error" not in out, out
    assert proc.returncode == status, out
    assert piece.replace("{d}", str(files)) in proc.stderr, proc.stderr
    assert "QX7" not in out and "ZJ9" not in out  # the rows' passwords
    if "shadow" in _name:
        assert "root:" not in out  # the file's content is never quoted


# ---- internal errors -----------------------------------------------------------------------------------------

SECRET_URL = "postgresql://tuner:QX7ZJ9KW8VY@db.lan/j"


def boom(*_args, **_kw):
    raise ZeroDivisionError(f"injected, near {SECRET_URL}")


def run_main(monkeypatch, capsys, argv: list[str]) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["tune", *argv])
    with pytest.raises(SystemExit) as info:
        cli.main()
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_an_unexpected_exception_is_an_internal_error_with_a_logged_traceback(monkeypatch, capsys, tmp_path):
    inv = tmp_path / "inventory.yaml"
    inv.write_text(INVENTORY)
    state = tmp_path / "state"
    monkeypatch.setenv("RT_TUNE_STATE", str(state))
    monkeypatch.setenv("RT_TUNE_DB", SECRET_URL)
    monkeypatch.setattr(cli_common, "_units", boom)
    code, out, err = run_main(monkeypatch, capsys, ["status", "-i", str(inv), "--db", SECRET_URL])
    assert code == 70
    assert err.startswith("internal error: ZeroDivisionError: injected, near postgresql://tuner:***@db.lan/j\n")
    assert "Traceback" not in out + err and "QX7ZJ9KW8VY" not in out + err
    logs = list((state / "logs").iterdir())
    assert len(logs) == 1 and logs[0].name.startswith("internal-error-") and str(logs[0]) in err.replace("\n", "")
    assert logs[0].stat().st_mode & 0o777 == 0o600
    text = logs[0].read_text()
    assert "Traceback (most recent call last)" in text and "in boom" in text and "status_cmd" in text
    assert "ZeroDivisionError: injected" in text and "argv:" in text
    assert "QX7ZJ9KW8VY" not in text and "tuner:***@db.lan" in text


def test_the_log_goes_to_the_temp_directory_when_the_state_directory_is_not_writable(monkeypatch, capsys,
                                                                                      tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("RT_TUNE_STATE", str(blocker / "state"))  # under a regular file: mkdir fails, even as root
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp))
    monkeypatch.setattr(cli_common, "_units", boom)
    inv = tmp_path / "inventory.yaml"
    inv.write_text(INVENTORY)
    code, _out, err = run_main(monkeypatch, capsys, ["status", "-i", str(inv)])
    assert code == 70 and "Traceback" not in err
    logs = list(tmp.iterdir())
    assert len(logs) == 1 and logs[0].name.startswith("rt-tune-internal-error-")
    assert str(logs[0]) in err.replace("\n", "") and "in boom" in logs[0].read_text()


def test_an_os_error_of_the_controller_is_a_message_naming_the_file(monkeypatch, capsys, tmp_path):
    def denied(*_args, **_kw):
        raise PermissionError(13, "Permission denied", "/var/lib/rt-tune/x")

    monkeypatch.setenv("RT_TUNE_STATE", str(tmp_path / "state"))
    monkeypatch.setattr(cli_common, "_units", denied)
    inv = tmp_path / "inventory.yaml"
    inv.write_text(INVENTORY)
    code, _out, err = run_main(monkeypatch, capsys, ["status", "-i", str(inv)])
    assert code == 74 and err == "error: Permission denied: /var/lib/rt-tune/x\n"
    assert not (tmp_path / "state" / "logs").exists()


@pytest.mark.parametrize("exc, status", [
    (InputError("x"), 2), (TuneError("x"), 1), (LockedError("x"), 7), (click.UsageError("x"), 2),
    (KeyboardInterrupt(), 130), (click.exceptions.Abort(), 130), (BrokenPipeError(), 141),
    (FileNotFoundError(2, "No such file", "/x"), 74), (ValueError("x"), 70), (RecursionError(), 70),
    (MemoryError(), 70),
])
def test_exit_statuses_are_decided_in_one_place(exc, status):
    assert cli.exit_status(exc) == status


def test_the_entry_point_is_main():
    """`tune` and `python -m orchestrator` both end in cli.main: what the table above runs is what users run."""
    from importlib.metadata import entry_points

    tune = [e.value for e in entry_points(group="console_scripts") if e.name == "tune"]
    assert tune == ["orchestrator.cli.main:main"]
    assert "main()" in (REPO / "orchestrator" / "__main__.py").read_text()
