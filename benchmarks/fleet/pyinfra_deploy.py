"""The fleet benchmark's workload in pyinfra: facts with host.get_fact, the drop-in with files.put (byte-exact
content: rt-tune's), the runtime value with server.sysctl (runtime only: its persist= would write a different
line to /etc/sysctl.conf), then a read-back check on the target that fails the host when either is wrong.

Run by benchmarks/fleet_bench.py:  pyinfra pyinfra_inventory.py pyinfra_deploy.py -y --parallel 32
with $RTB_FLEET_WORKLOAD = JSON {sysctl_name, sysctl_value, dropin_path, dropin_content}.
"""

import base64
import json
import os
import shlex
from io import StringIO

from pyinfra import host
from pyinfra.facts.hardware import Cpus
from pyinfra.facts.server import Arch, Hostname, KernelVersion
from pyinfra.operations import files, server

w = json.loads(os.environ["RTB_FLEET_WORKLOAD"])

facts = {
    "hostname": host.get_fact(Hostname),
    "kernel_release": host.get_fact(KernelVersion),
    "arch": host.get_fact(Arch),
    "cpu_count": host.get_fact(Cpus),
}
if not all(facts.values()):
    raise RuntimeError(f"{host.name}: missing facts {facts}")

files.put(
    name="Persistent drop-in",
    src=StringIO(w["dropin_content"]),
    dest=w["dropin_path"],
    user="root",
    group="root",
    mode="644",
)

server.sysctl(
    name="Runtime value",
    key=w["sysctl_name"],
    value=w["sysctl_value"],
)

want_b64 = base64.b64encode(w["dropin_content"].encode()).decode()
server.shell(
    name="Read back the runtime value and the drop-in",
    commands=[
        f'test "$(sysctl -n {shlex.quote(w["sysctl_name"])})" = {shlex.quote(w["sysctl_value"])} && '
        f"echo {want_b64} | base64 -d | cmp -s - {shlex.quote(w['dropin_path'])}"
    ],
)
