"""Inventory: the units rt-tune manages, how to reach each unit's host and guest, and per-unit vars."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestrator.errors import InputError
from orchestrator.transport import Endpoint
from orchestrator.yamlio import load_model

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
Target = Literal["host", "guest"]


class EndpointSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str
    port: int = Field(22, ge=1, le=65535)
    user: str = "root"
    key: str | None = None  # private key file
    known_hosts: str | None = None  # extra known_hosts file (host-key checking always stays on)
    become: bool = False  # sudo for a non-root user
    via_host: bool = False  # reach it through the unit's host as a jump host

    @field_validator("address", "user")
    @classmethod
    def _plain(cls, v: str) -> str:
        if not v or any(c.isspace() or c in "'\"`$;&|<>\\" for c in v):
            raise ValueError("must be a plain host or user name (no spaces or shell metacharacters)")
        return v


class UnitSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: EndpointSpec
    guest: EndpointSpec | None = None
    power_cycle: list[str] | None = None  # argv run on the controller when the unit does not come back
    #: The same for the guest alone (e.g. restart its QEMU, or a lab VM's reset); None: wait for its watchdog.
    guest_power_cycle: list[str] | None = None
    vars: dict[str, Any] = Field(default_factory=dict)


class Inventory(BaseModel):
    model_config = ConfigDict(extra="forbid")

    units: dict[str, UnitSpec]
    groups: dict[str, list[str]] = Field(default_factory=dict)

    @field_validator("units")
    @classmethod
    def _names(cls, v: dict[str, UnitSpec]) -> dict[str, UnitSpec]:
        for name in v:
            if not NAME.match(name):
                raise ValueError(f"unit name {name!r} must match {NAME.pattern}")
        return v

    def unit(self, name: str) -> UnitSpec:
        try:
            return self.units[name]
        except KeyError:
            raise InputError(f"no unit {name!r} in the inventory; units: {', '.join(sorted(self.units))}") from None

    def endpoint(self, unit: str, target: Target = "host") -> Endpoint:
        spec = self.unit(unit)
        host = _endpoint(spec.host, None)
        if target == "host":
            return host
        if spec.guest is None:
            raise InputError(f"unit {unit!r} has no guest endpoint in the inventory")
        return _endpoint(spec.guest, host if spec.guest.via_host else None)


def ssh_config_lookup(address: str, path: Path | None = None) -> dict[str, Any]:
    """What ~/.ssh/config says about `address` (HostName, Port, User, IdentityFile, UserKnownHostsFile)."""
    import paramiko

    path = path or Path.home() / ".ssh" / "config"
    if not path.is_file():
        return {}
    config = paramiko.SSHConfig.from_path(str(path))
    return config.lookup(address)


def _endpoint(spec: EndpointSpec, jump: Endpoint | None, ssh_config: Path | None = None) -> Endpoint:
    """The inventory's explicit settings win; what it leaves out comes from ~/.ssh/config, then defaults."""
    cfg = ssh_config_lookup(spec.address, ssh_config)
    given = spec.model_fields_set
    host = cfg.get("hostname", spec.address)
    port = spec.port if "port" in given or "port" not in cfg else int(cfg["port"])
    user = spec.user if "user" in given or "user" not in cfg else cfg["user"]
    key = spec.key if spec.key or not cfg.get("identityfile") else cfg["identityfile"][0]
    known = spec.known_hosts
    if not known and cfg.get("userknownhostsfile"):
        known = cfg["userknownhostsfile"].split()[0]
    return Endpoint(host=host, port=port, user=user, key_file=key, known_hosts=known, become=spec.become,
                    jump=jump)


def load_inventory(path: Path) -> Inventory:
    if not path.exists():
        raise InputError(f"inventory {path} does not exist; `tune lab up` writes one for the local lab")
    return load_model(Inventory, path, "inventory")


def split_target(ref: str) -> tuple[str, Target]:
    """'lab1.guest' -> ('lab1', 'guest'); a bare unit name means its host."""
    unit, _, target = ref.rpartition(".")
    if not unit:
        return ref, "host"
    if target not in ("host", "guest"):
        raise InputError(f"target {ref!r}: expected UNIT, UNIT.host or UNIT.guest")
    return unit, target  # type: ignore[return-value]
