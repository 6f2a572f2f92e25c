"""The bootloader interface every backend implements, and the registry that picks one from facts.

A backend knows how to (1) snapshot every file/variable it may touch, byte for byte, (2) say what arguments the
default entry boots with, (3) stage a *trial* entry (the default's kernel + extra args, or another kernel)
armed for the next boot only, so that any reset afterwards lands on the old default by itself, (4) commit the
trial as the new default, (5) discard the trial, and (6) restore a snapshot exactly. `preflight` lists what
would stop the fallback from working on this unit.

`control` is the transport where the bootloader lives: the target itself, except for a guest whose cmdline is
its QEMU's `-append` (then it is the host, and "reboot" is a restart of the guest's QEMU service).
"""

from __future__ import annotations

import base64
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from orchestrator.core.errors import TuneError
from orchestrator.remote.transport import Transport, read_files
from orchestrator.remote.transport import read_optional as read_optional  # the backends import it from here

State = dict[str, Any]


class BootError(TuneError):
    """A bootloader operation failed (the unit's boot configuration is as the journal says)."""


class PreflightError(TuneError):
    """The unit's fallback cannot work; rt-tune refuses to trial-boot it unless explicitly overridden."""


@dataclass(frozen=True)
class BootTarget:
    """What the trial boot boots: the default entry's kernel (or `kernel`, a release) with `add` appended."""

    add: dict[str, str | None] = field(default_factory=dict)
    kernel: str | None = None  # `uname -r` of the kernel to boot; None = the default entry's kernel


def b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def snapshot_files(t: Transport, paths: list[str]) -> dict[str, str | None]:
    return {p: b64(data) for p, data in read_files(t, paths).items()}


def restore_files(t: Transport, files: dict[str, str | None]) -> None:
    """Write back every snapshotted file exactly (mode kept by write_file's default for new files), delete the
    ones that did not exist."""
    for path, content in files.items():
        data = unb64(content)
        if data is None:
            t.run(["rm", "-f", "--", path], timeout_s=30)
        else:
            mode = t.run(["sh", "-c", 'stat -c %a "$1" 2>/dev/null || echo 644', "-", path], timeout_s=30)
            t.write_file(path, data, mode=int(mode.stdout.strip() or "644", 8))


REBOOT_UNIT = "rt-tune-reboot"


def one_second_later(argv: list[str], *, unit: str | None = None) -> list[str]:
    """The `systemd-run` command that runs `argv` one second from now (after the SSH command that starts it has
    returned), on a transient timer named `unit` when given. Its accuracy is 100 ms: systemd's default (1 min)
    lets an idle unit fire it up to a minute late (measured 12-14 s late on the lab, with nothing else waking
    systemd once the SSH session is gone)."""
    named = [f"--unit={unit}", "--collect"] if unit else []
    return ["systemd-run", *named, "--on-active=1", "--timer-property=AccuracySec=100ms", "--no-block", *argv]


def cancel_reboot(t: Transport) -> None:
    """Stop a reboot rt-tune scheduled that has not started yet (no-op when there is none)."""
    t.run(["systemctl", "stop", f"{REBOOT_UNIT}.timer"], timeout_s=30, check=False)


class Bootloader(ABC):
    """One bootloader backend (see the module docstring for the contract)."""

    kind: ClassVar[str]
    #: A reset during/after the trial boot returns to the old default without anyone's help.
    self_fallback: ClassVar[bool] = True

    @abstractmethod
    def snapshot(self, t: Transport) -> State:
        """Everything stage/commit may change, byte for byte (files base64; variables verbatim)."""

    @abstractmethod
    def restore(self, t: Transport, snap: State) -> None:
        """Put back `snap` exactly and regenerate derived config (grub.cfg) so the next boot uses it."""

    @abstractmethod
    def preflight(self, t: Transport) -> list[str]:
        """Reasons a failed trial would NOT fall back by itself (empty: safe)."""

    @abstractmethod
    def default_args(self, t: Transport) -> str:
        """The arguments the default entry passes (as configured, not as booted)."""

    @abstractmethod
    def stage_trial(self, t: Transport, target: BootTarget) -> None:
        """Create the trial entry and arm it for the next boot only."""

    def reboot(self, t: Transport, verb: str = "reboot") -> None:
        """Start the reboot into the armed trial (or into the default when nothing is armed): a named timer a
        second from now, so the SSH command returns first and a reconcile can still cancel it."""
        cancel_reboot(t)
        t.run(one_second_later(["systemctl", verb], unit=REBOOT_UNIT), timeout_s=30)

    @abstractmethod
    def commit(self, t: Transport, target: BootTarget) -> None:
        """Make the trial's kernel/args the default and remove the trial entry."""

    @abstractmethod
    def discard(self, t: Transport) -> None:
        """Remove the trial entry and disarm it; the default is left as it was."""

    def committed(self, t: Transport, target: BootTarget) -> list[str]:
        """Problems with a commit (empty: the default entry now boots `target`)."""
        from orchestrator.boot import cmdline

        return [f"default entry: {p}" for p in cmdline.holds(self.default_args(t), target.add)]
