"""Benchmarks that ship with sfpp: the end-to-end suite of `sfpp bench` (e2e.py), the eager Self-Forcing baseline it
runs against (baseline.py), and the provenance every benchmark records (record.py)."""
