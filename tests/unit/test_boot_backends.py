"""Bootloader backends other than Debian's GRUB: systemd-boot, extlinux (kexec trial), U-Boot environment,
QEMU -append (systemd drop-ins), libvirt, GRUB + BLS (grubby).

Each backend runs through a LocalTransport on files under tmp_path. Real tools run where they can run here:
bootctl (is-installed, list) on a tmpfs ESP, fw_printenv/fw_setenv on a file-backed environment made with
mkenvimage, grub-editenv/grub-reboot on a temporary grubenv, virsh on libvirt's test driver. Programs that
cannot run here (bootctl set-oneshot needs EFI variables, kexec needs to replace this kernel, systemctl needs
the real service, grubby is not in Debian) are intercepted: the tests check the argv the backend planned and
the files it wrote, and replay only output recorded from the real tools (tests/recorded/boot/README.md).
"""

from __future__ import annotations

import difflib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.boot import bls, common, extlinux, qemu_append, registry, systemd_boot, uboot
from orchestrator.boot.cmdline import CmdlineError
from orchestrator.boot.loader import BootError, Bootloader, BootTarget
from orchestrator.core.errors import CommandFailed, InputError, ParseError
from orchestrator.remote.local import LocalTransport
from orchestrator.remote.transport import CommandResult
from tests.conftest import RECORDED

pytestmark = pytest.mark.unit

REC = RECORDED / "boot"
ADD = {"isolcpus": "1-3", "nohz_full": "1-3"}
TARGET = BootTarget(add=ADD)

Handler = Callable[[list[str], bytes | None], CommandResult | None]


def result(argv: list[str], stdout: str = "", status: int = 0, stderr: str = "") -> CommandResult:
    return CommandResult(argv=tuple(argv), exit_status=status, stdout=stdout, stderr=stderr, duration_s=0.0)


class Tools:
    """A LocalTransport whose commands are recorded, and answered by a handler for the programs that cannot
    run here (a handler returning None lets the real program run)."""

    def __init__(self, handlers: dict[str, Handler] | None = None) -> None:
        self.inner = LocalTransport(label="test")
        self.handlers = handlers or {}
        self.calls: list[list[str]] = []

    @property
    def label(self) -> str:
        return "test"

    def run(self, argv, *, timeout_s=60.0, check=True, stdin=None, sudo=None) -> CommandResult:
        argv = list(argv)
        self.calls.append(argv)
        handler = self.handlers.get(argv[0])
        res = handler(argv, stdin) if handler else None
        if res is None:
            return self.inner.run(argv, timeout_s=timeout_s, check=check, stdin=stdin, sudo=sudo)
        if check and res.exit_status != 0:
            raise CommandFailed(
                f"{argv} exited {res.exit_status}",
                exit_status=res.exit_status,
                stdout=res.stdout,
                stderr=res.stderr,
            )
        return res

    def read_file(self, path: str) -> bytes:
        return self.inner.read_file(path)

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.inner.write_file(path, data, mode)

    def close(self) -> None:
        pass

    def ran(self, *prefix: str) -> list[list[str]]:
        return [c for c in self.calls if c[: len(prefix)] == list(prefix)]


def changed_lines(old: str, new: str) -> list[str]:
    return [line for line in difflib.ndiff(old.splitlines(), new.splitlines()) if line[:1] in "+-"]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"needs {', '.join(missing)}: install.sh installs them (see tests/recorded/boot/README.md)")


# =========================================================================================================
# Registry


def test_registry_maps_every_kind_to_its_class():
    assert registry.backend_for("extlinux").kind == "extlinux"
    assert registry.backend_for("u-boot", fw_env_config="/x").config == "/x"
    assert registry.backend_for("qemu-append", service="rtvm").service == "rtvm.service"
    assert registry.backend_for("libvirt", domain="rtguest").domain == "rtguest"
    for kind in registry.BACKENDS:
        cls = registry.backend_class(kind)
        assert issubclass(cls, Bootloader) and cls.kind == kind
    with pytest.raises(InputError):
        registry.backend_for("lilo")


# =========================================================================================================
# BLS entries (shared by systemd-boot and grub-bls)

SD = REC / "systemd-boot"
MID = "3a6d2b9e8f1c4d7a9b0e5f2c1d8a7b6e"
E28 = f"{MID}-6.1.0-28-amd64.conf"
E27 = f"{MID}-6.1.0-27-amd64.conf"
OPTS = f"root=UUID=5b1c6a4e-3f0e-4a57-9a8e-2f1b0c7d9e21 ro quiet systemd.machine_id={MID}"


def test_bls_entry_appends_to_the_last_options_line_only():
    text = (SD / "entries" / E28).read_text()
    entry = bls.BlsEntry(text)
    assert entry.options() == OPTS
    new = entry.with_args_added(ADD).text
    assert changed_lines(text, new) == [
        f"- options    {OPTS}",
        f"+ options    {OPTS} isolcpus=1-3 nohz_full=1-3",
    ]
    assert bls.BlsEntry(new).with_args_added(ADD).text == new  # present already: not repeated
    two = text.replace(f"options    {OPTS}\n", "options    root=/dev/sda1\noptions ro\n")
    assert bls.BlsEntry(two).options() == "root=/dev/sda1 ro"
    assert (
        bls.BlsEntry(two)
        .with_args_added({"quiet": None})
        .text.endswith("options ro quiet\n" + text.split(f"{OPTS}\n", 1)[1])
    )
    with pytest.raises(CmdlineError):
        entry.with_args_added({"systemd.machine_id": "0" * 32})


def test_bls_entry_ids_drop_the_boot_counter():
    assert bls.entry_id("a-6.1.conf") == "a-6.1.conf"
    assert bls.entry_id("a-6.1+3.conf") == "a-6.1.conf"
    assert bls.entry_id("a-6.1+2-1.conf") == "a-6.1.conf"
    assert common.kernel_version_of("/boot/vmlinuz-6.1.0-28-arm64") == "6.1.0-28-arm64"
    assert common.kernel_version_of("/Image") is None
    assert common.panic_problem("ro quiet panic=10") is None
    assert common.panic_problem("ro quiet") is not None and common.panic_problem("panic=0") is not None


# =========================================================================================================
# systemd-boot


def test_bootctl_list_recordings_parse():
    items = systemd_boot.parse_bootctl_list((SD / "bootctl-list-json-short.txt").read_text())
    assert [i["id"] for i in items] == [E28, E27]  # menu order: newest version first
    assert items[0]["options"] == OPTS
    counted = systemd_boot.parse_bootctl_list((SD / "bootctl-list-json-short-boot-counting.txt").read_text())
    assert counted[0]["id"] == E28 and counted[0]["path"].endswith(f"{MID}-6.1.0-28-amd64+2-1.conf")
    assert systemd_boot.parse_bootctl_list("") == []
    with pytest.raises(ParseError):
        systemd_boot.parse_bootctl_list('{"id": "a.conf"}\n{"path": "x"}\n')
    with pytest.raises(ParseError):
        systemd_boot.parse_bootctl_list("not json\n")


