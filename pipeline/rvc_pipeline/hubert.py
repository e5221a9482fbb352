"""HuBERT-base (fairseq `HubertModel`) for RVC content features, loadable without fairseq.

The forward pass is the one RVC uses (eval, no masking, `features_only=True`), reference §4.1:
conv feature extractor (block 0 with a GroupNorm computed in fp32, exact GELU) -> LayerNorm(512) ->
post_extract_proj (512->768) -> x + GELU(SamePad(pos_conv(x))) -> encoder.layer_norm -> post-norm
transformer layers, stopped after layer `output_layer` (1-based). v1 = final_proj(layer 9) (256-d),
v2 = layer 12 (768-d).

Module and parameter names are fairseq's, so the `model` state dict of `hubert_base.pt` loads as is
(training-only `mask_emb`/`label_embs_concat` are dropped, fp16 tensors cast to fp32). The checkpoint's
pickled `cfg` (omegaconf) and `task_state` (fairseq Dictionary) are read through rvc_pipeline.safeload,
which maps those classes to inert data classes and refuses any other Python object, so neither fairseq
nor omegaconf is needed and nothing in the file can run. A Hugging Face `transformers.HubertModel` folder
(with an optional `final_proj`) loads too, through the key mapping of §4.1.

Batches of clips of different lengths give, for every clip, the result of running it alone: the
block-0 GroupNorm takes its statistics over each clip's own frames only, padded frames are zeroed
before pos_conv (as fairseq does), and attention masks padded keys.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import sys
import types
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import safeload

log = logging.getLogger("rvc_pipeline")

Version = Literal["v1", "v2"]

HUBERT_BASE_CONV = "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"
TRAINING_ONLY_KEYS = ("mask_emb", "label_embs_concat")
OUTPUT_LAYER = {"v1": 9, "v2": 12}
"""RVC's HuBERT layer per model version (1-based); v1 also applies final_proj."""


# ------------------------------------------------------------------------------------------------
# configuration


def parse_conv_layers(spec: str) -> list[tuple[int, int, int]]:
    """Evaluate fairseq's `conv_feature_layers` string (lists of (dim, kernel, stride), + and *) safely."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise ValueError(f"conv_feature_layers: unsupported expression {ast.dump(node)[:80]}")

    try:
        layers = ev(ast.parse(spec.strip(), mode="eval"))
    except SyntaxError as e:
        raise ValueError(f"conv_feature_layers: cannot parse {spec!r}: {e}") from None
    if not isinstance(layers, list) or not all(
        isinstance(t, tuple) and len(t) == 3 and all(isinstance(v, int) and v > 0 for v in t) for t in layers
    ):
        raise ValueError(f"conv_feature_layers: expected a list of (dim, kernel, stride), got {spec!r}")
    return [tuple(t) for t in layers]  # type: ignore[misc]


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


# ------------------------------------------------------------------------------------------------
# fairseq checkpoints without fairseq


_PLAIN_BUDGET = 100_000  # objects; a pickle can share one object many times (memo), so count visits


def plain(obj: Any) -> Any:
    """Turn an unpickled config (inert omegaconf DictConfig/ListConfig/nodes, Namespace, dicts) into
    plain data. ValueError for a structure deeper than 50 or with more than 100000 objects."""
    budget = [_PLAIN_BUDGET]
    return _plain(obj, 0, budget)


def _plain(obj: Any, depth: int, budget: list[int]) -> Any:
    budget[0] -= 1
    if depth > 50 or budget[0] < 0:
        raise ValueError("the checkpoint's config is nested too deeply or is too large")
    if isinstance(obj, safeload.InertObject):
        return _plain_inert(obj, depth, budget)
    if isinstance(obj, dict):
        return {k: _plain(v, depth + 1, budget) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, depth + 1, budget) for v in obj]
    return obj


def _plain_inert(obj: safeload.InertObject, depth: int, budget: list[int]) -> Any:
    st = obj.state
    if isinstance(st, tuple) and len(st) == 2 and (st[0] is None or isinstance(st[0], dict)):
        st = {**(st[0] or {}), **(st[1] if isinstance(st[1], dict) else {})}  # (__dict__, slots)
    if not isinstance(st, dict):
        return None
    if "_content" in st:  # omegaconf DictConfig / ListConfig
        return _plain(st["_content"], depth + 1, budget)
    if "_val" in st:  # omegaconf value node
        return _plain(st["_val"], depth + 1, budget)
    keep_private = obj.origin == "argparse.Namespace"
    return {k: _plain(v, depth + 1, budget) for k, v in st.items()
            if keep_private or not str(k).startswith("_")}


def config_from_fairseq(cfg: dict[str, Any] | None) -> HubertConfig:
    """HubertConfig from a checkpoint's cfg (sections model/task) or flat args; defaults where absent."""
    cfg = cfg or {}
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else cfg
    task = cfg.get("task") if isinstance(cfg.get("task"), dict) else cfg
    d = HubertConfig()

    def get(key: str, default: Any) -> Any:
        v = model.get(key)
        return default if v is None else v

    if get("extractor_mode", "default") != "default":
        raise ValueError(
            f"unsupported HuBERT extractor_mode {model.get('extractor_mode')!r} (need 'default')"
        )
    if get("layer_norm_first", False):
        raise ValueError("unsupported HuBERT config: layer_norm_first=True (HuBERT-large style)")
    if str(get("activation_fn", "gelu")) != "gelu":
        raise ValueError(f"unsupported HuBERT activation_fn {model.get('activation_fn')!r}")
    conv = get("conv_feature_layers", None)
    return HubertConfig(
        conv_layers=parse_conv_layers(conv) if isinstance(conv, str) else d.conv_layers,
        conv_bias=bool(get("conv_bias", d.conv_bias)),
        embed_dim=int(get("encoder_embed_dim", d.embed_dim)),
        ffn_dim=int(get("encoder_ffn_embed_dim", d.ffn_dim)),
        heads=int(get("encoder_attention_heads", d.heads)),
        layers=int(get("encoder_layers", d.layers)),
        conv_pos=int(get("conv_pos", d.conv_pos)),
        conv_pos_groups=int(get("conv_pos_groups", d.conv_pos_groups)),
        final_dim=int(get("final_dim", d.final_dim)),
        normalize=bool(task.get("normalize") or False),
    )


