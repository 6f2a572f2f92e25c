#!/usr/bin/env python3
# managed by rt-tune: the vCPU map of a QEMU. Also run by systemd (ExecStartPost), so a restarted QEMU is pinned
# again.  rt-tune-pin-vcpus MAINPID --map VCPU:CPU[,VCPU:CPU...] --housekeeping CPUS [--fifo PRIO]
#        rt-tune-pin-vcpus --list MAINPID             (JSON: every thread's affinity and policy; read-only)
#        rt-tune-pin-vcpus --restore MAINPID JSON     (put back what --list printed before)
# Each mapped vCPU thread is allowed on its CPU alone; every other thread (the other vCPUs, the main loop, I/O
# and worker threads, call_rcu) on the housekeeping CPUs; threads QEMU starts later inherit the main thread's.
# vCPU threads: by name with -name ...,debug-threads=on ("CPU n/KVM", "CPU n/TCG"), pinned with qemu-affinity
# (the unit's, else rt-tune's copy); without debug-threads: QMP query-cpus-fast thread ids, pinned directly.
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

POLICIES = {0: "other", 1: "fifo", 2: "rr", 3: "batch", 5: "idle", 6: "deadline"}

def tasks(pid):
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            found[int(tid)] = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
        except OSError:
            continue
    return found

def named_vcpus(pid):
    found = {}
    for tid, comm in tasks(pid).items():
        m = re.fullmatch(r"CPU (\d+)/(KVM|TCG|HVF|WHPX)", comm)
        if m:
            found[int(m.group(1))] = (tid, comm)
    return found

def qmp_vcpus(argv):
    path = None
    for i, a in enumerate(argv):
        if a == b"-qmp" and i + 1 < len(argv) and argv[i + 1].startswith(b"unix:"):
            path = argv[i + 1][5:].split(b",")[0].decode()
    if path is None:
        sys.exit("no debug-threads=on and no -qmp unix: socket: cannot find the vCPU threads")
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    f = s.makefile("rw")
    json.loads(f.readline())
    for cmd in ("qmp_capabilities", "query-cpus-fast"):
        f.write(json.dumps({"execute": cmd}) + "\n")
        f.flush()
        while True:
            reply = json.loads(f.readline())
            if "return" in reply or "error" in reply:
                break
    return {c["cpu-index"]: (c["thread-id"], None) for c in reply.get("return", [])}

def cpulist(cpus):
    out, cpus = [], sorted(cpus)
    i = 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        out.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(out)

def parse_cpus(text):
    cpus = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus

def state(tid):
    try:
        pol = os.sched_getscheduler(tid)
        return {"cpus": cpulist(os.sched_getaffinity(tid)), "policy": POLICIES.get(pol, str(pol)),
                "prio": os.sched_getparam(tid).sched_priority}
    except ProcessLookupError:
        return None

def find_vcpus(pid, wait_for):
    argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    if any(b"debug-threads=on" in a for a in argv):
        deadline = time.time() + 30
        while len(named_vcpus(pid)) < wait_for and time.time() < deadline:
            time.sleep(0.1)
        vcpus = named_vcpus(pid)
        if vcpus:
            return vcpus, "names"
    return qmp_vcpus(argv), "qmp"

def listing(pid):
    vcpus, via = find_vcpus(pid, 1)
    vtids = {tid for tid, _ in vcpus.values()}
    out = {"via": via, "main": state(pid), "vcpus": {}, "threads": {}}
    for i, (tid, _) in sorted(vcpus.items()):
        out["vcpus"][str(i)] = state(tid)
    for tid, comm in tasks(pid).items():
        st = None if tid == pid or tid in vtids else state(tid)
        if st is not None:
            seen = out["threads"].setdefault(comm, [])
            if st not in seen:
                seen.append(st)
    for comm in out["threads"]:
        out["threads"][comm].sort(key=lambda st: json.dumps(st, sort_keys=True))
    return out

