"""RVC's small-model format (`savee` in process_ckpt.py), written and read.

An exported model is a `torch.save`d OrderedDict:

* `weight`: every generator tensor except keys containing "enc_q", in fp16 (weight_g/weight_v names);
* `config`: the 18 constructor arguments, element 1 = 32 (RVC's placeholder), last = int sample rate;
* `info`: e.g. "20epoch"; `sr`: "40k" (a string in RVC, an int in Applio); `f0`: 1/0 (a bool in Applio);
  `version`: "v1"/"v2"; optional extra keys (Applio: epoch, step, creation_date, model_hash, ...).

`load_small_model` reads RVC's and Applio's variants and checks that every non-enc_q tensor was loaded.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rvc_pipeline.core.fileio import atomic_write
from rvc_pipeline.nn.compat import check_compatible, describe_state_dict, normalized_shapes
from rvc_pipeline.nn.config import SAMPLE_RATES, VERSIONS, RVCConfig, normalize_sample_rate
from rvc_pipeline.nn.synthesizer import SynthesizerTrn, build_generator_from_list, constructor_args
from rvc_pipeline.nn.weightnorm import to_legacy_names

RVC_KEYS: tuple[str, ...] = ("weight", "config", "info", "sr", "f0", "version")
SUPPORTED_VOCODERS: tuple[str, ...] = ("HiFi-GAN",)


class ModelFileError(ValueError):
    """An exported model file that cannot be used; the message names the file and the cause."""


def small_model_weights(net_g_state_dict: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """RVC's `weight` entry: all tensors but enc_q, weight_g/weight_v names, fp16, on CPU."""
    sd = to_legacy_names(dict(net_g_state_dict))
    return OrderedDict(
        (k, v.detach().to("cpu").half()) for k, v in sd.items() if "enc_q" not in k
    )


def _check_against_config(sd: Mapping[str, torch.Tensor], cfg: RVCConfig, version: str, f0: bool,
                          sr_name: str) -> None:
    """The state dict must have exactly the shapes of the generator that `cfg` builds (RVC builds it from
    the experiment's config.json, which the exported config list records), so RVC can load the file."""
    spk = int(sd["emb_g.weight"].shape[0]) if "emb_g.weight" in sd else 109
    with torch.device("meta"):
        ref = SynthesizerTrn(*constructor_args(cfg, spk), version=version, f0=f0)
    want = {k: v for k, v in normalized_shapes(ref.state_dict()).items() if not k.startswith("enc_q.")}
    have = {k: v for k, v in normalized_shapes(sd).items() if not k.startswith("enc_q.")}
    if want != have:
        # explain with the standard architectures when it is one of them, else list the differences
        check_compatible(sd, version, sr_name, f0, "export: generator state dict", kind="generator",
                         allow_missing_enc_q=True)
        diff = sorted(set(want.items()) ^ set(have.items()))[:8]
        raise ValueError(f"export: generator state dict does not match its config.json; differing: {diff}")


