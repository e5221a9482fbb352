"""HuBERT through `transformers.HubertModel`, plus the final projection (Linear 768 -> 256) for v1.

RVC's features: v1 = final_proj(output of layer 9), 256-d; v2 = output of layer 12,
768-d. Layers count from 1 as fairseq's `output_layer` does (HF's `hidden_states[k]`); a smaller test
model stops at its last layer. A Hugging Face HubertModel folder (config.json + model.safetensors or
pytorch_model.bin, with an optional `final_proj`) loads here; fairseq files go through
fairseq_convert.py to the same `HubertWeights`.

Clips are batched only with clips of the same length: HF's block-0 GroupNorm would take its statistics
over padding, so a padded batch would not give each clip its own result (tests/unit/test_embedders.py).
On CPU in fp32 every Linear runs oneDNN on a pre-packed weight (PackedLinear) and the conv front end runs
clip by clip (HFHubert.forward); bench/bench_features.py measures both against a plain HF loop.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from rvc_pipeline import safeload
from rvc_pipeline.components.embedders.base import (
    Embedder,
    EmbedderKind,
    Version,
    as_clips,
    check_version,
    equal_length_batches,
    register,
)
from rvc_pipeline.core import fileio

# speed: audio seconds per CPU second, 1 thread, HuBERT-base v2 in equal-length batches (bench_features.py)
CATALOG = {"hf_hubert": {"needs_gpu": True, "weights": [], "speed": 5.0}}
OUTPUT_LAYER = {"v1": 9, "v2": 12}
"""RVC's HuBERT layer per model version (1-based); v1 also applies final_proj."""
FINAL_PROJ = "final_proj."
OPTIONAL_KEYS = ("masked_spec_embed",)  # used only for training-time masking
_WEIGHT_NORM = {"weight_g": "parametrizations.weight.original0",
                "weight_v": "parametrizations.weight.original1"}


@dataclass
class HubertWeights:
    """A HuBERT in HF layout: config (transformers.HubertConfig), state (HF names, maybe final_proj.*),
    normalize (fairseq's cfg.task.normalize: layer_norm over the waveform first), source (for errors)."""

    config: Any
    state: dict[str, torch.Tensor]
    normalize: bool
    source: str


def hf_config(**kw: Any) -> Any:
    """transformers.HubertConfig of RVC's HuBERT kind (post-norm, GroupNorm front end, exact GELU);
    HuBERT-base unless `kw` says otherwise."""
    import transformers

    base: dict[str, Any] = dict(feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False,
                                hidden_act="gelu", feat_extract_activation="gelu", layer_norm_eps=1e-5,
                                classifier_proj_size=256)
    return transformers.HubertConfig(**{**base, **kw})


class Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in fp32 as fairseq does for block 0 (fp16 statistics over ~10^4 frames lose
    precision); identical in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


@contextmanager
def _first_layers(encoder: Any, k: int) -> Iterator[None]:
    """Run only the first k encoder layers (v1 stops at 9: running all 12 would waste a quarter)."""
    full = encoder.layers
    encoder.layers = full[:k]
    try:
        yield
    finally:
        encoder.layers = full


def _onednn_linear() -> bool:
    """Whether this torch has oneDNN's packed-weight linear (a CPU fast path, private API: checked here)."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._linear_pointwise.default)
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Linear):
    """nn.Linear that, in CPU fp32 inference, runs oneDNN on a pre-packed copy of its weight: 1.2-1.6x MKL's
    sgemm on the AMD EPYC this was measured on (bench/bench_features.py). Same parameters and state-dict
    keys; repacks when the weight changed in place; plain F.linear under autograd or off CPU fp32."""

    packed: torch.Tensor | None = None
    packed_version: int = -1

    @classmethod
    def of(cls, lin: nn.Linear) -> PackedLinear:
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
        new.weight, new.bias = lin.weight, lin.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if torch.is_grad_enabled() or w.device.type != "cpu" or not w.dtype == x.dtype == torch.float32:
            return super().forward(x)
        if self.packed is None or self.packed_version != w._version:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach())
            self.packed_version = w._version
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave out the packed weight (an opaque oneDNN tensor): packed again on use."""
        return {**self.__dict__, "packed": None, "packed_version": -1}


def pack_linears(module: nn.Module) -> int:
    """Replace every plain nn.Linear under `module` by a PackedLinear sharing its parameters; the count."""
    n = 0
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            setattr(module, name, PackedLinear.of(child))
            n += 1
        else:
            n += pack_linears(child)
    return n