def set_policy(tid, policy, prio):
    pol = {v: k for k, v in POLICIES.items()}[policy]
    os.sched_setscheduler(tid, pol, os.sched_param(prio))

def pin(pid, vmap, hk, fifo):
    vcpus, via = find_vcpus(pid, max(vmap) + 1)
    missing = sorted(set(vmap) - set(vcpus))
    if missing:
        sys.exit(f"vCPU {missing[0]} not found: QEMU pid {pid} has vCPUs {cpulist(vcpus) or 'none'}")
    done = False
    if via == "names":
        tool = shutil.which("qemu-affinity")
        cmd = [tool] if tool else [sys.executable, "@QA_COPY@"]
        spec = [f"{vcpus[v][1]}:{c}" for v, c in sorted(vmap.items())]
        others = [] if hk is None else ["-p", cpulist(hk)]
        spec += [] if hk is None else [f"*:{cpulist(hk)}"]
        done = subprocess.run(cmd + [str(pid), *others, "-t", *spec], stdout=subprocess.DEVNULL).returncode == 0
        if not done:
            print("qemu-affinity failed; pinning by thread id", file=sys.stderr)
    if not done:
        rt = {vcpus[v][0]: c for v, c in vmap.items()}
        for tid in tasks(pid):
            if tid not in rt and hk is None:
                continue
            try:
                os.sched_setaffinity(tid, {rt[tid]} if tid in rt else hk)
            except ProcessLookupError:
                pass  # a worker thread that just ended
    if hk is not None:
        sweep(pid, {vcpus[v][0] for v in vmap}, hk)
    if fifo:
        for v in vmap:
            set_policy(vcpus[v][0], "fifo", fifo)

def sweep(pid, vtids, hk):
    # a thread QEMU started while the threads were being pinned (a thread-pool worker spawned by a thread not yet
    # moved) inherited the old affinity: pin the stragglers until a pass finds none. Threads started afterwards
    # inherit the housekeeping CPUs from the thread that starts them.
    for _ in range(10):
        strays = 0
        for tid in tasks(pid):
            try:
                if tid not in vtids and os.sched_getaffinity(tid) != hk:
                    os.sched_setaffinity(tid, hk)
                    strays += 1
            except ProcessLookupError:
                pass  # a worker thread that just ended
        if not strays:
            return
        time.sleep(0.05)

def restore(pid, before):
    vcpus, _ = find_vcpus(pid, len(before["vcpus"]))
    by_tid = {vcpus[int(v)][0]: st for v, st in before["vcpus"].items() if int(v) in vcpus}
    if before.get("main"):
        by_tid[pid] = before["main"]
    for tid, comm in tasks(pid).items():
        if tid in by_tid:
            continue
        seen = before.get("threads", {}).get(comm) or []
        by_tid[tid] = seen[0] if len(seen) == 1 else before.get("main")
    for tid, st in by_tid.items():
        if not st:
            continue
        try:
            os.sched_setaffinity(tid, parse_cpus(st["cpus"]))
            if "policy" in st and st["policy"] in ("other", "fifo", "rr", "batch", "idle"):
                set_policy(tid, st["policy"], st["prio"])
        except ProcessLookupError:
            pass

def main():
    if sys.argv[1] == "--list":
        print(json.dumps(listing(int(sys.argv[2]))))
    elif sys.argv[1] == "--restore":
        restore(int(sys.argv[2]), json.loads(sys.argv[3]))
    else:
        pid, opts = int(sys.argv[1]), sys.argv[2:]
        args = dict(zip(opts[::2], opts[1::2]))
        vmap = {int(v): int(c) for v, c in (p.split(":") for p in args["--map"].split(","))}
        hk = parse_cpus(args["--housekeeping"]) if "--housekeeping" in args else None
        pin(pid, vmap, hk, int(args.get("--fifo", 0)))

if __name__ == "__main__":
    main()
