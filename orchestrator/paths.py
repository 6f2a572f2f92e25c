"""Where rt-tune keeps its files on the controller: per-user cache, state and default inventory.

Every location can be moved with an environment variable so tests and CI use their own directories.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    cache: Path  # rebuildable artifacts (lab images, .deb cache)
    state: Path  # live state (lab VMs, journals)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Paths:
        env = dict(os.environ if env is None else env)
        home = Path(env.get("HOME", "~")).expanduser()
        cache = env.get("RT_TUNE_CACHE") or os.path.join(env.get("XDG_CACHE_HOME") or home / ".cache", "rt-tune")
        state = env.get("RT_TUNE_STATE") or os.path.join(
            env.get("XDG_STATE_HOME") or home / ".local" / "state", "rt-tune"
        )
        return cls(cache=Path(cache), state=Path(state))

    @property
    def lab(self) -> Path:
        return self.state / "lab"

    @property
    def lab_inventory(self) -> Path:
        return self.lab / "inventory.yaml"


def default_inventory(paths: Paths, env: dict[str, str] | None = None, cwd: Path | None = None) -> Path:
    """`--inventory` default: $RT_TUNE_INVENTORY, else ./inventory.yaml if present, else the lab's inventory."""
    env = dict(os.environ if env is None else env)
    if env.get("RT_TUNE_INVENTORY"):
        return Path(env["RT_TUNE_INVENTORY"])
    local = (cwd or Path.cwd()) / "inventory.yaml"
    if local.is_file():
        return local
    return paths.lab_inventory
