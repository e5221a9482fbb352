"""RVC's training configs: `configs/v1/{32k,40k,48k}.json`, `configs/v2/{32k,48k}.json`.

v2 at 40k uses `v1/40k.json` (there is no v2/40k.json). `RVCConfig.to_json()` gives the same structure
and key order as RVC's `config.json` (`{"train": ..., "data": ..., "model": ...}`), and
`RVCConfig.from_json()` reads one back (also a `logs/<exp>/config.json` written by RVC or Applio;
unknown keys such as Applio's `text_enc_hidden_dim` are ignored).

This module does not import torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rvc_pipeline.core.layout import VERSIONS

SAMPLE_RATES: dict[str, int] = {"32k": 32000, "40k": 40000, "48k": 48000}


@dataclass(frozen=True)
class TrainSection:
    """The `train` section (segment_size is in samples)."""

    log_interval: int = 200
    seed: int = 1234
    epochs: int = 20000
    learning_rate: float = 1e-4
    betas: tuple[float, float] = (0.8, 0.99)
    eps: float = 1e-9
    batch_size: int = 4
    fp16_run: bool = True
    lr_decay: float = 0.999875
    segment_size: int = 12800
    init_lr_ratio: int = 1
    warmup_epochs: int = 0
    c_mel: int = 45
    c_kl: float = 1.0


@dataclass(frozen=True)
class DataSection:
    """The `data` section."""

    max_wav_value: float = 32768.0
    sampling_rate: int = 40000
    filter_length: int = 2048
    hop_length: int = 400
    win_length: int = 2048
    n_mel_channels: int = 125
    mel_fmin: float = 0.0
    mel_fmax: float | None = None


@dataclass(frozen=True)
class ModelSection:
    """The `model` section (the synthesizer's constructor arguments)."""

    inter_channels: int = 192
    hidden_channels: int = 192
    filter_channels: int = 768
    n_heads: int = 2
    n_layers: int = 6
    kernel_size: int = 3
    p_dropout: float = 0
    resblock: str = "1"
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    upsample_rates: tuple[int, ...] = (10, 10, 2, 2)
    upsample_initial_channel: int = 512
    upsample_kernel_sizes: tuple[int, ...] = (16, 16, 4, 4)
    use_spectral_norm: bool = False
    gin_channels: int = 256
    spk_embed_dim: int = 109


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_to_jsonable(v) for v in value]
    return value


def _to_tuple(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_to_tuple(v) for v in value)
    return value