def test_default_selection_follows_efivar_then_loader_conf_then_order():
    entries = [{"id": E28}, {"id": E27}, {"id": "auto-reboot-to-firmware-setup"}]
    assert systemd_boot.select_default(entries, [])["id"] == E28
    assert systemd_boot.select_default(entries, ["*6.1.0-27*"])["id"] == E27
    assert systemd_boot.select_default(entries, [E27.upper()])["id"] == E27  # case-folded like sd-boot
    assert systemd_boot.select_default(entries, ["nomatch*", f"{MID}-*"])["id"] == E28
    assert systemd_boot.parse_loader_conf((SD / "loader.conf").read_text()) == {}  # all commented out
    assert systemd_boot.parse_loader_conf("timeout 3\ndefault  debian-*\n# default x\n") == {
        "timeout": "3",
        "default": "debian-*",
    }
    var = (0x7).to_bytes(4, "little") + (E27 + "\0").encode("utf-16-le")
    assert systemd_boot.decode_efivar_string(var) == E27


@pytest.fixture()
def esp(tmp_path, monkeypatch):
    """A tmpfs mounted at tmp_path/esp with systemd-boot installed by the real bootctl, the two recorded
    kernel-install entries, their (empty) kernel files, and an empty efivars directory."""
    need("bootctl", "mount", "umount")
    if os.geteuid() != 0:
        pytest.fail("mounting the test ESP needs root (CI runs as root)")
    monkeypatch.setenv("SYSTEMD_RELAX_ESP_CHECKS", "1")  # a tmpfs is not FAT
    path = tmp_path / "esp"
    path.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)]
    if subprocess.run(mount, capture_output=True, check=False).returncode:
        pytest.fail("cannot mount a tmpfs here")
    try:
        subprocess.run(
            ["bootctl", f"--esp-path={path}", "--no-variables", "install"], check=True, capture_output=True
        )
        shutil.copy(SD / "loader.conf", path / "loader" / "loader.conf")
        for name in (E27, E28):
            shutil.copy(SD / "entries" / name, path / "loader" / "entries" / name)
        for version in ("6.1.0-27-amd64", "6.1.0-28-amd64"):
            kdir = path / MID / version
            kdir.mkdir(parents=True)
            (kdir / "linux").write_bytes(b"")
            (kdir / f"initrd.img-{version}").write_bytes(b"")
        (tmp_path / "efivars").mkdir()
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def sd_backend(esp_path: Path) -> systemd_boot.SystemdBootBackend:
    return systemd_boot.SystemdBootBackend(esp_path=str(esp_path), efivars=str(esp_path.parent / "efivars"))


def sd_tools() -> Tools:
    """Real bootctl, except `set-oneshot` (it writes an EFI variable)."""

    def bootctl(argv, _stdin):
        return result(argv) if "set-oneshot" in argv else None

    return Tools({"bootctl": bootctl})


def test_systemd_boot_reads_the_default_with_real_bootctl(esp):
    t, b = sd_tools(), sd_backend(esp)
    entries = esp / "loader" / "entries"
    assert b.default_path(t) == str(entries / E28)
    assert b.default_args(t) == OPTS
    conf = esp / "loader" / "loader.conf"
    conf.write_text(conf.read_text() + "default *-6.1.0-27-amd64.conf\n")
    assert b.default_path(t) == str(entries / E27)
    efivar = esp.parent / "efivars" / f"LoaderEntryDefault-{systemd_boot.LOADER_GUID}"
    efivar.write_bytes((7).to_bytes(4, "little") + (E28 + "\0").encode("utf-16-le"))
    assert b.default_path(t) == str(entries / E28)  # bootctl set-default wins over loader.conf
    efivar.unlink()
    conf.write_text("default @saved\n")
    with pytest.raises(BootError, match="@saved"):
        b.default_path(t)


def test_systemd_boot_preflight(esp):
    t, b = sd_tools(), sd_backend(esp)
    assert b.preflight(t) == [systemd_boot_panic()]  # installed, entries, EFI variables: only panic= missing
    (esp.parent / "efivars").rmdir()
    assert any("no EFI variables" in p for p in b.preflight(t))
    (esp.parent / "efivars").mkdir()
    for efi in (esp / "EFI" / "systemd").glob("*.efi"):
        efi.unlink()
    problems = b.preflight(t)
    assert any("bootctl is-installed" in p and "no" in p for p in problems)
    assert any(
        "not found" in p for p in systemd_boot.SystemdBootBackend(bootctl="rt-tune-no-bootctl").preflight(t)
    )


def systemd_boot_panic() -> str:
    problem = common.panic_problem(OPTS)
    assert problem is not None
    return problem


def test_systemd_boot_stage_discard_commit_restore(esp):
    t, b = sd_tools(), sd_backend(esp)
    entries = esp / "loader" / "entries"
    before = tree_bytes(esp)
    snap = b.snapshot(t)

    b.stage_trial(t, TARGET)
    trial = (entries / systemd_boot.TRIAL_ID).read_text()
    base = (entries / E28).read_text()
    assert sorted(changed_lines(base, trial)) == sorted(
        [
            "- title      Debian GNU/Linux 12 (bookworm)",
            "+ title      rt-tune trial: Debian GNU/Linux 12 (bookworm)",
            "- sort-key   debian",
            "+ sort-key   debian~rt-tune-trial",
            f"- options    {OPTS}",
            f"+ options    {OPTS} isolcpus=1-3 nohz_full=1-3",
        ]
    )
    assert t.ran("bootctl", f"--esp-path={esp}", "set-oneshot") == [
        ["bootctl", f"--esp-path={esp}", "set-oneshot", systemd_boot.TRIAL_ID]
    ]
    assert tree_bytes(esp) == {**before, f"loader/entries/{systemd_boot.TRIAL_ID}": trial.encode()}
    assert b.default_path(t) == str(entries / E28)  # real bootctl still sorts the default first
    assert [e["id"] for e in b.listing(t)] == [E28, E27, systemd_boot.TRIAL_ID]  # the sort-key puts it last

    b.discard(t)
    assert tree_bytes(esp) == before
    assert t.calls[-1] == ["bootctl", f"--esp-path={esp}", "set-oneshot", ""]

    b.stage_trial(t, TARGET)
    b.commit(t, TARGET)
    after = tree_bytes(esp)
    assert set(after) == set(before)
    assert [k for k in after if after[k] != before[k]] == [f"loader/entries/{E28}"]
    assert changed_lines(base, (entries / E28).read_text()) == [
        f"- options    {OPTS}",
        f"+ options    {OPTS} isolcpus=1-3 nohz_full=1-3",
    ]
    assert b.committed(t, TARGET) == []
    b.commit(t, TARGET)
    assert tree_bytes(esp) == after  # nothing added twice

    b.restore(t, snap)
    assert tree_bytes(esp) == before


def test_systemd_boot_refuses_conflicts_and_missing_kernels(esp):
    t, b = sd_tools(), sd_backend(esp)
    before = tree_bytes(esp)
    with pytest.raises(CmdlineError):
        b.stage_trial(t, BootTarget(add={"systemd.machine_id": "0" * 32}))
    with pytest.raises(BootError, match="6.1.0-99-amd64"):
        b.stage_trial(t, BootTarget(add=ADD, kernel="6.1.0-99-amd64"))
    assert tree_bytes(esp) == before and not t.ran("bootctl", f"--esp-path={esp}", "set-oneshot")
    b.stage_trial(t, BootTarget(add=ADD, kernel="6.1.0-27-amd64"))
    trial = bls.BlsEntry((esp / "loader" / "entries" / systemd_boot.TRIAL_ID).read_text())
    assert trial.first("version") == "6.1.0-27-amd64"
    assert trial.values("linux") == [f"/{MID}/6.1.0-27-amd64/linux"]
    assert trial.values("initrd") == [f"/{MID}/6.1.0-27-amd64/initrd.img-6.1.0-27-amd64"]
    assert trial.options() == f"{OPTS} isolcpus=1-3 nohz_full=1-3"
    with pytest.raises(BootError, match="not 6.1.0-27-amd64"):
        b.commit(t, BootTarget(add=ADD, kernel="6.1.0-27-amd64"))


