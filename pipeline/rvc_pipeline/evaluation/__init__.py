"""Checkpoint evaluation: the held-out split, scoring and selection, the HTML report."""
