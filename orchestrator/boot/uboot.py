"""U-Boot environment (`bootargs`), through libubootenv's `fw_printenv`/`fw_setenv` and /etc/fw_env.config.

The kernel arguments are the `bootargs` variable. The trial uses U-Boot's boot counting
(CONFIG_BOOTCOUNT_LIMIT): one `fw_setenv -s -` script (applied and stored at once) saves every variable it
changes as `rt_tune_prev_NAME` (absent ones are not saved, so "absent" is remembered too), sets `bootargs` to
the merged arguments, `altbootcmd` to a command that puts the old `bootargs` back and boots normally,
`bootlimit=1`, `bootcount=0`, `upgrade_available=1`. The trial boot counts 1 (not over the limit: bootcmd runs
with the new arguments); any later boot before commit counts 2 and runs altbootcmd, i.e. the old arguments.
commit keeps `bootargs`, disarms the counting (`upgrade_available=0`, `bootcount=0`) and puts `altbootcmd` and
`bootlimit` back as they were (deleted when they did not exist). discard puts every changed variable back from
the saved copies; restore puts the whole environment back to a snapshot (variables that were absent are
deleted), then checks it.

Only libubootenv's fw_setenv is supported (Debian's `libubootenv-tool`, Yocto's and Buildroot's default): its
script syntax is `name=value` (`name=` deletes), the old U-Boot tools' is `name value`, so the two cannot be
fed the same script. libubootenv ignores script lines it cannot apply, so every write is read back.
"""

from __future__ import annotations

import re
from typing import ClassVar

from orchestrator.boot import cmdline
from orchestrator.boot.common import command_exists, panic_problem, path_exists
from orchestrator.boot.loader import BootError, Bootloader, BootTarget, State
from orchestrator.core.errors import ParseError
from orchestrator.remote.transport import Transport

PREFIX = "rt_tune_prev_"
#: Every variable the trial changes (each saved as rt_tune_prev_NAME when it exists).
MANAGED = ("bootargs", "altbootcmd", "bootlimit", "bootcount", "upgrade_available")
ALTBOOTCMD = f"setenv bootargs ${{{PREFIX}bootargs}}; setenv upgrade_available 0; saveenv; run bootcmd"
#: libubootenv 0.3.x reads script lines into a 1024-byte buffer (newer: 2048); longer lines are cut.
MAX_SCRIPT_LINE = 1023
_NAME = re.compile(r"^[^=\s]+$")