def reduced_dtype(device: torch.device) -> torch.dtype:
    """The half precision used on `device`: fp16 on CUDA, bf16 on a CPU that has it natively, else fp32."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and fileio.cpu_bf16_supported():
        return torch.bfloat16
    return torch.float32


class HFHubert(Embedder):
    """A transformers.HubertModel (+ optional final_proj) on a device. `half`: fp16 on CUDA, bf16 on a CPU
    with native bf16 (core.fileio.cpu_bf16_supported), else fp32."""

    def __init__(self, model: Any, final_proj: nn.Linear | None, *, normalize: bool = False,
                 device: str = "cpu", half: bool = False, source: str = ""):
        self.device = torch.device(device)
        self.dtype = reduced_dtype(self.device) if half else torch.float32
        self.source, self.normalize = source, normalize
        cfg = model.config
        self.kernels = list(zip(cfg.conv_kernel, cfg.conv_stride))
        self.layers = int(cfg.num_hidden_layers)
        block0 = model.feature_extractor.conv_layers[0]
        if isinstance(getattr(block0, "layer_norm", None), nn.GroupNorm):
            gn = block0.layer_norm
            fp32 = Fp32GroupNorm(gn.num_groups, gn.num_channels, gn.eps, gn.affine)
            fp32.load_state_dict(gn.state_dict())
            block0.layer_norm = fp32
        conv = model.encoder.pos_conv_embed.conv
        if parametrize.is_parametrized(conv, "weight"):  # inference only: fold weight norm once
            parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
        self.model = model.eval().to(self.device, self.dtype)
        self.final_proj = final_proj.eval().to(self.device, self.dtype) if final_proj is not None else None
        if self.device.type == "cpu" and self.dtype == torch.float32 and _onednn_linear():
            pack_linears(self.model)

    @property
    def receptive_field(self) -> int:
        r = 1
        for k, s in reversed(self.kernels):
            r = (r - 1) * s + k
        return r

    def frames(self, n_samples: int) -> int:
        """Output frames for n samples (HuBERT-base: floor((N-400)/320)+1)."""
        n = n_samples
        for k, s in self.kernels:
            n = (n - k) // s + 1 if n >= k else 0
        return max(n, 0)

    def output_layer(self, version: Version) -> int:
        return min(OUTPUT_LAYER[version], self.layers)

    def dim(self, version: Version) -> int:
        """hidden_size for v2; final_proj's size for v1 (0: no final_proj, v1 unavailable)."""
        check_version(version)
        if version == "v2":
            return int(self.model.config.hidden_size)
        return int(self.final_proj.out_features) if self.final_proj is not None else 0

    def forward(self, wav: torch.Tensor, version: Version) -> torch.Tensor:
        """wav [B, N] of equal-length clips (model dtype, on the device) -> [B, T, dim]; HubertModel's own
        steps in inference (no masking), with the conv front end clip by clip on CPU: a 3.7 s clip's
        largest buffers (512 x 11.8k floats, 24 MB) stay under glibc's 32 MB mmap ceiling and can be reused,
        where a batch's are mmapped and page-faulted afresh every batch (1.7x the faults and 2-3x the
        kernel time of a per-clip loop, with no gain in user time: bench/bench_features.py)."""
        m = self.model
        if wav.device.type == "cpu":
            feats = torch.cat([m.feature_extractor(w[None]) for w in wav])
        else:
            feats = m.feature_extractor(wav)
        with _first_layers(m.encoder, self.output_layer(version)):
            h = m.encoder(m.feature_projection(feats.transpose(1, 2))).last_hidden_state
        return self.final_proj(h) if version == "v1" and self.final_proj is not None else h

    def extract(self, clips: np.ndarray | Sequence[np.ndarray], version: Version = "v2",
                batch_seconds: float | None = None) -> list[np.ndarray]:
        """Features per clip; clips of equal length run together, at most `batch_seconds` per batch."""
        if not self.dim(version):
            raise ValueError("v1 features need final_proj, which this embedder does not have")
        items = as_clips(clips, self.receptive_field)
        out: list[np.ndarray] = [np.empty(0)] * len(items)
        for idx in equal_length_batches([len(c) for c in items], batch_seconds):
            for i, f in zip(idx, self._run(np.stack([items[i] for i in idx]), version)):
                out[i] = f
        return out

    def _run(self, batch: np.ndarray, version: Version) -> list[np.ndarray]:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            if self.normalize:
                x = F.layer_norm(x, (x.shape[-1],))
            y = self.forward(x.to(self.dtype), version).float().cpu().numpy()
        return [np.ascontiguousarray(f) for f in y]


def _own_name(k: str, own: set[str]) -> str:
    """Accept both weight-norm spellings (legacy weight_g/weight_v, torch's parametrizations)."""
    if k in own:
        return k
    for legacy, param in _WEIGHT_NORM.items():
        for a, b in ((legacy, param), (param, legacy)):
            alt = k[: -len(a)] + b
            if k.endswith("." + a) and alt in own:
                return alt
    return k