def test_systemd_boot_will_not_arm_a_trial_that_would_become_the_default(esp):
    """Entries without sort-key sort by id, descending: `rt-tune-trial.conf` would come before
    `debian-6.1.0-28.conf` and, with nothing pinning the default, be booted on every reset."""
    t, b = sd_tools(), sd_backend(esp)
    entries = esp / "loader" / "entries"
    for name in (E27, E28):
        text = "".join(
            line
            for line in (entries / name).read_text().splitlines(keepends=True)
            if not line.startswith(("sort-key", "machine-id"))
        )
        (entries / name).unlink()
        (entries / name.replace(MID, "debian")).write_text(text)
    before = tree_bytes(esp)
    with pytest.raises(BootError, match="would pick rt-tune-trial.conf"):
        b.stage_trial(t, TARGET)
    assert tree_bytes(esp) == before and not t.ran("bootctl", f"--esp-path={esp}", "set-oneshot")
    conf = esp / "loader" / "loader.conf"
    conf.write_text(conf.read_text() + "default debian-6.1.0-28-amd64.conf\n")
    b.stage_trial(t, TARGET)  # pinned: now safe
    assert t.ran("bootctl", f"--esp-path={esp}", "set-oneshot")


def test_systemd_boot_counting_entries(esp):
    t, b = sd_tools(), sd_backend(esp)
    entries = esp / "loader" / "entries"
    counted = entries / f"{MID}-6.1.0-28-amd64+2-1.conf"
    (entries / E28).rename(counted)
    before = tree_bytes(esp)
    snap = b.snapshot(t)
    assert b.default_path(t) == str(counted)
    b.stage_trial(t, TARGET)
    b.commit(t, TARGET)
    assert counted.read_text().count("isolcpus=1-3") == 1
    renamed = entries / f"{MID}-6.1.0-28-amd64+1-2.conf"  # what systemd-boot does at the next boot
    counted.rename(renamed)
    b.restore(t, snap)
    assert renamed.read_bytes() == before[f"loader/entries/{counted.name}"]
    assert not counted.exists() and not (entries / systemd_boot.TRIAL_ID).exists()


# =========================================================================================================
# extlinux

EXT = (REC / "extlinux" / "extlinux.conf").read_text()
EXT_ARGS = "root=PARTUUID=6c586e13-02 console=ttyS1,115200 console=tty0 rootwait ro quiet"


def test_extlinux_parse_recorded_and_case_insensitive():
    conf = extlinux.parse_extlinux(EXT)
    assert conf.default == "l0" and [lb.name for lb in conf.labels] == ["l0", "l0r", "l1", "l1r"]
    label = conf.default_label()
    assert (label.kernel, label.initrd, label.fdt, label.append) == (
        "/boot/vmlinuz-6.1.0-28-arm64",
        "/boot/initrd.img-6.1.0-28-arm64",
        "/boot/dtbs/6.1.0-28-arm64/broadcom/bcm2711-rpi-4-b.dtb",
        EXT_ARGS,
    )
    upper = "\n".join(
        " ".join([w.upper(), *rest]) if (w := line.split(" ")[0].strip()) else line
        for line in EXT.replace("\tmenu label", "\tMENU LABEL").splitlines()
        for rest in [line.split(" ")[1:]]
    )
    upper = upper.replace("\tLINUX", "\tKERNEL").replace("DEFAULT l0", "DEFAULT l1")
    conf = extlinux.parse_extlinux(upper)
    assert conf.default_label().name == "l1" and conf.default_label().kernel == "/boot/vmlinuz-6.1.0-27-arm64"
    menu_default = EXT.replace("label l1r\n", "label l1r\n\tmenu default\n")
    assert extlinux.parse_extlinux(menu_default).default_label().name == "l1r"
    with pytest.raises(BootError, match="no DEFAULT"):
        extlinux.parse_extlinux(EXT.replace("default l0\n", "")).default_label()
    with pytest.raises(BootError, match="does not exist"):
        extlinux.parse_extlinux(EXT.replace("default l0", "default l9")).default_label()


@pytest.fixture()
def ext(tmp_path):
    root = tmp_path / "root"
    (root / "boot" / "extlinux").mkdir(parents=True)
    (root / "boot" / "extlinux" / "extlinux.conf").write_text(EXT)
    for v in ("6.1.0-27-arm64", "6.1.0-28-arm64"):
        (root / "boot" / f"vmlinuz-{v}").write_bytes(b"")
        (root / "boot" / f"initrd.img-{v}").write_bytes(b"")
    sys_dir = tmp_path / "sys"
    sys_dir.mkdir()
    (sys_dir / "kexec_loaded").write_text("0\n")
    (sys_dir / "kexec_load_disabled").write_text("0\n")
    (sys_dir / "lockdown").write_text("[none] integrity confidentiality\n")
    return root


def ext_backend(root: Path, kexec: str = "kexec") -> extlinux.ExtlinuxBackend:
    sys_dir = root.parent / "sys"
    return extlinux.ExtlinuxBackend(
        conf=str(root / "boot" / "extlinux" / "extlinux.conf"),
        boot_root=str(root),
        kexec=kexec,
        kexec_loaded=str(sys_dir / "kexec_loaded"),
        kexec_load_disabled=str(sys_dir / "kexec_load_disabled"),
        lockdown=str(sys_dir / "lockdown"),
    )


def ext_tools(root: Path) -> Tools:
    """kexec and systemd-run are never run: kexec's effect on /sys/kernel/kexec_loaded is simulated."""
    loaded = root.parent / "sys" / "kexec_loaded"

    def kexec(argv, _stdin):
        loaded.write_text("1\n" if argv[1] == "-l" else "0\n")
        return result(argv)

    return Tools({"kexec": kexec, "systemd-run": lambda argv, _s: result(argv)})


def test_extlinux_trial_is_a_kexec_that_leaves_the_config_alone(ext):
    t, b = ext_tools(ext), ext_backend(ext)
    before = tree_bytes(ext)
    b.stage_trial(t, TARGET)
    assert tree_bytes(ext) == before
    assert t.ran("kexec") == [
        [
            "kexec",
            "-l",
            f"{ext}/boot/vmlinuz-6.1.0-28-arm64",
            f"--initrd={ext}/boot/initrd.img-6.1.0-28-arm64",
            f"--append={EXT_ARGS} isolcpus=1-3 nohz_full=1-3",
        ]
    ]
    b.reboot(t)
    assert t.calls[-1] == ["systemd-run", "--unit=rt-tune-reboot", "--collect", "--on-active=1",
                           "--timer-property=AccuracySec=100ms", "--no-block", "systemctl", "kexec"]
    b.discard(t)
    assert t.ran("kexec")[-1] == ["kexec", "-u"] and tree_bytes(ext) == before
    with pytest.raises(BootError, match="no kexec kernel is loaded"):
        b.reboot(t)


