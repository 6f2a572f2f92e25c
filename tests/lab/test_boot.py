"""Trial boots that cannot brick a unit, on the lab's real GRUB (issue #5's fault injection):

- a preflight that refuses a unit whose grubenv cannot be written, or whose GRUB_DEFAULT is not `saved`;
- a trial cmdline that never becomes healthy (`systemd.unit=emergency.target`: passes validation, boots to a
  shell without SSH) -> power cycle -> the unit is back on its old cmdline, the change "rolled back by fallback";
- the power cut while the trial kernel boots -> GRUB's one-shot entry is spent -> old default, fallback;
- the controller SIGKILLed while the unit reboots into its trial -> the next run reconciles from what the unit
  reports: files restored byte for byte, old cmdline booted.
Each test ends with the guest's boot files byte-identical to the start and the old cmdline running.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, tune_env

pytestmark = pytest.mark.lab

PLAYBOOK = str(REPO / "tests" / "lab" / "playbook-fast.yaml")
BOOT_FILES = ("/etc/default/grub", "/boot/grub/grub.cfg", "/boot/grub/grubenv",
              "/etc/default/grub.d/90-rt-tune.cfg", "/etc/grub.d/42_rt-tune-trial")


def tune(lab_paths, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], env=tune_env(lab_paths),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def boot_files(t) -> dict[str, str | None]:
    """sha256 of each boot file (None: absent), read with plain shell, independent of the backend's code."""
    out = {}
    for path in BOOT_FILES:
        res = t.run(["sh", "-c", 'if [ -e "$1" ]; then sha256sum "$1"; fi', "-", path])
        out[path] = res.stdout.split()[0] if res.stdout.strip() else None
    return out


def cmdline_of(t) -> str:
    return t.run(["cat", "/proc/cmdline"]).stdout.strip()


def write_profile(tmp_path: Path, body: str) -> str:
    path = tmp_path / "boot-profile.yaml"
    path.write_text(f"name: boot-test\n{body}")
    return str(path)


def journal(lab_paths) -> sqlite3.Connection:
    return sqlite3.connect(lab_paths.state / "journal.sqlite", timeout=30)


def outcome(proc: subprocess.CompletedProcess, cid: str) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {o["id"]: o for o in json.loads(proc.stdout)["results"][0]["outcomes"]}[cid]


def wait_event(lab_paths, kind: str, after_id: int, timeout: float = 900) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with journal(lab_paths) as db:
                row = db.execute("SELECT id FROM events WHERE kind = ? AND id > ? ORDER BY id LIMIT 1",
                                 (kind, after_id)).fetchone()
            if row:
                return row[0]
        except sqlite3.OperationalError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"no {kind} event within {timeout} s")


def last_event_id(lab_paths) -> int:
    try:
        with journal(lab_paths) as db:
            return db.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


@pytest.fixture()
def pristine_guest(lab, lab_paths, inventory):
    """Nothing of rt-tune's on the unit before; afterwards the guest's boot files and cmdline are as before."""
    from orchestrator.remote.ssh import SSHTransport

    tune(lab_paths, "rollback", "lab1", "--all")
    with SSHTransport(inventory.endpoint("lab1", "guest")) as t:
        files, cmd = boot_files(t), cmdline_of(t)
    yield files, cmd
    with SSHTransport(inventory.endpoint("lab1", "guest")) as t:
        assert boot_files(t) == files
        assert cmdline_of(t) == cmd


def test_preflight_refuses_unwritable_grubenv_and_grub_default_not_saved(lab_paths, guest, pristine_guest,
                                                                         tmp_path):
    profile = write_profile(tmp_path, "guest:\n  cmdline:\n    nohz_full: \"1\"\n")
    files, _ = pristine_guest
    guest.run(["chattr", "+i", "/boot/grub/grubenv"])
    try:
        proc = tune(lab_paths, "apply", profile, "--playbook", PLAYBOOK, "--json")
        o = outcome(proc, "guest.cmdline")
        assert o["status"] == "refused" and "grubenv /boot/grub/grubenv cannot be written" in o["reason"]
        assert o["journal_id"] is None  # refused before anything was journaled or touched
        assert boot_files(guest) == files
    finally:
        guest.run(["chattr", "-i", "/boot/grub/grubenv"])

    grub = guest.read_file("/etc/default/grub")
    guest.run(["sed", "-i", "s/^GRUB_DEFAULT=saved$/GRUB_DEFAULT=0/", "/etc/default/grub"])
    try:
        o = outcome(tune(lab_paths, "apply", profile, "--dry-run", "--json"), "guest.cmdline")
        assert o["status"] == "refused" and "GRUB_DEFAULT is '0'" in o["reason"]
        # the explicit override turns the refusal into a plan (not applied here: --dry-run)
        o = outcome(tune(lab_paths, "apply", profile, "--dry-run", "--accept-boot-risk", "--json"),
                    "guest.cmdline")
        assert o["status"] == "planned"
        # someone edited /etc/default/grub and never ran update-grub: staging would bring their edit in too
        guest.run(["sed", "-i", "s/^GRUB_DEFAULT=0$/GRUB_DEFAULT=saved/; "
                   's/^GRUB_CMDLINE_LINUX="/GRUB_CMDLINE_LINUX="quiet /', "/etc/default/grub"])
        o = outcome(tune(lab_paths, "apply", profile, "--dry-run", "--json"), "guest.cmdline")
        assert o["status"] == "refused" and "grub.cfg is out of date" in o["reason"] and "quiet" in o["reason"]
    finally:
        guest.write_file("/etc/default/grub", grub)