def export_small_model(net_g_state_dict: Mapping[str, torch.Tensor], cfg: RVCConfig, version: str, f0: bool,
                       path: str | os.PathLike[str], info: str,
                       extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write RVC's small-model file at `path` (atomically); returns a summary.

    The state dict is checked first against the generator that `cfg` builds (version, f0), so a file
    that RVC could not load is never written. `extra` keys are added after RVC's own (they may not
    override them).
    """
    if version not in VERSIONS:
        raise ValueError(f"export: version {version!r} is not one of {list(VERSIONS)}")
    sr_name = normalize_sample_rate(cfg.sampling_rate)
    _check_against_config(net_g_state_dict, cfg, version, f0, sr_name)
    weight = small_model_weights(net_g_state_dict)
    spk = int(weight["emb_g.weight"].shape[0])
    opt: OrderedDict[str, Any] = OrderedDict()
    opt["weight"] = weight
    opt["config"] = constructor_args(cfg, spk_embed_dim=spk, segment_frames=32)
    opt["info"] = str(info)
    opt["sr"] = sr_name
    opt["f0"] = int(bool(f0))
    opt["version"] = version
    for k, v in (extra or {}).items():
        if k in RVC_KEYS:
            raise ValueError(f"export: extra key {k!r} would override RVC's own field")
        opt[k] = v
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, sync_dir=True) as f:
        torch.save(opt, f)
    n_params = sum(int(v.numel()) for v in weight.values())
    return {"path": str(path), "tensors": len(weight), "params": n_params, "bytes": path.stat().st_size,
            "sr": sr_name, "f0": int(bool(f0)), "version": version, "info": str(info)}


def _as_bool_f0(value: Any, path: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("0", "1", "true", "false"):
        return value.strip().lower() in ("1", "true")
    raise ModelFileError(f"{path}: field 'f0' must be 0/1 or a bool, got {value!r}")


def read_small_model(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load an exported model through rvc_pipeline.safeload and check its top-level structure (no model
    is built). ModelFileError if unreadable; safeload.UnsafeFile if it needs foreign Python objects."""
    from rvc_pipeline import safeload

    p = str(path)
    if not os.path.exists(p):
        raise ModelFileError(f"{p}: no such file")
    try:
        ckpt = safeload.load(p, what="voice model")
    except safeload.UnreadableFile as exc:
        raise ModelFileError(f"{p}: cannot be read as a PyTorch model file ({exc})") from None
    if not isinstance(ckpt, Mapping):
        raise ModelFileError(f"{p}: expected a dict with 'weight' and 'config', got {type(ckpt).__name__}")
    if "weight" not in ckpt:
        if "model" in ckpt:
            raise ModelFileError(
                f"{p}: this is a training checkpoint (G_*.pth / D_*.pth with a 'model' entry), not an "
                "exported voice model; export it first")
        raise ModelFileError(f"{p}: missing the 'weight' entry (keys: {sorted(map(str, ckpt))[:10]})")
    if "config" not in ckpt:
        raise ModelFileError(f"{p}: missing the 'config' entry")
    if not isinstance(ckpt["weight"], Mapping) or not ckpt["weight"]:
        raise ModelFileError(f"{p}: 'weight' must be a non-empty dict of tensors")
    return dict(ckpt)


def _weights(ckpt: Mapping[str, Any], p: str) -> dict[str, torch.Tensor]:
    """The 'weight' entry with RVC's key names, every value a tensor, of a generator (emb_g)."""
    weight = to_legacy_names({k: v for k, v in ckpt["weight"].items()})
    bad = [k for k, v in weight.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelFileError(f"{p}: non-tensor entries in 'weight': {bad[:5]}")
    if "emb_g.weight" not in weight:
        raise ModelFileError(f"{p}: 'weight' has no emb_g.weight (not an RVC generator)")
    return weight


def _version(ckpt: Mapping[str, Any], desc: Mapping[str, Any], p: str) -> str:
    """The 'version' field, checked against the weights; read from the weights when absent (RVC: v1)."""
    if "version" not in ckpt:
        return str(desc["version"] or "v1")
    version = str(ckpt["version"])
    if version not in VERSIONS:
        raise ModelFileError(f"{p}: field 'version' is {version!r}, expected one of {list(VERSIONS)}")
    if desc["version"] is not None and desc["version"] != version:
        raise ModelFileError(f"{p}: field 'version' says {version} but the weights are "
                             f"{desc['version']} (emb_phone {desc['phone_dim']}-d)")
    return version


def _f0(ckpt: Mapping[str, Any], desc: Mapping[str, Any], p: str) -> bool:
    """The 'f0' field, checked against the weights; read from the weights when absent (RVC: 1)."""
    if "f0" not in ckpt:
        return bool(desc["f0"]) if desc["f0"] is not None else True
    f0 = _as_bool_f0(ckpt["f0"], p)
    if desc["f0"] is not None and desc["f0"] != f0:
        raise ModelFileError(f"{p}: field 'f0' says {int(f0)} but the weights are "
                             f"{'with' if desc['f0'] else 'without'} pitch")
    return f0


def _config(ckpt: Mapping[str, Any], weight: Mapping[str, torch.Tensor], p: str) -> tuple[list[Any], int]:
    """(the 18 constructor arguments with config[-3] := emb_g rows, as RVC does; the sample rate),
    the rate checked against the 'sr' field."""
    config = list(ckpt["config"])
    if len(config) != 18:
        raise ModelFileError(f"{p}: 'config' must list 18 constructor arguments, got {len(config)}")
    try:
        tgt_sr = int(config[-1])
    except (TypeError, ValueError):
        raise ModelFileError(f"{p}: config[-1] (sample rate) is {config[-1]!r}, not an integer") from None
    sr_field = ckpt.get("sr")
    if sr_field is not None:
        try:
            sr_from_field = SAMPLE_RATES[normalize_sample_rate(sr_field)]
        except ValueError:
            sr_from_field = None
        if sr_from_field is not None and sr_from_field != tgt_sr:
            raise ModelFileError(f"{p}: field 'sr' is {sr_field!r} but config[-1] is {tgt_sr}")
    config[-3] = int(weight["emb_g.weight"].shape[0])
    return config, tgt_sr


def _check_fit(net_g: SynthesizerTrn, weight: Mapping[str, torch.Tensor], desc: Mapping[str, Any],
               what: str, p: str) -> None:
    """ModelFileError naming the missing, unexpected and mismatched tensors (enc_q aside)."""
    expected = {k: tuple(v.shape) for k, v in net_g.state_dict().items()}
    given = {k: s for k, s in normalized_shapes(weight).items() if "enc_q" not in k}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [f"{k} {list(given[k])} (expected {list(s)})" for k, s in expected.items()
                  if k in given and given[k] != s]
    if not (missing or unexpected or mismatched):
        return
    parts = [f"{p}: weights do not fit {what}"]
    if desc["kind"] == "generator":
        parts.append(f"the weights look like a {desc['version']} {desc['sr'] or desc['sr_candidates']} "
                     f"model {'with' if desc['f0'] else 'without'} f0")
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)):
        if items:
            more = f" and {len(items) - 6} more" if len(items) > 6 else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:6])}{more}")
    raise ModelFileError("; ".join(parts))


