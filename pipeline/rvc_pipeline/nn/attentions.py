"""The text encoder's transformer: VITS-style relative-position self-attention.

* Multi-head attention with 1x1-conv projections and relative-position embeddings shared across heads
  (`emb_rel_k`, `emb_rel_v`: [1, 2*window+1, k_channels]); positions farther apart than the window get
  no relative term.
* Post-norm residual blocks: x = LN1(x + attn(x)); x = LN2(x + FFN(x)); LayerNorm over channels with
  parameters named gamma/beta.

The relative terms are computed directly in window form ([T, 2w+1] per query instead of [T, 2T-1]),
which gives the same numbers as the pad/reshape formulation with less memory for long inputs.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class LayerNorm(nn.Module):
    """LayerNorm over the channel axis of [B, C, T] with RVC's parameter names gamma/beta."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.channels = channels
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, -1)
        x = F.layer_norm(x, (self.channels,), self.gamma, self.beta, self.eps)
        return x.transpose(1, -1)


def _rel_index(t: int, window: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For query i and relative slot r in [0, 2w]: key j = i + r - w, and whether 0 <= j < t."""
    i = torch.arange(t, device=device).unsqueeze(1)
    r = torch.arange(2 * window + 1, device=device).unsqueeze(0)
    j = i + r - window
    valid = (j >= 0) & (j < t)
    return j.clamp(0, t - 1), valid


class MultiHeadAttention(nn.Module):
    """Self-attention with relative-position keys and values (window `window_size`)."""

    def __init__(self, channels: int, out_channels: int, n_heads: int, p_dropout: float = 0.0,
                 window_size: int | None = 10) -> None:
        super().__init__()
        if channels % n_heads:
            raise ValueError(f"channels {channels} not divisible by n_heads {n_heads}")
        self.channels = channels
        self.n_heads = n_heads
        self.k_channels = channels // n_heads
        self.window_size = window_size
        if window_size is not None:
            rel_stddev = self.k_channels**-0.5
            self.emb_rel_k = nn.Parameter(torch.randn(1, window_size * 2 + 1, self.k_channels) * rel_stddev)
            self.emb_rel_v = nn.Parameter(torch.randn(1, window_size * 2 + 1, self.k_channels) * rel_stddev)
        self.conv_q = nn.Conv1d(channels, channels, 1)
        self.conv_k = nn.Conv1d(channels, channels, 1)
        self.conv_v = nn.Conv1d(channels, channels, 1)
        self.conv_o = nn.Conv1d(channels, out_channels, 1)
        self.drop = nn.Dropout(p_dropout)
        nn.init.xavier_uniform_(self.conv_q.weight)
        nn.init.xavier_uniform_(self.conv_k.weight)
        nn.init.xavier_uniform_(self.conv_v.weight)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, C, T]; attn_mask: [B, 1, T, T] (nonzero = attend)."""
        b, _, t = x.shape
        h, d = self.n_heads, self.k_channels
        q = self.conv_q(x).view(b, h, d, t).transpose(2, 3)  # [B, H, T, D]
        k = self.conv_k(x).view(b, h, d, t).transpose(2, 3)
        v = self.conv_v(x).view(b, h, d, t).transpose(2, 3)
        q = q / math.sqrt(d)
        scores = torch.matmul(q, k.transpose(-2, -1))  # [B, H, T, T]
        if self.window_size is not None:
            j, valid = _rel_index(t, self.window_size, x.device)  # [T, 2w+1]
            rel_logits = torch.matmul(q, self.emb_rel_k.to(q.dtype).transpose(-2, -1))  # [B, H, T, 2w+1]
            rel_logits = rel_logits * valid.to(rel_logits.dtype)
            # scatter each query's window logits to its absolute key positions
            local = torch.zeros_like(scores)
            local.scatter_add_(-1, j.expand(b, h, t, -1), rel_logits)
            scores = scores + local
        if attn_mask is not None:
            scores = scores.masked_fill(attn_mask == 0, -1e4)
        p_attn = self.drop(F.softmax(scores, dim=-1))
        out = torch.matmul(p_attn, v)  # [B, H, T, D]
        if self.window_size is not None:
            rel_w = torch.gather(p_attn, -1, j.expand(b, h, t, -1)) * valid.to(p_attn.dtype)
            out = out + torch.matmul(rel_w, self.emb_rel_v.to(rel_w.dtype))
        out = out.transpose(2, 3).reshape(b, h * d, t)
        return self.conv_o(out)


class FFN(nn.Module):
    """Conv1d(k) -> ReLU -> Conv1d(k), input masked before each conv, output masked ('same' padding)."""

    def __init__(self, in_channels: int, out_channels: int, filter_channels: int, kernel_size: int,
                 p_dropout: float = 0.0) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.conv_1 = nn.Conv1d(in_channels, filter_channels, kernel_size)
        self.conv_2 = nn.Conv1d(filter_channels, out_channels, kernel_size)
        self.drop = nn.Dropout(p_dropout)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_size == 1:
            return x
        left = (self.kernel_size - 1) // 2
        right = self.kernel_size // 2
        return F.pad(x, (left, right))

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor) -> torch.Tensor:
        x = self.conv_1(self._pad(x * x_mask))
        x = self.drop(torch.relu(x))
        x = self.conv_2(self._pad(x * x_mask))
        return x * x_mask


class Encoder(nn.Module):
    """n_layers x [relative-position attention, LN, FFN, LN] (post-norm)."""

    def __init__(self, hidden_channels: int, filter_channels: int, n_heads: int, n_layers: int,
                 kernel_size: int = 1, p_dropout: float = 0.0, window_size: int = 10) -> None:
        super().__init__()
        self.n_layers = n_layers
        self.drop = nn.Dropout(p_dropout)
        self.attn_layers = nn.ModuleList()
        self.norm_layers_1 = nn.ModuleList()
        self.ffn_layers = nn.ModuleList()
        self.norm_layers_2 = nn.ModuleList()
        for _ in range(n_layers):
            self.attn_layers.append(MultiHeadAttention(hidden_channels, hidden_channels, n_heads,
                                                       p_dropout=p_dropout, window_size=window_size))
            self.norm_layers_1.append(LayerNorm(hidden_channels))
            self.ffn_layers.append(FFN(hidden_channels, hidden_channels, filter_channels, kernel_size,
                                       p_dropout=p_dropout))
            self.norm_layers_2.append(LayerNorm(hidden_channels))

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor) -> torch.Tensor:
        """x: [B, C, T], x_mask: [B, 1, T]."""
        attn_mask = x_mask.unsqueeze(2) * x_mask.unsqueeze(-1)
        x = x * x_mask
        for attn, norm1, ffn, norm2 in zip(self.attn_layers, self.norm_layers_1, self.ffn_layers,
                                           self.norm_layers_2):
            y = self.drop(attn(x, attn_mask))
            x = norm1(x + y)
            y = self.drop(ffn(x, x_mask))
            x = norm2(x + y)
        return x * x_mask