def test_extlinux_trial_of_another_kernel(ext):
    t, b = ext_tools(ext), ext_backend(ext)
    b.stage_trial(t, BootTarget(add=ADD, kernel="6.1.0-27-arm64"))
    argv = t.ran("kexec")[-1]
    assert argv[2:4] == [
        f"{ext}/boot/vmlinuz-6.1.0-27-arm64",
        f"--initrd={ext}/boot/initrd.img-6.1.0-27-arm64",
    ]
    with pytest.raises(BootError, match="does not exist"):
        b.stage_trial(t, BootTarget(add=ADD, kernel="6.1.0-99-arm64"))
    assert len(t.ran("kexec")) == 1


def test_extlinux_commit_changes_only_the_default_append_line(ext):
    t, b = ext_tools(ext), ext_backend(ext)
    conf = ext / "boot" / "extlinux" / "extlinux.conf"
    snap = b.snapshot(t)
    b.stage_trial(t, TARGET)
    b.commit(t, TARGET)
    assert changed_lines(EXT, conf.read_text()) == [
        f"- \tappend {EXT_ARGS}",
        f"+ \tappend {EXT_ARGS} isolcpus=1-3 nohz_full=1-3",
    ]
    assert conf.read_text().count("isolcpus") == 1  # l0r, l1, l1r untouched
    assert t.ran("kexec")[-1] == ["kexec", "-u"]
    assert b.committed(t, TARGET) == []
    committed = conf.read_bytes()
    b.commit(t, TARGET)
    assert conf.read_bytes() == committed
    b.restore(t, snap)
    assert conf.read_text() == EXT
    with pytest.raises(CmdlineError):
        b.stage_trial(t, BootTarget(add={"console": "ttyAMA0"}))
    with pytest.raises(BootError, match="not 6.1.0-27-arm64"):
        b.commit(t, BootTarget(add=ADD, kernel="6.1.0-27-arm64"))
    assert conf.read_text() == EXT


def test_extlinux_refuses_a_default_label_without_append(ext):
    t, b = ext_tools(ext), ext_backend(ext)
    conf = ext / "boot" / "extlinux" / "extlinux.conf"
    conf.write_text(EXT.replace(f"\tappend {EXT_ARGS}\n\nlabel l0r", "\nlabel l0r", 1))
    with pytest.raises(BootError, match="no APPEND"):
        b.commit(t, TARGET)
    assert any("no APPEND" in p for p in b.preflight(t))


def test_extlinux_preflight_and_notes(ext):
    t = ext_tools(ext)
    sys_dir = ext.parent / "sys"
    problems = ext_backend(ext, kexec="rt-tune-no-kexec").preflight(t)
    assert any("kexec-tools" in p for p in problems)
    assert any("panic=N" in p for p in problems)  # the recorded file has no panic=
    conf = ext / "boot" / "extlinux" / "extlinux.conf"
    conf.write_text(EXT.replace(EXT_ARGS, EXT_ARGS + " panic=10"))
    assert ext_backend(ext, kexec="sh").preflight(t) == []  # any program on PATH stands in for kexec here
    (sys_dir / "kexec_load_disabled").write_text("1\n")
    (sys_dir / "lockdown").write_text("none [integrity] confidentiality\n")
    problems = ext_backend(ext, kexec="sh").preflight(t)
    assert len(problems) == 2 and "disabled" in problems[0] and "locked down" in problems[1]
    assert "u-boot-update" in ext_backend(ext).notes(t)[0]


# =========================================================================================================
# U-Boot environment (real fw_printenv / fw_setenv of libubootenv on a file-backed environment)

UB = REC / "u-boot"
VARS = dict(line.split("=", 1) for line in (UB / "vars.txt").read_text().splitlines() if line)
UB_ARGS = VARS["bootargs"]


def test_fw_printenv_recordings():
    assert uboot.parse_fw_printenv((UB / "fw_printenv.txt").read_text()) == VARS  # values with '=' kept whole
    assert "=" in VARS["bootargs"]
    assert (UB / "fw_printenv-V.txt").read_text().strip() == "0.3.2"
    assert (
        (UB / "fw_printenv-bad-crc.stderr").read_text().startswith("Cannot read environment, using default")
    )
    with pytest.raises(ParseError):
        uboot.parse_fw_printenv("bootargs=x\nnot a variable\n")


def make_env(tmp_path: Path, variables: dict[str, str]) -> Path:
    need("mkenvimage", "fw_printenv", "fw_setenv")
    text = tmp_path / "vars.txt"
    text.write_text("".join(f"{k}={v}\n" for k, v in variables.items()))
    subprocess.run(["mkenvimage", "-s", "0x4000", "-o", str(tmp_path / "env.bin"), str(text)], check=True)
    config = tmp_path / "fw_env.config"
    config.write_text(f"{tmp_path / 'env.bin'} 0x0000 0x4000\n")
    return config


def printenv(config: Path) -> bytes:
    return subprocess.run(["fw_printenv", "-c", str(config)], check=True, capture_output=True).stdout


def env_data(config: Path) -> bytes:
    """The variables area of the environment image (after the CRC, up to the terminating empty string)."""
    image = Path(config.read_text().split()[0]).read_bytes()
    return image[4 : image.index(b"\0\0", 4) + 2]


@pytest.fixture()
def uenv(tmp_path):
    return make_env(tmp_path, VARS)


def test_uboot_preflight_on_real_tools(tmp_path, uenv):
    t = Tools()
    assert uboot.UBootEnvBackend(fw_env_config=str(uenv)).preflight(t) == []
    cases = {
        "no-bootargs": ({k: v for k, v in VARS.items() if k != "bootargs"}, "builds its kernel command line"),
        "no-bootcount": ({k: v for k, v in VARS.items() if k != "bootlimit"}, "CONFIG_BOOTCOUNT_LIMIT"),
        "setter": (
            {**VARS, "bootcmd": "setenv bootargs console=ttyS0; run loadimage"},
            "set bootargs at boot",
        ),
        "pending": ({**VARS, "upgrade_available": "1"}, "upgrade_available=1"),
    }
    for name, (variables, reason) in cases.items():
        (tmp_path / name).mkdir()
        problems = uboot.UBootEnvBackend(fw_env_config=str(make_env(tmp_path / name, variables))).preflight(t)
        assert len(problems) == 1 and reason in problems[0], (name, problems)
    image = Path(uenv.read_text().split()[0])
    data = bytearray(image.read_bytes())
    data[10] ^= 0xFF  # a bad CRC
    image.write_bytes(bytes(data))
    assert "cannot be read" in uboot.UBootEnvBackend(fw_env_config=str(uenv)).preflight(t)[0]
    assert "no " in uboot.UBootEnvBackend(fw_env_config=str(tmp_path / "none.config")).preflight(t)[0]
    missing = uboot.UBootEnvBackend(fw_env_config=str(uenv), fw_setenv="rt-tune-no-fw_setenv").preflight(t)
    assert missing == ["rt-tune-no-fw_setenv not found (Debian package libubootenv-tool)"]


