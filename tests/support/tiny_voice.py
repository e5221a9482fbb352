"""A tiny voice model saved as RVC exports it, and a tiny HuBERT in fairseq's file format: conversion
tests (the batch converter, the convert step) run real inference on them in well under a second."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

from tests.support.fairseq_hubert import save_fairseq_checkpoint, small_model


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    """A narrow v2 40k generator with pitch, in RVC's small-model layout (fp16 weights, config, meta)."""
    import torch
    from rvc_pipeline.nn import constructor_args, get_config
    from rvc_pipeline.nn.synthesizer import SynthesizerTrn

    a = constructor_args(get_config("v2", "40k"), spk_embed_dim=4, segment_frames=32)
    a[2], a[3], a[4], a[5], a[6], a[13], a[16] = 16, 16, 32, 2, 1, 32, 16
    torch.manual_seed(seed)
    g = SynthesizerTrn(*a, version="v2", f0=True).eval()
    ckpt: OrderedDict[str, Any] = OrderedDict(
        weight=OrderedDict((k, v.half()) for k, v in g.state_dict().items() if "enc_q" not in k),
        config=a, info="1epoch", sr="40k", f0=1, version="v2")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def save_tiny_hubert(path: Path) -> Path:
    """A one-layer 768-d HuBERT (v2 features) in fairseq's checkpoint format."""
    save_fairseq_checkpoint(small_model(embed_dim=768, final_dim=256, layers=1), path)
    return path