def _meta(ckpt: Mapping[str, Any], version: str, f0: bool, config: list[Any], tgt_sr: int) -> dict[str, Any]:
    applio = isinstance(ckpt.get("sr"), int) or isinstance(ckpt.get("f0"), bool) or any(
        k in ckpt for k in ("model_hash", "creation_date", "vocoder", "embedder_model"))
    return {
        "version": version, "f0": f0, "sr": tgt_sr, "sr_name": f"{tgt_sr // 1000}k" if tgt_sr % 1000 == 0
        else str(tgt_sr), "tgt_sr": tgt_sr, "info": ckpt.get("info"), "config": config,
        "spk_embed_dim": config[-3], "format": "applio" if applio else "rvc",
        "extra": {k: v for k, v in ckpt.items() if k not in RVC_KEYS},
    }


def load_small_model(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                     ) -> tuple[SynthesizerTrn, dict[str, Any]]:
    """Load an RVC/Applio exported model: `(net_g in eval mode, fp32, without enc_q; meta)`.

    Follows RVC's loader (config[-3] := emb_g rows; class by version and f0) but: a missing `version`
    or `f0` is read from the weights (RVC defaults to v1 / f0=1), a contradiction between the fields
    and the weights is an error, and every non-enc_q tensor must load (missing, unexpected and
    mismatched keys are named). meta holds version, f0 (bool), sr (int), sr_name, info, config,
    spk_embed_dim, format ('rvc' or 'applio') and the remaining keys under 'extra'.
    """
    p = str(path)
    ckpt = read_small_model(p)
    weight = _weights(ckpt, p)
    desc = describe_state_dict(weight)
    vocoder = ckpt.get("vocoder")
    if vocoder is not None and str(vocoder) not in SUPPORTED_VOCODERS:
        raise ModelFileError(f"{p}: vocoder {vocoder!r} is not supported (only {list(SUPPORTED_VOCODERS)})")
    version, f0 = _version(ckpt, desc, p), _f0(ckpt, desc, p)
    config, tgt_sr = _config(ckpt, weight, p)
    try:
        net_g = build_generator_from_list(config, version, f0)
    except Exception as exc:
        raise ModelFileError(f"{p}: cannot build a model from its config {config}: {exc}") from exc
    net_g.remove_posterior_encoder()
    _check_fit(net_g, weight, desc, f"a {version} {'f0' if f0 else 'no-f0'} model with config {config}", p)
    to_load = {k: v.float() for k, v in weight.items() if "enc_q" not in k}
    result = net_g.load_state_dict(to_load, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelFileError(f"{p}: load left missing {result.missing_keys[:6]} / unexpected "
                             f"{result.unexpected_keys[:6]}")
    return net_g.float().eval().to(device), _meta(ckpt, version, f0, config, tgt_sr)