def test_uboot_stage_is_one_atomic_script_and_discard_puts_everything_back(uenv):
    t, b = Tools(), uboot.UBootEnvBackend(fw_env_config=str(uenv))
    before, data = printenv(uenv), env_data(uenv)
    b.stage_trial(t, TARGET)
    assert [c for c in t.calls if c[0] == "fw_setenv"] == [["fw_setenv", "-c", str(uenv), "-s", "-"]]
    assert uboot.parse_fw_printenv(printenv(uenv).decode()) == {
        **VARS,
        "bootargs": f"{UB_ARGS} isolcpus=1-3 nohz_full=1-3",
        "altbootcmd": uboot.ALTBOOTCMD,
        "bootlimit": "1",
        "bootcount": "0",
        "upgrade_available": "1",
        "rt_tune_prev_bootargs": UB_ARGS,
        "rt_tune_prev_bootlimit": "3",
    }
    subprocess.run(
        ["fw_setenv", "-c", str(uenv), "bootcount", "1"], check=True
    )  # U-Boot counted the trial boot
    b.discard(t)
    assert printenv(uenv) == before
    assert env_data(uenv) == data
    b.discard(t)  # nothing staged: nothing to do
    assert printenv(uenv) == before


def test_uboot_commit_disarms_counting_and_restore_is_exact(uenv):
    t, b = Tools(), uboot.UBootEnvBackend(fw_env_config=str(uenv))
    before, data = printenv(uenv), env_data(uenv)
    snap = b.snapshot(t)
    b.stage_trial(t, TARGET)
    b.commit(t, TARGET)
    assert uboot.parse_fw_printenv(printenv(uenv).decode()) == {
        **VARS,
        "bootargs": f"{UB_ARGS} isolcpus=1-3 nohz_full=1-3",
        "upgrade_available": "0",
        "bootcount": "0",
    }
    assert b.committed(t, TARGET) == []
    b.restore(t, snap)
    assert printenv(uenv) == before
    assert env_data(uenv) == data


def test_uboot_refuses_before_writing(tmp_path, uenv):
    t, b = Tools(), uboot.UBootEnvBackend(fw_env_config=str(uenv))
    before = printenv(uenv)
    with pytest.raises(CmdlineError):
        b.stage_trial(t, BootTarget(add={"console": "ttyS0"}))
    with pytest.raises(BootError, match="another kernel"):
        b.stage_trial(t, BootTarget(add=ADD, kernel="6.1.0-28-arm64"))
    with pytest.raises(BootError, match="cut lines"):
        b.stage_trial(t, BootTarget(add={f"rt_tune_test{i}": "x" * 40 for i in range(30)}))
    assert printenv(uenv) == before and not [c for c in t.calls if c[0] == "fw_setenv"]
    b.stage_trial(t, TARGET)
    with pytest.raises(BootError, match="still staged"):
        b.stage_trial(t, TARGET)


# =========================================================================================================
# QEMU -append in a systemd service (systemctl cat replayed from the lab recordings)

QA = REC / "qemu-append"
QA_ARGS = "console=ttyAMA0 root=/dev/vda rw quiet panic=10"
FIRST = BootTarget(add={"isolcpus": "1-3", "nohz_full": "1-3", "rcu_nocbs": "1-3"})
SECOND = BootTarget(add={"nosoftlockup": None})


def qa_setup(tmp_path: Path, *, override: bool = False):
    """The backend on tmp dirs; `systemctl cat` answered with the recording of the state those dirs are in
    (trial drop-in, committed drop-in), daemon-reload and restart only recorded."""
    b = qemu_append.QemuAppendBackend(
        "rtvm.service", runtime_dir=str(tmp_path / "run"), persistent_dir=str(tmp_path / "etc")
    )
    states = {
        (False, False): "cat-0-initial.txt",
        (True, False): "cat-1-trial.txt",
        (False, True): "cat-2-committed.txt",
        (True, True): "cat-3-committed-and-trial.txt",
    }

    def systemctl(argv, _stdin):
        if argv[1] == "cat":
            state = (Path(b.trial_path).exists() and not override, Path(b.commit_path).exists())
            return result(argv, (QA / states[state]).read_text())
        return result(argv)

    return b, Tools({"systemctl": systemctl})


def recorded_section(name: str, suffix: str) -> str:
    sections = qemu_append.parse_systemctl_cat((QA / name).read_text())
    [content] = [c for p, c in sections if p.endswith(suffix)]
    return content


def test_systemctl_cat_recordings_parse():
    sections = qemu_append.parse_systemctl_cat((QA / "cat-0-initial.txt").read_text())
    assert [p for p, _ in sections] == [
        "/etc/systemd/system/rtvm.service",
        "/etc/systemd/system/rtvm.service.d/10-rt.conf",
    ]
    assert sections[0][1] == (QA / "rtvm.service").read_text().rstrip("\n") + "\n"
    assert qemu_append.append_value(qemu_append.effective_exec_start(sections)) == QA_ARGS
    # systemd parsed the trial drop-in rt-tune wrote into the argv it would run:
    shown = (QA / "show-execstart-1-trial.txt").read_text()
    assert f"-append {QA_ARGS} isolcpus=1-3 nohz_full=1-3 rcu_nocbs=1-3 -drive" in shown
    assert f"-append {QA_ARGS} -drive" in (QA / "show-execstart-0-initial.txt").read_text()
    with pytest.raises(ParseError):
        qemu_append.parse_systemctl_cat((QA / "cat-missing-unit.stdout").read_text())


def test_qemu_append_stage_writes_what_systemd_accepted(tmp_path):
    b, t = qa_setup(tmp_path)
    assert b.default_args(t) == QA_ARGS
    assert b.preflight(t) == []
    b.stage_trial(t, FIRST)
    trial = Path(b.trial_path).read_text()
    assert trial == recorded_section("cat-1-trial.txt", "/rtvm.service.d/50-rt-tune-trial.conf")
    assert trial.count("isolcpus=1-3") == 1 and "ExecStart=\nExecStart=/usr/bin/qemu-system-aarch64" in trial
    assert t.ran("systemctl", "daemon-reload")
    b.reboot(t)
    assert t.calls[-1] == ["systemctl", "restart", "rtvm.service"]


def test_qemu_append_commit_discard_restore(tmp_path):
    b, t = qa_setup(tmp_path)
    snap = b.snapshot(t)
    b.stage_trial(t, FIRST)
    b.commit(t, FIRST)
    assert not Path(b.trial_path).exists()
    assert Path(b.commit_path).read_text() == recorded_section(
        "cat-2-committed.txt", "/rtvm.service.d/50-rt-tune-cmdline.conf"
    )
    assert b.committed(t, FIRST) == []
    assert b.default_args(t) == f"{QA_ARGS} isolcpus=1-3 nohz_full=1-3 rcu_nocbs=1-3"
    b.stage_trial(t, SECOND)
    assert Path(b.trial_path).read_text() == recorded_section(
        "cat-3-committed-and-trial.txt", "/rtvm.service.d/50-rt-tune-trial.conf"
    )
    b.discard(t)
    assert not Path(b.trial_path).parent.exists()  # the drop-in directory rt-tune made is gone too
    b.restore(t, snap)
    assert tree_bytes(tmp_path) == {}
    assert t.calls[-1] == ["systemctl", "daemon-reload"]


def test_qemu_append_rolls_back_a_trial_another_drop_in_overrides(tmp_path):
    b, t = qa_setup(tmp_path, override=True)
    with pytest.raises(BootError, match="another drop-in"):
        b.stage_trial(t, FIRST)
    assert not Path(b.trial_path).exists()
    with pytest.raises(CmdlineError):
        qa_setup(tmp_path / "x")[0].stage_trial(t, BootTarget(add={"console": "ttyS0"}))


