"""Facts: read-only probes of a unit. Each fact is a command plus a pure parser tested on recorded output."""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
import re
import secrets
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel

from orchestrator.core.cpulist import parse_kernel_cpulist as parse_cpu_list  # for kernel output
from orchestrator.core.errors import ParseError
from orchestrator.core.names import UNIT_TYPES, check_sysctl_name, check_unit_name
from orchestrator.remote.transport import Transport

T = TypeVar("T")


@dataclass(frozen=True)
class Fact(Generic[T]):
    name: str
    argv: tuple[str, ...]
    parse: Callable[[str], T]
    sudo: bool = False

    def gather(self, transport: Transport, timeout_s: float = 30.0) -> T:
        result = transport.run(self.argv, timeout_s=timeout_s, sudo=self.sudo)
        try:
            return self.parse(result.stdout)
        except ParseError as exc:
            raise ParseError(f"{transport.label}: fact {self.name}: {exc}") from exc


def _single_line(what: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) != 1:
            raise ParseError(f"expected one line of {what}, got {len(lines)}: {text[:200]!r}")
        return lines[0].strip()

    return parse


def parse_boot_id(text: str) -> str:
    value = _single_line("boot_id")(text)
    if len(value) != 36 or value.count("-") != 4:
        raise ParseError(f"not a boot_id: {value!r}")
    return value


KERNEL_RELEASE = Fact("kernel_release", ("uname", "-r"), _single_line("kernel release"))
ARCH = Fact("arch", ("uname", "-m"), _single_line("machine architecture"))
CPUS_ONLINE = Fact("cpus_online", ("cat", "/sys/devices/system/cpu/online"), parse_cpu_list)
CMDLINE = Fact("cmdline", ("cat", "/proc/cmdline"), _single_line("/proc/cmdline"))
BOOT_ID = Fact("boot_id", ("cat", "/proc/sys/kernel/random/boot_id"), parse_boot_id)
HOSTNAME = Fact("hostname", ("hostname",), _single_line("hostname"))


class BasicFacts(BaseModel):
    """What `tune apply` shows first for each machine: enough to know which kernel and boot you are looking at."""

    target: str
    hostname: str
    kernel_release: str
    arch: str
    cpus_online: list[int]
    cmdline: str
    boot_id: str


# Several facts in one round trip. Each fact's argv travels as one argument joined by the unit separator
# (\x1f); the script splits it with IFS (globbing off), so nothing is re-quoted here: the transport quotes the
# arguments, as for every command. Each fact's record starts with a random marker line (name and exit status);
# its exact stdout follows, up to the next marker. One fork per fact (its command substitution), no pipes: on a
# small unit every fork in a round trip counts.
_SEP = "\x1f"
_GATHER = ('set -f; m=$1; shift; IFS=$(printf "\\037"); for spec in "$@"; do name=${spec%%"$IFS"*}; '
           'cmd=${spec#*"$IFS"}; o=$($cmd 2>/dev/null; rc=$?; echo x; exit $rc); rc=$?; '
           'printf "%s %s %s\\n%s" "$m" "$name" "$rc" "${o%x}"; done')


def gather_facts(transport: Transport, facts: Sequence[Fact], timeout_s: float = 30.0) -> dict[str, Any]:
    """Gather facts with one command per sudo setting (one round trip), each parsed by its own parser."""
    values: dict[str, Any] = {}
    for sudo in sorted({f.sudo for f in facts}):
        group = [f for f in facts if f.sudo == sudo]
        for f in group:
            if any(_SEP in a or not a for a in (f.name, *f.argv)) or " " in f.name:
                raise ValueError(f"fact {f.name!r} cannot be gathered in a batch (separator or empty argument)")
        marker = "@@rt-tune-fact-" + secrets.token_hex(8)
        specs = [_SEP.join((f.name, *f.argv)) for f in group]
        out = transport.run(["sh", "-c", _GATHER, "-", marker, *specs], timeout_s=timeout_s, sudo=sudo).stdout
        records = out.split(marker + " ")
        if records[0] != "" or len(records) != len(group) + 1:
            raise ParseError(f"{transport.label}: unexpected answer gathering {len(group)} facts: {out[:200]!r}")
        for f, record in zip(group, records[1:], strict=False):
            head, _, text = record.partition("\n")
            name, _, rc = head.partition(" ")
            if name != f.name or not rc.isdigit():
                raise ParseError(f"{transport.label}: fact {f.name}: unexpected answer {head[:100]!r}")
            if rc != "0":
                raise ParseError(f"{transport.label}: fact {f.name}: `{' '.join(f.argv)}` exited with status {rc}")
            try:
                values[f.name] = f.parse(text)
            except ParseError as exc:
                raise ParseError(f"{transport.label}: fact {f.name}: {exc}") from exc
    return values


def gather_basic(transport: Transport, target: str) -> BasicFacts:
    facts = gather_facts(transport, (HOSTNAME, KERNEL_RELEASE, ARCH, CPUS_ONLINE, CMDLINE, BOOT_ID))
    return BasicFacts(target=target, **facts)


def _one_line_raw(what: str, text: str) -> str:
    """The single line of `text` (possibly empty), which must end with exactly one newline."""
    if not text.endswith("\n") or text.count("\n") != 1:
        raise ParseError(f"expected exactly one newline-terminated line of {what}, got {text[:200]!r}")
    return text[:-1]


def _parse_cpu_count(text: str) -> int:
    cpus = parse_cpu_list(_one_line_raw("/sys/devices/system/cpu/online", text))
    if not cpus:
        raise ParseError(f"expected at least one online CPU, got {text[:200]!r}")
    return len(cpus)


def _cpu_list_file(what: str) -> Callable[[str], list[int]]:
    def parse(text: str) -> list[int]:
        return parse_cpu_list(_one_line_raw(what, text))

    return parse


