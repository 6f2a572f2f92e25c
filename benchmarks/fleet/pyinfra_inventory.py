"""pyinfra inventory of the fleet benchmark's targets, from the JSON file named by $RTB_FLEET_SPECS (written by
benchmarks/fleet_bench.py). Host key checking is on: the generated known_hosts file, StrictHostKeyChecking=yes
(pyinfra's StrictPolicy: an unknown key is refused)."""

import json
import os

_specs = json.loads(open(os.environ["RTB_FLEET_SPECS"]).read())

fleet = [
    (
        s["host"],
        {
            "ssh_user": s["user"],
            "ssh_port": s["port"],
            "ssh_key": s["key_file"],
            "ssh_known_hosts_file": s["known_hosts"],
            "ssh_strict_host_key_checking": "yes",
            "ssh_allow_agent": False,
            "ssh_look_for_keys": False,
        },
    )
    for s in _specs
]
