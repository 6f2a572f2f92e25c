"""Helpers of `benchmarks/fleet_bench.py`: a fleet of real sshd targets in network namespaces, and the
workload as rt-tune, Ansible and pyinfra each run it."""
