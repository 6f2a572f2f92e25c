"""Latency measurement: cyclictest on a target under a declared load, parsed into exact percentiles, with the
target's mechanism counters read right before and right after each run (counters.py; mechanism.py declares
which counters a change acts through)."""