def test_qemu_append_preflight_on_a_missing_unit(tmp_path):
    b = qemu_append.QemuAppendBackend("rt-tune-no-such.service")
    rc = int((QA / "cat-missing-unit.rc").read_text())
    err = (QA / "cat-missing-unit.stderr").read_text()
    t = Tools({"systemctl": lambda argv, _s: result(argv, "", rc, err)})
    assert b.preflight(t) == [f"`systemctl cat rt-tune-no-such.service` failed: {err.strip()}"]
    with pytest.raises(InputError):
        qemu_append.QemuAppendBackend("a b")


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ('qemu -kernel k -append "a b"', 'qemu -kernel k -append "a b c=1"'),
        ("qemu -kernel k -append 'a b' -m 1", "qemu -kernel k -append 'a b c=1' -m 1"),
        ("qemu -kernel k --append a -m 1", 'qemu -kernel k --append "a c=1" -m 1'),
        ("qemu -append a\\ b -m 1", 'qemu -append a\\ b" c=1" -m 1'),
    ],
)
def test_with_append_rewrites_only_that_argument(command, expected):
    old = qemu_append.append_value(command)
    out = qemu_append.with_append(command, old + " c=1", old)
    assert out == expected
    assert qemu_append.append_value(out) == old + " c=1"


def test_append_value_refusals():
    with pytest.raises(BootError, match="no -append"):
        qemu_append.append_value("qemu -kernel k")
    with pytest.raises(BootError, match="several"):
        qemu_append.append_value("qemu -append a -append b")
    with pytest.raises(BootError, match="expansions"):
        qemu_append.append_value('qemu -append "${GUEST_ARGS} quiet"')
    assert qemu_append.append_value('qemu -append "mem=50%%"') == "mem=50%"
    out = qemu_append.with_append('qemu -append "a"', "a x=5%", "a")
    assert out == 'qemu -append "a x=5%%"'  # % is a unit-file specifier: escaped


def test_unit_assignments_join_continuations_and_resets():
    unit = "[Service]\nExecStart=/bin/a \\\n  # comment inside\n  -b\nExecStart=\nExecStart=/bin/c\n"
    assert qemu_append.unit_assignments(unit) == [
        ("Service", "ExecStart", "/bin/a    -b"),
        ("Service", "ExecStart", ""),
        ("Service", "ExecStart", "/bin/c"),
    ]
    assert qemu_append.effective_exec_start([("/u", unit)]) == "/bin/c"
    with pytest.raises(BootError, match="exactly one"):
        qemu_append.effective_exec_start([("/u", "[Service]\nExecStart=/a\nExecStart=/b\n")])


# =========================================================================================================
# libvirt (virsh against libvirt's test driver where it can run; argv checks where it cannot persist)

LV = REC / "libvirt"
LV_XML = (LV / "dumpxml-inactive.xml").read_text()
LV_ARGS = "console=ttyS0 root=/dev/vda1 ro quiet panic=10"


def test_domain_xml_edit_changes_only_the_cmdline():
    assert qemu_append.domain_cmdline(LV_XML) == LV_ARGS
    assert qemu_append.domain_kernel(LV_XML)[0] == "/var/lib/libvirt/boot/vmlinuz-6.1.0-28-amd64"
    new = qemu_append.edit_domain_os(LV_XML, cmdline_text=LV_ARGS + " isolcpus=1-3")
    assert changed_lines(LV_XML, new) == [
        f"-     <cmdline>{LV_ARGS}</cmdline>",
        f"+     <cmdline>{LV_ARGS} isolcpus=1-3</cmdline>",
    ]
    no_cmdline = LV_XML.replace(f"    <cmdline>{LV_ARGS}</cmdline>\n", "")
    added = qemu_append.edit_domain_os(no_cmdline, cmdline_text="quiet")
    assert changed_lines(no_cmdline, added) == ["+     <cmdline>quiet</cmdline>"]
    swapped = qemu_append.edit_domain_os(LV_XML, cmdline_text=LV_ARGS, kernel="/k/vmlinuz-6.1.0-27-amd64")
    assert changed_lines(LV_XML, swapped) == [
        "-     <kernel>/var/lib/libvirt/boot/vmlinuz-6.1.0-28-amd64</kernel>",
        "+     <kernel>/k/vmlinuz-6.1.0-27-amd64</kernel>",
    ]
    firmware = (
        LV_XML.replace("    <kernel>/var/lib/libvirt/boot/vmlinuz-6.1.0-28-amd64</kernel>\n", "")
        .replace("    <initrd>/var/lib/libvirt/boot/initrd.img-6.1.0-28-amd64</initrd>\n", "")
        .replace(f"    <cmdline>{LV_ARGS}</cmdline>\n", "")
    )
    with pytest.raises(BootError, match="no <kernel>"):
        qemu_append.edit_domain_os(firmware, cmdline_text="quiet")


@pytest.fixture()
def lv(tmp_path):
    need("virsh")
    node = tmp_path / "node.xml"
    shutil.copy(LV / "node.xml", node)
    b = qemu_append.LibvirtBackend(
        "rtguest",
        connect=f"test://{node}",
        trial_dir=str(tmp_path / "run"),
        shutdown_timeout_s=0.2,
        poll_s=0.05,
    )
    return b, node


def test_libvirt_stage_writes_a_trial_that_real_libvirt_runs_transiently(lv):
    b, node = lv
    t = Tools()
    assert b.preflight(t) == []
    assert b.default_args(t) == LV_ARGS
    b.stage_trial(t, TARGET)
    trial = Path(b.trial_path).read_text()
    assert changed_lines(b.xml(t), trial) == [
        f"-     <cmdline>{LV_ARGS}</cmdline>",
        f"+     <cmdline>{LV_ARGS} isolcpus=1-3 nohz_full=1-3</cmdline>",
    ]
    assert not [c for c in t.calls if c[0] == "virsh" and c[3] in ("define", "create", "start", "destroy")]
    # One virsh session (the test driver keeps state per connection): the trial runs as the live
    # configuration while the persistent definition keeps the old arguments, and comes back after a stop.
    session = (
        f"destroy rtguest; create {b.trial_path}; dumpxml rtguest; dumpxml --inactive rtguest; "
        "destroy rtguest; dumpxml rtguest"
    )
    out = subprocess.run(
        ["virsh", "-c", f"test://{node}", session], check=True, capture_output=True, text=True
    ).stdout
    live, inactive, after = out.split("<domain")[1:]
    assert f"{LV_ARGS} isolcpus=1-3 nohz_full=1-3</cmdline>" in live
    assert f"<cmdline>{LV_ARGS}</cmdline>" in inactive and f"<cmdline>{LV_ARGS}</cmdline>" in after


def lv_fake(states: list[str], create_status: int = 0) -> Tools:
    """virsh answered from the recorded domstate outputs (running, then shut off); lifecycle commands only
    recorded (the test driver forgets them between connections)."""
    recorded = {
        "running": (LV / "domstate-running.txt").read_text(),
        "shut off": (LV / "domstate-shut-off.txt").read_text(),
    }

    def virsh(argv, _stdin):
        verb = argv[3]
        if verb == "domstate":
            return result(argv, recorded[states.pop(0) if len(states) > 1 else states[0]])
        if verb in ("shutdown", "destroy", "start", "define"):
            return result(argv)
        if verb == "create":
            return result(argv, status=create_status, stderr="error: failed to start")
        return None

    return Tools({"virsh": virsh})


