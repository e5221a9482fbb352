"""The train step's inputs: consistency checks, config.json, the filelist (with the mute set), the batch
size, and RVC's hparams line of train.log. Everything here runs before the models are built."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from rvc_pipeline.core import layout
from rvc_pipeline.core.errors import StepFailed
from rvc_pipeline.core.spec import SAMPLE_RATES
from rvc_pipeline.data import (
    BUCKET_BOUNDARIES,
    bucket_index,
    is_mute_item,
    mute_features_from_embedder,
)
from rvc_pipeline.steps.runner import StepContext
from rvc_pipeline.steps.train.state import InitPlan
from rvc_pipeline.weights import resolve_weight

log = logging.getLogger("rvc_pipeline")


# ------------------------------------------------------------------------------------ input checks
def _check_features(exp_dir: Path, version: str) -> int:
    fd = layout.feature_dir(version)
    other_version = "v1" if version == "v2" else "v2"
    other = layout.feature_dir(other_version)
    dim = layout.feature_dim(version)
    feats = sorted((exp_dir / fd).glob("*.npy"))
    if not feats:
        if any((exp_dir / other).glob("*.npy")):
            raise StepFailed(
                f"{exp_dir / fd}: no features, but {other}/ has some: the features were extracted for "
                f"{other_version} while spec.model.version is {version} (needs {fd}/ "
                f"with {dim}-d features). Rerun the features step or change spec.model.version."
            )
        raise StepFailed(f"{exp_dir / fd}: no feature files; run the features step first")
    for p in feats:
        try:
            arr = np.load(p, mmap_mode="r")
        except Exception as e:  # noqa: BLE001
            raise StepFailed(f"{p}: unreadable feature file ({e})") from None
        if arr.ndim != 2 or arr.shape[1] != dim:
            raise StepFailed(
                f"{p}: features of shape {tuple(arr.shape)} in {fd}/; spec.model.version {version} needs "
                f"[frames, {dim}]"
            )
    return len(feats)


def _check_wavs(exp_dir: Path, sr_key: str) -> int:
    wavs = sorted((exp_dir / layout.GT_WAVS_DIR).glob("*.wav"))
    sr = SAMPLE_RATES[sr_key]
    for p in wavs:
        try:
            info = sf.info(str(p))
        except Exception as e:  # noqa: BLE001
            raise StepFailed(f"{p}: unreadable WAV ({e})") from None
        if info.samplerate != sr:
            raise StepFailed(
                f"{p}: sample rate {info.samplerate} Hz, but spec.model.sampleRate is {sr_key} ({sr} Hz); "
                "rerun the preprocess step for this sample rate"
            )
    return len(wavs)


def check_inputs(exp_dir: Path, version: str, sr_key: str, f0: bool) -> dict[str, int]:
    """Consistency of the inputs with the spec; StepFailed naming the folder/file otherwise."""
    exp_dir = Path(exp_dir)
    if not any((exp_dir / layout.GT_WAVS_DIR).glob("*.wav")):
        raise StepFailed(f"{exp_dir / layout.GT_WAVS_DIR}: no WAV files; run the preprocess step first")
    n_feats = _check_features(exp_dir, version)
    counts = {layout.GT_WAVS_DIR: _check_wavs(exp_dir, sr_key), layout.feature_dir(version): n_feats}
    if f0:
        for sub in layout.F0_DIRS:
            n = len(list((exp_dir / sub).glob("*.npy")))
            if n == 0:
                raise StepFailed(
                    f"{exp_dir / sub}: no pitch files, but spec.model.pitchGuidance is true; run the f0 step "
                    "(or set pitchGuidance: false)"
                )
            counts[sub] = n
    return counts


def usable_items(items: list[list[str]], hop: int) -> tuple[int, int, int]:
    """(usable, too short, too long) real (non-mute) items by the sampler's length rule."""
    ok = short = long_ = 0
    for it in items:
        if is_mute_item(it):
            continue
        n = os.path.getsize(it[0]) // (3 * hop)
        if bucket_index(n) >= 0:
            ok += 1
        elif n <= BUCKET_BOUNDARIES[0]:
            short += 1
        else:
            long_ += 1
    return ok, short, long_


def check_items(items: list[list[str]], filelist: Path, hop: int, counts: dict[str, int]) -> tuple[int, ...]:
    """(real items, usable, too short, too long); StepFailed when nothing can be trained on."""
    exp_dir = filelist.parent
    n_real = sum(not is_mute_item(it) for it in items)
    if n_real == 0:
        raise StepFailed(
            f"{filelist}: no training items: no file stem is present in every input folder ({counts}); "
            "the preprocess, f0 and features outputs do not match"
        )
    ok, short, long_ = usable_items(items, hop)
    if ok == 0:
        raise StepFailed(
            f"{exp_dir / layout.GT_WAVS_DIR}: none of the {n_real} clips can be trained on: {short} are "
            f"too short (clips must be longer than 0.75 s) and {long_} too long (more than ~6.7 s); check "
            "the preprocess settings (segmentSeconds, slicer minLengthMs)"
        )
    if short or long_:
        log.warning("train: %d clip(s) shorter than 0.75 s and %d longer than ~6.7 s are not used",
                    short, long_)
    return n_real, ok, short, long_


