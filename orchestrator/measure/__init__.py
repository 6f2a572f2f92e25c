"""Latency measurement: cyclictest on a target under a declared load, parsed into exact percentiles."""
