"""rt-tune vs Ansible vs pyinfra on a fleet of real SSH targets: the same small tuning job, end to end.

    python benchmarks/fleet_bench.py [--targets 32] [--rounds 3] [--quick-rounds N] [--json] [--no-noop]
        [--no-profile] [--ansible-facts both|all|min] [--tools rt-tune,ansible,pyinfra]

Needs root (network namespaces), /usr/sbin/sshd (openssh-server) and the bench extra in the venv:
`.venv/bin/pip install -e '.[bench]'` (ansible-core, pyinfra); run it with the venv's python
(`.venv/bin/python benchmarks/fleet_bench.py`), whose bin/ has ansible-playbook and pyinfra.

Targets. `--targets` sshd instances on this machine, each in its own network namespace (reached over a veth
pair) AND its own mount namespace in which /etc/sysctl.d is a private, empty directory (see
benchmarks/fleet/targets.py). `net.ipv4.ip_forward` is per network namespace, so nothing of this machine
changes: its /etc/sysctl.d and ip_forward are compared before and after and printed. Each target has its own
ed25519 host key; one client key; a known_hosts file with every target's key: host key checking is ON for all
three tools. Root login by key only. Targets see a plain /root/.bashrc (bash sources it for every command sshd
runs; this machine's runs `pyenv init`, 0.1-0.2 s per command, which no robot pays and which would swamp the
comparison).

Workload (identical for all tools, all targets in parallel), timed from the tool's process start to its exit:
  1. gather facts (kernel release, arch, hostname, CPU count at least);
  2. net.ipv4.ip_forward=1 at runtime, and the drop-in /etc/sysctl.d/90-rt-tune-net.ipv4.ip_forward.conf with
     exactly the bytes rt-tune's SysctlChange writes;
  3. read both back and verify.
Before every timed "fresh" run each target is reset (runtime 0, drop-in removed), not timed. Right after it,
the same tool runs again on the finished state ("noop" pass: idempotent run). After every run the benchmark
checks all targets itself (ip_forward=1 in each namespace, the drop-in byte-exact with mode 0644, no stray
files) and the tool's exit status: a run that did not do the work counts as failed and cannot win.
Order of the tools alternates from round to round (rt-tune and pyinfra back to back, each first every other
round); one untimed warm-up run of each tool comes first. The figure is the median wall time over the rounds.
`--quick-rounds` gives the two quick tools more rounds than Ansible's (their difference is the close one).

Ansible runs twice: with full facts (gather_subset all, Ansible's default) and with the smallest subset that
still has kernel, arch, hostname and CPU count (!all,!min,platform,hardware). The goals are judged on both.

After the timed rounds rt-tune is profiled (unless --no-profile): per phase and per remote command, connect
cost, process start; then a what-if that is NOT rt-tune's code (the work hand-batched into 2 shell commands per
target), interleaved with rt-tune as is, to show what is left above that floor.

All tools run as processes (rt-tune's side is benchmarks/fleet/rt_tune_run.py, which calls
`rt_tune_fleet(endpoints)` - SSHTransport, gather_basic, SysctlChange plan/apply/verify - on a thread pool of
32), so each pays its interpreter start and imports. Their bytecode is cached in a private PYTHONPYCACHEPREFIX
for all of them alike (this machine sets PYTHONDONTWRITEBYTECODE, which would make rt-tune's editable install
recompile on every start).

Caveat printed with the results: the controller and all targets share this machine's CPUs, so work a tool
makes the targets do (Ansible runs a Python module on the target for every task) competes with the
controller here, unlike on a real fleet. The table therefore also shows controller and target CPU seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from fleet.targets import SshFleet  # noqa: E402

from orchestrator.changes.sysctl import SysctlChange

FLEET_DIR = REPO / "benchmarks" / "fleet"
PLAYBOOK = FLEET_DIR / "ansible_playbook.yml"
PYINFRA_INVENTORY = FLEET_DIR / "pyinfra_inventory.py"
PYINFRA_DEPLOY = FLEET_DIR / "pyinfra_deploy.py"
RT_TUNE_RUN = FLEET_DIR / "rt_tune_run.py"
BIN = Path(sys.executable).parent
SYSCTL_NAME, SYSCTL_VALUE = "net.ipv4.ip_forward", "1"
GOALS = {"ansible": 0.25, "pyinfra": 0.5}  # rt-tune's wall time <= this fraction of the tool's
ANSIBLE_MIN_SUBSET = ["!all", "!min", "platform", "hardware"]
RUN_TIMEOUT_S = 600

_T0 = time.monotonic()


def progress(msg: str) -> None:
    print(f"[fleet_bench {time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ---- child accounting -----------------------------------------------------------------------------------

def become_subreaper() -> bool:
    """Orphans (Ansible's ControlPersist ssh masters) are re-parented to us, so their CPU is counted."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except OSError:
        return False


def reap_orphans(keep: set[int]) -> None:
    """Reap exited children that are not ours to keep (the sshd targets) and not tracked by a Popen."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid in keep:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(info.si_pid, 0)


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# ---- tools ------------------------------------------------------------------------------------------------

@dataclass
class Tool:
    key: str  # rt-tune | ansible | ansible-min | pyinfra
    label: str
    argv: list[str]
    env: dict[str, str]
    settings: str
    after: object = None  # callable run after each run, not timed (Ansible: stop the ssh masters)


@dataclass
class RunResult:
    tool: str
    kind: str  # fresh | noop
    round: int
    wall_s: float
    controller_cpu_s: float
    target_cpu_s: float
    exit_status: int
    problems: list[str]
    changed_noop: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_status == 0 and not self.problems


@dataclass
class Workload:
    name: str
    value: str
    dropin_path: str
    dropin: bytes

    @classmethod
    def default(cls) -> Workload:
        change = SysctlChange(SYSCTL_NAME, SYSCTL_VALUE)
        return cls(SYSCTL_NAME, SYSCTL_VALUE, change.dropin, change._dropin_bytes())

    def as_vars(self) -> dict[str, str]:
        return {"sysctl_name": self.name, "sysctl_value": self.value, "dropin_path": self.dropin_path,
                "dropin_content": self.dropin.decode()}


def base_env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


def make_tools(fleet: SshFleet, work: Path, wl: Workload, ansible_variants: list[str]) -> list[Tool]:
    needed = [BIN / "pyinfra"] + ([BIN / "ansible-playbook"] if ansible_variants else [])
    missing = [str(p) for p in needed if not os.access(p, os.X_OK)]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run with the venv's python after "
                         f"`.venv/bin/pip install -e '.[bench]'`")
    specs = work / "specs.json"
    specs.write_text(json.dumps(fleet.target_specs()))
    env = base_env(work)
    n = fleet.count
    tools = [Tool("rt-tune", "rt-tune", [sys.executable, str(RT_TUNE_RUN), str(specs), "--workers", str(n)], env,
                  f"SSHTransport (fabric {metadata.version('fabric')}, paramiko {metadata.version('paramiko')}) "
                  f"per target, one connection each, thread pool of {n}; plan_all (hostname, uname -r, uname -m, "
                  f"cpus online and the SysctlChange's state: one command), then unless a no-op "
                  f"SysctlChange.apply_and_read + verify (one command)")]

    # Ansible: ansible.cfg, inventory and extra vars in work/ansible
    adir = work / "ansible"
    (adir / "cp").mkdir(parents=True)
    inventory = adir / "inventory.ini"
    inventory.write_text("[fleet]\n" + "".join(f"{s['name']} ansible_host={s['host']}\n"
                                                  for s in fleet.target_specs()))
    ssh_args = (f"-o ControlMaster=auto -o ControlPersist=60s -o UserKnownHostsFile={fleet.known_hosts} "
                f"-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes -o PasswordAuthentication=no")
    cfg = adir / "ansible.cfg"
    cfg.write_text(
        "[defaults]\n"
        f"inventory = {inventory}\nforks = {n}\nhost_key_checking = True\nremote_user = root\n"
        f"private_key_file = {fleet.client_key}\ninterpreter_python = /usr/bin/python3\n"
        f"remote_tmp = {adir / 'remote-tmp'}\nlocal_tmp = {adir / 'local-tmp'}\nretry_files_enabled = False\n"
        "timeout = 30\n"
        "[ssh_connection]\n"
        f"pipelining = True\nssh_args = {ssh_args}\ncontrol_path_dir = {adir / 'cp'}\n")

    def stop_masters() -> None:
        for sock in (adir / "cp").iterdir():
            subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=10, check=False)
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()

    aenv = dict(env, ANSIBLE_CONFIG=str(cfg), ANSIBLE_HOME=str(adir / "home"), ANSIBLE_NOCOLOR="1")
    common = (f"forks={n}, strategy linear (default), pipelining=True, ssh_args '-o ControlMaster=auto "
              f"-o ControlPersist=60s' (a fresh ControlPath dir per run: every run starts cold; the masters are "
              f"stopped after the run, outside the timing), interpreter_python=/usr/bin/python3 (no interpreter "
              f"discovery), host_key_checking=True with UserKnownHostsFile + StrictHostKeyChecking=yes; tasks: "
              f"setup, assert(facts), copy (drop-in), shell (sysctl -w only if it differs, changed_when), "
              f"shell (read back sysctl -n + base64 of the drop-in), assert")
    for variant in ansible_variants:
        subset = ["all"] if variant == "ansible" else ANSIBLE_MIN_SUBSET
        vars_file = adir / f"vars-{variant}.json"
        vars_file.write_text(json.dumps(dict(wl.as_vars(), facts_subset=subset)))
        label = "Ansible (facts: all)" if variant == "ansible" else "Ansible (facts: min)"
        tools.append(Tool(variant, label, [str(BIN / "ansible-playbook"), str(PLAYBOOK), "-e", f"@{vars_file}"],
                          aenv, f"gather_subset={subset}; " + common, after=stop_masters))

    penv = dict(env, RTB_FLEET_SPECS=str(specs), RTB_FLEET_WORKLOAD=json.dumps(wl.as_vars()))
    tools.append(Tool("pyinfra", "pyinfra", [str(BIN / "pyinfra"), str(PYINFRA_INVENTORY), str(PYINFRA_DEPLOY),
                                             "-y", "--parallel", str(n)], penv,
                      f"CLI `pyinfra inventory.py deploy.py -y --parallel {n}`; ssh_known_hosts_file + "
                      f"ssh_strict_host_key_checking=yes; facts Hostname, KernelVersion, Arch, hardware.Cpus via "
                      f"host.get_fact; files.put (drop-in), server.sysctl (runtime), server.shell (read-back "
                      f"check)"))
    return tools


def run_tool(tool: Tool, fleet: SshFleet, wl: Workload, work: Path, kind: str, rnd: int) -> RunResult:
    keep = set(fleet.sshd_pids())
    reap_orphans(keep)
    tcpu0, ccpu0 = fleet.target_cpu_s(), children_cpu_s()
    log = work / "logs" / f"{tool.key}-{kind}-r{rnd}.log"
    log.parent.mkdir(exist_ok=True)
    with open(log, "wb") as out:
        start = time.monotonic()
        try:
            proc = subprocess.run(tool.argv, env=tool.env, stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S, check=False)
            status = proc.returncode
        except subprocess.TimeoutExpired:
            status = -9
        wall = time.monotonic() - start
    if callable(tool.after):
        tool.after()
    time.sleep(0.05)
    reap_orphans(keep)
    tcpu = fleet.target_cpu_s() - tcpu0
    ccpu = children_cpu_s() - ccpu0
    problems = fleet.check(wl.value, Path(wl.dropin_path).name, wl.dropin)
    if status != 0:
        problems.insert(0, f"exit status {status}; log tail: {log.read_text(errors='replace')[-800:]!r}")
    res = RunResult(tool.key, kind, rnd, wall, ccpu, tcpu, status, problems)
    if kind == "noop":
        res.changed_noop = noop_report(tool.key, log)
    return res


def noop_report(key: str, log: Path) -> str:
    """What the tool itself says it changed on an already-finished fleet (should be nothing)."""
    text = log.read_text(errors="replace")
    if key.startswith("ansible"):
        import re

        changed = [int(m) for m in re.findall(r"changed=(\d+)", text)]
        return f"changed={sum(changed)} over {len(changed)} hosts"
    if key == "rt-tune":
        try:
            doc = json.loads(text.strip().splitlines()[-1])
            return f"noop plans: {sum(1 for o in doc['outcomes'] if o['noop'])}/{len(doc['outcomes'])}"
        except (ValueError, IndexError, KeyError):
            return "?"
    if key == "pyinfra":
        rows = [line.split() for line in text.splitlines() if line.strip().startswith(("Persistent drop-in",
                                                                                      "Runtime value"))]
        # results table: Operation Hosts Success Error No-Change ('-' for none); the read-back always "succeeds"
        no_change = [r[-1] for r in rows]
        return f"no change on {'/'.join(no_change)} hosts for the drop-in/runtime ops" if rows else "?"
    return ""


# ---- rt-tune profile ------------------------------------------------------------------------------------

def run_json(argv: list[str], env: dict[str, str]) -> tuple[float, dict]:
    start = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    wall = time.monotonic() - start
    try:
        return wall, json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"{argv}: exit {proc.returncode}: {proc.stderr[-1500:]}") from None


def profile_rt_tune(fleet: SshFleet, wl: Workload, work: Path, rounds: int) -> dict:
    """Where rt-tune's time goes (phases, remote commands, connects, process start), and what-ifs that are NOT
    rt-tune's code: the same work hand-batched into 2 round trips per target."""
    env = base_env(work)
    specs = work / "specs.json"
    one = work / "specs-one.json"
    one.write_text(json.dumps(fleet.target_specs()[:1]))
    n = fleet.count
    dropin_name = Path(wl.dropin_path).name
    prof: dict = {}

    starts = []
    for _ in range(3):
        t = time.monotonic()
        subprocess.run([sys.executable, "-c",
                        "import orchestrator.changes.sysctl, orchestrator.facts.base, orchestrator.remote.transport"],
                       env=dict(env, PYTHONPATH=str(REPO)), check=True)
        starts.append(time.monotonic() - t)
    prof["python_start_and_imports_s"] = statistics.median(starts)

    def instrumented(spec: Path, label: str, extra: list[str]) -> dict:
        fleet.reset()
        wall, doc = run_json([sys.executable, str(RT_TUNE_RUN), str(spec), "--profile", "--workers", str(n),
                              *extra], env)
        outs = doc["outcomes"]
        phases = [p for p in ("connect", "facts+plan", "apply+verify", "close")
                  if any(p in o["phases"] for o in outs)]
        cmds: dict[str, list[float]] = {}
        for o in outs:
            for phase, kind, secs in o["commands"]:
                cmds.setdefault(f"{phase}: {kind}", []).append(secs)
        problems = fleet.check(wl.value, dropin_name, wl.dropin) if spec == specs else []
        return {
            "label": label, "process_wall_s": wall, "in_process_wall_s": doc["wall_s"],
            "controller_cpu_s": doc["cpu_s"], "targets": len(outs), "ok": doc["ok"] == len(outs) and not problems,
            "commands_per_target": statistics.median(len(o["commands"]) for o in outs),
            "phase_median_ms": {p: 1000 * statistics.median(o["phases"].get(p, 0.0) for o in outs)
                                for p in phases},
            "phase_max_ms": {p: 1000 * max(o["phases"].get(p, 0.0) for o in outs) for p in phases},
            "command_median_ms": {k: 1000 * statistics.median(v) for k, v in cmds.items()},
            "command_count": {k: len(v) // len(outs) for k, v in cmds.items()},
            "all_commands_median_ms": 1000 * statistics.median(s for v in cmds.values() for s in v),
        }

    progress("profile: rt-tune instrumented, 1 target alone (no contention)")
    prof["one_target"] = instrumented(one, "1 target", [])
    progress(f"profile: rt-tune instrumented, {n} targets")
    prof["fleet"] = instrumented(specs, f"{n} targets", [])

    progress(f"profile: connect + auth only, {n} targets at once (x{rounds})")
    walls, per, cpus = [], [], []
    for _ in range(rounds):
        _, doc = run_json([sys.executable, str(RT_TUNE_RUN), str(specs), "--connect-only", "--workers", str(n)],
                          env)
        walls.append(doc["wall_s"])
        per.append(statistics.median(doc["connect_s"]))
        cpus.append(doc["cpu_s"])
    prof["connect_only"] = {"in_process_wall_s": statistics.median(walls), "per_target_median_ms":
                            1000 * statistics.median(per), "controller_cpu_s": statistics.median(cpus)}
    _, doc = run_json([sys.executable, str(RT_TUNE_RUN), str(one), "--connect-only"], env)
    prof["connect_only"]["one_target_ms"] = 1000 * doc["connect_s"][0]

    # what-ifs, and the real thing again between them, so all of them see the same load; CPU of each run
    variants = [("connect + auth only", ["--connect-only"]), ("rt-tune as is", []),
                ("what-if hand-batched (2 shell commands)", ["--what-if-batched"])]
    keys = ("process", "in_process", "ok", "controller_cpu", "targets_cpu")
    acc: dict[str, dict[str, list]] = {label: {k: [] for k in keys} for label, _ in variants}
    for r in range(rounds):
        progress(f"profile: what-ifs, round {r + 1}/{rounds}")
        for label, extra in (variants if r % 2 == 0 else list(reversed(variants))):
            fleet.reset()
            reap_orphans(set(fleet.sshd_pids()))
            tcpu0, ccpu0 = fleet.target_cpu_s(), children_cpu_s()
            wall, doc = run_json([sys.executable, str(RT_TUNE_RUN), str(specs), "--workers", str(n), *extra], env)
            acc[label]["targets_cpu"].append(fleet.target_cpu_s() - tcpu0)
            acc[label]["controller_cpu"].append(children_cpu_s() - ccpu0)
            acc[label]["process"].append(wall)
            acc[label]["in_process"].append(doc["wall_s"])
            connect_only_run = "--connect-only" in extra
            acc[label]["ok"].append(connect_only_run or (doc["ok"] == n and
                                                         not fleet.check(wl.value, dropin_name, wl.dropin)))
    prof["what_if"] = {label: {"process_wall_s": statistics.median(v["process"]),
                               "in_process_wall_s": statistics.median(v["in_process"]), "ok": all(v["ok"]),
                               "controller_cpu_s": statistics.median(v["controller_cpu"]),
                               "targets_cpu_s": statistics.median(v["targets_cpu"]),
                               "walls_s": v["process"]} for label, v in acc.items()}
    conn, asis = prof["what_if"]["connect + auth only"], prof["what_if"]["rt-tune as is"]
    cmds = n * prof["fleet"]["commands_per_target"]
    prof["cpu_per_command_ms"] = {
        "targets": 1000 * (asis["targets_cpu_s"] - conn["targets_cpu_s"]) / cmds,
        "controller": 1000 * (asis["controller_cpu_s"] - conn["controller_cpu_s"]) / cmds}
    prof["cpu_per_connection_ms"] = {"targets": 1000 * conn["targets_cpu_s"] / n}
    return prof


# ---- report ------------------------------------------------------------------------------------------------

def versions() -> dict[str, str]:
    def v(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"

    return {
        "rt-tune": metadata.version("rt-tune"), "ansible-core": metadata.version("ansible-core"),
        "pyinfra": metadata.version("pyinfra"), "paramiko": metadata.version("paramiko"),
        "python": platform.python_version(), "openssh client": v(["ssh", "-V"]),
        "openssh-server (targets)": v(["dpkg-query", "-W", "-f", "${Version}", "openssh-server"]),
        "kernel": platform.release(), "cpus": str(os.cpu_count()),
    }


def summarize(results: list[RunResult], tools: list[Tool], n: int) -> dict:
    out: dict = {}
    for tool in tools:
        for kind in ("fresh", "noop"):
            rs = [r for r in results if r.tool == tool.key and r.kind == kind and r.round > 0]
            if not rs:
                continue
            walls = [r.wall_s for r in rs]
            out.setdefault(tool.key, {})[kind] = {
                "median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls),
                "per_target_ms": 1000 * statistics.median(walls) / n, "walls_s": walls,
                "controller_cpu_s": statistics.median(r.controller_cpu_s for r in rs),
                "target_cpu_s": statistics.median(r.target_cpu_s for r in rs),
                "all_ok": all(r.ok for r in rs), "failed_rounds": [r.round for r in rs if not r.ok],
                "noop_report": [r.changed_noop for r in rs if r.changed_noop],
            }
    return out


def ratios(summary: dict) -> dict:
    res: dict = {}
    rt = summary.get("rt-tune", {})
    for key, sm in summary.items():
        if key == "rt-tune":
            continue
        goal = GOALS["ansible" if key.startswith("ansible") else key]
        for kind in ("fresh", "noop"):
            if kind in rt and kind in sm:
                ok = rt[kind]["all_ok"] and sm[kind]["all_ok"]
                r = rt[kind]["median_s"] / sm[kind]["median_s"]
                res.setdefault(key, {})[kind] = {"ratio": r, "goal": goal, "met": bool(ok and r <= goal),
                                                 "valid": ok}
    return res


def print_report(doc: dict) -> None:
    n = doc["targets"]
    print("## Fleet benchmark: rt-tune vs Ansible vs pyinfra\n")
    print(f"`{doc['command']}`: {n} real sshd targets (one network + mount namespace each, on this machine), "
          f"{doc['rounds']} rounds ({doc['quick_rounds']} for rt-tune and pyinfra), alternating order, after one "
          f"untimed warm-up run per tool. Wall time = the "
          f"tool's process from start to exit; 'noop' = the same run again on the finished fleet.\n")
    labels = {t["key"]: t["label"] for t in doc["tools"]}
    print("| tool | pass | median s | min s | max s | per target ms | controller CPU s | targets CPU s | "
          "correct |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for key, kinds in doc["summary"].items():
        for kind, s in kinds.items():
            ok = "yes" if s["all_ok"] else f"NO (rounds {s['failed_rounds']})"
            print(f"| {labels[key]} | {kind} | {s['median_s']:.2f} | {s['min_s']:.2f} | {s['max_s']:.2f} | "
                  f"{s['per_target_ms']:.0f} | {s['controller_cpu_s']:.2f} | {s['target_cpu_s']:.2f} | {ok} |")
    print()
    print("Goals (rt-tune's median wall time / the tool's): <= 0.25x Ansible, <= 0.5x pyinfra.\n")
    print("| vs | pass | ratio rt-tune/tool | goal | met |")
    print("|---|---|---:|---:|---|")
    for key, kinds in doc["ratios"].items():
        for kind, r in kinds.items():
            met = ("yes" if r["met"] else "no") if r["valid"] else "n/a (a run failed)"
            print(f"| {labels[key]} | {kind} | {r['ratio']:.3f} | {r['goal']} | {met} |")
    print()
    noop = {labels[k]: v["noop"]["noop_report"][:1] for k, v in doc["summary"].items() if "noop" in v}
    if noop:
        print("What each tool reported on its noop pass: " +
              "; ".join(f"{k}: {v[0] if v else '?'}" for k, v in noop.items()) + "\n")
    print("Settings:")
    for t in doc["tools"]:
        print(f"- {t['label']}: {t['settings']}")
    print()
    print("Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()) + "\n")
    h = doc["host_check"]
    print(f"This machine: /etc/sysctl.d before {h['before']['etc_sysctl_d']}, after {h['after']['etc_sysctl_d']}; "
          f"ip_forward before {h['before']['ip_forward']}, after {h['after']['ip_forward']} -> "
          f"{'UNCHANGED' if h['unchanged'] else 'CHANGED!'}")
    c = doc["target_check"]
    print(f"Targets at start: ip_forward {c['ip_forward_at_start']}; /etc/sysctl.d seen over SSH is the private "
          f"dir (same device:inode; empty) and /root/.bashrc the plain one on {c['private_sysctl_d_ok']}/{n} "
          f"targets; hostnames "
          f"{c['hostnames'][0]}..{c['hostnames'][-1]}\n")
    print(f"Load average at start {doc['loadavg']['start']}, at end {doc['loadavg']['end']}."
          f"{' Other heavy processes were running: ' + doc['foreign'] if doc['foreign'] else ''}")
    print("Caveat: controller and targets share this machine's CPUs: target-side work (Ansible's Python "
          "modules on every target, every task) competes with the controller here; on a real fleet it runs on "
          "the targets' own CPUs. See the CPU columns.\n")
    p = doc.get("profile")
    if p:
        print("### Where rt-tune's time goes\n")
        print(f"- Python start + imports of orchestrator (changes, facts, transport): "
              f"{1000 * p['python_start_and_imports_s']:.0f} ms (median of 3, bytecode cached)")
        c = p["connect_only"]
        print(f"- paramiko connect + host key check + auth only: {c['one_target_ms']:.0f} ms for 1 target alone; "
              f"{n} at once: {c['in_process_wall_s']:.2f} s in process (median per target "
              f"{c['per_target_median_ms']:.0f} ms), controller CPU {c['controller_cpu_s']:.2f} s")
        for key in ("one_target", "fleet"):
            f = p[key]
            print(f"- instrumented run, {f['label']}: {f['process_wall_s']:.2f} s process, "
                  f"{f['in_process_wall_s']:.2f} s in process, controller CPU {f['controller_cpu_s']:.2f} s, "
                  f"{f['commands_per_target']:.0f} remote commands per target (median "
                  f"{f['all_commands_median_ms']:.1f} ms each), correct: {f['ok']}")
            print("  - phase medians (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in f["phase_median_ms"].items()))
            print("  - phase max (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in f["phase_max_ms"].items()))
            print("  - per command (count per target x median ms): " + "; ".join(
                f"{k} {f['command_count'][k]}x {v:.1f}" for k, v in f["command_median_ms"].items()))
        py = doc["summary"].get("pyinfra", {}).get("fresh", {}).get("median_s")
        am = next((doc["summary"][k]["fresh"]["median_s"] for k in ("ansible-min", "ansible")
                   if k in doc["summary"]), None)
        print(f"\nWhat-ifs (NOT rt-tune's code; {n} targets, fresh, process wall, median of "
              f"{len(next(iter(p['what_if'].values()))['walls_s'])}, interleaved with rt-tune as is):\n")
        print("| variant | process s | in process s | controller CPU s | targets CPU s | / pyinfra fresh | "
              "/ Ansible fresh | correct |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        for label, w in p["what_if"].items():
            rp = f"{w['process_wall_s'] / py:.3f}" if py else "-"
            ra = f"{w['process_wall_s'] / am:.3f}" if am else "-"
            print(f"| {label} | {w['process_wall_s']:.2f} | {w['in_process_wall_s']:.2f} | "
                  f"{w['controller_cpu_s']:.2f} | {w['targets_cpu_s']:.2f} | {rp} | {ra} | {w['ok']} |")
        c, k = p["cpu_per_command_ms"], p["cpu_per_connection_ms"]
        print(f"\nCPU per remote command (as is minus connect only, {p['fleet']['commands_per_target']:.0f} "
              f"commands per target): targets {c['targets']:.1f} ms (sshd session, bash, timeout, the command), "
              f"controller {c['controller']:.1f} ms (paramiko channel); per connection on the targets "
              f"{k['targets']:.1f} ms (sshd fork + re-exec, key exchange, auth).")
        a = p["what_if"]["rt-tune as is"]
        cpu = a["controller_cpu_s"] + a["targets_cpu_s"]
        one = p["one_target"]
        print(f"rt-tune as is used {cpu:.2f} CPU-seconds (controller + targets) in {a['process_wall_s']:.2f} s of "
              f"wall on {os.cpu_count()} CPUs, {100 * cpu / (a['process_wall_s'] * (os.cpu_count() or 1)):.0f}% of "
              f"them by itself (other sessions' load comes on top). Where that share is high, a round trip costs "
              f"mostly CPU here; on a real fleet each target has its own CPUs and a round trip costs latency, as "
              f"in the 1-target run (median per command {one['all_commands_median_ms']:.0f} ms).")
        print()
    sc = doc.get("scale")
    if sc and "error" not in sc:
        print(f"Controller cost per unit, `tune rollout`'s code over a {sc['transport']} transport: "
              f"{sc['units']} units, {sc['max_in_flight']} in flight, {sc['runs_per_unit']} cyclictest runs each "
              f"(RTT {sc['rtt_ms']:g} ms, connect {sc['connect_ms']:g} ms): {sc['cpu_ms_per_unit']:.0f} ms CPU per "
              f"unit, resident memory {sc['rss_start_mib']:.0f} -> {sc['rss_end_mib']:.0f} MiB (peak "
              f"{sc['rss_peak_mib']:.0f}; {sc['rss_growth_kib_per_unit']:.0f} KiB per unit), journal "
              f"{sc['journal_kib_per_unit']:.0f} KiB per unit, {sc['wall_s']:.0f} s wall.")
    elif sc:
        print(f"Scale figure FAILED: {sc['error']}")
    print(f"Whole benchmark: {doc['total_s']:.0f} s.")


# ---- main ------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=int, default=32, help="number of sshd targets (default 32)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per tool (default 3)")
    ap.add_argument("--quick-rounds", type=int, default=None,
                    help="timed rounds for rt-tune and pyinfra, the two quick tools (default: --rounds)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--no-noop", action="store_true", help="skip the idempotent (already in place) pass")
    ap.add_argument("--no-profile", action="store_true", help="skip profiling rt-tune")
    ap.add_argument("--ansible-facts", choices=["both", "all", "min"], default="both",
                    help="Ansible variants: full facts (its default), the minimal subset, or both (default)")
    ap.add_argument("--tools", default="rt-tune,ansible,pyinfra", help="comma-separated subset of the tools")
    ap.add_argument("--scale", type=int, default=1000,
                    help="second figure: controller CPU and memory per unit for a rollout to this many SIMULATED "
                         "units (benchmarks/fleet/scale.py); 0 skips it (default 1000)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    command = "python benchmarks/fleet_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    wl = Workload.default()
    # Ctrl-C cleans up even when started as a background job (which inherits SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    become_subreaper()
    load_start = os.getloadavg()
    foreign = foreign_load()
    wanted = set(args.tools.split(","))
    variants = {"both": ["ansible", "ansible-min"], "all": ["ansible"], "min": ["ansible-min"]}[args.ansible_facts]
    if "ansible" not in wanted:
        variants = []
    results: list[RunResult] = []
    doc: dict = {"command": command.strip(), "targets": args.targets, "rounds": args.rounds,
                 "quick_rounds": args.rounds if args.quick_rounds is None else args.quick_rounds}
    with SshFleet(args.targets, log=progress) as fleet:
        assert fleet.base is not None
        work = fleet.base / "work"
        work.mkdir()
        doc["target_check"] = confirm_targets(fleet)
        # rt-tune and pyinfra, the close pair, run back to back, each first every other round
        rank = {"rt-tune": 0, "pyinfra": 1, "ansible": 2, "ansible-min": 3}
        tools = sorted((t for t in make_tools(fleet, work, wl, variants) if t.key in wanted or t.key in variants),
                       key=lambda t: rank[t.key])
        kinds = ["fresh"] if args.no_noop else ["fresh", "noop"]
        quick = args.rounds if args.quick_rounds is None else args.quick_rounds
        rounds_of = {t.key: (quick if t.key in ("rt-tune", "pyinfra") else args.rounds) for t in tools}
        for rnd in range(0, max(rounds_of.values()) + 1):  # round 0: warm-up, not counted
            order = tools if rnd % 2 == 0 else list(reversed(tools))
            for tool in order:
                if rnd > rounds_of[tool.key]:
                    continue
                for kind in kinds:
                    if kind == "fresh":
                        fleet.reset()
                    res = run_tool(tool, fleet, wl, work, kind, rnd)
                    results.append(res)
                    what = "warm-up" if rnd == 0 else f"round {rnd}/{rounds_of[tool.key]}"
                    progress(f"{what}: {tool.label} {kind}: {res.wall_s:.2f} s "
                             f"(controller CPU {res.controller_cpu_s:.1f} s, "
                             f"targets CPU {res.target_cpu_s:.1f} s) "
                             f"{'ok' if res.ok else 'FAILED: ' + '; '.join(res.problems[:3])}")
        summary = summarize(results, tools, args.targets)
        doc["summary"] = summary
        doc["ratios"] = ratios(summary)
        doc["tools"] = [{"key": t.key, "label": t.label, "settings": t.settings} for t in tools]
        doc["runs"] = [r.__dict__ for r in results]
        if not args.no_profile and any(t.key == "rt-tune" for t in tools):
            doc["profile"] = profile_rt_tune(fleet, wl, work, args.rounds)
        fleet.reset()
    doc["host_check"] = {"before": fleet.host_before, "after": fleet.host_after,
                         "unchanged": fleet.host_before == fleet.host_after}
    progress(f"this machine's /etc/sysctl.d and ip_forward "
             f"{'unchanged' if doc['host_check']['unchanged'] else 'CHANGED'}: {fleet.host_after}")
    if args.scale:
        progress(f"second figure: a rollout to {args.scale} simulated units (controller CPU and memory)")
        proc = subprocess.run([sys.executable, "-m", "benchmarks.fleet.scale", str(args.scale)], cwd=REPO,
                              capture_output=True, text=True, check=False)
        doc["scale"] = json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr[-2000:]}
    doc["versions"] = versions()
    doc["loadavg"] = {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]}
    doc["foreign"] = foreign or foreign_load()
    doc["total_s"] = time.monotonic() - _T0
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_report(doc)
    all_ok = all(r.ok for r in results) and doc["host_check"]["unchanged"]
    return 0 if all_ok else 1


def confirm_targets(fleet: SshFleet) -> dict:
    """From inside every target (over rt-tune's SSHTransport): ip_forward starts at 0, /etc/sysctl.d is the
    private directory (same device:inode as <base>/tN/sysctl.d here, and empty)."""
    from concurrent.futures import ThreadPoolExecutor

    from orchestrator.remote.ssh import SSHTransport

    def one(pair):
        target, ep = pair
        with SSHTransport(ep) as t:
            out = t.run(["sh", "-c", "sysctl net.ipv4.ip_forward; stat -c %d:%i /etc/sysctl.d; "
                         "ls -A /etc/sysctl.d | wc -l; hostname; stat -c %d:%i /root/.bashrc"],
                        timeout_s=30).stdout.split("\n")
        st, rc = os.stat(target.sysctl_dir), os.stat(fleet.bashrc)
        private = out[1].strip() == f"{st.st_dev}:{st.st_ino}" and out[2].strip() == "0"
        return out[0].strip(), private and out[4].strip() == f"{rc.st_dev}:{rc.st_ino}", out[3].strip()

    with ThreadPoolExecutor(max_workers=fleet.count) as pool:
        rows = list(pool.map(one, zip(fleet.targets, fleet.endpoints(), strict=True)))
    values = sorted({r[0] for r in rows})
    private = sum(r[1] for r in rows)
    progress(f"targets confirmed from inside: {values}; private /etc/sysctl.d on {private}/{fleet.count}")
    if values != ["net.ipv4.ip_forward = 0"] or private != fleet.count:
        raise SystemExit(f"targets are not as expected: {rows}")
    return {"ip_forward_at_start": values[0], "private_sysctl_d_ok": private, "hostnames": [r[2] for r in rows]}


def foreign_load() -> str:
    """Other CPU-heavy processes on this shared machine (QEMU of a lab test run), to mention with the figures."""
    try:
        out = subprocess.run(["ps", "-eo", "pcpu=,comm="], capture_output=True, text=True, check=False).stdout
    except OSError:
        return ""
    heavy = [line.split(None, 1) for line in out.splitlines() if line.strip()]
    heavy = [f"{c.strip()} {p}%" for p, c in heavy if float(p) >= 20 and c.strip() not in ("ps",)]
    return ", ".join(heavy)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; targets cleaned up", file=sys.stderr)
        sys.exit(130)
