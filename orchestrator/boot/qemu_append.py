"""Guests whose kernel command line is set by their host: QEMU's `-append` in a systemd service, or a libvirt
domain's `<os><cmdline>`. The transport is the HOST's; "reboot" restarts the guest's QEMU.

QemuAppendBackend (kind "qemu-append"): the effective ExecStart comes from `systemctl cat SERVICE` (the unit
and its drop-ins in the order systemd applies them). The trial is a runtime drop-in,
/run/systemd/system/SERVICE.d/50-rt-tune-trial.conf, that resets ExecStart and sets it again with only the
`-append` argument changed (every other byte of the command line is kept), then `systemctl daemon-reload`;
reboot() is `systemctl restart SERVICE`. A host reboot empties /run, so the guest comes back with its old
arguments. commit writes the same override to /etc/systemd/system/SERVICE.d/50-rt-tune-cmdline.conf and
removes the runtime one (no restart: the running QEMU already has the arguments).

LibvirtBackend (kind "libvirt"): the trial is transient. stage_trial keeps the domain's persistent definition
and writes an edited copy of it (only `<os><cmdline>` changed) to /run/rt-tune/; reboot() shuts the domain
down and starts it with `virsh create` of that copy, which for a defined domain runs the copy as its live
configuration while the persistent definition stays as it was. Destroying the domain or rebooting the host
therefore comes back with the old arguments. commit defines the persistent definition with the arguments
added.

Neither is `self_fallback`: a reset *inside* the guest (panic=N, a watchdog) reboots the same QEMU process,
with the same arguments. The way back is always through the host, which the trial cannot break: discard and
restart the guest (or reboot the host).
"""

from __future__ import annotations

import posixpath
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import ClassVar
from xml.sax.saxutils import escape

from orchestrator.boot import cmdline
from orchestrator.boot.common import (
    command_exists,
    kernel_version_of,
    panic_problem,
    path_exists,
    remove_file,
    swap_version,
)
from orchestrator.boot.loader import (
    BootError,
    Bootloader,
    BootTarget,
    State,
    restore_files,
    snapshot_files,
)
from orchestrator.core.errors import InputError, ParseError
from orchestrator.remote.transport import Transport

_SERVICE = re.compile(r"^[A-Za-z0-9:_.@\\-]+$")
TRIAL_DROPIN = "50-rt-tune-trial.conf"
COMMIT_DROPIN = "50-rt-tune-cmdline.conf"


# --------------------------------------------------------------------------------------------------------
# `systemctl cat` and unit-file syntax


@dataclass(frozen=True)
class Word:
    start: int
    end: int
    value: str


def parse_systemctl_cat(text: str) -> list[tuple[str, str]]:
    """(path, content) of each file `systemctl cat` printed: a `# /path` header line (first, or after an empty
    line) starts a file. Comment lines inside a file that look like paths are not taken as headers unless
    they follow an empty line and name a unit file or drop-in."""
    sections: list[tuple[str, list[str]]] = []
    prev_blank = True
    for line in text.split("\n"):
        m = re.fullmatch(r"# (/\S+)", line)
        if m and prev_blank and (m.group(1).endswith((".conf", ".service")) or ".service" in m.group(1)):
            sections.append((m.group(1), []))
        elif sections:
            sections[-1][1].append(line)
        elif line.strip():
            raise ParseError(
                f"unexpected `systemctl cat` output before the first file header: {line[:200]!r}"
            )
        prev_blank = not line.strip()
    if not sections:
        raise ParseError(f"`systemctl cat` printed no unit file: {text[:200]!r}")
    out = []
    for path, lines in sections:
        body = "\n".join(lines)
        # systemctl separates files with one empty line
        out.append((path, body[:-1] if body.endswith("\n\n") else body))
    return out