def _model_state(w: HubertWeights, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """w.state renamed to the model's keys, fp32, checked against `own` (ValueError naming the source)."""
    sd: dict[str, torch.Tensor] = {}
    names = set(own)
    for k, v in w.state.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{w.source}: model entry {k!r} is not a tensor ({type(v).__name__})")
        if not k.startswith(FINAL_PROJ):
            sd[_own_name(k, names)] = v.float() if v.is_floating_point() else v
    missing = sorted(set(own) - set(sd) - set(OPTIONAL_KEYS))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{w.source}: state dict does not match the HuBERT config "
            f"(missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''})"
        )
    bad = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in sd.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(f"{w.source}: shape mismatch: {'; '.join(bad[:6])}")
    return sd


def _final_proj(w: HubertWeights) -> nn.Linear | None:
    weight, bias = w.state.get(FINAL_PROJ + "weight"), w.state.get(FINAL_PROJ + "bias")
    if weight is None:
        return None
    if weight.ndim != 2 or bias is None or bias.shape != weight.shape[:1]:
        raise ValueError(f"{w.source}: final_proj has shape {tuple(weight.shape)} without a matching bias")
    lin = nn.Linear(weight.shape[1], weight.shape[0])
    lin.load_state_dict({"weight": weight.float(), "bias": bias.float()})
    return lin


def load_weights(w: HubertWeights, device: str = "cpu", half: bool = False) -> HFHubert:
    """An HFHubert from HF-layout weights (strict but for the optional masking embedding)."""
    import transformers

    model = transformers.HubertModel(w.config)
    sd = _model_state(w, model.state_dict())
    model.load_state_dict(sd, strict=False)
    return HFHubert(model, _final_proj(w), normalize=w.normalize, device=device, half=half, source=w.source)


def _hf_state(d: Path) -> dict[str, torch.Tensor]:
    """The tensors of model*.safetensors, else of pytorch_model*.bin (through rvc_pipeline.safeload)."""
    state: dict[str, torch.Tensor] = {}
    st_files = sorted(d.glob("model*.safetensors"))
    if st_files:
        from safetensors.torch import load_file

        for f in st_files:
            state.update(load_file(str(f)))
        return state
    bin_files = sorted(d.glob("pytorch_model*.bin"))
    if not bin_files:
        raise ValueError(f"{d}: no model.safetensors or pytorch_model.bin")
    for f in bin_files:
        sd = safeload.load(f, what="Hugging Face model file")
        if not isinstance(sd, dict):
            raise ValueError(f"{f}: not a state dict")
        state.update(sd)
    return state


def _check_hf_config(d: Path, conf: dict[str, Any]) -> None:
    if conf.get("do_stable_layer_norm"):
        raise ValueError(f"{d}: do_stable_layer_norm=true (pre-norm HuBERT-large) is not supported")
    if conf.get("feat_extract_norm", "group") != "group":
        raise ValueError(f"{d}: feat_extract_norm {conf.get('feat_extract_norm')!r} is not supported")
    for key in ("hidden_act", "feat_extract_activation"):
        if conf.get(key, "gelu") != "gelu":
            raise ValueError(f"{d}: {key}={conf.get(key)!r} is not supported (need exact gelu)")
    if conf.get("feat_proj_layer_norm", True) is False:
        raise ValueError(f"{d}: feat_proj_layer_norm=false is not supported")


def read_hf_dir(path: str | Path) -> HubertWeights:
    """A Hugging Face HubertModel folder as HubertWeights (heads other than final_proj dropped)."""
    import transformers

    d = Path(path)
    try:
        conf = json.loads((d / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{d}: not a Hugging Face model folder (config.json: {e})") from None
    if not isinstance(conf, dict):
        raise ValueError(f"{d}: config.json is not an object")
    _check_hf_config(d, conf)
    keep = ("feature_extractor.", "feature_projection.", "encoder.", FINAL_PROJ, *OPTIONAL_KEYS)
    state = {}
    for k, v in _hf_state(d).items():
        k = k.removeprefix("hubert.")  # HubertForCTC / ForSequenceClassification wrap the model
        if k.startswith(keep):
            state[k] = v
    return HubertWeights(transformers.HubertConfig.from_dict(conf), state, False, str(d))


def _load(path: Path | None, device: str, half: bool) -> HFHubert:
    if path is None:
        raise ValueError("a Hugging Face HuBERT needs a folder")
    return load_weights(read_hf_dir(path), device, half)


register(EmbedderKind("hf_hubert", accepts=Path.is_dir, load=_load))
