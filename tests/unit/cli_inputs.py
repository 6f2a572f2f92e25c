"""The inventory the CLI input tests run the real `tune` against: lab-shaped units on 127.0.0.1 port 1, where
nothing listens, so a command that gets past its input checks fails cleanly on connecting."""

from __future__ import annotations

VARS = ('{rt_cpus: "1", housekeeping_cpus: "0", guest_rt_cpus: "1", guest_housekeeping_cpus: "0", cpus: 2, '
        'guest_cpus: 2, qemu_service: rt-guest-vm.service}')


def unit_yaml(name: str, guest: bool = True) -> str:
    """One unit of an inventory's `units:` mapping."""
    lines = [f"  {name}:", "    host: {address: 127.0.0.1, port: 1}"]
    if guest:
        lines.append("    guest: {address: 127.0.0.1, port: 1, via_host: true}")
    return "\n".join(lines + [f"    vars: {VARS}"]) + "\n"