#: Number of online CPUs (len of /sys/devices/system/cpu/online).
CPU_COUNT = Fact("cpu_count", ("cat", "/sys/devices/system/cpu/online"), _parse_cpu_count)
CPUS_POSSIBLE = Fact(
    "cpus_possible", ("cat", "/sys/devices/system/cpu/possible"), _cpu_list_file("possible CPUs")
)
CPUS_PRESENT = Fact(
    "cpus_present", ("cat", "/sys/devices/system/cpu/present"), _cpu_list_file("present CPUs")
)


# --------------------------------------------------------------------------------------------------------
# sysctl

def sysctl_path(name: str) -> str:
    """/proc/sys path of a dotted sysctl name; refuses anything but [a-z0-9_-] words (no '..', no '/')."""
    return "/proc/sys/" + check_sysctl_name(name).replace(".", "/")


def sysctl_fact(name: str) -> Fact[str]:
    """The current value of one sysctl, as the kernel prints it minus the final newline ('1', '4\\t4\\t1\\t7').

    Only single-line sysctls are accepted; a missing sysctl makes `cat` fail (CommandFailed)."""
    path = sysctl_path(name)

    def parse(text: str) -> str:
        return _one_line_raw(f"sysctl {name} ({path})", text)

    return Fact(f"sysctl:{name}", ("cat", path), parse)


class SysctlFile(BaseModel):
    """One sysctl.d configuration file, as systemd-sysctl reads it (see sysctl.d(5))."""

    path: str
    content: str
    #: key (dotted form) -> value, the last assignment in the file winning.
    settings: dict[str, str]
    #: keys written with a leading '-' (systemd-sysctl ignores failures to set them).
    ignore_failure: list[str]
    #: 1-based numbers of lines that are neither blank, comments nor `key = value` (systemd-sysctl skips them).
    invalid_lines: list[int]


#: Directories systemd-sysctl reads, highest precedence first (a file name in an earlier one masks later ones).
SYSCTL_DIRS = ("/etc/sysctl.d", "/run/sysctl.d", "/usr/local/lib/sysctl.d", "/usr/lib/sysctl.d")
# Debian's /etc/sysctl.conf is read through the /etc/sysctl.d/99-sysctl.conf symlink, so it is not listed apart.
_SYSCTL_FILES_SCRIPT = (
    "for f in "
    + " ".join(f"{d}/*.conf" for d in SYSCTL_DIRS)
    + '; do [ -f "$f" ] || continue; '
    + 'if c=$(base64 -w0 -- "$f"); then printf \'file %s\\n%s\\n\' "$f" "$c"; '
    + "else printf 'unreadable %s\\n' \"$f\"; fi; done; echo end"
)


def normalize_sysctl_key(key: str) -> str:
    """sysctl.d(5): if the first separator is '/', dots and slashes are swapped; give the dotted form."""
    for ch in key:
        if ch == "/":
            return key.translate(str.maketrans("/.", "./"))
        if ch == ".":
            break
    return key