def test_staging_and_discarding_a_trial_write_what_grub_mkconfig_would(guest, pristine_guest):
    """The GRUB backend places the trial entry's section in grub.cfg itself (one update-grub less per trial):
    the file it writes is byte for byte what grub-mkconfig makes with the trial script there, and discarding
    gives back what grub-mkconfig makes without it, which is the grub.cfg from before."""
    from orchestrator.boot.grub import GrubBackend, with_section
    from orchestrator.boot.loader import BootTarget

    def mkconfig() -> bytes:
        return guest.run(["sh", "-c", 'grub-mkconfig -o "$1" 2>/dev/null && cat "$1"; rm -f "$1"', "-",
                          "/run/rt-tune-test-grub.cfg"], timeout_s=300).stdout.encode()

    grub = GrubBackend()
    snap = grub.snapshot(guest)
    try:
        guest.run(["update-grub"], timeout_s=300)  # grub.cfg as this machine's grub-mkconfig makes it
        before = guest.read_file(grub.cfg)
        mode = guest.run(["stat", "-c", "%a", grub.cfg]).stdout.strip()
        grub.stage_trial(guest, BootTarget(add={"rt_tune_test.staged": "1"}))
        staged = guest.read_file(grub.cfg)
        assert b"--id rt-tune-trial" in staged and b"rt_tune_test.staged=1" in staged
        entry = b"".join(guest.read_file(grub.trial_script).splitlines(keepends=True)[3:]).decode()
        assert with_section(before.decode(), grub.trial_script, entry) == staged.decode()  # placed, not update-grub
        assert staged == mkconfig()
        assert guest.run(["stat", "-c", "%a", grub.cfg]).stdout.strip() == mode
        assert grub.env(guest).get("next_entry") == "rt-tune-trial"
        grub.discard(guest)
        assert guest.read_file(grub.cfg) == before  # update-grub's output without the trial script
        assert "next_entry" not in grub.env(guest)
    finally:
        grub.restore(guest, snap)


def test_trial_that_never_becomes_healthy_is_power_cycled_back_to_the_old_cmdline(lab_paths, guest,
                                                                                   pristine_guest, tmp_path):
    _, old = pristine_guest
    profile = write_profile(tmp_path, "guest:\n  cmdline:\n    systemd.unit: emergency.target\n")
    start = time.monotonic()
    proc = tune(lab_paths, "apply", profile, "--playbook", PLAYBOOK, "--boot-timeout", "100", "--json")
    o = outcome(proc, "guest.cmdline")
    assert o["status"] == "rolled_back", o
    assert o["reason"].startswith("rolled back by fallback: came back on the old cmdline after a power cycle")
    since = time.time() - (time.monotonic() - start)
    with journal(lab_paths) as db:
        state, = db.execute("SELECT state FROM changes WHERE id = ?", (o["journal_id"],)).fetchone()
        kinds = [k for (k,) in db.execute("SELECT kind FROM events WHERE kind LIKE 'trial.%' AND at > ?",
                                          (since,))]
        sides = [json.loads(d)["side"] for (d,) in db.execute(
            "SELECT data FROM events WHERE kind = 'change.run' AND at > ?", (since,))]
    assert state == "rolled_back"
    assert kinds == ["trial.reboot", "trial.power_cycle", "trial.fallback"]
    assert sides == ["before"] * 4  # measured before; never on the broken trial
    assert cmdline_of(guest) == old  # (the fixture checks the boot files byte for byte)


def test_power_cut_while_the_trial_kernel_boots_falls_back(lab, lab_paths, guest, pristine_guest, tmp_path):
    _, old = pristine_guest
    profile = write_profile(tmp_path, "guest:\n  cmdline:\n    nohz_full: \"1\"\n")
    serial = lab.dir / "vms" / "lab1-guest" / "serial.log"
    mark = last_event_id(lab_paths)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "apply", profile, "--playbook", PLAYBOOK,
                             "--json"], env=tune_env(lab_paths), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    try:
        wait_event(lab_paths, "trial.reboot", mark)
        boots = serial.read_bytes().count(b"Linux version")
        deadline = time.monotonic() + 180
        while serial.read_bytes().count(b"Linux version") == boots and time.monotonic() < deadline:
            time.sleep(0.2)  # GRUB has now spent the one-shot entry and the trial kernel is starting
        lab.power_cycle("lab1-guest", wait=False)  # pull the plug mid-boot
        stdout, stderr = proc.communicate(timeout=1200)
    finally:
        if proc.poll() is None:
            proc.kill()
    o = outcome(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), "guest.cmdline")
    assert o["status"] == "rolled_back", o
    assert o["reason"].startswith("rolled back by fallback: came back on the old cmdline"), o["reason"]
    assert cmdline_of(guest) == old


