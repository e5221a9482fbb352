"""Writers of rmvpe.pt-shaped files for tests (random weights in the real file's format)."""

from __future__ import annotations

from pathlib import Path

import torch
from rvc_pipeline.components.pitch.rmvpe import E2E


def save_random_checkpoint(path: str | Path, seed: int = 0, half: bool = True) -> Path:
    """Write a randomly initialised E2E state_dict in rmvpe.pt's format.

    The public rmvpe.pt holds its 90.5 M parameters as float16 (181 MB), hence `half`."""
    torch.manual_seed(seed)
    net = E2E()
    if half:
        net = net.half()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), p)
    return p
