"""Building blocks: WaveNet-style WN, HiFi-GAN ResBlock1/2, coupling flow, Flip."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from rvc_pipeline.nn.commons import get_padding, init_normal
from rvc_pipeline.nn.weightnorm import remove_weight_norm, weight_norm

LRELU_SLOPE = 0.1


class WN(nn.Module):
    """Gated dilated conv stack conditioned on g (WaveNet without the causal part).

    Per layer: a = in_layer(x) + cond slice; acts = tanh(a[:h]) * sigmoid(a[h:]); res_skip(acts) is split
    into a residual (added to x, masked) and a skip part (summed into the output); the last layer is
    skip only.
    """

    def __init__(self, hidden_channels: int, kernel_size: int, dilation_rate: int, n_layers: int,
                 gin_channels: int = 0, p_dropout: float = 0.0) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError("WN kernel_size must be odd")
        self.hidden_channels = hidden_channels
        self.n_layers = n_layers
        self.gin_channels = gin_channels
        self.in_layers = nn.ModuleList()
        self.res_skip_layers = nn.ModuleList()
        self.drop = nn.Dropout(p_dropout)
        for i in range(n_layers):
            dilation = dilation_rate**i
            padding = (kernel_size * dilation - dilation) // 2
            self.in_layers.append(weight_norm(nn.Conv1d(hidden_channels, 2 * hidden_channels, kernel_size,
                                                        dilation=dilation, padding=padding)))
            out = 2 * hidden_channels if i < n_layers - 1 else hidden_channels
            self.res_skip_layers.append(weight_norm(nn.Conv1d(hidden_channels, out, 1)))
        if gin_channels:
            self.cond_layer = weight_norm(nn.Conv1d(gin_channels, 2 * hidden_channels * n_layers, 1))

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden_channels
        output = torch.zeros_like(x)
        if g is not None:
            g = self.cond_layer(g)
        for i, (in_layer, res_skip) in enumerate(zip(self.in_layers, self.res_skip_layers)):
            x_in = in_layer(x)
            if g is not None:
                x_in = x_in + g[:, i * 2 * h:(i + 1) * 2 * h, :]
            acts = self.drop(torch.tanh(x_in[:, :h]) * torch.sigmoid(x_in[:, h:]))
            rs = res_skip(acts)
            if i < self.n_layers - 1:
                x = (x + rs[:, :h]) * x_mask
                output = output + rs[:, h:]
            else:
                output = output + rs
        return output * x_mask

    def remove_weight_norm(self) -> None:
        if self.gin_channels:
            remove_weight_norm(self.cond_layer)
        for layer in self.in_layers:
            remove_weight_norm(layer)
        for layer in self.res_skip_layers:
            remove_weight_norm(layer)


class ResBlock1(nn.Module):
    """HiFi-GAN ResBlock1: for each dilation d, x += c2(lrelu(c1_d(lrelu(x))))."""

    def __init__(self, channels: int, kernel_size: int = 3, dilation: tuple[int, ...] = (1, 3, 5)) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList([
            weight_norm(nn.Conv1d(channels, channels, kernel_size, 1, dilation=d,
                                  padding=get_padding(kernel_size, d)))
            for d in dilation
        ])
        self.convs2 = nn.ModuleList([
            weight_norm(nn.Conv1d(channels, channels, kernel_size, 1, dilation=1,
                                  padding=get_padding(kernel_size, 1)))
            for _ in dilation
        ])
        for c in list(self.convs1) + list(self.convs2):
            init_normal(c, 0.01)

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor | None = None) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            xt = F.leaky_relu(x, LRELU_SLOPE)
            if x_mask is not None:
                xt = xt * x_mask
            xt = c1(xt)
            xt = F.leaky_relu(xt, LRELU_SLOPE)
            if x_mask is not None:
                xt = xt * x_mask
            x = c2(xt) + x
        if x_mask is not None:
            x = x * x_mask
        return x

    def remove_weight_norm(self) -> None:
        for c in list(self.convs1) + list(self.convs2):
            remove_weight_norm(c)


class ResBlock2(nn.Module):
    """HiFi-GAN ResBlock2 (resblock "2"; RVC's configs never use it)."""

    def __init__(self, channels: int, kernel_size: int = 3, dilation: tuple[int, ...] = (1, 3)) -> None:
        super().__init__()
        self.convs = nn.ModuleList([
            weight_norm(nn.Conv1d(channels, channels, kernel_size, 1, dilation=d,
                                  padding=get_padding(kernel_size, d)))
            for d in dilation
        ])
        for c in self.convs:
            init_normal(c, 0.01)

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor | None = None) -> torch.Tensor:
        for c in self.convs:
            xt = F.leaky_relu(x, LRELU_SLOPE)
            if x_mask is not None:
                xt = xt * x_mask
            x = c(xt) + x
        if x_mask is not None:
            x = x * x_mask
        return x

    def remove_weight_norm(self) -> None:
        for c in self.convs:
            remove_weight_norm(c)


