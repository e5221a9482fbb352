"""Small tensor helpers shared by the RVC models (masks, padding, segment slicing)."""

from __future__ import annotations

import torch
from torch import nn


def get_padding(kernel_size: int, dilation: int = 1) -> int:
    """'Same' padding for an odd kernel with dilation."""
    return (kernel_size * dilation - dilation) // 2


def init_normal(module: nn.Module, std: float = 0.01) -> None:
    """N(0, std) init of a conv's weight (of `weight_v` when weight-normed, then g = ||v||)."""
    from rvc_pipeline.nn.weightnorm import is_weight_normed, reset_weight_norm

    with torch.no_grad():
        if is_weight_normed(module):
            module.get_parameter("weight_v").normal_(0.0, std)
            reset_weight_norm(module)
        else:
            module.get_parameter("weight").normal_(0.0, std)


def sequence_mask(lengths: torch.Tensor, max_length: int | None = None) -> torch.Tensor:
    """[B] lengths -> [B, T] bool mask."""
    if max_length is None:
        max_length = int(lengths.max())
    x = torch.arange(max_length, dtype=lengths.dtype, device=lengths.device)
    return x.unsqueeze(0) < lengths.unsqueeze(1)


def slice_segments(x: torch.Tensor, ids_str: torch.Tensor, segment_size: int) -> torch.Tensor:
    """Per-item slices x[i, ..., ids[i] : ids[i] + segment_size] along the last axis.

    Works for [B, T] and [B, C, T]; positions past the end are zero (RVC would fail there).
    """
    t = x.size(-1)
    idx = ids_str.to(x.device).long().unsqueeze(1) + torch.arange(segment_size, device=x.device)  # [B, S]
    valid = idx < t
    idx = idx.clamp(max=t - 1)
    if x.dim() == 2:
        out = torch.gather(x, 1, idx)
        return out * valid.to(out.dtype)
    gidx = idx.unsqueeze(1).expand(x.size(0), x.size(1), segment_size)
    out = torch.gather(x, 2, gidx)
    return out * valid.unsqueeze(1).to(out.dtype)


def rand_slice_segments(
    x: torch.Tensor, x_lengths: torch.Tensor, segment_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random slice of `segment_size` frames per item: start = floor(U[0,1) * (len - seg + 1)).

    Items shorter than the segment start at 0 (and are zero-padded).
    """
    b = x.size(0)
    ids_str_max = (x_lengths - segment_size + 1).clamp(min=1).to(torch.float32)
    u = torch.rand(b, generator=generator, device=x.device if generator is None else generator.device)
    ids_str = (u.to(x.device) * ids_str_max.to(x.device)).long()
    return slice_segments(x, ids_str, segment_size), ids_str
