"""HiFi-GAN discriminators: MultiPeriodDiscriminator (v1) and ...V2 (v2).

`forward(y, y_hat)` returns `(real_logits, fake_logits, real_fmaps, fake_fmaps)`: one entry per
sub-discriminator (7 for v1, 9 for v2); each fmaps entry is a list (7 maps for DiscriminatorS, 6 for
DiscriminatorP). When both or neither of y and y_hat need a gradient (the D step: y_hat detached), real
and fake audio go through each sub-discriminator as one batch (same numbers as two calls, half the
kernel launches); otherwise (the G step) as two calls, as RVC does, so that the real half records no
autograd graph when D's parameters are frozen (see trainer.gan_step).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from rvc_pipeline.nn.commons import get_padding
from rvc_pipeline.nn.modules import LRELU_SLOPE
from rvc_pipeline.nn.weightnorm import remove_all_weight_norm, weight_norm

PERIODS: dict[str, tuple[int, ...]] = {"v1": (2, 3, 5, 7, 11, 17), "v2": (2, 3, 5, 7, 11, 17, 23, 37)}


def _conv_stack(convs: nn.ModuleList, conv_post: nn.Module,
                x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Each conv then LeakyReLU(0.1), then conv_post: (flattened logits, every activation + the logits)."""
    fmap: list[torch.Tensor] = []
    for conv in convs:
        x = F.leaky_relu(conv(x), LRELU_SLOPE)
        fmap.append(x)
    x = conv_post(x)
    fmap.append(x)
    return torch.flatten(x, 1, -1), fmap


class DiscriminatorS(nn.Module):
    """Scale discriminator on raw audio (grouped strided Conv1d stack)."""

    def __init__(self) -> None:
        super().__init__()
        specs = [(1, 16, 15, 1, 1, 7), (16, 64, 41, 4, 4, 20), (64, 256, 41, 4, 16, 20),
                 (256, 1024, 41, 4, 64, 20), (1024, 1024, 41, 4, 256, 20), (1024, 1024, 5, 1, 1, 2)]
        self.convs = nn.ModuleList([
            weight_norm(nn.Conv1d(i, o, k, s, groups=g, padding=p)) for i, o, k, s, g, p in specs
        ])
        self.conv_post = weight_norm(nn.Conv1d(1024, 1, 3, 1, padding=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x [B, 1, T] -> (logits [B, N], 7 feature maps)."""
        return _conv_stack(self.convs, self.conv_post, x)


class DiscriminatorP(nn.Module):
    """Period discriminator: audio folded to [B, 1, T/p, p], Conv2d (k, 1) stack."""

    def __init__(self, period: int, kernel_size: int = 5, stride: int = 3) -> None:
        super().__init__()
        self.period = period
        pad = (get_padding(kernel_size, 1), 0)
        chans = [1, 32, 128, 512, 1024]
        convs = [weight_norm(nn.Conv2d(chans[i], chans[i + 1], (kernel_size, 1), (stride, 1), padding=pad))
                 for i in range(4)]
        convs.append(weight_norm(nn.Conv2d(1024, 1024, (kernel_size, 1), 1, padding=pad)))
        self.convs = nn.ModuleList(convs)
        self.conv_post = weight_norm(nn.Conv2d(1024, 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x [B, 1, T] -> (logits [B, N], 6 feature maps)."""
        b, c, t = x.shape
        if t % self.period:
            n_pad = self.period - t % self.period
            x = F.pad(x, (0, n_pad), "reflect")
            t = t + n_pad
        return _conv_stack(self.convs, self.conv_post, x.view(b, c, t // self.period, self.period))


class MultiPeriodDiscriminator(nn.Module):
    """[DiscriminatorS] + [DiscriminatorP(p) for p in periods] (v1: 6 periods, v2: 8)."""

    def __init__(self, periods: tuple[int, ...] = PERIODS["v1"]) -> None:
        super().__init__()
        self.periods = tuple(periods)
        self.discriminators = nn.ModuleList([DiscriminatorS()] + [DiscriminatorP(p) for p in periods])

    def forward(self, y: torch.Tensor, y_hat: torch.Tensor
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[torch.Tensor]],
                           list[list[torch.Tensor]]]:
        if y.shape != y_hat.shape:
            raise ValueError(f"discriminator: real {tuple(y.shape)} and fake {tuple(y_hat.shape)} differ")
        if y.requires_grad != y_hat.requires_grad:
            real, fake = self.run(y), self.run(y_hat.to(y.dtype))
            return real[0], fake[0], real[1], fake[1]
        b = y.size(0)
        logits, fmaps = self.run(torch.cat([y, y_hat.to(y.dtype)], dim=0))
        return ([x[:b] for x in logits], [x[b:] for x in logits], [[f[:b] for f in fm] for fm in fmaps],
                [[f[b:] for f in fm] for fm in fmaps])

    def run(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """x [B, 1, T] through every sub-discriminator: (logits, fmaps), one entry per discriminator."""
        outs = [d(x) for d in self.discriminators]
        return [o[0] for o in outs], [o[1] for o in outs]

    def remove_weight_norm(self) -> None:
        remove_all_weight_norm(self)


class MultiPeriodDiscriminatorV2(MultiPeriodDiscriminator):
    """v2: periods 2, 3, 5, 7, 11, 17, 23, 37."""

    def __init__(self) -> None:
        super().__init__(PERIODS["v2"])


def build_discriminator(version: str) -> MultiPeriodDiscriminator:
    """v1 -> MultiPeriodDiscriminator, v2 -> MultiPeriodDiscriminatorV2."""
    if version == "v1":
        return MultiPeriodDiscriminator(PERIODS["v1"])
    if version == "v2":
        return MultiPeriodDiscriminatorV2()
    raise ValueError(f"discriminator version must be 'v1' or 'v2', got {version!r}")
