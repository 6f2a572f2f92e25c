"""`tune lab`: the rehearsal lab of real Debian VMs on this machine."""

from __future__ import annotations

import json
import os

import click
from rich.table import Table

from orchestrator.cli.common import cli_paths, emit, new_progress


@click.group()
def lab() -> None:
    """The rehearsal lab: robot units made of real Debian VMs (host VM + guest VM) on this machine."""


def _lab():
    from orchestrator.lab.lab import Lab

    return Lab(cli_paths(), events=new_progress())


@lab.command("up")
@click.option("--units", default=1, show_default=True, help="How many units (host VM + guest VM each).")
@click.option("--host-only", is_flag=True, help="Units without a guest VM (saves memory).")
@click.option("--arch", type=click.Choice(["amd64", "arm64"]), default="amd64", show_default=True,
              help="arm64: an arm64 host VM (EL2) running its guest nested with KVM; built under emulation.")
@click.option("--timeout", "boot_timeout", type=float, default=None,
              help="Seconds to wait for SSH [default: 300; arm64 900].")
@click.option("--json", "as_json", is_flag=True)
def lab_up(units: int, host_only: bool, arch: str, boot_timeout: float | None, as_json: bool) -> None:
    """Build (or reuse) the images, boot the VMs, write the inventory."""
    the_lab = _lab()
    state = the_lab.up(units, host_only=host_only, boot_timeout=boot_timeout, arch=arch)
    data = {"inventory": str(the_lab.paths.lab_inventory), **json.loads(state.model_dump_json())}
    emit(data, as_json, f"lab is up; inventory: {the_lab.paths.lab_inventory}")


@lab.command("build")
@click.option("--arch", type=click.Choice(["amd64", "arm64"]), default="amd64", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def lab_build(arch: str, as_json: bool) -> None:
    """Build (or find in the cache) the lab's images without booting anything."""
    images = _lab().build(arch)
    data = {"directory": str(images.directory), "arch": images.arch, "kernel": images.kernel,
            "kernels": list(images.kernels), "nested_guest": images.nested_guest}
    emit(data, as_json, f"{arch} images: {images.directory} (kernels: {', '.join(images.kernels)})")


@lab.command("down")
@click.option("--json", "as_json", is_flag=True)
def lab_down(as_json: bool) -> None:
    """Stop every lab VM; no QEMU process is left behind."""
    stopped = _lab().down()
    emit({"stopped": stopped}, as_json, f"stopped: {', '.join(stopped) or 'nothing was running'}")


@lab.command("status")
@click.option("--json", "as_json", is_flag=True)
def lab_status(as_json: bool) -> None:
    """Each VM: running, QEMU status, SSH port and whether SSH answers."""
    rows = _lab().status()
    table = Table("VM", "unit", "role", "running", "QEMU", "SSH", "port", "pid")
    for r in rows:
        table.add_row(r.name, r.unit, r.role, str(r.running), r.qemu_status or "-", str(r.ssh), str(r.ssh_port),
                      str(r.pid or "-"))
    emit([r.model_dump() for r in rows], as_json, table if rows else "no lab (run `tune lab up`)")


@lab.command("ssh", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.option("--user", default="root", show_default=True)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def lab_ssh(name: str, user: str, command: tuple[str, ...]) -> None:
    """Open a shell (or run COMMAND) on lab VM NAME, host key checked.

    COMMAND is OpenSSH's: its words are joined with spaces and run by the VM's shell, so quote a pipeline as
    one word (`tune lab ssh lab1-host -- 'dpkg -l | grep -c ^ii'`)."""
    argv = _lab().ssh_argv(name, list(command), user=user)
    os.execvp(argv[0], argv)


@lab.command("reset")
@click.argument("names", nargs=-1)
@click.option("--cold", is_flag=True, help="Boot on fresh disks even when a pristine snapshot could be restored.")
@click.option("--json", "as_json", is_flag=True)
def lab_reset(names: tuple[str, ...], cold: bool, as_json: bool) -> None:
    """Return VMs (default: all) to pristine: restore the snapshot taken after their first pristine boot (disk
    and memory, seconds), or boot them on fresh disks (--cold, or when no snapshot matches)."""
    state = _lab().reset(list(names) or None, cold=cold)
    emit(json.loads(state.model_dump_json()), as_json, "reset to pristine" + (" disks and booted" if cold else ""))


@lab.command("power-cycle")
@click.argument("name")
@click.option("--no-wait", is_flag=True, help="Return right after the reset, do not wait for SSH.")
@click.option("--json", "as_json", is_flag=True)
def lab_power_cycle(name: str, no_wait: bool, as_json: bool) -> None:
    """Hard-reset VM NAME like pulling a unit's power: a QMP reset; a nested guest's QEMU is killed on its host and
    systemd starts it again."""
    boot_id = _lab().power_cycle(name, wait=not no_wait)
    emit({"name": name, "boot_id": boot_id}, as_json,
         f"{name} power-cycled" + (f"; boot_id {boot_id}" if boot_id else ""))


@lab.command("start")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def lab_start(name: str, as_json: bool) -> None:
    """Start a stopped or killed VM again on its current disks."""
    _lab().start(name)
    emit({"name": name, "started": True}, as_json, f"{name} is up")


@lab.command("kill")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def lab_kill(name: str, as_json: bool) -> None:
    """Kill VM NAME at once (fault injection: a unit that lost power)."""
    _lab().kill(name)
    emit({"name": name, "killed": True}, as_json, f"{name} killed")
