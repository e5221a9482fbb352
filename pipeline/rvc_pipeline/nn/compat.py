"""Recognise and check RVC state dicts: which version / sample rate / f0 a file was built for.

The expected key->shape maps are built from the real model classes on torch's `meta` device (no
memory, milliseconds), so they can never drift from what `build_generator` / `build_discriminator`
produce. Keys are compared after normalising the weight-norm spelling (`parametrizations.weight.
original0/1` and folded `.weight` are mapped to `weight_g`/`weight_v`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import torch

from rvc_pipeline.core.layout import version_of_dim
from rvc_pipeline.nn.config import SAMPLE_RATES, VERSIONS, get_config, normalize_sample_rate
from rvc_pipeline.nn.discriminator import build_discriminator
from rvc_pipeline.nn.synthesizer import build_generator
from rvc_pipeline.nn.weightnorm import to_legacy_names

Shape = tuple[int, ...]


def param_count(obj: torch.nn.Module | Mapping[str, Any]) -> int:
    """Number of parameters of a module, or of the tensors in a state dict."""
    if isinstance(obj, torch.nn.Module):
        return sum(p.numel() for p in obj.parameters())
    return sum(int(v.numel()) for v in obj.values() if isinstance(v, torch.Tensor))


@functools.cache
def generator_shapes(version: str, sr: str, f0: bool) -> dict[str, Shape]:
    """Key -> shape of `build_generator(get_config(version, sr), version, f0).state_dict()` (109 speakers)."""
    with torch.device("meta"):
        model = build_generator(get_config(version, sr), version, f0)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@functools.cache
def discriminator_shapes(version: str) -> dict[str, Shape]:
    with torch.device("meta"):
        model = build_discriminator(version)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _unwrap(sd: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accept a bare state dict, an RVC checkpoint ({'model': sd}) or an exported model ({'weight': sd})."""
    for key in ("model", "weight"):
        inner = sd.get(key) if isinstance(sd, Mapping) else None
        if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
            return inner
    return sd


def normalized_shapes(state_dict: Mapping[str, Any]) -> dict[str, Shape]:
    """Key -> shape with weight-norm names normalised to weight_g/weight_v where RVC has them.

    A folded `X.weight` (after remove_weight_norm) becomes `X.weight_v` plus `X.weight_g` [out, 1, ...]
    when X is a weight-normed layer in RVC's models (recognised by the layer names).
    """
    sd = to_legacy_names({k: v for k, v in _unwrap(state_dict).items() if isinstance(v, torch.Tensor)})
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    wn_layers = _weight_normed_layer_names()
    out: dict[str, Shape] = {}
    for k, s in shapes.items():
        if k.endswith(".weight"):
            layer = k[: -len(".weight")]
            if _generic_layer(layer) in wn_layers:
                out[layer + ".weight_g"] = (s[0],) + (1,) * (len(s) - 1)
                out[layer + ".weight_v"] = s
                continue
        out[k] = s
    return out


def _generic_layer(name: str) -> str:
    return ".".join("N" if part.isdigit() else part for part in name.split("."))


@functools.lru_cache(maxsize=1)
def _weight_normed_layer_names() -> frozenset[str]:
    names: set[str] = set()
    maps = [generator_shapes(v, sr, f0) for v in VERSIONS for sr in SAMPLE_RATES for f0 in (True, False)]
    maps += [discriminator_shapes(v) for v in VERSIONS]
    for m in maps:
        for k in m:
            if k.endswith(".weight_g"):
                names.add(_generic_layer(k[: -len(".weight_g")]))
    return frozenset(names)


def _kind(shapes: Mapping[str, Shape]) -> str:
    if any(k.startswith("discriminators.") for k in shapes):
        return "discriminator"
    if any(k.startswith(("enc_p.", "dec.", "flow.", "emb_g.")) for k in shapes):
        return "generator"
    return "unknown"


def _matches(given: Mapping[str, Shape], expected: Mapping[str, Shape], allow_missing_enc_q: bool,
             ignore_emb_g_rows: bool) -> bool:
    exp = dict(expected)
    if allow_missing_enc_q and not any(k.startswith("enc_q.") for k in given):
        exp = {k: s for k, s in exp.items() if not k.startswith("enc_q.")}
    if set(given) != set(exp):
        return False
    for k, s in exp.items():
        g = given[k]
        if k == "emb_g.weight" and ignore_emb_g_rows:
            if g[1:] != s[1:]:
                return False
        elif g != s:
            return False
    return True