def batch_size(ctx: StepContext, n_items: int, world: int) -> int:
    """spec.train.batchSize, lowered (with a warning) when there are fewer items than one batch per GPU."""
    batch = ctx.spec.train.batch_size
    if n_items >= batch * world:
        return batch
    new = max(1, n_items // world)
    msg = (f"only {n_items} usable training items for batch size {batch} x {world} GPU(s); "
           f"lowering the batch size to {new}")
    log.warning("train: %s", msg)
    ctx.reporter.event("warning", message=msg)
    return new


# ------------------------------------------------------------------------------------ files
def pull_append(ctx: StepContext, name: str) -> None:
    """Fetch an append-only log from storage and keep what this run already wrote after it (a resumed
    pod starts with a fresh scratch; pushing its own file alone would drop the earlier history)."""
    if not ctx.remote:
        return
    key = f"{ctx.exp_key}/{name}"
    if not ctx.storage.exists(key):
        return
    local = ctx.exp_dir / name
    mine = local.read_bytes() if local.exists() else b""
    tmp = local.with_name(name + ".remote.partial")
    ctx.storage.download(key, tmp)
    old = tmp.read_bytes()
    if old and not old.endswith(b"\n"):
        old += b"\n"
    local.write_bytes(old + mine)
    tmp.unlink()


def load_config(ctx: StepContext) -> Any:
    """The experiment's config.json (written from RVC's defaults when absent) with spec.train applied."""
    from rvc_pipeline.nn.config import RVCConfig, get_config

    spec = ctx.spec
    sr_key = spec.model.sample_rate
    cfg_path = ctx.exp_dir / layout.CONFIG_FILE
    cfg = get_config(spec.model.version, sr_key)
    if cfg_path.exists():
        try:
            existing = RVCConfig.from_json(json.loads(cfg_path.read_text()))
        except (ValueError, json.JSONDecodeError) as e:
            raise StepFailed(f"{cfg_path}: not a valid RVC config ({e}); delete it to regenerate") from None
        if existing.sampling_rate != cfg.sampling_rate or existing.hop_length != cfg.hop_length:
            raise StepFailed(f"{cfg_path}: written for {existing.sampling_rate} Hz, but "
                             f"spec.model.sampleRate is {sr_key}; delete it or use another experiment name")
        cfg = existing
    else:
        cfg_path.write_text(json.dumps(cfg.to_json(), indent=2))
    return cfg.replace_train(batch_size=spec.train.batch_size, learning_rate=spec.train.learning_rate,
                             lr_decay=spec.train.lr_decay, seed=spec.train.seed)


def mute_features(ctx: StepContext, version: str) -> tuple[np.ndarray | None, str]:
    """HuBERT's output for 3 s of silence from the embedder that made the features (recorded by the
    features step), else zeros: the mute set never mixes embedders with the real items."""
    try:
        from rvc_pipeline.components.embedders.base import Version, load_embedder
    except ImportError:
        return None, "zeros"
    from rvc_pipeline.provenance import RANDOM, read_record, weight_identity
    from rvc_pipeline.safeload import UnsafeFile
    from rvc_pipeline.steps.features import PARAMS_FILE as FEATURES_PARAMS

    made_by = (read_record(ctx.exp_dir / FEATURES_PARAMS) or {}).get("embedder")
    try:
        if made_by == RANDOM:  # the features step's demo embedder (same seed)
            emb, kind = load_embedder(None, "cpu"), f"embedder:{RANDOM}"
        else:
            path = resolve_weight(ctx.spec.features.embedder, ctx.spec, what="HuBERT embedder",
                                  allow_online=False)
            kind = f"embedder:{Path(path).name}@{weight_identity(path)}"
            if made_by is not None and weight_identity(path) != made_by:
                log.info("mute features: %s did not make the features (%s); using zeros", path, made_by)
                return None, "zeros"
            emb = load_embedder(path, "cpu")
        v: Version = "v1" if version == "v1" else "v2"
        feats = mute_features_from_embedder(lambda w: emb.extract(w, v)[0])
        return feats, kind
    except UnsafeFile:  # a hostile embedder in the weights cache is news, not a reason for zeros
        raise
    except Exception as e:  # noqa: BLE001 - the mute features are a nicety; zeros work
        log.info("mute features: embedder not available (%s); using zeros", e)
        return None, "zeros"


def hparams(ctx: StepContext, cfg: dict[str, Any], plan: InitPlan, batch: int, filelist: Path) -> dict:
    """The hparams dict RVC writes as the first line of train.log (its UI reads it back)."""
    s = ctx.spec
    hp = json.loads(json.dumps(cfg))
    hp["train"]["batch_size"] = batch
    hp["data"]["training_files"] = str(filelist)
    hp.update({
        "model_dir": str(ctx.exp_dir), "experiment_dir": str(ctx.exp_dir), "name": ctx.name,
        "save_every_epoch": s.train.save_every_epoch, "total_epoch": s.train.epochs,
        "pretrainG": plan.g or "" if plan.kind == "pretrained" else "",
        "pretrainD": plan.d or "" if plan.kind == "pretrained" else "",
        "version": s.model.version, "gpus": str(s.train.gpus), "sample_rate": s.model.sample_rate,
        "if_f0": int(s.model.pitch_guidance), "if_latest": int(s.train.save_latest_only),
        "save_every_weights": "1" if s.train.save_every_weights else "0",
        "if_cache_data_in_gpu": int(s.train.cache_data_in_gpu),
    })
    return hp