def parse_sysctl_conf(path: str, content: str) -> SysctlFile:
    settings: dict[str, str] = {}
    ignore: list[str] = []
    invalid: list[int] = []
    for lineno, raw in enumerate(content.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key:
            invalid.append(lineno)
            continue
        if key.startswith("-"):
            key = key[1:].strip()
            ignore.append(normalize_sysctl_key(key))
        settings[normalize_sysctl_key(key)] = value.strip()
    return SysctlFile(
        path=path, content=content, settings=settings, ignore_failure=ignore, invalid_lines=invalid
    )


def parse_sysctl_files(text: str) -> list[SysctlFile]:
    """Output of _SYSCTL_FILES_SCRIPT: pairs of lines `file PATH` / base64 of the content, then `end`."""
    lines = text.split("\n")
    if lines[-2:] != ["end", ""]:
        raise ParseError(f"expected `file PATH` / base64 line pairs and a final `end`, got {text[-200:]!r}")
    lines = lines[:-2]
    files: list[SysctlFile] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("unreadable /"):
            raise ParseError(
                f"sysctl file {line[len('unreadable ') :]!r} could not be read (expected readable)"
            )
        if not line.startswith("file /") or i + 1 >= len(lines):
            raise ParseError(f"expected `file PATH` followed by a base64 line, got {line[:200]!r}")
        path, encoded = line[len("file ") :], lines[i + 1]
        try:
            content = base64.b64decode(encoded, validate=True).decode("utf-8", "replace")
        except (binascii.Error, ValueError):
            raise ParseError(f"expected base64 content of {path}, got {encoded[:200]!r}") from None
        files.append(parse_sysctl_conf(path, content))
        i += 2
    return files


def effective_sysctl_settings(files: list[SysctlFile]) -> dict[str, tuple[str, str]]:
    """key -> (value, path) after systemd-sysctl's rules: one file per name (the earliest SYSCTL_DIRS entry
    wins), files applied in name order, later assignments overriding earlier ones."""
    chosen: dict[str, SysctlFile] = {}
    rank = {d: i for i, d in enumerate(SYSCTL_DIRS)}
    for f in files:
        directory, _, base = f.path.rpartition("/")
        old = chosen.get(base)
        if old is None or rank.get(directory, 99) < rank.get(old.path.rpartition("/")[0], 99):
            chosen[base] = f
    result: dict[str, tuple[str, str]] = {}
    for base in sorted(chosen):
        for key, value in chosen[base].settings.items():
            result[key] = (value, chosen[base].path)
    return result


SYSCTL_FILES = Fact("sysctl_files", ("sh", "-c", _SYSCTL_FILES_SCRIPT), parse_sysctl_files)


# --------------------------------------------------------------------------------------------------------
# Isolated / nohz_full CPUs

ISOLATED_CPUS = Fact(
    "isolated_cpus", ("cat", "/sys/devices/system/cpu/isolated"), _cpu_list_file("isolated CPUs")
)

_NOHZ_FULL = "/sys/devices/system/cpu/nohz_full"
_ABSENT = "(absent)"


def parse_nohz_full(text: str) -> list[int]:
    """nohz_full CPUs; the file is absent without CONFIG_NO_HZ_FULL (the script then prints '(absent)')
    and reads '(null)' when nohz_full= was not given: both mean none."""
    line = _one_line_raw(_NOHZ_FULL, text)
    if line == _ABSENT:
        return []
    return parse_cpu_list(line)


NOHZ_FULL_CPUS = Fact(
    "nohz_full_cpus",
    ("sh", "-c", f'if [ -e {_NOHZ_FULL} ]; then cat {_NOHZ_FULL}; else echo "{_ABSENT}"; fi'),
    parse_nohz_full,
)


# --------------------------------------------------------------------------------------------------------
# systemd units

_UNIT_PROPS = (
    "Id",
    "LoadState",
    "UnitFileState",
    "ActiveState",
    "SubState",
    "NRestarts",
    "MainPID",
    "ExecMainStatus",
)


def validate_unit_name(unit: str) -> str:
    """`unit` when systemd would take it (orchestrator.core.names: any unit type, no template); else InvalidName, a
    ValueError."""
    return check_unit_name(unit, types=UNIT_TYPES)


class UnitState(BaseModel):
    """`systemctl show` of one unit. A unit that does not exist has load_state 'not-found'."""

    name: str
    load_state: str
    #: enabled / disabled / masked / static / ... as reported; "" when systemd has no unit file state (not-found).
    unit_file_state: str
    active_state: str
    sub_state: str
    #: Times systemd restarted the service (Restart=); None when systemd reports none (non-service units).
    n_restarts: int | None
    #: None when no main process runs (systemd reports 0).
    main_pid: int | None
    #: Exit status or signal number of the last main process.
    exec_main_status: int

    @property
    def exists(self) -> bool:
        return self.load_state != "not-found"


def _int_field(what: str, value: str) -> int:
    if not re.fullmatch(r"-?[0-9]+", value):
        raise ParseError(f"expected an integer for {what}, got {value!r}")
    return int(value)


def parse_unit_state(text: str) -> UnitState:
    """`systemctl show -p Id,LoadState,...` output: one `Key=Value` line per property, in systemd's order."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or key not in _UNIT_PROPS:
            raise ParseError(f"expected `Key=Value` lines for {', '.join(_UNIT_PROPS)}, got {line[:200]!r}")
        if key in values:
            raise ParseError(f"property {key} appears twice in systemctl show output")
        values[key] = value
    missing = [p for p in _UNIT_PROPS if p not in values]
    if missing:
        raise ParseError(
            f"expected properties {', '.join(missing)} in systemctl show output, got {text[:200]!r}"
        )
    for key in ("Id", "LoadState", "ActiveState", "SubState"):
        if not values[key]:
            raise ParseError(f"expected a non-empty {key} in systemctl show output")
    main_pid = _int_field("MainPID", values["MainPID"])
    return UnitState(
        name=values["Id"],
        load_state=values["LoadState"],
        unit_file_state=values["UnitFileState"],
        active_state=values["ActiveState"],
        sub_state=values["SubState"],
        n_restarts=_int_field("NRestarts", values["NRestarts"]) if values["NRestarts"] else None,
        main_pid=main_pid or None,
        exec_main_status=_int_field("ExecMainStatus", values["ExecMainStatus"]),
    )


def unit_state_fact(unit: str) -> Fact[UnitState]:
    validate_unit_name(unit)
    return Fact(
        f"unit_state:{unit}",
        ("systemctl", "show", "-p", ",".join(_UNIT_PROPS), "--no-pager", "--", unit),
        parse_unit_state,
    )


# --------------------------------------------------------------------------------------------------------
# Core dumps (systemd-coredump journal entries)

COREDUMP_MESSAGE_ID = "fc2e22bc6ee647b6b90729ab34a250b1"
_COREDUMP_FIELDS = (
    "COREDUMP_UNIT",
    "COREDUMP_PID",
    "COREDUMP_SIGNAL",
    "COREDUMP_SIGNAL_NAME",
    "COREDUMP_TIMESTAMP",
    "COREDUMP_EXE",
    "COREDUMP_COMM",
    "COREDUMP_FILENAME",
)


class Coredump(BaseModel):
    """One core dump recorded by systemd-coredump."""

    #: The system unit the crashed process belonged to (None outside a unit).
    unit: str | None
    pid: int
    signal: int
    signal_name: str | None
    #: When the process crashed (COREDUMP_TIMESTAMP), UTC.
    timestamp: datetime
    exe: str | None
    comm: str | None
    #: Where the core was stored (None when it was not kept).
    filename: str | None
    boot_id: str | None


def _journal_value(entry: dict[str, Any], key: str, *, required: bool) -> str | None:
    value = entry.get(key)
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(b, int) and 0 <= b < 256 for b in value):
        return bytes(value).decode("utf-8", "replace")  # journalctl's form for non-UTF-8 data
    if value is None and not required:
        return None
    raise ParseError(f"expected journal field {key} as a string, got {value!r}")


def parse_coredumps(text: str) -> list[Coredump]:
    """`journalctl -o json` output: one JSON object per line; sorted by crash time."""
    dumps: list[Coredump] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise ParseError(
                f"expected one JSON object per line from journalctl, got {line[:200]!r}"
            ) from None
        if not isinstance(entry, dict):
            raise ParseError(f"expected a JSON object per journal entry, got {line[:200]!r}")
        ts = _int_field(
            "COREDUMP_TIMESTAMP", _journal_value(entry, "COREDUMP_TIMESTAMP", required=True) or ""
        )
        dumps.append(
            Coredump(
                unit=_journal_value(entry, "COREDUMP_UNIT", required=False),
                pid=_int_field("COREDUMP_PID", _journal_value(entry, "COREDUMP_PID", required=True) or ""),
                signal=_int_field(
                    "COREDUMP_SIGNAL", _journal_value(entry, "COREDUMP_SIGNAL", required=True) or ""
                ),
                signal_name=_journal_value(entry, "COREDUMP_SIGNAL_NAME", required=False),
                timestamp=datetime.fromtimestamp(ts / 1_000_000, tz=UTC),
                exe=_journal_value(entry, "COREDUMP_EXE", required=False),
                comm=_journal_value(entry, "COREDUMP_COMM", required=False),
                filename=_journal_value(entry, "COREDUMP_FILENAME", required=False),
                boot_id=_journal_value(entry, "_BOOT_ID", required=False),
            )
        )
    dumps.sort(key=lambda d: (d.timestamp, d.pid))
    return dumps


def coredumps_fact(since_s: int = 3600, unit: str | None = None) -> Fact[list[Coredump]]:
    """Core dumps of the last `since_s` seconds (by the unit's clock), optionally of one unit only."""
    if isinstance(since_s, bool) or not isinstance(since_s, int) or since_s <= 0:
        raise ValueError(f"since_s must be a positive number of seconds, not {since_s!r}")
    argv = [
        "journalctl", "-o", "json", "--no-pager", "-q",
        "--output-fields=" + ",".join(_COREDUMP_FIELDS),
        f"--since=-{since_s}s",
        f"MESSAGE_ID={COREDUMP_MESSAGE_ID}",
    ]  # fmt: skip
    if unit is not None:
        argv.append(f"COREDUMP_UNIT={validate_unit_name(unit)}")
    # The system journal is readable by root and the adm/systemd-journal groups only.
    return Fact("coredumps" if unit is None else f"coredumps:{unit}", tuple(argv), parse_coredumps, sudo=True)


COREDUMPS = coredumps_fact()


# --------------------------------------------------------------------------------------------------------
# QEMU processes and their threads

# For every process whose /proc/PID/exe basename starts with qemu-system: a block
#   process PID / exe BASE64(path) / cmdline BASE64(NUL-separated argv) /
#   (task TID / Name:<TAB>comm / Cpus_allowed_list:<TAB>list)... / end
# and, after all blocks, a final `done` line.
# A process or task that exits while it is read is left out (a block is only printed once complete).
QEMU_SCRIPT = r"""for d in /proc/[0-9]*; do
  exe=$(readlink "$d/exe" 2>/dev/null) || continue
  case "${exe##*/}" in qemu-system*) ;; *) continue ;; esac
  cmdline=$(base64 -w0 "$d/cmdline" 2>/dev/null) || continue
  [ -n "$cmdline" ] || continue
  tasks=
  for t in "$d"/task/[0-9]*; do
    st=$(grep -E '^(Name|Cpus_allowed_list):' "$t/status" 2>/dev/null) || continue
    tasks="$tasks
task ${t##*/}
$st"
  done
  [ -n "$tasks" ] || continue
  printf 'process %s\nexe %s\ncmdline %s%s\nend\n' "${d#/proc/}" "$(printf %s "$exe" | base64 -w0)" "$cmdline" "$tasks"
done
echo done
"""

_VCPU_COMM = re.compile(r"CPU (\d+)/([A-Za-z]+)")


class QemuThread(BaseModel):
    tid: int
    comm: str
    cpus_allowed: list[int]


class VcpuThread(QemuThread):
    """A vCPU thread, named `CPU <index>/<ACCEL>` by QEMU with -name ...,debug-threads=on."""

    index: int
    #: KVM, TCG, ...
    accel: str


class QemuProcess(BaseModel):
    pid: int
    exe: str
    argv: list[str]
    #: -name's guest name (the value before the first comma, or guest=NAME); None without -name.
    name: str | None
    debug_threads: bool
    #: Unix socket paths of QMP monitors (-qmp/-qmp-pretty unix:PATH, or -chardev socket + -mon mode=control).
    qmp_sockets: list[str]
    #: Affinity of the main thread (tid == pid).
    cpus_allowed: list[int]
    #: Sorted by vCPU index.
    vcpus: list[VcpuThread]
    #: Every other thread, the main thread included, by tid.
    other_threads: list[QemuThread]


def split_qemu_opts(value: str) -> list[str]:
    """QemuOpts 'a,b=c,,d' -> ['a', 'b=c,d'] (',,' is a literal comma)."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == ",":
            if value[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def _qemu_opts_dict(value: str, implied: str) -> dict[str, str]:
    opts: dict[str, str] = {}
    for i, part in enumerate(split_qemu_opts(value)):
        key, sep, val = part.partition("=")
        if not sep:
            if i == 0:
                opts[implied] = part
            else:
                opts[key] = "on"  # QemuOpts boolean shorthand
        else:
            opts[key] = val
    return opts


def _qemu_options(argv: list[str]) -> list[tuple[str, str]]:
    wanted = {"-name", "-qmp", "-qmp-pretty", "-chardev", "-mon"}
    found: list[tuple[str, str]] = []
    i = 1
    while i < len(argv):
        opt = argv[i]
        if opt.startswith("--"):
            opt = opt[1:]
        if opt in wanted and i + 1 < len(argv):
            found.append((opt, argv[i + 1]))
            i += 2
        else:
            i += 1
    return found


def _unescape_status_name(value: str) -> str:
    # /proc/PID/status escapes '\n' and '\\' in Name.
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


class QemuArgs(BaseModel):
    """What rt-tune needs from a QEMU command line."""

    name: str | None
    debug_threads: bool
    qmp_sockets: list[str]


def parse_qemu_argv(argv: list[str]) -> QemuArgs:
    """-name NAME[,debug-threads=on] (or guest=NAME), and QMP unix sockets from -qmp/-qmp-pretty unix:PATH,...
    or from -chardev socket,id=ID,path=PATH with -mon chardev=ID,mode=control (libvirt's form)."""
    name: str | None = None
    debug_threads = False
    qmp: list[str] = []
    chardevs: dict[str, str] = {}
    monitors: list[str] = []
    for opt, value in _qemu_options(argv):
        if opt == "-name":
            opts = _qemu_opts_dict(value, "guest")
            name = opts.get("guest")
            debug_threads = opts.get("debug-threads", "off") in ("on", "yes", "true", "y")
        elif opt in ("-qmp", "-qmp-pretty"):
            first = split_qemu_opts(value)[0]
            if first.startswith("unix:"):
                qmp.append(first[len("unix:") :])
        elif opt == "-chardev":
            opts = _qemu_opts_dict(value, "backend")
            if opts.get("backend") == "socket" and "id" in opts and "path" in opts:
                chardevs[opts["id"]] = opts["path"]
        elif opt == "-mon":
            opts = _qemu_opts_dict(value, "chardev")
            if opts.get("mode") == "control" and "chardev" in opts:
                monitors.append(opts["chardev"])
    qmp += [chardevs[m] for m in monitors if m in chardevs]
    return QemuArgs(name=name, debug_threads=debug_threads, qmp_sockets=qmp)


def _qemu_process(pid: int, exe: str, argv: list[str], tasks: list[QemuThread]) -> QemuProcess:
    args = parse_qemu_argv(argv)
    main = [t for t in tasks if t.tid == pid]
    if not main:
        raise ParseError(f"expected the main thread (tid {pid}) among the tasks of QEMU process {pid}")
    vcpus: list[VcpuThread] = []
    others: list[QemuThread] = []
    for t in tasks:
        m = _VCPU_COMM.fullmatch(t.comm)
        if m:
            vcpus.append(VcpuThread(**t.model_dump(), index=int(m.group(1)), accel=m.group(2)))
        else:
            others.append(t)
    return QemuProcess(
        pid=pid,
        exe=exe,
        argv=argv,
        name=args.name,
        debug_threads=args.debug_threads,
        qmp_sockets=args.qmp_sockets,
        cpus_allowed=main[0].cpus_allowed,
        vcpus=sorted(vcpus, key=lambda v: (v.index, v.tid)),
        other_threads=sorted(others, key=lambda t: t.tid),
    )


def _b64(what: str, value: str) -> str:
    try:
        return base64.b64decode(value, validate=True).decode("utf-8", "surrogateescape")
    except (binascii.Error, ValueError):
        raise ParseError(f"expected base64 {what}, got {value[:200]!r}") from None


def parse_qemu_processes(text: str) -> list[QemuProcess]:
    """Output of QEMU_SCRIPT (see there for the framing)."""
    if not text.endswith("done\n") or (len(text) > 5 and not text.endswith("\ndone\n")):
        raise ParseError(f"expected QEMU process blocks and a final `done` line, got {text[-200:]!r}")
    text = text[: -len("done\n")]
    procs: list[QemuProcess] = []
    block: dict[str, Any] | None = None
    task: dict[str, Any] | None = None

    def close_task() -> None:
        nonlocal task
        if task is not None:
            if "comm" not in task or "cpus" not in task:
                raise ParseError(f"expected Name: and Cpus_allowed_list: lines for task {task['tid']}")
            block["tasks"].append(QemuThread(tid=task["tid"], comm=task["comm"], cpus_allowed=task["cpus"]))
            task = None

    for line in text.splitlines():
        word, _, rest = line.partition(" ")
        if block is None:
            if word != "process" or not rest.isdigit():
                raise ParseError(f"expected `process PID`, got {line[:200]!r}")
            block = {"pid": int(rest), "tasks": []}
        elif word in ("exe", "cmdline") and "tasks" in block and not block["tasks"] and task is None:
            if word in block:
                raise ParseError(f"`{word}` appears twice for QEMU process {block['pid']}")
            block[word] = _b64(word, rest)
        elif word == "task":
            if "exe" not in block or "cmdline" not in block:
                raise ParseError(f"expected `exe` and `cmdline` before tasks of QEMU process {block['pid']}")
            close_task()
            if not rest.isdigit():
                raise ParseError(f"expected `task TID`, got {line[:200]!r}")
            task = {"tid": int(rest)}
        elif task is not None and line.startswith("Name:\t") and "comm" not in task:
            task["comm"] = _unescape_status_name(line[len("Name:\t") :])
        elif task is not None and line.startswith("Cpus_allowed_list:\t") and "cpus" not in task:
            task["cpus"] = parse_cpu_list(line[len("Cpus_allowed_list:\t") :])
        elif line == "end":
            close_task()
            if not block["tasks"]:
                raise ParseError(f"expected at least one task for QEMU process {block['pid']}")
            argv = block["cmdline"].split("\0")
            if argv and argv[-1] == "":
                argv.pop()
            if not argv:
                raise ParseError(f"expected a command line for QEMU process {block['pid']}")
            procs.append(_qemu_process(block["pid"], block["exe"], argv, block["tasks"]))
            block = None
        else:
            raise ParseError(f"unexpected line in QEMU process listing: {line[:200]!r}")
    if block is not None:
        raise ParseError(f"expected `end` after QEMU process {block['pid']} (truncated output)")
    return sorted(procs, key=lambda p: p.pid)


# Reading another user's /proc/PID/exe needs root.
QEMU_PROCESSES = Fact("qemu_processes", ("sh", "-c", QEMU_SCRIPT), parse_qemu_processes, sudo=True)


# --------------------------------------------------------------------------------------------------------
# Bootloader

BootloaderKind = Literal["grub", "systemd-boot", "extlinux", "u-boot", "unknown"]

_GRUB_CFGS = ("/boot/grub/grub.cfg", "/boot/grub2/grub.cfg", "/boot/efi/EFI/*/grub.cfg")
_GRUBENVS = ("/boot/grub/grubenv", "/boot/grub2/grubenv", "/boot/efi/EFI/*/grubenv")
_LOADER_CONFS = ("/boot/efi/loader/loader.conf", "/efi/loader/loader.conf", "/boot/loader/loader.conf")
_LOADER_ENTRIES = ("/boot/efi/loader/entries", "/efi/loader/entries", "/boot/loader/entries")
_EXTLINUX = ("/boot/extlinux/extlinux.conf", "/extlinux/extlinux.conf")
_BOOT_FILES = ("/etc/default/grub", *_GRUB_CFGS, *_GRUBENVS, *_LOADER_CONFS, *_EXTLINUX, "/etc/fw_env.config")
_GRUB_MKCONFIG = ("update-grub", "grub-mkconfig", "grub2-mkconfig")
_BOOT_COMMANDS = (
    *_GRUB_MKCONFIG, "grub-reboot", "grub2-reboot", "grub-editenv", "grub2-editenv",
    "bootctl", "fw_printenv", "fw_setenv",
)  # fmt: skip

# Lines: `file yes|no PATH`, `entries yes DIR N` / `entries no DIR`, `command yes NAME PATH` /
# `command no NAME`, `bootctl-is-installed RC STDOUT`, `grub-default-in FILE` then `grub-default LINE`, `end`.
BOOTLOADER_SCRIPT = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    f"for f in {' '.join(_BOOT_FILES)}; do\n"
    '  if [ -e "$f" ]; then echo "file yes $f"; else echo "file no $f"; fi\n'
    "done\n"
    f"for d in {' '.join(_LOADER_ENTRIES)}; do\n"
    '  if [ -d "$d" ]; then n=0; for e in "$d"/*.conf; do [ -e "$e" ] && n=$((n+1)); done; '
    'echo "entries yes $d $n"; else echo "entries no $d"; fi\n'
    "done\n"
    f"for c in {' '.join(_BOOT_COMMANDS)}; do\n"
    '  if p=$(command -v "$c"); then echo "command yes $c $p"; else echo "command no $c"; fi\n'
    "done\n"
    "if command -v bootctl >/dev/null; then\n"
    "  out=$(bootctl is-installed 2>/dev/null); rc=$?\n"
    "  printf 'bootctl-is-installed %s %s\\n' \"$rc\" \"$(printf %s \"$out\" | tr '\\n' ' ')\"\n"
    "fi\n"
    "for f in /etc/default/grub /etc/default/grub.d/*.cfg; do\n"
    '  [ -f "$f" ] || continue\n'
    "  grep -E '^[[:space:]]*(export[[:space:]]+)?GRUB_DEFAULT=' \"$f\" | while IFS= read -r l; do\n"
    '    printf \'grub-default-in %s\\ngrub-default %s\\n\' "$f" "$l"\n'
    "  done\n"
    "done\n"
    "echo end\n"
)


class BootloaderInfo(BaseModel):
    """Which bootloader holds the kernel cmdline, from files and commands found on the unit."""

    kind: BootloaderKind
    #: Every kind with evidence, in the priority order used to choose `kind` (grub, systemd-boot, extlinux, u-boot).
    candidates: list[str]
    #: What was found for `kind` ("file /etc/default/grub", "command update-grub at /usr/sbin/update-grub").
    evidence: list[str]
    #: Every probed path -> exists (glob patterns that matched nothing are listed as not existing).
    files: dict[str, bool]
    #: Every probed command -> its path, or None when not on PATH.
    commands: dict[str, str | None]
    #: systemd-boot entry directories that exist -> number of *.conf entries.
    loader_entries: dict[str, int]
    #: `bootctl is-installed` said yes (None: no bootctl).
    bootctl_is_installed: bool | None
    #: GRUB_DEFAULT's value (the last assignment in /etc/default/grub and /etc/default/grub.d/*.cfg).
    grub_default: str | None
    grub_default_source: str | None
    grub_default_saved: bool
    #: The first grubenv found (/boot/grub/grubenv, /boot/grub2/grubenv, ESP); None when there is none.
    grubenv: str | None


def _shell_assignment_value(line: str) -> str:
    _, sep, rhs = line.partition("=")
    if not sep:
        raise ParseError(f"expected a shell assignment GRUB_DEFAULT=VALUE, got {line[:200]!r}")
    try:
        words = shlex.split(rhs, comments=True, posix=True)
    except ValueError:
        raise ParseError(f"expected a shell assignment GRUB_DEFAULT=VALUE, got {line[:200]!r}") from None
    if len(words) > 1:
        raise ParseError(f"expected one word after GRUB_DEFAULT=, got {line[:200]!r}")
    return words[0] if words else ""


def _existing(files: dict[str, bool], patterns: tuple[str, ...]) -> list[str]:
    pats = [re.compile(fnmatch.translate(p)) for p in patterns]
    return [f for f, ok in files.items() if ok and any(p.match(f) for p in pats)]


def choose_bootloader(
    files: dict[str, bool],
    commands: dict[str, str | None],
    loader_entries: dict[str, int],
    bootctl_is_installed: bool | None,
) -> tuple[BootloaderKind, list[str], list[str]]:
    """(kind, candidates, evidence for kind) from what the probe found. Rules, in priority order:
    grub: /etc/default/grub + update-grub/grub-mkconfig/grub2-mkconfig + a grub.cfg;
    systemd-boot: `bootctl is-installed` yes, a loader.conf, or *.conf loader entries;
    extlinux: an extlinux.conf; u-boot: fw_printenv + /etc/fw_env.config."""
    evidence: dict[str, list[str]] = {}
    mk = [f"command {c} at {commands[c]}" for c in _GRUB_MKCONFIG if commands.get(c)]
    cfgs = _existing(files, _GRUB_CFGS)
    if files.get("/etc/default/grub") and mk and cfgs:
        evidence["grub"] = ["file /etc/default/grub", *mk, *(f"file {f}" for f in cfgs)]
    sd = ["bootctl is-installed: yes"] if bootctl_is_installed else []
    sd += [f"file {f}" for f in _existing(files, _LOADER_CONFS)]
    sd += [f"{n} entries in {d}" for d, n in loader_entries.items() if n]
    if sd:
        evidence["systemd-boot"] = sd
    if ext := _existing(files, _EXTLINUX):
        evidence["extlinux"] = [f"file {f}" for f in ext]
    if commands.get("fw_printenv") and files.get("/etc/fw_env.config"):
        evidence["u-boot"] = [f"command fw_printenv at {commands['fw_printenv']}", "file /etc/fw_env.config"]
    candidates = list(evidence)
    if not candidates:
        return "unknown", [], []
    kind = candidates[0]
    return kind, candidates, evidence[kind]  # type: ignore[return-value]


def parse_bootloader(text: str) -> BootloaderInfo:
    files: dict[str, bool] = {}
    commands: dict[str, str | None] = {}
    entries: dict[str, int] = {}
    bootctl: bool | None = None
    grub_default: str | None = None
    grub_default_source: str | None = None
    pending_source: str | None = None
    lines = text.split("\n")
    if lines[-2:] != ["end", ""]:
        raise ParseError(f"expected bootloader probe lines and a final `end`, got {text[-200:]!r}")
    for line in lines[:-2]:
        parts = line.split(" ")
        word = parts[0]
        if word == "file" and len(parts) >= 3 and parts[1] in ("yes", "no"):
            files[line.split(" ", 2)[2]] = parts[1] == "yes"
        elif word == "entries" and len(parts) == 4 and parts[1] == "yes" and parts[3].isdigit():
            entries[parts[2]] = int(parts[3])
        elif word == "entries" and len(parts) == 3 and parts[1] == "no":
            pass
        elif word == "command" and len(parts) >= 4 and parts[1] == "yes":
            commands[parts[2]] = line.split(" ", 3)[3]
        elif word == "command" and len(parts) == 3 and parts[1] == "no":
            commands[parts[2]] = None
        elif word == "bootctl-is-installed" and len(parts) >= 2 and parts[1].isdigit():
            bootctl = parts[1] == "0" and " ".join(parts[2:]).strip() == "yes"
        elif word == "grub-default-in" and len(parts) >= 2:
            pending_source = line.split(" ", 1)[1]
        elif word == "grub-default" and pending_source is not None:
            grub_default = _shell_assignment_value(line.split(" ", 1)[1])
            grub_default_source, pending_source = pending_source, None
        else:
            raise ParseError(f"unexpected line in bootloader probe output: {line[:200]!r}")
    missing = [f for f in ("/etc/default/grub", "/etc/fw_env.config") if f not in files]
    missing += [c for c in _BOOT_COMMANDS if c not in commands]
    if missing or pending_source is not None:
        raise ParseError(
            f"expected probe lines for {', '.join(missing) or 'grub-default'} (truncated output?)"
        )
    if commands.get("bootctl") and bootctl is None:
        raise ParseError("expected a bootctl-is-installed line when bootctl exists")

    kind, candidates, evidence = choose_bootloader(files, commands, entries, bootctl)
    grubenvs = _existing(files, _GRUBENVS)
    return BootloaderInfo(
        kind=kind,
        candidates=candidates,
        evidence=evidence,
        files=files,
        commands=commands,
        loader_entries=entries,
        bootctl_is_installed=bootctl,
        grub_default=grub_default,
        grub_default_source=grub_default_source,
        grub_default_saved=grub_default == "saved",
        grubenv=grubenvs[0] if grubenvs else None,
    )


# bootctl needs root to look at the ESP.
BOOTLOADER = Fact("bootloader", ("sh", "-c", BOOTLOADER_SCRIPT), parse_bootloader, sudo=True)


# --------------------------------------------------------------------------------------------------------
# Interrupts


class Irq(BaseModel):
    """One row of /proc/interrupts; numeric IRQs also carry their /proc/irq/N affinities."""

    #: "24", or a name such as LOC, RES, CAL, IPI0.
    irq: str
    #: CPU numbers of the count columns (from the header; offline CPUs have no column).
    cpus: list[int]
    #: The counts as printed; one per CPU when `per_cpu`, else (ERR, MIS) a single total.
    per_cpu_counts: list[int]
    per_cpu: bool
    #: Numeric IRQs: the irq chip ("IO-APIC", "PCI-MSI", "GICv3").
    chip: str | None = None
    #: Numeric IRQs: the hardware IRQ number in the chip's domain.
    hwirq: str | None = None
    #: Numeric IRQs: the flow handler / trigger ("edge", "fasteoi", "Level").
    trigger: str | None = None
    #: Numeric IRQs: the devices/handlers registered on it.
    actions: list[str] = []
    #: Named rows: the description ("Local timer interrupts", "Rescheduling interrupts").
    description: str | None = None
    smp_affinity_list: list[int] | None = None
    effective_affinity_list: list[int] | None = None

    @property
    def total(self) -> int:
        return sum(self.per_cpu_counts)


IRQS_SCRIPT = (
    "cat /proc/interrupts || exit\n"
    "echo '@@ affinity'\n"
    "for d in /proc/irq/[0-9]*; do\n"
    '  s=$(cat "$d/smp_affinity_list" 2>/dev/null) || s=-\n'
    '  e=$(cat "$d/effective_affinity_list" 2>/dev/null) || e=-\n'
    '  printf \'irq %s smp=%s eff=%s\\n\' "${d##*/}" "$s" "$e"\n'
    "done\n"
    "echo end\n"
)

_IRQ_ROW = re.compile(r"\s*([0-9A-Za-z_]+):(.*)")
_NUMERIC_REST = re.compile(
    r"\s+(?P<chip>\S+)"
    r"(?:\s+(?P<hwirq>\d+)?-(?P<handler>\S+)|\s+(?P<hwirq2>\d+)(?=\s|$))?"
    r"(?:\s+(?P<level>Level|Edge)(?:-(?P<handler2>\S+))?)?"
    r"(?:\s+(?P<actions>\S.*?))?\s*"
)
#: /proc/interrupts rows that count IPIs: x86 RES/CAL/TLB/IWI, arm64 IPI0..IPIn (IPI0 reschedule,
#: IPI1 function call, IPI5 IRQ work, per the field notes).
_X86_IPI_ROWS = ("RES", "CAL", "TLB", "IWI")


def _parse_interrupts_table(lines: list[str]) -> list[Irq]:
    if not lines:
        raise ParseError("expected the /proc/interrupts header line (CPU0 CPU1 ...), got nothing")
    header = lines[0].split()
    if not header or not all(re.fullmatch(r"CPU\d+", h) for h in header):
        raise ParseError(f"expected the /proc/interrupts header of CPUn columns, got {lines[0][:200]!r}")
    cpus = [int(h[3:]) for h in header]
    n = len(cpus)
    irqs: list[Irq] = []
    for line in lines[1:]:
        if not line.strip():
            continue
        m = _IRQ_ROW.fullmatch(line)
        if not m:
            raise ParseError(f"expected `IRQ: counts...` in /proc/interrupts, got {line[:200]!r}")
        label, rest = m.group(1), m.group(2)
        tokens = rest.split()
        counts: list[int] = []
        pos = 0
        for tok in tokens[:n]:
            if not tok.isdigit():
                break
            counts.append(int(tok))
            pos = rest.index(tok, pos) + len(tok)
        remainder = rest[pos:]
        if not counts:
            raise ParseError(f"expected counts after {label}: in /proc/interrupts, got {line[:200]!r}")
        if label.isdigit():
            if len(counts) != n:
                raise ParseError(f"expected {n} per-CPU counts for IRQ {label}, got {line[:200]!r}")
            r = _NUMERIC_REST.fullmatch(remainder)
            if not r:
                raise ParseError(
                    f"expected `chip hwirq-handler actions` after the counts of IRQ {label}, "
                    f"got {line[:200]!r}"
                )
            actions = r.group("actions")
            irqs.append(
                Irq(
                    irq=label,
                    cpus=cpus,
                    per_cpu_counts=counts,
                    per_cpu=True,
                    chip=r.group("chip"),
                    hwirq=r.group("hwirq") or r.group("hwirq2"),
                    trigger=r.group("handler") or r.group("level") or None,
                    actions=[a.strip() for a in actions.split(", ")] if actions else [],
                )
            )
        else:
            if len(counts) not in (1, n):
                raise ParseError(
                    f"expected 1 or {n} counts for {label} in /proc/interrupts, got {line[:200]!r}"
                )
            description = remainder.strip() or None
            if description is not None and description.split()[0].isdigit():
                raise ParseError(f"expected {n} counts then a description for {label}, got {line[:200]!r}")
            irqs.append(
                Irq(
                    irq=label,
                    cpus=cpus,
                    per_cpu_counts=counts,
                    per_cpu=len(counts) == n and (n > 1 or description is not None),
                    description=description,
                )
            )
    return irqs


def parse_interrupts(text: str) -> list[Irq]:
    """Plain /proc/interrupts (x86 LOC/RES/CAL/TLB rows, arm64 IPI0..IPIn rows), without affinities."""
    return _parse_interrupts_table(text.rstrip("\n").split("\n"))


def parse_irqs(text: str) -> list[Irq]:
    """Output of IRQS_SCRIPT: /proc/interrupts, a `@@ affinity` line, `irq N smp=LIST eff=LIST` lines, `end`."""
    lines = text.split("\n")
    if lines[-2:] != ["end", ""]:
        raise ParseError(f"expected /proc/interrupts, affinity lines and a final `end`, got {text[-200:]!r}")
    lines = lines[:-2]
    try:
        sep = lines.index("@@ affinity")
    except ValueError:
        raise ParseError("expected a `@@ affinity` line after /proc/interrupts (truncated output?)") from None
    irqs = _parse_interrupts_table(lines[:sep])
    affinity: dict[str, tuple[list[int] | None, list[int] | None]] = {}
    for line in lines[sep + 1 :]:
        m = re.fullmatch(r"irq (\d+) smp=(\S*) eff=(\S*)", line)
        if not m:
            raise ParseError(f"expected `irq N smp=LIST eff=LIST`, got {line[:200]!r}")
        smp, eff = (None if v == "-" else parse_cpu_list(v) for v in (m.group(2), m.group(3)))
        affinity[m.group(1)] = (smp, eff)
    for irq in irqs:
        if irq.irq in affinity:
            irq.smp_affinity_list, irq.effective_affinity_list = affinity[irq.irq]
    return irqs


IRQS = Fact("irqs", ("sh", "-c", IRQS_SCRIPT), parse_irqs)


def is_ipi_row(irq: Irq) -> bool:
    return irq.irq in _X86_IPI_ROWS or re.fullmatch(r"IPI\d+", irq.irq) is not None


def ipi_counts(irqs: list[Irq]) -> dict[str, list[int]]:
    """IPI row name -> per-CPU counts (x86 RES/CAL/TLB/IWI, arm64 IPI0..IPIn), in /proc/interrupts order."""
    return {i.irq: list(i.per_cpu_counts) for i in irqs if is_ipi_row(i) and i.per_cpu}