def _describe_discriminator(shapes: Mapping[str, Shape], info: dict[str, Any]) -> None:
    idx = {int(k.split(".")[1]) for k in shapes if k.split(".")[1].isdigit()}
    info["n_discriminators"] = len(idx)
    for v in VERSIONS:
        if _matches(shapes, discriminator_shapes(v), False, False):
            info["version"], info["exact"] = v, True
    if info["version"] is None:
        info["version"] = {7: "v1", 9: "v2"}.get(len(idx))


def _describe_generator(shapes: Mapping[str, Shape], info: dict[str, Any]) -> None:
    phone = shapes.get("enc_p.emb_phone.weight")
    if phone is not None and len(phone) == 2:
        info["phone_dim"] = phone[1]
        info["version"] = version_of_dim(phone[1])
    info["f0"] = "enc_p.emb_pitch.weight" in shapes or any(k.startswith("dec.m_source.") for k in shapes)
    emb = shapes.get("emb_g.weight")
    if emb is not None:
        info["spk_embed_dim"] = emb[0]
    ups = sorted({int(k.split(".")[2]) for k in shapes
                  if k.startswith("dec.ups.") and k.split(".")[2].isdigit()})
    info["n_upsamples"] = len(ups) or None
    kernels = [shapes.get(f"dec.ups.{i}.weight_v") for i in ups]
    if kernels and all(s is not None for s in kernels):
        info["upsample_kernels"] = [s[-1] for s in kernels if s is not None]
    exact = [(v, sr, f0) for v in VERSIONS for sr in SAMPLE_RATES for f0 in (True, False)
             if _matches(shapes, generator_shapes(v, sr, f0), True, True)]
    if exact:
        info["exact"] = True
        info["version"] = exact[0][0]
        info["f0"] = exact[0][2]
        cands = [sr for _, sr, _ in exact]
    else:
        cands = _decoder_rates(shapes, bool(info["f0"]), info["has_enc_q"])
    info["sr_candidates"] = sorted(set(cands), key=lambda s: SAMPLE_RATES[s])
    if len(info["sr_candidates"]) == 1:
        info["sr"] = info["sr_candidates"][0]


def _decoder_rates(shapes: Mapping[str, Shape], f0: bool, has_enc_q: bool) -> list[str]:
    """Closest structural guess: the rates whose decoder layout (kernels, noise convs, spec bins) fits."""
    cands = []
    for v in VERSIONS:
        for sr in SAMPLE_RATES:
            exp = generator_shapes(v, sr, f0)
            dec_keys = [k for k in exp if k.startswith(("dec.ups.", "dec.noise_convs.", "enc_q.pre."))]
            if dec_keys and all(shapes.get(k) == exp[k] for k in dec_keys if k in shapes) and all(
                    k in shapes for k in dec_keys if not k.startswith("enc_q.") or has_enc_q):
                cands.append(sr)
    return cands


def describe_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """What a state dict is: kind, version, sr, f0 and a few structural facts.

    Returns a dict with keys: kind ('generator' / 'discriminator' / 'unknown'), version ('v1'/'v2'/None),
    f0 (bool/None), sr ('32k'/'40k'/'48k' or None when ambiguous), sr_candidates (list), exact (True when
    the keys and shapes equal one RVC architecture), spk_embed_dim, has_enc_q, n_upsamples,
    upsample_kernels, phone_dim, n_discriminators, n_tensors, n_params.
    """
    sd = _unwrap(state_dict)
    shapes = normalized_shapes(sd)
    info: dict[str, Any] = {
        "kind": _kind(shapes), "version": None, "f0": None, "sr": None, "sr_candidates": [], "exact": False,
        "spk_embed_dim": None, "has_enc_q": any(k.startswith("enc_q.") for k in shapes),
        "n_upsamples": None, "upsample_kernels": None, "phone_dim": None, "n_discriminators": None,
        "n_tensors": len(shapes), "n_params": sum(math.prod(s) for s in shapes.values()),
    }
    if info["kind"] == "discriminator":
        _describe_discriminator(shapes, info)
    elif info["kind"] == "generator":
        _describe_generator(shapes, info)
    return info


