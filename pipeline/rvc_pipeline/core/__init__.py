"""Torch-free core: the only part of rvc_pipeline the operator imports."""