def test_controller_killed_while_the_unit_reboots_is_reconciled_from_the_units_state(lab, lab_paths, guest,
                                                                                      pristine_guest, tmp_path):
    _, old = pristine_guest
    profile = write_profile(tmp_path, "guest:\n  cmdline:\n    nohz_full: \"1\"\n")
    serial = lab.dir / "vms" / "lab1-guest" / "serial.log"
    mark = last_event_id(lab_paths)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "apply", profile, "--playbook", PLAYBOOK],
                            env=tune_env(lab_paths), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        wait_event(lab_paths, "trial.reboot", mark)
        boots = serial.read_bytes().count(b"Linux version")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 180
    while serial.read_bytes().count(b"Linux version") == boots and time.monotonic() < deadline:
        time.sleep(0.5)  # the unit is now booting its trial, with nobody watching
    assert serial.read_bytes().count(b"Linux version") > boots
    mark = last_event_id(lab_paths)
    status = json.loads(tune(lab_paths, "status", "--json").stdout)["lab1"]
    [in_flight] = status["in_flight"]
    lock = status["lock"]
    # the unit is rebooting into its trial right now; the next run waits for it, sees the trial cmdline,
    # restores the journaled boot files and boots the old default
    done = tune(lab_paths, "rollback", "lab1", "--all", "--force-unlock", lock, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    with journal(lab_paths) as db:
        state, = db.execute("SELECT state FROM changes WHERE change_id = 'guest.cmdline' "
                            "ORDER BY id DESC LIMIT 1").fetchone()
    assert state == "rolled_back"
    with journal(lab_paths) as db:  # it found the unit up on the trial, so it booted the old default again
        kinds = [k for (k,) in db.execute("SELECT kind FROM events WHERE id > ? AND kind LIKE 'trial.%'", (mark,))]
    assert kinds == ["trial.reboot"]
    assert json.loads(tune(lab_paths, "status", "--json").stdout)["lab1"]["in_flight"] == []
    assert cmdline_of(guest) == old


CHECK_REFUSES_NOHZ = '''\
"""The robot's own invariant, as its integrator writes it: its controller cannot run with nohz_full."""


def test_the_controller_runs_without_nohz_full(host, rt_vars, rt_target):
    assert rt_target == "guest" and rt_vars["guest_rt_cpus"]
    assert "nohz_full=" not in host.file("/proc/cmdline").content_string
'''


def test_tune_check_on_the_lab_then_a_trial_whose_profile_check_fails_is_rolled_back(lab_paths, guest,
                                                                                     pristine_guest, tmp_path):
    """Issue #19: `tune check` runs the shipped checks (real systemd: the guest's crash loop is found) and the
    profile's own check file (it passes on the old boot); then the same check fails on the trial boot, which is
    rolled back like any unhealthy trial."""
    _, old = pristine_guest
    (tmp_path / "test_robot.py").write_text(CHECK_REFUSES_NOHZ)
    profile = write_profile(tmp_path, "guest:\n  cmdline:\n    nohz_full: \"1\"\n  checks: [test_robot.py]\n")
    check = tune(lab_paths, "check", "lab1", "--profile", profile, "--json", "--junit", str(tmp_path / "j.xml"))
    assert check.returncode == 12, check.stderr[-2000:]  # the lab guest's crash loop
    reports = {r["target"]: r for r in json.loads(check.stdout)["reports"]}
    assert reports["host"]["ok"], reports["host"]
    outcomes = {o["nodeid"].split("::")[-1]: o for o in reports["guest"]["outcomes"]}
    assert outcomes["test_the_controller_runs_without_nohz_full"]["outcome"] == "passed"
    assert outcomes["test_no_crash_loop"]["outcome"] == "failed"
    assert "mirobot_teleoperate.service" in outcomes["test_no_crash_loop"]["message"]
    assert "test_no_crash_loop" in (tmp_path / "j.xml").read_text()

    proc = tune(lab_paths, "apply", profile, "--playbook", PLAYBOOK, "--json")
    o = outcome(proc, "guest.cmdline")
    assert o["status"] == "rolled_back", o
    assert "the profile's checks failed" in o["reason"], o["reason"]
    assert "test_the_controller_runs_without_nohz_full" in o["reason"] and "nohz_full=" in o["reason"]
    assert cmdline_of(guest) == old  # (the fixture checks the boot files byte for byte)
