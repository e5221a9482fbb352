"""HiFi-GAN decoders: `Generator` (no f0) and `GeneratorNSF` (neural source filter).

NSF source: the frame-rate f0 is held for `upp` (= hop) samples; the phase is the running sum of f0/sr
wrapped to [0, 1). Inside frame j, sub-sample k (1..upp) adds f0_j * k / sr to the wrapped phase of all
previous frames (sum of f0_i * upp / sr, accumulated in float64 and wrapped per frame), so the phase
stays exact for inputs of any length. sine = 0.1 * sin(2 pi phase); voiced samples (f0 > 0) get
N(0, 0.003) noise, unvoiced ones are noise only (std 0.1 / 3). har_source = tanh(Linear(1, 1)(e)).

Random draws in RVC's order: first U[0, 1) of shape [1, 1, dim] (float32), the initial phase of each
overtone (the fundamental's is set to 0, so with RVC's harmonic_num = 0 it changes nothing but is still
drawn), then the noise N(0, 1) of shape [B, T*upp, dim] (float32). So the same seed (or generator)
gives the same audio as RVC's code, up to float rounding of the phase.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from rvc_pipeline.nn.commons import init_normal
from rvc_pipeline.nn.modules import LRELU_SLOPE, ResBlock1, ResBlock2
from rvc_pipeline.nn.weightnorm import remove_weight_norm, weight_norm


class SineGen(nn.Module):
    """Sine excitation (fundamental plus `harmonic_num` overtones) with voiced/unvoiced noise."""

    def __init__(self, samp_rate: int, harmonic_num: int = 0, sine_amp: float = 0.1, noise_std: float = 0.003,
                 voiced_threshold: float = 0.0) -> None:
        super().__init__()
        self.sampling_rate = samp_rate
        self.harmonic_num = harmonic_num
        self.dim = harmonic_num + 1
        self.sine_amp = sine_amp
        self.noise_std = noise_std
        self.voiced_threshold = voiced_threshold

    def phase(self, f0: torch.Tensor, upp: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Wrapped phase in cycles, [B, T*upp, dim], float32, for f0 [B, T] in Hz."""
        b, t = f0.shape
        harmonics = torch.arange(1, self.dim + 1, device=f0.device, dtype=torch.float64)
        rad = f0.to(torch.float64).unsqueeze(-1) * harmonics / self.sampling_rate  # cycles/sample [B,T,D]
        frame_inc = rad * upp
        prev = torch.cumsum(frame_inc, dim=1) - frame_inc  # phase at the start of each frame
        prev = prev - torch.floor(prev)
        # random initial phase of each overtone, one per harmonic for the whole batch, 0 for the
        # fundamental; drawn even when dim == 1, as RVC does, so the noise that follows matches RVC's
        ini = torch.rand(1, 1, self.dim, device=f0.device, generator=generator, dtype=torch.float32)
        ini[..., 0] = 0.0
        prev = prev + ini.to(torch.float64)
        k = torch.arange(1, upp + 1, device=f0.device, dtype=torch.float32).view(1, 1, upp, 1)
        ph = prev.to(torch.float32).unsqueeze(2) + rad.to(torch.float32).unsqueeze(2) * k  # [B,T,upp,D]
        ph = ph - torch.floor(ph)
        return ph.reshape(b, t * upp, self.dim)

    @torch.no_grad()
    def forward(self, f0: torch.Tensor, upp: int, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """f0 [B, T] Hz -> (sine_waves [B, T*upp, dim], uv [B, T*upp, 1], noise [B, T*upp, dim])."""
        with torch.autocast(device_type=f0.device.type, enabled=False):
            f0 = f0.float()
            sine = self.sine_amp * torch.sin(2.0 * math.pi * self.phase(f0, upp, generator))
            uv = (f0 > self.voiced_threshold).to(torch.float32)
            uv = uv.repeat_interleave(upp, dim=1).unsqueeze(-1)  # [B, T*upp, 1]
            noise_amp = uv * self.noise_std + (1.0 - uv) * (self.sine_amp / 3.0)
            noise = noise_amp * torch.randn(sine.shape, generator=generator, device=sine.device,
                                            dtype=sine.dtype)
            sine = sine * uv + noise
        return sine, uv, noise


class SourceModuleHnNSF(nn.Module):
    """har_source = tanh(l_linear(SineGen(f0))) (no gradient through the sine generator)."""

    def __init__(self, sampling_rate: int, harmonic_num: int = 0, sine_amp: float = 0.1,
                 add_noise_std: float = 0.003, voiced_threshold: float = 0.0) -> None:
        super().__init__()
        self.l_sin_gen = SineGen(sampling_rate, harmonic_num, sine_amp, add_noise_std, voiced_threshold)
        self.l_linear = nn.Linear(harmonic_num + 1, 1)

    def forward(self, f0: torch.Tensor, upp: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """f0 [B, T] -> har_source [B, T*upp, 1]."""
        sine, _, _ = self.l_sin_gen(f0, upp, generator)
        return torch.tanh(self.l_linear(sine.to(self.l_linear.weight.dtype)))


def _resblock_class(resblock: str) -> type[nn.Module]:
    if str(resblock) == "1":
        return ResBlock1
    if str(resblock) == "2":
        return ResBlock2
    raise ValueError(f"resblock must be '1' or '2', got {resblock!r}")


class Generator(nn.Module):
    """HiFi-GAN generator conditioned on g; with `use_nsf`, the NSF variant (`GeneratorNSF`).

    The two share everything but `m_source` and `noise_convs`; registration order follows RVC so the
    state dicts list keys in the same order.
    """

    def __init__(self, initial_channel: int, resblock: str, resblock_kernel_sizes: tuple[int, ...],
                 resblock_dilation_sizes: tuple[tuple[int, ...], ...], upsample_rates: tuple[int, ...],
                 upsample_initial_channel: int, upsample_kernel_sizes: tuple[int, ...], gin_channels: int = 0,
                 sr: int | None = None, use_nsf: bool = False) -> None:
        super().__init__()
        self.num_kernels = len(resblock_kernel_sizes)
        self.num_upsamples = len(upsample_rates)
        self.upp = math.prod(upsample_rates)
        self.use_nsf = use_nsf
        if use_nsf:
            if sr is None:
                raise ValueError("GeneratorNSF needs the sampling rate")
            self.m_source = SourceModuleHnNSF(sampling_rate=sr, harmonic_num=0)
            self.noise_convs = nn.ModuleList()
            for i in range(self.num_upsamples):
                c_cur = upsample_initial_channel // (2 ** (i + 1))
                if i + 1 < self.num_upsamples:
                    s = math.prod(upsample_rates[i + 1:])
                    self.noise_convs.append(nn.Conv1d(1, c_cur, kernel_size=s * 2, stride=s, padding=s // 2))
                else:
                    self.noise_convs.append(nn.Conv1d(1, c_cur, kernel_size=1))
        self.conv_pre = nn.Conv1d(initial_channel, upsample_initial_channel, 7, 1, padding=3)
        self.ups = nn.ModuleList()
        for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes)):
            self.ups.append(weight_norm(nn.ConvTranspose1d(
                upsample_initial_channel // (2**i), upsample_initial_channel // (2 ** (i + 1)),
                k, u, padding=(k - u) // 2)))
        block = _resblock_class(resblock)
        self.resblocks = nn.ModuleList()
        ch = upsample_initial_channel
        for i in range(self.num_upsamples):
            ch = upsample_initial_channel // (2 ** (i + 1))
            for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes):
                self.resblocks.append(block(ch, k, tuple(d)))
        self.conv_post = nn.Conv1d(ch, 1, 7, 1, padding=3, bias=False)
        for up in self.ups:
            init_normal(up, 0.01)
        if gin_channels:
            self.cond = nn.Conv1d(gin_channels, upsample_initial_channel, 1)

    def forward(self, x: torch.Tensor, f0: torch.Tensor | None = None, g: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """x [B, C, T] (+ f0 [B, T] Hz for NSF) -> audio [B, 1, T*upp]."""
        har_source = None
        if self.use_nsf:
            if f0 is None:
                raise ValueError("GeneratorNSF needs f0")
            har_source = self.m_source(f0, self.upp, generator).transpose(1, 2)  # [B, 1, T*upp]
        x = self.conv_pre(x)
        if g is not None:
            x = x + self.cond(g)
        for i in range(self.num_upsamples):
            x = F.leaky_relu(x, LRELU_SLOPE)
            x = self.ups[i](x)
            if har_source is not None:
                x = x + self.noise_convs[i](har_source)
            xs = self.resblocks[i * self.num_kernels](x)
            for j in range(1, self.num_kernels):
                xs = xs + self.resblocks[i * self.num_kernels + j](x)
            x = xs / self.num_kernels
        x = F.leaky_relu(x)  # default slope 0.01, as RVC
        x = self.conv_post(x)
        return torch.tanh(x)

    def remove_weight_norm(self) -> None:
        for up in self.ups:
            remove_weight_norm(up)
        for block in self.resblocks:
            assert isinstance(block, ResBlock1 | ResBlock2)
            block.remove_weight_norm()


class GeneratorNSF(Generator):
    """RVC's NSF generator: `Generator` with the sine source and noise_convs."""

    def __init__(self, initial_channel: int, resblock: str, resblock_kernel_sizes: tuple[int, ...],
                 resblock_dilation_sizes: tuple[tuple[int, ...], ...], upsample_rates: tuple[int, ...],
                 upsample_initial_channel: int, upsample_kernel_sizes: tuple[int, ...], gin_channels: int,
                 sr: int) -> None:
        super().__init__(initial_channel, resblock, resblock_kernel_sizes, resblock_dilation_sizes,
                         upsample_rates, upsample_initial_channel, upsample_kernel_sizes, gin_channels,
                         sr=sr, use_nsf=True)
