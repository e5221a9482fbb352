"""Machinery for the real-cluster e2e tier (scripts + the Python harness the fixtures use)."""
