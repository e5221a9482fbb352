"""The demo: a generated voice set and the one-click local run."""
