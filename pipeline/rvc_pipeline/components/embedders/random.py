"""DEMO ONLY: HuBERT-base with random weights (seeded; the caller logs weights.DEMO_WARNING).

The features step, training's mute set and inference all get the same weights (seed 0), so a demo
model's features are consistent end to end. Speed is the real model's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rvc_pipeline.components.embedders.base import RANDOM_KIND, EmbedderKind, register
from rvc_pipeline.components.embedders.hf_hubert import HFHubert, hf_config

CATALOG = {"random": {"needs_gpu": True, "weights": [], "speed": 5.0, "rank": 200}}  # as hf_hubert


def random_embedder(device: str = "cpu", half: bool = False, seed: int = 0) -> HFHubert:
    """HuBERT-base (768-d, final_proj 256) with random weights from `seed`; the global RNG is left as is."""
    import transformers

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        config = hf_config()
        model = transformers.HubertModel(config)
        final_proj = nn.Linear(config.hidden_size, config.classifier_proj_size)
    finally:
        torch.random.set_rng_state(state)
    return HFHubert(model, final_proj, device=device, half=half, source=f"random(seed={seed})")


def _load(path: Path | None, device: str, half: bool) -> HFHubert:
    return random_embedder(device, half, seed=0)


register(EmbedderKind(RANDOM_KIND, accepts=lambda p: False, load=_load))
