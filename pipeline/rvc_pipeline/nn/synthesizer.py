"""RVC's synthesizer: `SynthesizerTrnMs{256,768}NSFsid[_nono]` as one parametrised class.

Submodules (names are the state-dict prefixes): `enc_p` (TextEncoder), `dec` (GeneratorNSF or
Generator), `enc_q` (PosteriorEncoder, training only), `flow` (ResidualCouplingBlock) and `emb_g`
(speaker Embedding). They are registered in RVC's order (v1: enc_p first; v2: enc_p last, as RVC's v2
subclass re-creates it), so `state_dict()` lists the keys in the same order as RVC's files.

* `forward(phone, phone_lengths, pitch, pitchf, spec, spec_lengths, sid)` (f0) or
  `forward(phone, phone_lengths, spec, spec_lengths, sid)` (no f0) returns
  `(o, ids_slice, x_mask, y_mask, (z, z_p, m_p, logs_p, m_q, logs_q))` with `o` = [B, 1, segment_size].
* `infer(phone, phone_lengths, pitch, nsff0, sid)` (f0) or `infer(phone, phone_lengths, sid)` returns,
  like RVC, the tuple `(o, x_mask, (z, z_p, m_p, logs_p))` with audio `o` = [B, 1, T*hop]; take
  `net_g.infer(...)[0]` for the audio. Keyword `generator` fixes the random draws (prior noise and NSF
  noise), `noise_scale` is RVC's 0.66666.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from rvc_pipeline.core.layout import FEATURE_DIMS as PHONE_DIMS
from rvc_pipeline.nn.attentions import Encoder
from rvc_pipeline.nn.commons import rand_slice_segments, sequence_mask, slice_segments
from rvc_pipeline.nn.config import SAMPLE_RATES, RVCConfig
from rvc_pipeline.nn.generator import Generator, GeneratorNSF
from rvc_pipeline.nn.modules import WN, ResidualCouplingBlock
from rvc_pipeline.nn.weightnorm import remove_all_weight_norm


class TextEncoder(nn.Module):
    """Content features (+ coarse pitch) -> prior mean and log-std (m_p, logs_p) and mask."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, filter_channels: int,
                 n_heads: int, n_layers: int, kernel_size: int, p_dropout: float, f0: bool = True) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.hidden_channels = hidden_channels
        self.emb_phone = nn.Linear(in_channels, hidden_channels)
        if f0:
            self.emb_pitch = nn.Embedding(256, hidden_channels)
        self.f0 = f0
        self.encoder = Encoder(hidden_channels, filter_channels, n_heads, n_layers, kernel_size,
                               float(p_dropout), window_size=10)
        self.proj = nn.Conv1d(hidden_channels, out_channels * 2, 1)

    def forward(self, phone: torch.Tensor, pitch: torch.Tensor | None, lengths: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """phone [B, T, in], pitch [B, T] coarse bins (or None), lengths [B]."""
        x = self.emb_phone(phone)
        if self.f0:
            if pitch is None:
                raise ValueError("this model uses pitch: pass the coarse pitch")
            x = x + self.emb_pitch(pitch)
        x = F.leaky_relu(x * math.sqrt(self.hidden_channels), 0.1)
        x = x.transpose(1, -1)  # [B, H, T]
        x_mask = sequence_mask(lengths, x.size(2)).unsqueeze(1).to(x.dtype)
        x = self.encoder(x * x_mask, x_mask)
        stats = self.proj(x) * x_mask
        m, logs = torch.split(stats, self.out_channels, dim=1)
        return m, logs, x_mask


class PosteriorEncoder(nn.Module):
    """Linear spectrogram -> posterior sample z, its mean/log-std and the mask."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, kernel_size: int,
                 dilation_rate: int, n_layers: int, gin_channels: int = 0) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.pre = nn.Conv1d(in_channels, hidden_channels, 1)
        self.enc = WN(hidden_channels, kernel_size, dilation_rate, n_layers, gin_channels=gin_channels)
        self.proj = nn.Conv1d(hidden_channels, out_channels * 2, 1)

    def forward(self, x: torch.Tensor, x_lengths: torch.Tensor, g: torch.Tensor | None = None,
                generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x_mask = sequence_mask(x_lengths, x.size(2)).unsqueeze(1).to(x.dtype)
        x = self.pre(x) * x_mask
        x = self.enc(x, x_mask, g=g)
        stats = self.proj(x) * x_mask
        m, logs = torch.split(stats, self.out_channels, dim=1)
        eps = torch.randn(m.shape, generator=generator, device=m.device, dtype=m.dtype)
        z = (m + eps * torch.exp(logs)) * x_mask
        return z, m, logs, x_mask

    def remove_weight_norm(self) -> None:
        self.enc.remove_weight_norm()


def _sr_int(sr: int | str) -> int:
    if isinstance(sr, str):
        if sr in SAMPLE_RATES:
            return SAMPLE_RATES[sr]
        return int(sr)
    return int(sr)


class SynthesizerTrn(nn.Module):
    """RVC synthesizer; `version` picks the phone dim (v1 256, v2 768), `f0` the NSF decoder + pitch."""

    def __init__(self, spec_channels: int, segment_size: int, inter_channels: int, hidden_channels: int,
                 filter_channels: int, n_heads: int, n_layers: int, kernel_size: int, p_dropout: float,
                 resblock: str, resblock_kernel_sizes: Any, resblock_dilation_sizes: Any, upsample_rates: Any,
                 upsample_initial_channel: int, upsample_kernel_sizes: Any, spk_embed_dim: int,
                 gin_channels: int, sr: int | str, *, version: str = "v2", f0: bool = True) -> None:
        super().__init__()
        if version not in PHONE_DIMS:
            raise ValueError(f"version must be one of {sorted(PHONE_DIMS)}, got {version!r}")
        self.version = version
        self.use_f0 = bool(f0)
        self.sr = _sr_int(sr)
        self.spec_channels = spec_channels
        self.segment_size = int(segment_size)  # frames
        self.inter_channels = inter_channels
        self.gin_channels = gin_channels
        self.spk_embed_dim = spk_embed_dim
        self.hop_length = math.prod(upsample_rates)
        # the 18-element constructor list, as RVC stores it in exported models (segment -> 32 there)
        self.config_list: list[Any] = [
            spec_channels, segment_size, inter_channels, hidden_channels, filter_channels, n_heads, n_layers,
            kernel_size, p_dropout, resblock, _lists(resblock_kernel_sizes), _lists(resblock_dilation_sizes),
            _lists(upsample_rates), upsample_initial_channel, _lists(upsample_kernel_sizes), spk_embed_dim,
            gin_channels, self.sr,
        ]

        def make_enc_p() -> TextEncoder:
            return TextEncoder(PHONE_DIMS[version], inter_channels, hidden_channels, filter_channels, n_heads,
                               n_layers, kernel_size, float(p_dropout), f0=self.use_f0)

        if version == "v1":
            self.enc_p = make_enc_p()
        dec_args = (inter_channels, resblock, tuple(resblock_kernel_sizes),
                    tuple(tuple(d) for d in resblock_dilation_sizes), tuple(upsample_rates),
                    upsample_initial_channel, tuple(upsample_kernel_sizes), gin_channels)
        if self.use_f0:
            self.dec: Generator = GeneratorNSF(*dec_args, sr=self.sr)
        else:
            self.dec = Generator(*dec_args)
        self.enc_q: PosteriorEncoder | None = PosteriorEncoder(
            spec_channels, inter_channels, hidden_channels, 5, 1, 16, gin_channels=gin_channels)
        self.flow = ResidualCouplingBlock(inter_channels, hidden_channels, 5, 1, 3, gin_channels=gin_channels)
        self.emb_g = nn.Embedding(spk_embed_dim, gin_channels)
        if version == "v2":
            self.enc_p = make_enc_p()

    # --- helpers ---------------------------------------------------------------------------------
    def _speaker(self, sid: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
        if not isinstance(sid, torch.Tensor):
            sid = torch.full((batch,), int(sid), dtype=torch.long, device=device)
        sid = sid.to(device=device, dtype=torch.long).reshape(-1)
        if sid.numel() == 1 and batch > 1:
            sid = sid.expand(batch)
        if int(sid.max()) >= self.spk_embed_dim or int(sid.min()) < 0:
            raise ValueError(f"speaker id {sid.tolist()} out of range for {self.spk_embed_dim} speakers")
        return self.emb_g(sid).unsqueeze(-1)  # [B, gin, 1]

    def remove_weight_norm(self) -> None:
        """Fold every weight norm into plain weights (faster inference; keys become `.weight`)."""
        remove_all_weight_norm(self)

    def remove_posterior_encoder(self) -> None:
        """Drop `enc_q` (not needed for inference; RVC's exported models leave it out)."""
        if self.enc_q is not None:
            del self.enc_q
            self.enc_q = None

    # --- training --------------------------------------------------------------------------------
    def forward(self, *args: Any, generator: torch.Generator | None = None) -> tuple[Any, ...]:
        """f0: (phone, phone_lengths, pitch, pitchf, spec, spec_lengths, sid);
        no f0: (phone, phone_lengths, spec, spec_lengths, sid)."""
        if self.use_f0:
            if len(args) != 7:
                raise TypeError("forward(phone, phone_lengths, pitch, pitchf, spec, spec_lengths, sid)")
            phone, phone_lengths, pitch, pitchf, spec, spec_lengths, sid = args
        else:
            if len(args) != 5:
                raise TypeError("forward(phone, phone_lengths, spec, spec_lengths, sid) (model without f0)")
            phone, phone_lengths, spec, spec_lengths, sid = args
            pitch = pitchf = None
        if self.enc_q is None:
            raise RuntimeError("this synthesizer has no posterior encoder (enc_q); it is inference-only")
        g = self._speaker(sid, phone.size(0), phone.device)
        m_p, logs_p, x_mask = self.enc_p(phone, pitch, phone_lengths)
        z, m_q, logs_q, y_mask = self.enc_q(spec, spec_lengths, g=g, generator=generator)
        z_p = self.flow(z, y_mask, g=g)
        z_slice, ids_slice = rand_slice_segments(z, spec_lengths, self.segment_size, generator=generator)
        if self.use_f0:
            assert pitchf is not None
            pitchf_slice = slice_segments(pitchf, ids_slice, self.segment_size)
            o = self.dec(z_slice, pitchf_slice, g=g, generator=generator)
        else:
            o = self.dec(z_slice, g=g)
        return o, ids_slice, x_mask, y_mask, (z, z_p, m_p, logs_p, m_q, logs_q)

    # --- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def infer(self, *args: Any, generator: torch.Generator | None = None, noise_scale: float = 0.66666
              ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """f0: (phone, phone_lengths, pitch, nsff0, sid); no f0: (phone, phone_lengths, sid).

        Returns `(o [B, 1, T*hop], x_mask, (z, z_p, m_p, logs_p))` like RVC.
        """
        if self.use_f0:
            if len(args) != 5:
                raise TypeError("infer(phone, phone_lengths, pitch, nsff0, sid)")
            phone, phone_lengths, pitch, nsff0, sid = args
        else:
            if len(args) != 3:
                raise TypeError("infer(phone, phone_lengths, sid) (model without f0)")
            phone, phone_lengths, sid = args
            pitch = nsff0 = None
        g = self._speaker(sid, phone.size(0), phone.device)
        m_p, logs_p, x_mask = self.enc_p(phone, pitch, phone_lengths)
        eps = torch.randn(m_p.shape, generator=generator, device=m_p.device, dtype=m_p.dtype)
        z_p = (m_p + torch.exp(logs_p) * eps * noise_scale) * x_mask
        z = self.flow(z_p, x_mask, g=g, reverse=True)
        if self.use_f0:
            o = self.dec(z * x_mask, nsff0, g=g, generator=generator)
        else:
            o = self.dec(z * x_mask, g=g)
        return o, x_mask, (z, z_p, m_p, logs_p)


def _lists(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_lists(v) for v in value]
    return value


class SynthesizerTrnMs256NSFsid(SynthesizerTrn):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("is_half", None)
        super().__init__(*args, version="v1", f0=True, **kwargs)


class SynthesizerTrnMs768NSFsid(SynthesizerTrn):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("is_half", None)
        super().__init__(*args, version="v2", f0=True, **kwargs)


class SynthesizerTrnMs256NSFsid_nono(SynthesizerTrn):  # noqa: N801 (RVC's class name)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("is_half", None)
        super().__init__(*args, version="v1", f0=False, **kwargs)


class SynthesizerTrnMs768NSFsid_nono(SynthesizerTrn):  # noqa: N801 (RVC's class name)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("is_half", None)
        super().__init__(*args, version="v2", f0=False, **kwargs)


def constructor_args(cfg: RVCConfig, spk_embed_dim: int | None = None, segment_frames: int | None = None
                     ) -> list[Any]:
    """The 18 positional constructor arguments for a config, in RVC's order."""
    m = cfg.model
    return [
        cfg.spec_channels, cfg.segment_frames if segment_frames is None else segment_frames,
        m.inter_channels, m.hidden_channels, m.filter_channels, m.n_heads, m.n_layers, m.kernel_size,
        m.p_dropout, m.resblock, _lists(m.resblock_kernel_sizes), _lists(m.resblock_dilation_sizes),
        _lists(m.upsample_rates), m.upsample_initial_channel, _lists(m.upsample_kernel_sizes),
        m.spk_embed_dim if spk_embed_dim is None else spk_embed_dim, m.gin_channels, cfg.sampling_rate,
    ]


def build_generator(cfg: RVCConfig, version: str, f0: bool, spk_embed_dim: int = 109) -> SynthesizerTrn:
    """The RVC generator for a config: SynthesizerTrnMs{256|768}NSFsid[_nono] equivalent."""
    return SynthesizerTrn(*constructor_args(cfg, spk_embed_dim), version=version, f0=f0)


def build_generator_from_list(config_list: list[Any], version: str, f0: bool) -> SynthesizerTrn:
    """Build from the 18-element list stored in exported models (element 1 is RVC's placeholder 32)."""
    if not isinstance(config_list, list | tuple) or len(config_list) != 18:
        n = len(config_list) if isinstance(config_list, list | tuple) else type(config_list).__name__
        raise ValueError(f"model config must be a list of 18 constructor arguments, got {n}")
    return SynthesizerTrn(*config_list, version=version, f0=f0)
