"""Content embedders (HuBERT-like): see base.py for the interface and how to add one."""