def test_libvirt_reboot_shuts_down_then_creates_the_trial(lv):
    b, node = lv
    uri = f"test://{node}"
    t = lv_fake(["running", "running", "shut off"])
    b.stage_trial(t, TARGET)
    b.reboot(t)
    lifecycle = [c[3:] for c in t.calls if c[0] == "virsh" and c[3] != "domstate"]
    assert lifecycle[-2:] == [["shutdown", "rtguest"], ["create", b.trial_path]]
    t = lv_fake(["running"])  # never stops: destroyed after the timeout
    b.reboot(t)
    assert [c[3] for c in t.calls if c[0] == "virsh" and c[3] != "domstate"] == [
        "shutdown",
        "destroy",
        "create",
    ]
    t = lv_fake(["shut off"], create_status=1)
    with pytest.raises(BootError, match="old definition"):
        b.reboot(t)
    assert t.calls[-1] == ["virsh", "-c", uri, "start", "rtguest"]
    b.discard(t)
    t = lv_fake(["shut off"])
    b.reboot(t)
    assert t.calls[-1] == ["virsh", "-c", uri, "start", "rtguest"]  # nothing armed: the persistent one


def test_libvirt_commit_defines_the_edited_definition(lv):
    b, _ = lv
    defined: list[str] = []
    t = lv_fake(["shut off"])
    inner = t.handlers["virsh"]

    def virsh(argv, stdin):
        if argv[3] == "define":
            defined.append(Path(argv[4]).read_text())
        return inner(argv, stdin)

    t.handlers["virsh"] = virsh
    snap = b.snapshot(t)
    b.stage_trial(t, TARGET)
    b.commit(t, TARGET)
    assert len(defined) == 1 and changed_lines(LV_XML, defined[0]) == [
        f"-     <cmdline>{LV_ARGS}</cmdline>",
        f"+     <cmdline>{LV_ARGS} isolcpus=1-3 nohz_full=1-3</cmdline>",
    ]
    assert not Path(b.trial_path).exists() and list(Path(b.trial_dir).iterdir()) == []
    b.restore(t, snap)  # the test driver forgot the define: the definition equals the snapshot, nothing to do
    assert len(defined) == 1


# =========================================================================================================
# GRUB + BLS (RHEL 9 layout; real grub-editenv and grub-reboot, grubby only planned)

RHEL_MID = "f3b5a9d2c81e4b0f9a6d7c2e1b0a9f8e"
RHEL_V = "5.14.0-362.8.1.el9_3.x86_64"
RHEL_OPTS = (
    "root=/dev/mapper/rhel-root ro crashkernel=1G-4G:192M,4G-64G:256M,64G-:512M "
    "resume=/dev/mapper/rhel-swap rd.lvm.lv=rhel/root rd.lvm.lv=rhel/swap rhgb quiet panic=10"
)


def rhel_entry(version: str) -> str:
    # The layout of a RHEL 9.3 /boot/loader/entries file as kernel-install/grubby write it.
    return (
        f"title Red Hat Enterprise Linux ({version}) 9.3 (Plow)\n"
        f"version {version}\n"
        f"linux /vmlinuz-{version}\n"
        f"initrd /initramfs-{version}.img $tuned_initrd\n"
        f"options {RHEL_OPTS} $tuned_params\n"
        "grub_users $grub_users\n"
        "grub_arg --unrestricted\n"
        "grub_class rhel\n"
    )


@pytest.fixture()
def rhel(tmp_path):
    need("grub-editenv", "grub-reboot")
    boot = tmp_path / "boot"
    (boot / "loader" / "entries").mkdir(parents=True)
    (boot / "grub").mkdir()
    for v in (RHEL_V, "5.14.0-284.11.1.el9_2.x86_64"):
        (boot / "loader" / "entries" / f"{RHEL_MID}-{v}.conf").write_text(rhel_entry(v))
        (boot / f"vmlinuz-{v}").write_bytes(b"")
        (boot / f"initramfs-{v}.img").write_bytes(b"")
    env = boot / "grub" / "grubenv"
    subprocess.run(["grub-editenv", str(env), "create"], check=True)
    subprocess.run(
        [
            "grub-editenv",
            str(env),
            "set",
            f"saved_entry={RHEL_MID}-{RHEL_V}",
            "menu_auto_hide=1",
            "boot_success=0",
            "tuned_params=skew_tick=1",
        ],
        check=True,
    )
    etc = tmp_path / "etc"
    (etc / "default").mkdir(parents=True)
    (etc / "default" / "grub").write_text(
        "GRUB_TIMEOUT=5\nGRUB_DISTRIBUTOR=\"$(sed 's, release .*$,,g' /etc/system-release)\"\n"
        'GRUB_DEFAULT=saved\nGRUB_DISABLE_SUBMENU=true\nGRUB_TERMINAL_OUTPUT="console"\n'
        'GRUB_CMDLINE_LINUX="crashkernel=1G-4G:192M,4G-64G:256M,64G-:512M resume=/dev/mapper/rhel-swap '
        'rd.lvm.lv=rhel/root rd.lvm.lv=rhel/swap rhgb quiet panic=10"\nGRUB_DISABLE_RECOVERY="true"\n'
        "GRUB_ENABLE_BLSCFG=true\n"
    )
    b = bls.BlsGrubbyBackend(
        entries_dir=str(boot / "loader" / "entries"),
        grubenv=str(env),
        default_grub=str(etc / "default" / "grub"),
        kernel_cmdline=str(etc / "kernel" / "cmdline"),
        editenv="grub-editenv",
        grub_reboot=("grub-reboot", f"--boot-directory={boot}"),
    )
    return b, tmp_path


def grubby_tools() -> Tools:
    return Tools({"grubby": lambda argv, _s: result(argv)})


def test_bls_grubby_default_args_expand_grubenv_variables(rhel):
    b, _ = rhel
    t = grubby_tools()
    assert b.default_args(t) == f"{RHEL_OPTS} skew_tick=1"
    assert bls.default_grub_value("GRUB_DEFAULT=0\nexport GRUB_DEFAULT=saved # pinned\n") == "saved"


def test_bls_grubby_stage_discard_restore(rhel):
    b, root = rhel
    t = grubby_tools()
    entries = Path(b.entries_dir)
    before = tree_bytes(root)
    snap = b.snapshot(t)
    b.stage_trial(t, TARGET)
    trial = (entries / "rt-tune-trial.conf").read_text()
    assert changed_lines(rhel_entry(RHEL_V), trial) == [
        f"- title Red Hat Enterprise Linux ({RHEL_V}) 9.3 (Plow)",
        f"+ title rt-tune trial: Red Hat Enterprise Linux ({RHEL_V}) 9.3 (Plow)",
        f"- options {RHEL_OPTS} $tuned_params",
        f"+ options {RHEL_OPTS} skew_tick=1 isolcpus=1-3 nohz_full=1-3",
    ]
    assert b.env(t)["next_entry"] == "rt-tune-trial"  # set by the real grub-reboot
    b.discard(t)
    assert "next_entry" not in b.env(t) and not (entries / "rt-tune-trial.conf").exists()
    b.stage_trial(t, BootTarget(add=ADD, kernel="5.14.0-284.11.1.el9_2.x86_64"))
    trial = bls.BlsEntry((entries / "rt-tune-trial.conf").read_text())
    assert trial.values("linux") == ["/vmlinuz-5.14.0-284.11.1.el9_2.x86_64"]
    b.restore(t, snap)
    assert tree_bytes(root) == before


