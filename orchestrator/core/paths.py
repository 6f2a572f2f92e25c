"""Where rt-tune keeps its files on the controller: per-user cache, state and default inventory.

Every location can be moved with an environment variable so tests and CI use their own directories.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent  # orchestrator/, this file being orchestrator/core/paths.py


def shipped(name: str) -> Path:
    """rt-tune's own `profiles/` or `playbooks/`: inside the package when installed from a wheel (setup.py copies
    them to orchestrator/_data/), else the checkout's, beside the package (an editable install, a source tree)."""
    packaged = PACKAGE / "_data" / name
    return packaged if packaged.is_dir() else PACKAGE.parent / name


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
    return inventory_search(paths, env, cwd)[0]


def inventory_search(paths: Paths, env: dict[str, str] | None = None,
                     cwd: Path | None = None) -> tuple[Path, str]:
    """The default inventory and where it came from ("$RT_TUNE_INVENTORY", "./inventory.yaml" or "lab"), so a
    missing one can be reported with where rt-tune looked."""
    env = dict(os.environ if env is None else env)
    if env.get("RT_TUNE_INVENTORY"):
        return Path(env["RT_TUNE_INVENTORY"]), "$RT_TUNE_INVENTORY"
    local = (cwd or Path.cwd()) / "inventory.yaml"
    if local.is_file():
        return local, "./inventory.yaml"
    return paths.lab_inventory, "lab"


def missing_inventory(paths: Paths, path: Path, source: str, cwd: Path | None = None) -> str:
    """Why there is no inventory at `path` (chosen from `source`: "--inventory" or what `inventory_search`
    says) and how to get one."""
    how = "run `tune lab up` (it builds the local lab and writes its inventory), or give --inventory FILE"
    if source == "--inventory":
        return f"inventory {path} (--inventory) does not exist"
    if source == "$RT_TUNE_INVENTORY":
        return f"inventory {path} (from $RT_TUNE_INVENTORY) does not exist"
    here = cwd or Path.cwd()
    return (f"no inventory found: no --inventory, $RT_TUNE_INVENTORY is not set, no inventory.yaml in "
            f"{here}, and no lab inventory ({paths.lab_inventory}): {how}")