def parse_fw_printenv(text: str) -> dict[str, str]:
    """`fw_printenv` output: one `name=value` line per variable (values may contain '=')."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if not sep or not name:
            raise ParseError(f"unexpected line in fw_printenv output: {line[:200]!r}")
        env[name] = value
    return env


def setenv_script(assignments: dict[str, str | None]) -> bytes:
    """A libubootenv `fw_setenv -s` script: `name=value`, `name=` to delete."""
    lines = []
    for name, value in assignments.items():
        if not _NAME.fullmatch(name):
            raise BootError(f"invalid U-Boot variable name {name!r}")
        if value is not None and ("\n" in value or "\r" in value):
            raise BootError(f"U-Boot variable {name} would contain a line break")
        if value == "":
            raise BootError(f"U-Boot cannot store an empty value for {name} (it means: delete)")
        line = f"{name}={value or ''}"
        if len(line.encode()) >= MAX_SCRIPT_LINE:
            raise BootError(
                f"{name}'s new value is {len(line.encode())} bytes long; fw_setenv scripts cut lines "
                f"at {MAX_SCRIPT_LINE}"
            )
        lines.append(line + "\n")
    return "".join(lines).encode()


class UBootEnvBackend(Bootloader):
    kind: ClassVar[str] = "u-boot"

    def __init__(
        self,
        *,
        fw_env_config: str = "/etc/fw_env.config",
        fw_printenv: str = "fw_printenv",
        fw_setenv: str = "fw_setenv",
    ):
        self.config, self.fw_printenv, self.fw_setenv = fw_env_config, fw_printenv, fw_setenv

    # ---- reading / writing ---------------------------------------------------------------------------
    def env(self, t: Transport) -> dict[str, str]:
        return parse_fw_printenv(t.run([self.fw_printenv, "-c", self.config], timeout_s=60).stdout)

    def setenv(self, t: Transport, assignments: dict[str, str | None]) -> dict[str, str]:
        """Apply `assignments` (None deletes) in one fw_setenv run, then check them; returns the new env."""
        if not assignments:
            return self.env(t)
        t.run([self.fw_setenv, "-c", self.config, "-s", "-"], stdin=setenv_script(assignments), timeout_s=60)
        env = self.env(t)
        wrong = [n for n, v in assignments.items() if env.get(n) != v]
        if wrong:
            raise BootError(
                f"{t.label}: fw_setenv did not apply {', '.join(wrong)} (read back: "
                + ", ".join(f"{n}={env.get(n)!r}" for n in wrong)
                + ")"
            )
        return env

    def default_args(self, t: Transport) -> str:
        env = self.env(t)
        if "bootargs" not in env:
            raise BootError(
                f"{t.label}: the U-Boot environment has no bootargs: the board builds its kernel "
                "command line in bootcmd (or a boot script)"
            )
        return env["bootargs"]

    # ---- state ---------------------------------------------------------------------------------------
    def snapshot(self, t: Transport) -> State:
        return {"config": self.config, "env": self.env(t)}

    def restore(self, t: Transport, snap: State) -> None:
        want: dict[str, str] = snap["env"]
        now = self.env(t)
        changes: dict[str, str | None] = {n: v for n, v in want.items() if now.get(n) != v}
        changes.update({n: None for n in now if n not in want})
        env = self.setenv(t, changes)
        if env != want:
            diff = sorted(set(env.items()) ^ set(want.items()))
            raise BootError(
                f"{t.label}: the U-Boot environment differs from the snapshot after restore: {diff[:10]}"
            )

    # ---- checks --------------------------------------------------------------------------------------
    def preflight(self, t: Transport) -> list[str]:
        problems = []
        for tool in (self.fw_printenv, self.fw_setenv):
            if not command_exists(t, tool):
                problems.append(f"{tool} not found (Debian package libubootenv-tool)")
        if not path_exists(t, self.config, "-f"):
            problems.append(f"no {self.config}: fw_printenv/fw_setenv do not know where the environment is")
        if problems:
            return problems
        version = t.run([self.fw_printenv, "-V"], timeout_s=30, check=False)
        if not version.ok or not re.fullmatch(r"\d+(\.\d+)+", version.stdout.strip()):
            problems.append(
                f"{self.fw_printenv} is not libubootenv's (`-V` printed "
                f"{(version.stdout + version.stderr).strip()[:100]!r}): rt-tune writes libubootenv's "
                "`name=value` script syntax only"
            )
        res = t.run([self.fw_printenv, "-c", self.config], timeout_s=60, check=False)
        if not res.ok or "using default" in res.stderr:
            problems.append(
                f"the stored U-Boot environment cannot be read ({res.stderr.strip()[:200]!r}): U-Boot "
                "boots with its built-in default environment"
            )
            return problems
        env = parse_fw_printenv(res.stdout)
        if "bootargs" not in env:
            problems.append(
                "the U-Boot environment has no bootargs: the board builds its kernel command line in "
                "bootcmd (or a boot script), so rt-tune cannot add arguments through the environment"
            )
        setters = sorted(
            n
            for n, v in env.items()
            if n != "altbootcmd" and re.search(r"\b(setenv|env\s+set)\s+bootargs\b", v)
        )
        if setters:
            problems.append(
                f"{', '.join(setters)} set bootargs at boot: a stored bootargs would be overwritten"
            )
        if "bootcount" not in env and "bootlimit" not in env:
            problems.append(
                "U-Boot must be built with CONFIG_BOOTCOUNT_LIMIT (no bootcount or bootlimit variable "
                "shows it is): without it altbootcmd never runs and a failed trial would not fall back"
            )
        if env.get("upgrade_available") == "1" and f"{PREFIX}bootargs" not in env:
            problems.append("upgrade_available=1: another update's boot counting is armed")
        if f"{PREFIX}bootargs" in env:
            problems.append(
                "a previous rt-tune trial is still staged (rt_tune_prev_* variables): discard it first"
            )
        if "bootargs" in env and (p := panic_problem(env["bootargs"])) is not None:
            problems.append(p)
        return problems

    # ---- changing ------------------------------------------------------------------------------------
    def stage_trial(self, t: Transport, target: BootTarget) -> None:
        cmdline.validate(target.add)
        if target.kernel:
            raise BootError(
                f"{t.label}: u-boot: bootcmd loads the kernel, rt-tune can only change bootargs; a "
                "trial of another kernel is not possible through the environment"
            )
        env = self.env(t)
        if f"{PREFIX}bootargs" in env:
            raise BootError(
                f"{t.label}: a previous trial is still staged (rt_tune_prev_bootargs); discard it first"
            )
        if "bootargs" not in env:
            raise BootError(
                f"{t.label}: the U-Boot environment has no bootargs: the board builds its kernel "
                "command line in bootcmd (or a boot script)"
            )
        changes: dict[str, str | None] = {f"{PREFIX}{n}": env[n] for n in MANAGED if n in env}
        changes.update(
            {
                "bootargs": cmdline.merged(env["bootargs"], target.add),
                "altbootcmd": ALTBOOTCMD,
                "bootlimit": "1",
                "bootcount": "0",
                "upgrade_available": "1",
            }
        )
        self.setenv(t, changes)

    def commit(self, t: Transport, target: BootTarget) -> None:
        if target.kernel:
            raise BootError(
                f"{t.label}: u-boot: rt-tune cannot commit another kernel through the environment"
            )
        env = self.env(t)
        base = env.get(f"{PREFIX}bootargs", env.get("bootargs"))
        if base is None:
            raise BootError(f"{t.label}: the U-Boot environment has no bootargs")
        changes: dict[str, str | None] = {"bootargs": cmdline.merged(base, target.add)}
        if f"{PREFIX}bootargs" in env:  # a trial is staged: disarm it, keep its bootargs
            for name in ("altbootcmd", "bootlimit"):
                changes[name] = env.get(f"{PREFIX}{name}")
            changes.update({"upgrade_available": "0", "bootcount": "0"})
            changes.update({n: None for n in env if n.startswith(PREFIX)})
        self.setenv(t, {n: v for n, v in changes.items() if env.get(n) != v})

    def discard(self, t: Transport) -> None:
        env = self.env(t)
        if f"{PREFIX}bootargs" not in env:
            return
        changes: dict[str, str | None] = {n: env.get(f"{PREFIX}{n}") for n in MANAGED}
        changes.update({n: None for n in env if n.startswith(PREFIX)})
        self.setenv(t, {n: v for n, v in changes.items() if env.get(n) != v})

    def committed(self, t: Transport, target: BootTarget) -> list[str]:
        problems = super().committed(t, target)
        env = self.env(t)
        if any(n.startswith(PREFIX) for n in env):
            problems.append("rt_tune_prev_* variables are still in the environment (trial not disarmed)")
        if env.get("upgrade_available") == "1":
            problems.append("upgrade_available=1: boot counting is still armed")
        return problems