def load_fairseq_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a fairseq checkpoint (hubert_base.pt) without fairseq: (model state dict, plain cfg dict).

    Through rvc_pipeline.safeload: fairseq's and omegaconf's config classes load as inert data, any
    other Python object is refused (safeload.UnsafeFile, a ValueError too)."""
    p = Path(path)
    try:
        ckpt = safeload.load(p, what="HuBERT checkpoint")
    except safeload.UnreadableFile as e:
        raise ValueError(f"{p}: not a readable fairseq/torch checkpoint ({e})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{p}: not a fairseq checkpoint (no 'model' state dict)")
    try:
        cfg = plain(ckpt.get("cfg"))
        if not isinstance(cfg, dict):
            args = plain(ckpt.get("args"))
            cfg = args if isinstance(args, dict) else {}
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None
    state = {k: v for k, v in ckpt["model"].items() if isinstance(v, torch.Tensor)}
    return state, cfg


def hubert_from_fairseq(path: str | Path) -> HubertModel:
    state, cfg = load_fairseq_checkpoint(path)
    hc = config_from_fairseq(cfg)
    if "final_proj.weight" not in state:
        hc.final_dim = 0
    elif hc.final_dim != state["final_proj.weight"].shape[0]:
        hc.final_dim = int(state["final_proj.weight"].shape[0])
    model = HubertModel(hc)
    model.load_fairseq_state(state, str(path))
    return model.eval()


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
        dictionary = classes["Dictionary"]()
        dictionary.__dict__.update(
            {
                "bos_word": "<s>",
                "unk_word": "<unk>",
                "pad_word": "<pad>",
                "eos_word": "</s>",
                "symbols": ["<s>", "<pad>", "</s>", "<unk>"] + [str(i) for i in range(500)],
                "count": [1] * 504,
                "indices": {},
                "nspecial": 4,
            }
        )
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


# ------------------------------------------------------------------------------------------------
# Hugging Face transformers.HubertModel folders


def _hf_key(k: str) -> str | None:
    """Map one HF HubertModel key to the fairseq name (None: not part of the model)."""
    if k.startswith("hubert."):  # HubertForCTC / ForSequenceClassification wrap the model
        k = k[len("hubert.") :]
    if not k.startswith(("feature_extractor.", "feature_projection.", "encoder.", "final_proj.")):
        return None  # masked_spec_embed, lm_head, classifier heads: not used for features
    reps = [
        ("feature_projection.layer_norm.", "layer_norm."),
        ("feature_projection.projection.", "post_extract_proj."),
        ("encoder.pos_conv_embed.conv.parametrizations.weight.original0", "encoder.pos_conv.0.weight_g"),
        ("encoder.pos_conv_embed.conv.parametrizations.weight.original1", "encoder.pos_conv.0.weight_v"),
        ("encoder.pos_conv_embed.conv.", "encoder.pos_conv.0."),
        (".attention.", ".self_attn."),
        (".feed_forward.intermediate_dense.", ".fc1."),
        (".feed_forward.output_dense.", ".fc2."),
    ]
    if k.startswith("feature_extractor.conv_layers."):
        k = k.replace(".conv.", ".0.").replace(".layer_norm.", ".2.")
    elif k.startswith("encoder.layers.") and ".layer_norm." in k:
        k = k.replace(".layer_norm.", ".self_attn_layer_norm.")
    for a, b in reps:
        if a in k:
            k = k.replace(a, b)
    return k


def _hf_state(d: Path) -> dict[str, torch.Tensor]:
    """The tensors of model*.safetensors, else of pytorch_model*.bin (through rvc_pipeline.safeload)."""
    state: dict[str, torch.Tensor] = {}
    st_files = sorted(d.glob("model*.safetensors"))
    bin_files = sorted(d.glob("pytorch_model*.bin"))
    if st_files:
        from safetensors.torch import load_file

        for f in st_files:
            state.update(load_file(str(f)))
        return state
    if not bin_files:
        raise ValueError(f"{d}: no model.safetensors or pytorch_model.bin")
    for f in bin_files:
        sd = safeload.load(f, what="Hugging Face model file")
        if not isinstance(sd, dict):
            raise ValueError(f"{f}: not a state dict")
        state.update(sd)
    return state


def load_hf_dir(path: str | Path) -> HubertModel:
    """Load a Hugging Face HubertModel folder (config.json + model.safetensors or pytorch_model.bin)."""
    d = Path(path)
    try:
        conf = json.loads((d / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{d}: not a Hugging Face model folder (config.json: {e})") from None
    if conf.get("do_stable_layer_norm"):
        raise ValueError(f"{d}: do_stable_layer_norm=true (pre-norm HuBERT-large) is not supported")
    if conf.get("feat_extract_norm", "group") != "group":
        raise ValueError(f"{d}: feat_extract_norm {conf.get('feat_extract_norm')!r} is not supported")
    for key in ("hidden_act", "feat_extract_activation"):
        if conf.get(key, "gelu") != "gelu":
            raise ValueError(f"{d}: {key}={conf.get(key)!r} is not supported (need exact gelu)")
    if conf.get("feat_proj_layer_norm", True) is False:
        raise ValueError(f"{d}: feat_proj_layer_norm=false is not supported")
    state = _hf_state(d)
    mapped = {}
    for k, v in state.items():
        nk = _hf_key(k)
        if nk is not None:
            mapped[nk] = v
    conv_dim = conf.get("conv_dim", [512] * 7)
    hc = HubertConfig(
        conv_layers=list(
            zip(
                conv_dim,
                conf.get("conv_kernel", [10, 3, 3, 3, 3, 2, 2]),
                conf.get("conv_stride", [5, 2, 2, 2, 2, 2, 2]),
            )
        ),
        conv_bias=bool(conf.get("conv_bias", False)),
        embed_dim=int(conf.get("hidden_size", 768)),
        ffn_dim=int(conf.get("intermediate_size", 3072)),
        heads=int(conf.get("num_attention_heads", 12)),
        layers=int(conf.get("num_hidden_layers", 12)),
        conv_pos=int(conf.get("num_conv_pos_embeddings", 128)),
        conv_pos_groups=int(conf.get("num_conv_pos_embedding_groups", 16)),
        final_dim=int(mapped["final_proj.weight"].shape[0]) if "final_proj.weight" in mapped else 0,
        layer_norm_eps=float(conf.get("layer_norm_eps", 1e-5)),
    )
    model = HubertModel(hc)
    model.load_fairseq_state(mapped, str(d))
    return model.eval()


# ------------------------------------------------------------------------------------------------
# the embedder used by the features step and by inference


def pick_dtype(device: str, half: bool) -> torch.dtype:
    """fp16 on CUDA when half (as RVC's is_half); fp32 elsewhere (CPU half is slower and less exact)."""
    if half and device.startswith("cuda"):
        return torch.float16
    return torch.float32


class Embedder:
    """A loaded HuBERT on a device; `extract` gives RVC's v1 (256-d) or v2 (768-d) features."""

    def __init__(self, model: HubertModel, device: str = "cpu", half: bool = False, source: str = ""):
        self.device = torch.device(device)
        self.dtype = pick_dtype(self.device.type, half)
        self.source = source
        self.model = model.eval().to(self.device, self.dtype)
        for layer in self.model.encoder.layers:  # fused weights follow the model's device/dtype
            layer.self_attn.fuse()
        self.cfg = model.cfg

    def frames(self, n_samples: int) -> int:
        return self.cfg.frames(n_samples)

    def dim(self, version: Version) -> int:
        """Feature size for `version`: final_dim (256) for v1, embed_dim (768) for v2."""
        return self.cfg.final_dim if version == "v1" else self.cfg.embed_dim

    def extract(
        self,
        wavs: np.ndarray | Sequence[np.ndarray],
        version: Version = "v2",
        batch_seconds: float | None = None,
    ) -> list[np.ndarray]:
        """16 kHz mono float waveforms -> [T, 256|768] float32 features, one array per clip.

        Clips are run in batches (sorted by length, at most `batch_seconds` of audio each, default: all
        at once); each result equals running that clip alone."""
        if version not in OUTPUT_LAYER:
            raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
        clips = [wavs] if isinstance(wavs, np.ndarray) and wavs.ndim == 1 else list(wavs)
        for i, w in enumerate(clips):
            if np.ndim(w) != 1:
                raise ValueError(f"clip {i}: expected a 1-D waveform, got shape {np.shape(w)}")
            if len(w) < self.cfg.receptive_field:
                raise ValueError(f"clip {i}: {len(w)} samples; need at least {self.cfg.receptive_field}")
        order = sorted(range(len(clips)), key=lambda i: len(clips[i]))
        out: list[np.ndarray | None] = [None] * len(clips)
        for batch in batches_by_seconds([len(clips[i]) for i in order], batch_seconds):
            idx = [order[j] for j in batch]
            for i, f in zip(idx, self._run([clips[i] for i in idx], version)):
                out[i] = f
        return out  # type: ignore[return-value]

    def _run(self, clips: list[np.ndarray], version: Version) -> list[np.ndarray]:
        lens = [len(c) for c in clips]
        n = max(lens)
        buf = np.zeros((len(clips), n), dtype=np.float32)
        for row, c in zip(buf, clips):
            row[: len(c)] = c
        with torch.inference_mode():
            x = torch.from_numpy(buf).to(self.device, self.dtype)
            y = self.model(x, version, lens if min(lens) != n else None)
            y = y.float().cpu().numpy()
        return [np.ascontiguousarray(y[b, : self.frames(m)]) for b, m in enumerate(lens)]


def batches_by_seconds(
    lengths: Sequence[int], batch_seconds: float | None, sr: int = 16000
) -> list[list[int]]:
    """Consecutive groups of indices whose padded size (count x longest) stays within batch_seconds."""
    if not batch_seconds:
        return [list(range(len(lengths)))] if lengths else []
    cap = batch_seconds * sr
    out: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if cur and (len(cur) + 1) * max(longest, n) > cap:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        out.append(cur)
    return out


def load_embedder(ref_path: str | Path, device: str = "cpu", half: bool = False) -> Embedder:
    """A fairseq checkpoint file (hubert_base.pt) or a Hugging Face HubertModel folder."""
    p = Path(ref_path)
    if p.is_dir():
        model = load_hf_dir(p)
    elif p.is_file():
        model = hubert_from_fairseq(p)
    else:
        raise FileNotFoundError(f"HuBERT embedder {p} does not exist")
    return Embedder(model, device, half, source=str(p))


def random_embedder(
    device: str = "cpu", half: bool = False, seed: int = 0, cfg: HubertConfig | None = None
) -> Embedder:
    """DEMO ONLY: HuBERT-base with random weights (the caller logs weights.DEMO_WARNING)."""
    state = torch.random.get_rng_state()  # leave the caller's global RNG untouched
    try:
        torch.manual_seed(seed)
        model = HubertModel(cfg or HubertConfig())
    finally:
        torch.random.set_rng_state(state)
    return Embedder(model.eval(), device, half, source=f"random(seed={seed})")


__all__ = [
    "Embedder",
    "HubertConfig",
    "HubertModel",
    "batches_by_seconds",
    "config_from_fairseq",
    "hubert_from_fairseq",
    "load_embedder",
    "load_fairseq_checkpoint",
    "load_hf_dir",
    "parse_conv_layers",
    "random_embedder",
    "save_fairseq_checkpoint",
]