def unit_assignments(content: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of a unit file, in order: continuation lines (trailing backslash) joined the way
    systemd joins them (the backslash becomes a space), comment lines inside a continuation skipped."""
    out = []
    section = ""
    pending: str | None = None
    for raw in content.split("\n"):
        line = raw.rstrip("\r")
        if pending is not None:
            if line.lstrip().startswith(("#", ";")):
                continue
            line = pending + line
            pending = None
        elif not line.strip() or line.lstrip().startswith(("#", ";")):
            continue
        if line.endswith("\\") and not line.endswith("\\\\"):
            pending = line[:-1] + " "
            continue
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped[1:-1]
            continue
        key, sep, value = stripped.partition("=")
        if sep:
            out.append((section, key.strip(), value.strip()))
    if pending is not None:
        key, sep, value = pending.strip().partition("=")
        if sep:
            out.append((section, key.strip(), value.strip()))
    return out


def split_words(line: str) -> list[Word]:
    """Words of a systemd command line with their spans: whitespace separates, '...' and "..." group, a
    backslash escapes the next character (C escapes \\n \\t are decoded)."""
    words = []
    i, n = 0, len(line)
    escapes = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", " ": " "}
    while i < n:
        while i < n and line[i] in " \t":
            i += 1
        if i >= n:
            break
        start, value, quote = i, [], None
        while i < n:
            c = line[i]
            if c == "\\" and i + 1 < n:
                value.append(escapes.get(line[i + 1], line[i + 1]))
                i += 2
                continue
            if quote:
                if c == quote:
                    quote = None
                else:
                    value.append(c)
            elif c in "\"'":
                quote = c
            elif c in " \t":
                break
            else:
                value.append(c)
            i += 1
        if quote:
            raise ParseError(f"unbalanced {quote} in ExecStart: {line[:200]!r}")
        words.append(Word(start, i, "".join(value)))
    return words


def append_word(words: list[Word]) -> tuple[Word, Word] | None:
    """(the -append option word, its value word), or None; several -append options are refused."""
    hits = [i for i, w in enumerate(words) if w.value in ("-append", "--append")]
    if not hits:
        return None
    if len(hits) > 1 or hits[0] + 1 >= len(words):
        raise BootError("the QEMU command line has several -append options, or one without a value")
    return words[hits[0]], words[hits[0] + 1]


def effective_exec_start(sections: list[tuple[str, str]], *, skip: tuple[str, ...] = ()) -> str:
    """The one ExecStart in effect after applying the files in order (`ExecStart=` resets), skipping files
    whose path ends with one of `skip`."""
    commands: list[str] = []
    for path, content in sections:
        if skip and path.endswith(skip):
            continue
        for section, key, value in unit_assignments(content):
            if section == "Service" and key == "ExecStart":
                commands = [] if not value else [*commands, value]
    if len(commands) != 1:
        raise BootError(f"expected exactly one ExecStart in the unit, found {len(commands)}")
    return commands[0]


def append_value(command: str) -> str:
    """The kernel command line of a QEMU ExecStart (`%%` read as `%`); refuses `$` and other `%` specifiers,
    whose values rt-tune cannot know."""
    words = split_words(command)
    hit = append_word(words)
    if hit is None:
        raise BootError(
            "the QEMU command line has no -append: the guest boots through its own bootloader "
            "(use that bootloader's backend on the guest)"
        )
    raw = command[hit[1].start : hit[1].end]
    if "$" in raw or re.search(r"%[^%]", raw.replace("%%", "")):
        raise BootError(f"-append {raw} uses $ or % expansions: rt-tune cannot tell the kernel command line")
    return hit[1].value.replace("%%", "%")


def with_append(command: str, new_args: str, old_args: str) -> str:
    """`command` with only the -append value changed to `new_args`, which must be `old_args` plus tokens."""
    if not new_args.startswith(old_args):
        raise BootError("internal: the new arguments do not extend the old ones")
    extra = new_args[len(old_args) :].replace("%", "%%")
    if not extra:
        return command
    words = split_words(command)
    hit = append_word(words)
    assert hit is not None
    value = hit[1]
    raw = command[value.start : value.end]
    if (
        len(raw) >= 2
        and raw[0] == raw[-1]
        and raw[0] in "\"'"
        and raw[0] not in raw[1:-1]
        and "\\" not in raw
    ):
        new_raw = raw[:-1] + extra + raw[-1]  # "a b" -> "a b c"
    elif not any(c in raw for c in "\"'\\"):
        new_raw = f'"{raw}{extra}"'  # a -> "a c"
    else:
        new_raw = f'{raw}"{extra}"'  # mixed quoting: an adjacent quoted part joins the same word
    out = command[: value.start] + new_raw + command[value.end :]
    if append_value(out) != new_args:
        raise BootError(f"internal: rewriting -append gave {append_value(out)!r}, not {new_args!r}")
    return out


# --------------------------------------------------------------------------------------------------------
# QEMU in a systemd service


class QemuAppendBackend(Bootloader):
    kind: ClassVar[str] = "qemu-append"
    self_fallback: ClassVar[bool] = False

    def __init__(
        self,
        service: str,
        *,
        runtime_dir: str = "/run/systemd/system",
        persistent_dir: str = "/etc/systemd/system",
        systemctl: tuple[str, ...] = ("systemctl",),
    ):
        if not _SERVICE.fullmatch(service):
            raise InputError(f"invalid systemd service name {service!r}")
        self.service = service if "." in service else f"{service}.service"
        self.runtime_dir, self.persistent_dir, self.systemctl = runtime_dir, persistent_dir, tuple(systemctl)

    @property
    def trial_path(self) -> str:
        return f"{self.runtime_dir}/{self.service}.d/{TRIAL_DROPIN}"

    @property
    def commit_path(self) -> str:
        return f"{self.persistent_dir}/{self.service}.d/{COMMIT_DROPIN}"

    def _trial_suffix(self) -> str:
        return f"/{self.service}.d/{TRIAL_DROPIN}"

    # ---- reading -------------------------------------------------------------------------------------
    def sections(self, t: Transport) -> list[tuple[str, str]]:
        return parse_systemctl_cat(
            t.run([*self.systemctl, "cat", "--no-pager", self.service], timeout_s=60).stdout
        )

    def command(self, t: Transport, *, with_trial: bool = False) -> str:
        skip = () if with_trial else (self._trial_suffix(),)
        return effective_exec_start(self.sections(t), skip=skip)

    def default_args(self, t: Transport) -> str:
        return append_value(self.command(t))

    def dropin(self, command: str, *, trial: bool) -> bytes:
        if trial:
            head = (
                f"# rt-tune: trial kernel arguments for the guest of {self.service} (runtime only: a host "
                "reboot drops it).\n"
            )
        else:
            head = (
                f"# rt-tune: kernel arguments rt-tune added to the guest of {self.service}. This copy of "
                "ExecStart overrides the unit's:\n# after changing the unit's ExecStart, delete this file "
                "and let rt-tune commit again.\n"
            )
        return f"{head}[Service]\nExecStart=\nExecStart={command}\n".encode()

    def _reload(self, t: Transport) -> None:
        t.run([*self.systemctl, "daemon-reload"], timeout_s=120)

    # ---- state ---------------------------------------------------------------------------------------
    def snapshot(self, t: Transport) -> State:
        return {"files": snapshot_files(t, [self.trial_path, self.commit_path])}

    def restore(self, t: Transport, snap: State) -> None:
        for path, content in snap["files"].items():
            if content is None:
                remove_file(t, path)
            else:
                t.run(["mkdir", "-p", "--", posixpath.dirname(path)], timeout_s=30)
        restore_files(t, {p: c for p, c in snap["files"].items() if c is not None})
        self._reload(t)

    # ---- checks --------------------------------------------------------------------------------------
    def preflight(self, t: Transport) -> list[str]:
        res = t.run([*self.systemctl, "cat", "--no-pager", self.service], timeout_s=60, check=False)
        if not res.ok:
            return [f"`systemctl cat {self.service}` failed: {(res.stderr or res.stdout).strip()[:200]}"]
        problems = []
        try:
            command = effective_exec_start(parse_systemctl_cat(res.stdout), skip=(self._trial_suffix(),))
            args = append_value(command)
        except (BootError, ParseError) as exc:
            return [f"{self.service}: {exc}"]
        if not any(w.value in ("-kernel", "--kernel") for w in split_words(command)):
            problems.append(f"{self.service}: QEMU has -append but no -kernel: the arguments are not used")
        if (p := panic_problem(args)) is not None:
            problems.append(p)
        return problems

    # ---- changing ------------------------------------------------------------------------------------
    def _write(self, t: Transport, path: str, data: bytes) -> None:
        t.run(["mkdir", "-p", "--", posixpath.dirname(path)], timeout_s=30)
        t.write_file(path, data, mode=0o644)

    def stage_trial(self, t: Transport, target: BootTarget) -> None:
        cmdline.validate(target.add)
        if target.kernel:
            raise BootError(
                f"{t.label}: qemu-append: a trial of another guest kernel needs another -kernel path; "
                "rt-tune only changes -append"
            )
        command = self.command(t)
        old = append_value(command)
        new = cmdline.merged(old, target.add)
        self._write(t, self.trial_path, self.dropin(with_append(command, new, old), trial=True))
        self._reload(t)
        got = append_value(self.command(t, with_trial=True))
        if got != new:
            remove_file(t, self.trial_path)
            self._reload(t)
            raise BootError(
                f"{t.label}: after the trial drop-in {self.service} would run with -append {got!r}, not "
                f"{new!r} (another drop-in sorting after {TRIAL_DROPIN} sets ExecStart?)"
            )

    def reboot(self, t: Transport, verb: str = "reboot") -> None:
        t.run([*self.systemctl, "restart", self.service], timeout_s=180)

    def commit(self, t: Transport, target: BootTarget) -> None:
        if target.kernel:
            raise BootError(f"{t.label}: qemu-append: rt-tune cannot commit another guest kernel")
        command = self.command(t)
        old = append_value(command)
        new = cmdline.merged(old, target.add)
        if new != old:
            self._write(t, self.commit_path, self.dropin(with_append(command, new, old), trial=False))
        remove_file(t, self.trial_path)
        self._reload(t)
        got = append_value(self.command(t, with_trial=True))
        if got != new:
            raise BootError(
                f"{t.label}: after commit {self.service} would run with -append {got!r}, not {new!r}"
            )

    def discard(self, t: Transport) -> None:
        remove_file(t, self.trial_path)
        self._reload(t)

    def committed(self, t: Transport, target: BootTarget) -> list[str]:
        problems = super().committed(t, target)
        if path_exists(t, self.trial_path):
            problems.append(f"the trial drop-in {self.trial_path} is still there")
        return problems


# --------------------------------------------------------------------------------------------------------
# libvirt


def os_element(xml: str) -> ET.Element:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ParseError(f"cannot parse the domain XML: {exc}") from None
    os_el = root.find("os")
    if root.tag != "domain" or os_el is None:
        raise ParseError("expected a libvirt <domain> with an <os> element")
    return os_el


def domain_cmdline(xml: str) -> str | None:
    el = os_element(xml).find("cmdline")
    return None if el is None else (el.text or "")


def domain_kernel(xml: str) -> tuple[str | None, str | None]:
    os_el = os_element(xml)
    kernel, initrd = os_el.find("kernel"), os_el.find("initrd")
    return (kernel.text if kernel is not None else None), (initrd.text if initrd is not None else None)


def _canonical(xml: str, *, drop: tuple[str, ...]) -> bytes:
    root = ET.fromstring(xml)
    os_el = root.find("os")
    assert os_el is not None
    for tag in drop:
        for el in os_el.findall(tag):
            os_el.remove(el)
    return ET.canonicalize(ET.tostring(root, encoding="unicode"), strip_text=True).encode()


def edit_domain_os(
    xml: str, *, cmdline_text: str | None = None, kernel: str | None = None, initrd: str | None = None
) -> str:
    """`xml` with `<os><cmdline>` (and optionally `<kernel>`/`<initrd>`) text replaced by splicing the raw
    text, so every other byte stays; checked by comparing both documents with those texts blanked."""
    out = xml
    for tag, value in (("cmdline", cmdline_text), ("kernel", kernel), ("initrd", initrd)):
        if value is None:
            continue
        hits = list(re.finditer(rf"<{tag}>(.*?)</{tag}>|<{tag}/>", out, flags=re.DOTALL))
        if len(hits) > 1:
            raise BootError(f"the domain XML has {len(hits)} <{tag}> elements")
        if hits:
            m = hits[0]
            out = out[: m.start()] + f"<{tag}>{escape(value)}</{tag}>" + out[m.end() :]
        elif tag == "cmdline":
            anchor = list(
                re.finditer(r"([ \t]*)<(initrd|kernel)>.*?</(initrd|kernel)>", out, flags=re.DOTALL)
            )
            if not anchor:
                raise BootError(
                    "the domain has no <kernel>: it boots through its own firmware and bootloader"
                )
            m = anchor[-1]
            out = out[: m.end()] + f"\n{m.group(1)}<cmdline>{escape(value)}</cmdline>" + out[m.end() :]
        else:
            raise BootError(f"the domain XML has no <{tag}>")
    if _canonical(out, drop=("cmdline", "kernel", "initrd")) != _canonical(
        xml, drop=("cmdline", "kernel", "initrd")
    ):
        raise BootError("internal: editing <os> changed more than the kernel, initrd and cmdline")
    if cmdline_text is not None and domain_cmdline(out) != cmdline_text:
        raise BootError("internal: the edited domain XML does not hold the new cmdline")
    return out


class LibvirtBackend(Bootloader):
    kind: ClassVar[str] = "libvirt"
    self_fallback: ClassVar[bool] = False

    def __init__(
        self,
        domain: str,
        *,
        connect: str | None = None,
        virsh: str = "virsh",
        trial_dir: str = "/run/rt-tune",
        shutdown_timeout_s: float = 120.0,
        poll_s: float = 2.0,
    ):
        if not domain or any(c.isspace() or c in "/\0" for c in domain):
            raise InputError(f"invalid libvirt domain name {domain!r}")
        self.domain, self.connect, self.virsh, self.trial_dir = domain, connect, virsh, trial_dir
        self.shutdown_timeout_s, self.poll_s = shutdown_timeout_s, poll_s

    @property
    def trial_path(self) -> str:
        return f"{self.trial_dir}/libvirt-{self.domain}-trial.xml"

    def _virsh(self, *args: str) -> list[str]:
        return [self.virsh, *(["-c", self.connect] if self.connect else []), *args]

    # ---- reading -------------------------------------------------------------------------------------
    def xml(self, t: Transport) -> str:
        """The persistent definition (what the next `virsh start` boots), secrets included so it can be
        defined back unchanged."""
        return t.run(
            self._virsh("dumpxml", "--inactive", "--security-info", self.domain), timeout_s=60
        ).stdout

    def default_args(self, t: Transport) -> str:
        return domain_cmdline(self.xml(t)) or ""

    def state(self, t: Transport) -> str:
        return t.run(self._virsh("domstate", self.domain), timeout_s=30).stdout.strip()

    def _define(self, t: Transport, xml: str) -> None:
        path = f"{self.trial_dir}/libvirt-{self.domain}-define.xml"
        t.run(["mkdir", "-p", "--", self.trial_dir], timeout_s=30)
        t.write_file(path, xml.encode(), mode=0o600)
        try:
            t.run(self._virsh("define", path), timeout_s=60)
        finally:
            t.run(["rm", "-f", "--", path], timeout_s=30)

    # ---- state ---------------------------------------------------------------------------------------
    def snapshot(self, t: Transport) -> State:
        return {"xml": self.xml(t), "files": snapshot_files(t, [self.trial_path])}

    def restore(self, t: Transport, snap: State) -> None:
        if self.xml(t) != snap["xml"]:
            self._define(t, snap["xml"])
        restore_files(t, snap["files"])
        if self.xml(t) != snap["xml"]:
            raise BootError(
                f"{t.label}: the definition of {self.domain} differs from the snapshot after restore"
            )

    # ---- checks --------------------------------------------------------------------------------------
    def preflight(self, t: Transport) -> list[str]:
        if not command_exists(t, self.virsh):
            return ["virsh not found (package libvirt-clients)"]
        res = t.run(
            self._virsh("dumpxml", "--inactive", "--security-info", self.domain), timeout_s=60, check=False
        )
        if not res.ok:
            return [f"`virsh dumpxml {self.domain}` failed: {res.stderr.strip()[:200]}"]
        problems = []
        info = t.run(self._virsh("dominfo", self.domain), timeout_s=30, check=False)
        if info.ok and re.search(r"^Persistent:\s+no\s*$", info.stdout, flags=re.MULTILINE):
            problems.append(f"{self.domain} is a transient domain: it has no definition to fall back to")
        kernel, _ = domain_kernel(res.stdout)
        if kernel is None:
            problems.append(
                f"{self.domain} has no <os><kernel>: it boots through its own firmware and bootloader "
                "(use that bootloader's backend on the guest)"
            )
        elif (p := panic_problem(domain_cmdline(res.stdout) or "")) is not None:
            problems.append(p)
        return problems

    # ---- changing ------------------------------------------------------------------------------------
    def stage_trial(self, t: Transport, target: BootTarget) -> None:
        cmdline.validate(target.add)
        xml = self.xml(t)
        kernel, initrd = domain_kernel(xml)
        if kernel is None:
            raise BootError(
                f"{t.label}: {self.domain} has no <os><kernel>: its cmdline is not libvirt's to set"
            )
        old = domain_cmdline(xml) or ""
        new_kernel = new_initrd = None
        if target.kernel:
            version = kernel_version_of(kernel)
            if version is None:
                raise BootError(f"{t.label}: cannot tell the release of {kernel} to swap in {target.kernel}")
            new_kernel, *rest = swap_version([kernel] + ([initrd] if initrd else []), version, target.kernel)
            new_initrd = rest[0] if rest else None
            for path in [new_kernel, *rest]:
                if not path_exists(t, path, "-f"):
                    raise BootError(f"{t.label}: {path} does not exist on the host")
        trial = edit_domain_os(
            xml, cmdline_text=cmdline.merged(old, target.add), kernel=new_kernel, initrd=new_initrd
        )
        t.run(["mkdir", "-p", "--", self.trial_dir], timeout_s=30)
        t.write_file(self.trial_path, trial.encode(), mode=0o600)

    def _stop(self, t: Transport) -> None:
        if self.state(t) == "shut off":
            return
        t.run(self._virsh("shutdown", self.domain), timeout_s=60, check=False)
        deadline = time.monotonic() + self.shutdown_timeout_s
        while time.monotonic() < deadline:
            if self.state(t) == "shut off":
                return
            time.sleep(self.poll_s)
        t.run(self._virsh("destroy", self.domain), timeout_s=60)

    def reboot(self, t: Transport, verb: str = "reboot") -> None:
        """Shut the guest down (destroy it after `shutdown_timeout_s`), then start the armed trial
        transiently, or the persistent definition when nothing is armed."""
        self._stop(t)
        if not path_exists(t, self.trial_path, "-f"):
            t.run(self._virsh("start", self.domain), timeout_s=120)
            return
        res = t.run(self._virsh("create", self.trial_path), timeout_s=120, check=False)
        if not res.ok:
            t.run(self._virsh("start", self.domain), timeout_s=120)
            raise BootError(
                f"{t.label}: `virsh create` of the trial failed ({res.stderr.strip()[:200]}); "
                f"{self.domain} was started with its old definition"
            )

    def commit(self, t: Transport, target: BootTarget) -> None:
        xml = self.xml(t)
        kernel, initrd = domain_kernel(xml)
        new_kernel = new_initrd = None
        if target.kernel and kernel and kernel_version_of(kernel) != target.kernel:
            version = kernel_version_of(kernel)
            assert version is not None
            new_kernel, *rest = swap_version([kernel] + ([initrd] if initrd else []), version, target.kernel)
            new_initrd = rest[0] if rest else None
        old = domain_cmdline(xml) or ""
        new = cmdline.merged(old, target.add)
        if new != old or new_kernel:
            self._define(t, edit_domain_os(xml, cmdline_text=new, kernel=new_kernel, initrd=new_initrd))
        t.run(["rm", "-f", "--", self.trial_path], timeout_s=30)

    def discard(self, t: Transport) -> None:
        t.run(["rm", "-f", "--", self.trial_path], timeout_s=30)

    def committed(self, t: Transport, target: BootTarget) -> list[str]:
        problems = super().committed(t, target)
        if path_exists(t, self.trial_path):
            problems.append(f"the trial definition {self.trial_path} is still there")
        return problems
