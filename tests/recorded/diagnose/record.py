"""Record the diagnosis window's raw output and the tracing state probe from a running lab.

Usage: RT_TUNE_STATE=DIR python tests/recorded/diagnose/record.py PREFIX TARGET [DURATION]
  (TARGET lab1.host or lab1.guest). Writes PREFIX-window.txt (the window script's unchanged stdout),
PREFIX-marker.txt (its section marker), PREFIX-state-before.txt and PREFIX-state-after.txt. Every file is the
stdout of the same argv `tune diagnose` runs (orchestrator/diagnose/probe.py), over SSH, through sudo.
"""

import secrets
import sys
from pathlib import Path

from orchestrator.config.inventory import load_inventory, split_target
from orchestrator.core.paths import Paths, default_inventory
from orchestrator.diagnose.probe import new_instance_name, state_argv, window_argv
from orchestrator.remote.ssh import SSHTransport

prefix, target = sys.argv[1], sys.argv[2]
duration = float(sys.argv[3]) if len(sys.argv) > 3 else 10
here = Path(__file__).parent
inv = load_inventory(default_inventory(Paths.from_env()))
unit, role = split_target(target)
with SSHTransport(inv.endpoint(unit, role)) as t:
    marker = "@@rt-tune-diag-" + secrets.token_hex(8)
    inst = new_instance_name()
    (here / f"{prefix}-state-before.txt").write_text(t.run(state_argv(), sudo=True).stdout)
    out = t.run(window_argv(marker, duration, inst, f"/run/{inst}.pid"), timeout_s=duration + 120, sudo=True)
    (here / f"{prefix}-window.txt").write_text(out.stdout)
    (here / f"{prefix}-marker.txt").write_text(marker + "\n")
    (here / f"{prefix}-state-after.txt").write_text(t.run(state_argv(), sudo=True).stdout)
    print(len(out.stdout), "bytes;", out.stderr[-500:])
