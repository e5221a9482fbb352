"""Pluggable components, one file each, found by name through rvc_pipeline.core.catalog."""