def _label(info: Mapping[str, Any]) -> str:
    if info["kind"] == "discriminator":
        return f"a {info['version'] or '?'} discriminator ({info['n_discriminators']} sub-discriminators)"
    if info["kind"] != "generator":
        return "not an RVC generator or discriminator"
    sr = info["sr"] or ("/".join(info["sr_candidates"]) if info["sr_candidates"] else "?")
    pitch = "with f0" if info["f0"] else "without f0"
    facts = []
    if info["phone_dim"] is not None:
        facts.append(f"emb_phone {info['phone_dim']}-d")
    if info["n_upsamples"] is not None:
        facts.append(f"{info['n_upsamples']} upsampling stages")
    if info["upsample_kernels"]:
        facts.append(f"ups kernels {info['upsample_kernels']}")
    return f"a {info['version'] or '?'} {sr} generator {pitch} ({', '.join(facts)})"


def check_compatible(state_dict: Mapping[str, Any], version: str, sr: str | int, f0: bool, what: str,
                     *, kind: str | None = None, allow_missing_enc_q: bool = False,
                     spk_embed_dim: int | None = None) -> dict[str, Any]:
    """Raise ValueError unless `state_dict` has exactly the keys/shapes of the spec's architecture.

    `kind` ('generator'/'G' or 'discriminator'/'D') is taken from the keys when None. emb_g may have any
    number of rows unless `spk_embed_dim` is given. enc_q may be absent only with
    `allow_missing_enc_q` (exported small models). Weight-norm spellings are normalised first.
    Returns `describe_state_dict(state_dict)` on success.
    """
    srn = normalize_sample_rate(sr)
    if version not in VERSIONS:
        raise ValueError(f"{what}: version {version!r} is not one of {list(VERSIONS)}")
    shapes = normalized_shapes(state_dict)
    info = describe_state_dict(state_dict)
    want = {"g": "generator", "generator": "generator", "d": "discriminator",
            "discriminator": "discriminator"}.get((kind or info["kind"]).lower(), info["kind"])
    spec_label = (f"{version} {srn} generator {'with' if f0 else 'without'} f0" if want == "generator"
                  else f"{version} discriminator")
    if not shapes:
        raise ValueError(f"{what}: holds no tensors, expected a {spec_label}")
    if info["kind"] != want:
        raise ValueError(f"{what}: is {_label(info)}; expected a {spec_label}")
    if want not in ("discriminator", "generator"):
        raise ValueError(f"{what}: is {_label(info)}; expected a {spec_label}")
    expected = _expected(want, version, srn, f0, allow_missing_enc_q and not info["has_enc_q"])
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    mismatched = _mismatched(shapes, expected, spk_embed_dim)
    if missing or unexpected or mismatched:
        parts = [f"{what}: looks like {_label(info)} but the spec says {spec_label}"]
        if mismatched:
            shown = "; ".join(f"{k} {list(g)} (expected {list(s)})" for k, g, s in mismatched[:8])
            parts.append(f"{len(mismatched)} shape mismatch(es): {shown}{_more(mismatched, 8)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s): {', '.join(missing[:8])}{_more(missing, 8)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:8])}"
                         f"{_more(unexpected, 8)}")
        raise ValueError("; ".join(parts))
    return info


def _expected(want: str, version: str, srn: str, f0: bool, without_enc_q: bool) -> dict[str, Shape]:
    """Key -> shape of the architecture `want` ('generator' / 'discriminator') of the spec."""
    if want == "discriminator":
        return dict(discriminator_shapes(version))
    expected = dict(generator_shapes(version, srn, bool(f0)))
    return {k: s for k, s in expected.items() if not k.startswith("enc_q.")} if without_enc_q else expected


def _mismatched(shapes: Mapping[str, Shape], expected: Mapping[str, Shape], spk_embed_dim: int | None
                ) -> list[tuple[str, Shape, tuple[int | None, ...]]]:
    """(key, given shape, expected shape) of each key present in both with another shape; emb_g may have
    any number of rows unless `spk_embed_dim` is given."""
    out: list[tuple[str, Shape, tuple[int | None, ...]]] = []
    for k, s in expected.items():
        g = shapes.get(k)
        if g is None:
            continue
        if k == "emb_g.weight" and spk_embed_dim is None:
            if g[1:] != s[1:]:
                out.append((k, g, s))
        elif k == "emb_g.weight":
            if g != (spk_embed_dim,) + s[1:]:
                out.append((k, g, (spk_embed_dim,) + s[1:]))
        elif g != s:
            out.append((k, g, s))
    return out


def _more(items: list[Any], shown: int) -> str:
    return f" and {len(items) - shown} more" if len(items) > shown else ""