class Flip(nn.Module):
    """Reverse the channel order (its own inverse)."""

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor | None = None, g: torch.Tensor | None = None,
                reverse: bool = False) -> torch.Tensor:
        return torch.flip(x, [1])


class ResidualCouplingLayer(nn.Module):
    """Affine coupling (mean only in RVC): x1 <- m(x0) + x1 forward, x1 <- x1 - m(x0) in reverse."""

    def __init__(self, channels: int, hidden_channels: int, kernel_size: int, dilation_rate: int,
                 n_layers: int, p_dropout: float = 0.0, gin_channels: int = 0,
                 mean_only: bool = True) -> None:
        super().__init__()
        if channels % 2:
            raise ValueError("coupling channels must be even")
        self.half_channels = channels // 2
        self.mean_only = mean_only
        self.pre = nn.Conv1d(self.half_channels, hidden_channels, 1)
        self.enc = WN(hidden_channels, kernel_size, dilation_rate, n_layers, gin_channels=gin_channels,
                      p_dropout=p_dropout)
        self.post = nn.Conv1d(hidden_channels, self.half_channels * (2 - int(mean_only)), 1)
        nn.init.zeros_(self.post.weight)
        nn.init.zeros_(self.post.get_parameter("bias"))

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, g: torch.Tensor | None = None,
                reverse: bool = False) -> torch.Tensor:
        x0, x1 = torch.split(x, [self.half_channels, self.half_channels], 1)
        h = self.pre(x0) * x_mask
        h = self.enc(h, x_mask, g=g)
        stats = self.post(h) * x_mask
        if self.mean_only:
            m, logs = stats, None
        else:
            m, logs = torch.split(stats, [self.half_channels, self.half_channels], 1)
        if not reverse:
            x1 = m + x1 * (torch.exp(logs) if logs is not None else 1.0) * x_mask
        else:
            x1 = (x1 - m) * (torch.exp(-logs) if logs is not None else 1.0) * x_mask
        return torch.cat([x0, x1], 1)

    def remove_weight_norm(self) -> None:
        self.enc.remove_weight_norm()


class ResidualCouplingBlock(nn.Module):
    """n_flows x [coupling, Flip]; reverse runs the list backwards (indices 0,2,4,6 hold parameters)."""

    def __init__(self, channels: int, hidden_channels: int, kernel_size: int, dilation_rate: int,
                 n_layers: int, n_flows: int = 4, gin_channels: int = 0) -> None:
        super().__init__()
        self.flows = nn.ModuleList()
        for _ in range(n_flows):
            self.flows.append(ResidualCouplingLayer(channels, hidden_channels, kernel_size, dilation_rate,
                                                    n_layers, gin_channels=gin_channels, mean_only=True))
            self.flows.append(Flip())

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, g: torch.Tensor | None = None,
                reverse: bool = False) -> torch.Tensor:
        flows = reversed(self.flows) if reverse else self.flows
        for flow in flows:
            x = flow(x, x_mask, g=g, reverse=reverse)
        return x

    def remove_weight_norm(self) -> None:
        for flow in self.flows:
            if isinstance(flow, ResidualCouplingLayer):
                flow.remove_weight_norm()
