"""Test scaffolding: the reference HuBERT forward pass of RVC (fairseq's module names) and a writer of
fairseq-format checkpoints.

`HubertModel` here is the re-implementation of fairseq's HubertModel that the project shipped before
issue 9 (reference §4.1: conv feature extractor with an fp32 GroupNorm, post-norm layers, 1-based
output layer; batches of unequal clips masked exactly). The package now runs `transformers.HubertModel`
(rvc_pipeline.components.embedders); these tests check that both give the same features on the same
weights. `save_fairseq_checkpoint` writes a model as fairseq does (`model`, omegaconf-like `cfg`,
`task_state` with a Dictionary-like object), with the cfg classes absent at load time.
"""

from __future__ import annotations

import math
import sys
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from rvc_pipeline.components.embedders.fairseq_convert import HUBERT_BASE_CONV, parse_conv_layers
from torch import nn

Version = Literal["v1", "v2"]
TRAINING_ONLY_KEYS = ("mask_emb", "label_embs_concat")
OUTPUT_LAYER = {"v1": 9, "v2": 12}


@dataclass
class HubertConfig:
    """Hyper-parameters of the model (defaults: HuBERT-base, the `hubert_base.pt` RVC uses)."""

    conv_layers: list[tuple[int, int, int]] = field(
        default_factory=lambda: parse_conv_layers(HUBERT_BASE_CONV)
    )
    conv_bias: bool = False
    embed_dim: int = 768
    ffn_dim: int = 3072
    heads: int = 12
    layers: int = 12
    conv_pos: int = 128
    conv_pos_groups: int = 16
    final_dim: int = 256  # 0: no final_proj (v1 features unavailable)
    normalize: bool = False  # cfg.task.normalize: layer_norm over the waveform first
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.conv_layers = [tuple(int(v) for v in t) for t in self.conv_layers]  # type: ignore[misc]
        if self.embed_dim % self.heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by heads {self.heads}")
        if self.embed_dim % self.conv_pos_groups:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by conv_pos_groups")

    @property
    def receptive_field(self) -> int:
        r = 1
        for _, k, s in reversed(self.conv_layers):
            r = (r - 1) * s + k
        return r

    @property
    def hop(self) -> int:
        return math.prod(s for _, _, s in self.conv_layers)

    def frames(self, n_samples: int) -> int:
        """Number of output frames for a clip of n samples (HuBERT-base: floor((N-400)/320)+1)."""
        n = n_samples
        for _, k, s in self.conv_layers:
            n = (n - k) // s + 1 if n >= k else 0
        return max(n, 0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["conv_layers"] = [list(t) for t in self.conv_layers]
        return d


# ------------------------------------------------------------------------------------------------
# model


class WeightNormConv1d(nn.Module):
    """Conv1d with legacy weight norm over dim 2 (parameters weight_g [1,1,k], weight_v, bias)."""

    def __init__(self, channels: int, kernel: int, groups: int):
        super().__init__()
        self.padding = kernel // 2
        self.groups = groups
        v = torch.empty(channels, channels // groups, kernel)
        nn.init.normal_(v, mean=0.0, std=math.sqrt(4.0 / (kernel * channels)))
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(self._norm(v).detach().clone())
        self.bias = nn.Parameter(torch.zeros(channels))

    @staticmethod
    def _norm(v: torch.Tensor) -> torch.Tensor:
        return v.pow(2).sum(dim=(0, 1), keepdim=True).sqrt()

    def weight(self) -> torch.Tensor:
        v = self.weight_v
        return v * (self.weight_g / self._norm(v.float()).to(v.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight(), self.bias, padding=self.padding, groups=self.groups)


class SamePad(nn.Module):
    """Drop the last frame after an even-kernel conv with padding k//2 (fairseq SamePad)."""

    def __init__(self, kernel: int):
        super().__init__()
        self.remove = 1 if kernel % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, : -self.remove] if self.remove else x


class FeatureExtractor(nn.Module):
    """fairseq ConvFeatureExtractionModel ('default'): conv_layers.i = (conv, dropout, [GroupNorm,] GELU)."""

    def __init__(self, cfg: HubertConfig):
        super().__init__()
        blocks = []
        in_dim = 1
        for i, (dim, k, s) in enumerate(cfg.conv_layers):
            conv = nn.Conv1d(in_dim, dim, k, stride=s, bias=cfg.conv_bias)
            nn.init.kaiming_normal_(conv.weight)
            if i == 0:
                blocks.append(
                    nn.Sequential(conv, nn.Dropout(0.0), nn.GroupNorm(dim, dim, affine=True), nn.GELU())
                )
            else:
                blocks.append(nn.Sequential(conv, nn.Dropout(0.0), nn.GELU()))
            in_dim = dim
        self.conv_layers = nn.ModuleList(blocks)

    def forward(self, wav: torch.Tensor, lengths: list[int] | None) -> torch.Tensor:
        """wav [B, N] -> [B, C, T]. `lengths` (samples per clip) when the batch is padded."""
        x = wav.unsqueeze(1)
        for i, block in enumerate(self.conv_layers):
            conv = block[0]
            x = conv(x)
            if i == 0:
                x = _group_norm_fp32(x, block[2], _conv_lengths(lengths, conv))
            x = F.gelu(x)
        return x


def _conv_lengths(lengths: list[int] | None, conv: nn.Conv1d) -> list[int] | None:
    if lengths is None:
        return None
    k, s = conv.kernel_size[0], conv.stride[0]
    return [(n - k) // s + 1 for n in lengths]


def _group_norm_fp32(x: torch.Tensor, gn: nn.GroupNorm, lengths: list[int] | None) -> torch.Tensor:
    """GroupNorm with one channel per group (per-channel over time), in fp32, over valid frames only."""
    xf = x.float()
    w, b = gn.weight.float(), gn.bias.float()
    if lengths is None or all(n == x.shape[-1] for n in lengths):
        y = F.group_norm(xf, gn.num_groups, w, b, gn.eps)
    else:
        mask = (
            torch.arange(x.shape[-1], device=x.device)[None, :]
            < torch.tensor(lengths, device=x.device)[:, None]
        )
        mask = mask.unsqueeze(1).to(xf.dtype)  # [B, 1, T]
        n = mask.sum(-1, keepdim=True)
        mean = (xf * mask).sum(-1, keepdim=True) / n
        var = (((xf - mean) * mask) ** 2).sum(-1, keepdim=True) / n
        y = (xf - mean) * torch.rsqrt(var + gn.eps) * w[None, :, None] + b[None, :, None]
    return y.to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self._fused: tuple[torch.Tensor, torch.Tensor] | None = None

    def fuse(self) -> None:
        """Concatenate q/k/v into one matrix (one GEMM instead of three); used for inference only."""
        self._fused = (
            torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]).detach(),
            torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]).detach(),
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        bsz, t, c = x.shape
        h = self.heads
        if self._fused is not None:
            q, k, v = F.linear(x, *self._fused).view(bsz, t, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (
                p(x).view(bsz, t, h, c // h).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
            )
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # scale = head_dim ** -0.5
        return self.out_proj(o.transpose(1, 2).reshape(bsz, t, c))


class EncoderLayer(nn.Module):
    """Post-norm transformer layer (layer_norm_first = False)."""

    def __init__(self, dim: int, ffn: int, heads: int, eps: float):
        super().__init__()
        self.self_attn = SelfAttention(dim, heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.final_layer_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.self_attn_layer_norm(x + self.self_attn(x, attn_mask))
        return self.final_layer_norm(x + self.fc2(F.gelu(self.fc1(x))))


class Encoder(nn.Module):
    def __init__(self, cfg: HubertConfig):
        super().__init__()
        self.pos_conv = nn.Sequential(
            WeightNormConv1d(cfg.embed_dim, cfg.conv_pos, cfg.conv_pos_groups),
            SamePad(cfg.conv_pos),
            nn.GELU(),
        )
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.embed_dim, cfg.ffn_dim, cfg.heads, cfg.layer_norm_eps) for _ in range(cfg.layers)
        )
        self.layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, output_layer: int) -> torch.Tensor:
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        x = self.layer_norm(x)
        for layer in self.layers[:output_layer]:
            x = layer(x, attn_mask)
        return x