def _section_from(cls: type, data: Any, name: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"config: section {name!r} must be an object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: _to_tuple(v) for k, v in data.items() if k in names}
    return cls(**kwargs)


@dataclass(frozen=True)
class RVCConfig:
    """One RVC config: train/data/model sections plus convenience properties."""

    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)

    # --- convenience -----------------------------------------------------------------------------
    @property
    def sampling_rate(self) -> int:
        return self.data.sampling_rate

    @property
    def hop_length(self) -> int:
        return self.data.hop_length

    @property
    def filter_length(self) -> int:
        return self.data.filter_length

    @property
    def win_length(self) -> int:
        return self.data.win_length

    @property
    def n_mel_channels(self) -> int:
        return self.data.n_mel_channels

    @property
    def spec_channels(self) -> int:
        """Linear-spectrogram bins: filter_length // 2 + 1 (513 or 1025)."""
        return self.data.filter_length // 2 + 1

    @property
    def segment_size(self) -> int:
        """Training segment in samples (12800 at 40k)."""
        return self.train.segment_size

    @property
    def segment_frames(self) -> int:
        """Training segment in frames: segment_size // hop (32 at 40k); the model's argument."""
        return self.train.segment_size // self.data.hop_length

    @property
    def sample_rate_name(self) -> str:
        """'32k' / '40k' / '48k'."""
        return f"{self.data.sampling_rate // 1000}k"

    # --- (de)serialisation -----------------------------------------------------------------------
    def to_json(self) -> dict[str, dict[str, Any]]:
        """RVC's config.json structure, key order included."""
        return {
            name: {f.name: _to_jsonable(getattr(section, f.name)) for f in dataclasses.fields(section)}
            for name, section in (("train", self.train), ("data", self.data), ("model", self.model))
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RVCConfig:
        """Parse RVC's config.json structure; unknown keys are ignored, missing ones take defaults."""
        if not isinstance(data, dict):
            raise ValueError("config: expected an object with 'train', 'data' and 'model' sections")
        missing = [s for s in ("train", "data", "model") if s not in data]
        if missing:
            raise ValueError(f"config: missing section(s) {missing}")
        cfg = cls(
            train=_section_from(TrainSection, data["train"], "train"),
            data=_section_from(DataSection, data["data"], "data"),
            model=_section_from(ModelSection, data["model"], "model"),
        )
        cfg.validate()
        return cfg

    def replace_train(self, **changes: Any) -> RVCConfig:
        """A copy with train-section fields changed (e.g. batch_size, fp16_run)."""
        return dataclasses.replace(self, train=dataclasses.replace(self.train, **changes))

    def validate(self) -> None:
        prod = 1
        for u in self.model.upsample_rates:
            prod *= u
        if prod != self.data.hop_length:
            raise ValueError(
                f"config: product of model.upsample_rates {list(self.model.upsample_rates)} = {prod} "
                f"!= data.hop_length {self.data.hop_length}"
            )
        if len(self.model.upsample_rates) != len(self.model.upsample_kernel_sizes):
            raise ValueError("config: model.upsample_rates and upsample_kernel_sizes differ in length")
        if self.train.segment_size % self.data.hop_length:
            raise ValueError(
                f"config: train.segment_size {self.train.segment_size} is not a multiple of "
                f"hop_length {self.data.hop_length}"
            )


def _make(sr: int, n_fft: int, hop: int, n_mel: int, segment: int, rates: tuple[int, ...],
          kernels: tuple[int, ...]) -> RVCConfig:
    return RVCConfig(
        train=TrainSection(segment_size=segment),
        data=DataSection(sampling_rate=sr, filter_length=n_fft, hop_length=hop, win_length=n_fft,
                         n_mel_channels=n_mel),
        model=ModelSection(upsample_rates=rates, upsample_kernel_sizes=kernels),
    )


# The five files RVC ships (key: the file, "v1/40k" serves v2 40k as well).
CONFIG_FILES: dict[str, RVCConfig] = {
    "v1/32k": _make(32000, 1024, 320, 80, 12800, (10, 4, 2, 2, 2), (16, 16, 4, 4, 4)),
    "v1/40k": _make(40000, 2048, 400, 125, 12800, (10, 10, 2, 2), (16, 16, 4, 4)),
    "v1/48k": _make(48000, 2048, 480, 128, 11520, (10, 6, 2, 2, 2), (16, 16, 4, 4, 4)),
    "v2/32k": _make(32000, 1024, 320, 80, 12800, (10, 8, 2, 2), (20, 16, 4, 4)),
    "v2/48k": _make(48000, 2048, 480, 128, 17280, (12, 10, 2, 2), (24, 20, 4, 4)),
}


def normalize_sample_rate(sample_rate: str | int) -> str:
    """'40k', 40000, '40000' -> '40k'; anything else raises ValueError."""
    if isinstance(sample_rate, int) and not isinstance(sample_rate, bool):
        name = f"{sample_rate // 1000}k" if sample_rate % 1000 == 0 else str(sample_rate)
    else:
        name = str(sample_rate).strip().lower()
        if name.isdigit() and int(name) % 1000 == 0:
            name = f"{int(name) // 1000}k"
    if name not in SAMPLE_RATES:
        raise ValueError(f"sample rate {sample_rate!r} is not one of {sorted(SAMPLE_RATES)}")
    return name


def config_file_for(version: str, sample_rate: str | int) -> str:
    """Which RVC config file a (version, sr) pair uses: v2 40k -> 'v1/40k'."""
    if version not in VERSIONS:
        raise ValueError(f"version {version!r} is not one of {list(VERSIONS)}")
    sr = normalize_sample_rate(sample_rate)
    if version == "v1" or sr == "40k":
        return f"v1/{sr}"
    return f"v2/{sr}"


def get_config(version: str, sample_rate: str | int) -> RVCConfig:
    """The RVC config for a model version ('v1'/'v2') and sample rate ('32k'/'40k'/'48k')."""
    return CONFIG_FILES[config_file_for(version, sample_rate)]