def test_bls_grubby_commit_plans_grubby(rhel):
    b, _ = rhel
    t = grubby_tools()
    b.stage_trial(t, TARGET)
    b.commit(t, TARGET)
    assert t.ran("grubby") == [["grubby", "--update-kernel=DEFAULT", "--args=isolcpus=1-3 nohz_full=1-3"]]
    assert "next_entry" not in b.env(t) and not Path(b.trial_path).exists()
    b.commit(t, BootTarget(add=ADD, kernel="5.14.0-284.11.1.el9_2.x86_64"))
    assert t.ran("grubby")[1:] == [
        [
            "grubby",
            "--update-kernel=/boot/vmlinuz-5.14.0-284.11.1.el9_2.x86_64",
            "--args=isolcpus=1-3 nohz_full=1-3",
        ],
        ["grubby", "--set-default=/boot/vmlinuz-5.14.0-284.11.1.el9_2.x86_64"],
    ]


def test_bls_grubby_preflight(rhel):
    b, root = rhel
    t = grubby_tools()
    problems = b.preflight(t)
    assert any(p.startswith("grubby not found") for p in problems)  # not in Debian
    fstype = subprocess.run(
        ["findmnt", "-no", "FSTYPE", "-T", b.grubenv], capture_output=True, check=False, text=True
    ).stdout.strip()
    assert len(problems) == 1 + (fstype in common.UNSAFE_FS)
    (root / "etc" / "default" / "grub").write_text("GRUB_DEFAULT=0\n")
    subprocess.run(["grub-editenv", b.grubenv, "unset", "saved_entry"], check=True)
    problems = b.preflight(t)
    assert any("GRUB_DEFAULT is '0'" in p for p in problems)
    assert any("no saved_entry" in p for p in problems)


# ---- GRUB: the trial section placed in grub.cfg where grub-mkconfig puts it -----------------------------------
def test_grub_trial_section_goes_where_grub_mkconfig_puts_it_and_comes_out_again():
    """On the x86 lab host's grub.cfg (written by the real grub-mkconfig; tests/recorded/lab-x86): a script after
    41_custom ends the file, one named between two others lands between their sections, and taking it out gives
    back the file byte for byte. The lab test compares the result with grub-mkconfig's own output."""
    from orchestrator.boot.grub import with_section, without_section
    from orchestrator.boot.grubcfg import parse_grub_cfg

    cfg = (RECORDED / "lab-x86" / "host-boot-grub.cfg").read_text()
    entry = "menuentry 'rt-tune trial' --id rt-tune-trial {\n\tlinux\t/vmlinuz root=/dev/vda ro quiet\n}\n"
    last = with_section(cfg, "/etc/grub.d/42_rt-tune-trial", entry)
    assert last == cfg + ("\n### BEGIN /etc/grub.d/42_rt-tune-trial ###\n" + entry
                          + "### END /etc/grub.d/42_rt-tune-trial ###\n")
    assert [e.id for e in parse_grub_cfg(last)][-1] == "rt-tune-trial"
    assert without_section(last, "/etc/grub.d/42_rt-tune-trial") == cfg

    middle = with_section(cfg, "/etc/grub.d/25_rt-tune-trial", entry)
    assert middle is not None and without_section(middle, "/etc/grub.d/25_rt-tune-trial") == cfg
    sections = [line for line in middle.splitlines() if line.startswith("### ")]
    at = sections.index("### BEGIN /etc/grub.d/25_rt-tune-trial ###")
    assert sections[at - 1] == "### END /etc/grub.d/20_linux_xen ###"
    assert sections[at + 2] == "### BEGIN /etc/grub.d/30_os-prober ###"
    assert "### END /etc/grub.d/20_linux_xen ###\n\n### BEGIN /etc/grub.d/25_rt-tune-trial ###\n" in middle
    assert "### END /etc/grub.d/25_rt-tune-trial ###\n\n### BEGIN /etc/grub.d/30_os-prober ###\n" in middle

    # no frames (a hand-written grub.cfg), the section already there, an output without its newline: None,
    # so the backend runs update-grub instead
    assert with_section("menuentry 'x' {\n}\n", "/etc/grub.d/42_rt-tune-trial", entry) is None
    assert with_section(last, "/etc/grub.d/42_rt-tune-trial", entry) is None
    assert with_section(cfg, "/etc/grub.d/42_rt-tune-trial", entry.rstrip("\n")) is None
    assert without_section(cfg, "/etc/grub.d/42_rt-tune-trial") is None


def test_grub_staleness_runs_grub_mkconfig_only_when_something_it_reads_changed_after_grub_cfg(tmp_path):
    """The preflight's grub-mkconfig comparison (10-50 s on a small unit) is skipped when nothing grub-mkconfig
    reads is newer than grub.cfg. Real files, real stat/find through LocalTransport: an edit of the settings, a
    new drop-in, a kernel added to /boot and a grub.cfg dated in the future each force the comparison; rt-tune's
    own writes in grub.cfg's directory do not."""
    from orchestrator.boot.grub import GrubBackend

    boot, etc = tmp_path / "boot", tmp_path / "etc"
    (boot / "grub").mkdir(parents=True)
    (etc / "default" / "grub.d").mkdir(parents=True)
    (etc / "grub.d").mkdir()
    settings, dropins, scripts = etc / "default" / "grub", etc / "default" / "grub.d", etc / "grub.d"
    settings.write_text('GRUB_CMDLINE_LINUX="panic=10"\n')
    (scripts / "10_linux").write_text("#!/bin/sh\n")
    (boot / "vmlinuz-6.1.0-50-amd64").write_text("k")
    cfg = boot / "grub" / "grub.cfg"
    grub = GrubBackend(cfg=str(cfg), mkconfig_inputs=(str(settings), str(dropins), str(scripts), str(boot),
                                                      str(etc / "absent")))
    t = LocalTransport()

    def written_at(path: Path, when: float) -> None:
        os.utime(path, (when, when))

    now = int(__import__("time").time())
    for p in (settings, dropins, scripts, scripts / "10_linux", boot, boot / "vmlinuz-6.1.0-50-amd64"):
        written_at(p, now - 100)
    cfg.write_text("# grub.cfg\n")
    written_at(cfg, now - 50)
    assert grub.changed_inputs(t) == []
    (boot / "grub" / "grubenv").write_text("# GRUB Environment Block\n")  # grub.cfg's own directory: ignored
    assert grub.changed_inputs(t) == []

    written_at(settings, now - 10)  # an edit without update-grub
    assert grub.changed_inputs(t) == [str(settings)]
    written_at(settings, now - 100)
    (dropins / "50-user.cfg").write_text('GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX quiet"\n')
    assert set(grub.changed_inputs(t) or []) == {str(dropins), str(dropins / "50-user.cfg")}
    (dropins / "50-user.cfg").unlink()
    written_at(dropins, now - 100)
    (boot / "vmlinuz-6.1.0-51-amd64").write_text("k")  # a kernel installed without update-grub
    assert set(grub.changed_inputs(t) or []) == {str(boot), str(boot / "vmlinuz-6.1.0-51-amd64")}
    (boot / "vmlinuz-6.1.0-51-amd64").unlink()
    written_at(boot, now - 100)
    assert grub.changed_inputs(t) == []
    written_at(cfg, now + 3600)  # the clock went back since grub.cfg was written: cannot tell
    assert grub.changed_inputs(t) is None