class HubertModel(nn.Module):
    """fairseq HubertModel (inference part), with fairseq's module names."""

    def __init__(self, cfg: HubertConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or HubertConfig()
        last = cfg.conv_layers[-1][0]
        self.feature_extractor = FeatureExtractor(cfg)
        self.layer_norm = nn.LayerNorm(last, eps=cfg.layer_norm_eps)
        self.post_extract_proj = nn.Linear(last, cfg.embed_dim)
        self.encoder = Encoder(cfg)
        self.final_proj: nn.Linear | None = nn.Linear(cfg.embed_dim, cfg.final_dim) if cfg.final_dim else None

    def extract_features(
        self, wav: torch.Tensor, output_layer: int, lengths: list[int] | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """wav [B, N] (zero-padded when `lengths` differ) -> ([B, T, embed_dim], frames per clip)."""
        cfg = self.cfg
        if not 1 <= output_layer <= cfg.layers:
            raise ValueError(f"output_layer {output_layer} outside 1..{cfg.layers}")
        n = wav.shape[-1]
        lens = list(lengths) if lengths is not None else [n] * wav.shape[0]
        if min(lens) < cfg.receptive_field:
            raise ValueError(
                f"clip of {min(lens)} samples is shorter than the {cfg.receptive_field}-sample window"
            )
        padded = any(m != n for m in lens)
        if cfg.normalize:
            wav = (
                torch.stack([F.pad(F.layer_norm(w[:m], (m,)), (0, n - m)) for w, m in zip(wav, lens)])
                if padded
                else F.layer_norm(wav, (n,))
            )
        x = self.feature_extractor(wav, lens if padded else None)
        x = self.layer_norm(x.transpose(1, 2))
        x = self.post_extract_proj(x)
        frames = [cfg.frames(m) for m in lens]
        attn_mask = None
        if padded:
            valid = (
                torch.arange(x.shape[1], device=x.device)[None, :]
                < torch.tensor(frames, device=x.device)[:, None]
            )
            x = x * valid.unsqueeze(-1).to(x.dtype)
            attn_mask = valid[:, None, None, :]  # [B, 1, 1, T] True = attend
        x = self.encoder(x, attn_mask, output_layer)
        return x, frames

    def output_layer(self, version: Version) -> int:
        """RVC's layer for `version` (9 or 12); a smaller test model uses its last layer at most."""
        return min(OUTPUT_LAYER[version], self.cfg.layers)

    def forward(
        self, wav: torch.Tensor, version: Version = "v2", lengths: list[int] | None = None
    ) -> torch.Tensor:
        x, _ = self.extract_features(wav, self.output_layer(version), lengths)
        if version == "v1":
            if self.final_proj is None:
                raise ValueError("v1 features need final_proj, which this embedder does not have")
            x = self.final_proj(x)
        return x

    def load_fairseq_state(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load a fairseq-named state dict (drops training-only keys, casts to fp32, strict otherwise)."""
        sd: dict[str, torch.Tensor] = {}
        for k, v in state.items():
            if k in TRAINING_ONLY_KEYS:
                continue
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"{source}: model entry {k!r} is not a tensor ({type(v).__name__})")
            sd[k] = v.float() if v.is_floating_point() else v
        own = self.state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"{source}: state dict does not match the HuBERT config "
                f"(missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''})"
            )
        bad = [
            f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in own.items() if sd[k].shape != v.shape
        ]
        if bad:
            raise ValueError(f"{source}: shape mismatch: {'; '.join(bad[:6])}")
        self.load_state_dict(sd, strict=True)



# ---- writing fairseq-format files (tests, demo): cfg/task_state classes absent at load time ----


def _fake_modules() -> tuple[dict[str, types.ModuleType], dict[str, type]]:
    """Throw-away modules named like omegaconf/fairseq with look-alike classes. They stand in for the
    real modules in sys.modules only while saving, so the names in the file are the real ones (which
    rvc_pipeline.safeload maps to inert classes) even where omegaconf or fairseq is installed."""
    oc, fs = "omegaconf", "fairseq"
    mods: dict[str, types.ModuleType] = {}
    classes: dict[str, type] = {}

    def make(modname: str, clsname: str) -> type:
        for i in range(1, modname.count(".") + 2):
            part = ".".join(modname.split(".")[:i])
            mods.setdefault(part, types.ModuleType(part))
        cls = type(clsname, (), {"__module__": modname})
        setattr(mods[modname], clsname, cls)
        classes[clsname] = cls
        return cls

    make(f"{oc}.dictconfig", "DictConfig")
    make(f"{oc}.nodes", "AnyNode")
    make(f"{oc}.base", "ContainerMetadata")
    make(f"{oc}.base", "Metadata")
    make(f"{fs}.data.dictionary", "Dictionary")
    return mods, classes


def _omega(value: Any, classes: dict[str, type]) -> Any:
    """Mimic omegaconf's pickled layout: DictConfig.__dict__ = {_metadata, _parent, _content}."""
    if isinstance(value, dict):
        obj = classes["DictConfig"].__new__(classes["DictConfig"])
        meta = classes["ContainerMetadata"]()
        meta.__dict__.update(
            {"ref_type": Any, "object_type": dict, "optional": True, "key": None, "flags": {}}
        )
        obj.__dict__.update(
            {
                "_metadata": meta,
                "_parent": None,
                "_content": {k: _omega(v, classes) for k, v in value.items()},
            }
        )
        return obj
    node = classes["AnyNode"]()
    m = classes["Metadata"]()
    m.__dict__.update({"ref_type": Any, "object_type": None, "optional": True, "key": None})
    node.__dict__.update({"_metadata": m, "_parent": None, "_val": value})
    return node


def _dictionary(classes: dict[str, type]) -> Any:
    """A look-alike of fairseq's Dictionary of 500 k-means units (task_state's only content)."""
    dictionary = classes["Dictionary"]()
    dictionary.__dict__.update({
        "bos_word": "<s>", "unk_word": "<unk>", "pad_word": "<pad>", "eos_word": "</s>",
        "symbols": ["<s>", "<pad>", "</s>", "<unk>"] + [str(i) for i in range(500)],
        "count": [1] * 504, "indices": {}, "nspecial": 4,
    })
    return dictionary


def fairseq_cfg(hc: HubertConfig) -> dict[str, Any]:
    conv = " + ".join(f"[{t}]" for t in hc.conv_layers).replace(" ", "")
    return {
        "_name": None,
        "common": {"fp16": True, "seed": 1337},
        "model": {
            "_name": "hubert",
            "extractor_mode": "default",
            "encoder_layers": hc.layers,
            "encoder_embed_dim": hc.embed_dim,
            "encoder_ffn_embed_dim": hc.ffn_dim,
            "encoder_attention_heads": hc.heads,
            "activation_fn": "gelu",
            "layer_norm_first": False,
            "conv_feature_layers": conv,
            "conv_bias": hc.conv_bias,
            "conv_pos": hc.conv_pos,
            "conv_pos_groups": hc.conv_pos_groups,
            "final_dim": hc.final_dim,
            "label_rate": 50,
        },
        "task": {
            "_name": "hubert_pretraining",
            "sample_rate": 16000,
            "normalize": hc.normalize,
            "labels": ["km"],
        },
    }


def save_fairseq_checkpoint(
    model: HubertModel, path: str | Path, cfg_overrides: dict[str, Any] | None = None, *, fp16: bool = False
) -> Path:
    """Write `model` as a fairseq hubert checkpoint (`model`, omegaconf-like `cfg`, `task_state` with a
    Dictionary-like object, `args: None`). The cfg/Dictionary classes live in modules that exist only
    while saving; rvc_pipeline.safeload reads them as inert data. fp16=True stores half tensors as the
    real hubert_base.pt does."""
    hc = model.cfg
    cfg = fairseq_cfg(hc)
    for section, values in (cfg_overrides or {}).items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    sd: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(7)
    sd["mask_emb"] = torch.rand(hc.embed_dim, generator=gen)
    for k, v in model.state_dict().items():
        sd[k] = v.detach().clone()
    if hc.final_dim:
        sd["label_embs_concat"] = torch.randn(504, hc.final_dim, generator=gen)
    if fp16:
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    mods, classes = _fake_modules()
    saved = {name: sys.modules[name] for name in mods if name in sys.modules}
    try:
        sys.modules.update(mods)
        dictionary = _dictionary(classes)
        ckpt = {
            "args": None,
            "cfg": _omega(cfg, classes),
            "model": sd,
            "criterion": None,
            "optimizer_history": [
                {
                    "criterion_name": "HubertCriterion",
                    "optimizer_name": "FairseqAdam",
                    "lr_scheduler_state": {"best": None},
                    "num_updates": 400000,
                }
            ],
            "task_state": {"dictionaries": [dictionary]},
            "extra_state": {"metrics": {}, "previous_training_time": 0.0},
        }
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, out)
    finally:
        for name in mods:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
    return out



def to_embedder(model: HubertModel, device: str = "cpu", half: bool = False) -> Any:
    """The package's embedder (transformers.HubertModel) with `model`'s weights, converted in memory by
    the same functions that read a fairseq file (no pickle in between)."""
    from rvc_pipeline.components.embedders import fairseq_convert
    from rvc_pipeline.components.embedders.hf_hubert import HubertWeights, load_weights

    hc = model.cfg
    config, normalize = fairseq_convert.config_from_fairseq(fairseq_cfg(hc), hc.final_dim)
    state = {nk: v.detach().clone() for k, v in model.state_dict().items()
             if (nk := fairseq_convert.hf_key(k)) is not None}
    return load_weights(HubertWeights(config, state, normalize, "in-memory"), device, half)


# ---- small models and speech-like clips for the tests ----

SMALL_CONV = [(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2  # HuBERT's strides, narrow channels


def small_cfg(**kw: object) -> HubertConfig:
    base: dict[str, object] = dict(
        conv_layers=SMALL_CONV,
        embed_dim=64,
        ffn_dim=128,
        heads=4,
        layers=3,
        conv_pos=16,
        conv_pos_groups=4,
        final_dim=16,
    )
    base.update(kw)
    return HubertConfig(**base)  # type: ignore[arg-type]


def small_model(seed: int = 0, **kw: object) -> HubertModel:
    torch.manual_seed(seed)
    m = HubertModel(small_cfg(**kw)).eval()
    with torch.no_grad():  # non-trivial norms/biases so that a wrong mapping cannot go unnoticed
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name or name.endswith("weight_g"):
                p.add_(0.1 * torch.randn_like(p))
    return m


def speechlike(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    f0 = 120 + 30 * np.sin(2 * np.pi * 1.3 * t)
    x = 0.3 * np.sin(2 * np.pi * np.cumsum(f0) / 16000) + 0.02 * rng.standard_normal(n)
    return (x * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)).astype(np.float32)


def run_alone(m: HubertModel, wav: np.ndarray, version: str) -> torch.Tensor:
    with torch.inference_mode():
        return m(torch.from_numpy(wav)[None], version)[0]  # type: ignore[arg-type]
