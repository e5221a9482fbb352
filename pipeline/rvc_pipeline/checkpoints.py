"""Training checkpoints G_<step>.pth / D_<step>.pth in RVC's format, written atomically.

Keys (both files), as RVC writes them: `model` (full state dict, weight-norm tensors named
`weight_g`/`weight_v`), `iteration` (the EPOCH), `optimizer` (AdamW state dict), `learning_rate`
(the initial LR). Ours add `global_step`, `scaler` (GradScaler state), `lr_epoch` (scheduler
position), `format` and a few facts about the model (`version`, `sr`, `f0`); RVC ignores them.

Differences from RVC, on purpose:
* writing is atomic (core.fileio.atomic_write): a temporary file in the same folder, fsync,
  `os.replace`, fsync of the folder.
  A kill in the middle of a save leaves the previous checkpoint intact.
* "latest" sorts on the integer in the FILE NAME (RVC used every digit of the full path, so digits
  in the experiment name broke the order); `G_2333333.pth` (save-latest-only) counts as newest.
* loading first checks that the checkpoint is of the same architecture (version, sample rate,
  pitch) with `rvc_pipeline.nn.check_compatible`, so another model's file is a clear error
  rather than a silent partial load; then it loads key by key with shape checks like RVC, logging
  what was skipped.
* a checkpoint that fails to unpickle (truncated upload, killed copy) is reported as
  CheckpointCorrupt so the caller can fall back to the previous one.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rvc_pipeline.core.fileio import atomic_write

log = logging.getLogger("rvc_pipeline")

LATEST_ONLY_STEP = 2333333
FORMAT = "rvc-operator/1"
_NAME_RE = re.compile(r"^(?P<prefix>[A-Za-z]+_)(?P<num>\d+)\.pth$")


class CheckpointCorrupt(RuntimeError):
    """A checkpoint file that cannot be read (truncated, not a torch file)."""


class CheckpointIncompatible(ValueError):
    """A readable checkpoint of another architecture (version, sample rate, pitch, shapes)."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def legacy_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with weight-norm tensors named weight_g / weight_v (RVC's names)."""
    from rvc_pipeline.nn.weightnorm import to_legacy_names

    sd = unwrap(model).state_dict()
    return to_legacy_names({k: v.detach().cpu() for k, v in sd.items()})


def save_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, lr: float, epoch: int,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write RVC's checkpoint dict (+ our extras) atomically to `path`."""
    ckpt: dict[str, Any] = {
        "model": legacy_state_dict(model),
        "iteration": int(epoch),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "learning_rate": float(lr),
        "format": FORMAT,
    }
    if extra:
        ckpt.update(extra)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, sync_dir=True) as f:  # readers never see a half-written checkpoint
        torch.save(ckpt, f)
    return path


def checkpoint_number(path: Path | str) -> int | None:
    m = _NAME_RE.match(Path(path).name)
    return int(m.group("num")) if m else None


def _order_key(path: Path) -> tuple[int, int]:
    n = checkpoint_number(path)
    assert n is not None
    # G_2333333 (save-latest-only) is always the newest file.
    return (1 if n == LATEST_ONLY_STEP else 0, n)


def list_checkpoints(folder: Path, prefix: str = "G_") -> list[Path]:
    """Checkpoints `<prefix><int>.pth` directly in `folder`, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME_RE.match(p.name)
        if m and m.group("prefix") == prefix and p.is_file():
            found.append(p)
    return sorted(found, key=_order_key, reverse=True)


def latest_checkpoint(folder: Path, prefix: str = "G_") -> Path | None:
    """The newest `<prefix><int>.pth` by the integer in the file name (G_2333333 = latest-only file)."""
    found = list_checkpoints(folder, prefix)
    return found[0] if found else None


def checkpoint_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(G, D) pairs with the same number, newest first."""
    ds = {checkpoint_number(p): p for p in list_checkpoints(folder, "D_")}
    gs = list_checkpoints(folder, "G_")
    return [(g, ds[checkpoint_number(g)]) for g in gs if checkpoint_number(g) in ds]


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint on CPU through rvc_pipeline.safeload (never a full unpickle).

    CheckpointCorrupt if it cannot be read (truncated, empty, garbage: the caller may fall back to an
    older one); safeload.UnsafeFile (a StepFailed) if it needs any Python object beyond tensors and
    plain data: refused, nothing of it ran."""
    from rvc_pipeline import safeload

    path = Path(path)
    try:
        obj = safeload.load(path, what="training checkpoint")
    except safeload.UnreadableFile as e:
        raise CheckpointCorrupt(str(e)) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), Mapping):
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointIncompatible(
            f"{path}: not an RVC training checkpoint (no 'model' state dict; found {keys}). "
            "Exported small models (with 'weight') cannot be trained from; use G_*.pth / D_*.pth or "
            "the pretrained f0G/f0D files."
        )
    return obj


def check_architecture(
    state_dict: Mapping[str, torch.Tensor], version: str, sr: str, f0: bool, what: str, kind: str = "G",
) -> None:
    """rvc_pipeline.nn.check_compatible (kind 'G' or 'D'), raising CheckpointIncompatible."""
    from rvc_pipeline.nn import check_compatible

    try:
        check_compatible(dict(state_dict), version, sr, f0, what, kind=kind)
    except ValueError as e:
        raise CheckpointIncompatible(str(e)) from None


def check_model_compat(
    state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module, version: str, sr: str, f0: bool,
    what: str, kind: str = "G",
) -> None:
    """The checkpoint must fit `model` (the architecture built from the experiment's config).

    When it does not, rvc_pipeline.nn.check_compatible explains what the file is instead (another
    version, sample rate or pitch setting); a file of the standard architecture that still does not fit
    (a model built from a customised config.json) gets a generic message. emb_g rows may differ."""
    from rvc_pipeline.nn.weightnorm import to_legacy_names

    own = {k: tuple(v.shape) for k, v in to_legacy_names(dict(unwrap(model).state_dict())).items()}
    given = {k: tuple(v.shape) for k, v in to_legacy_names(dict(state_dict)).items()
             if isinstance(v, torch.Tensor)}
    diffs = [k for k in own if k not in given or (given[k] != own[k] and not (
        k == "emb_g.weight" and given[k][1:] == own[k][1:]))]
    extra = [k for k in given if k not in own]
    if not diffs and not extra:
        return
    check_architecture(state_dict, version, sr, f0, what, kind)
    shown = ", ".join((diffs + extra)[:5])
    raise CheckpointIncompatible(
        f"{what}: {len(diffs)} missing/mis-shaped and {len(extra)} unexpected keys (e.g. {shown}) for the "
        "model built from this experiment's config.json"
    )


def load_into(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool, what: str,
) -> list[str]:
    """Copy tensors into `model` key by key (shape-checked). Returns the skipped keys.

    strict: any missing/unexpected/mis-shaped key raises CheckpointIncompatible."""
    target = unwrap(model)
    own = target.state_dict()
    from rvc_pipeline.nn.weightnorm import to_legacy_names

    sd = to_legacy_names(dict(state_dict))
    own_legacy = to_legacy_names(dict(own))
    skipped: list[str] = []
    new: dict[str, torch.Tensor] = {}
    for k, v in own_legacy.items():
        src = sd.get(k)
        if src is None:
            skipped.append(f"{k} (missing)")
            new[k] = v
        elif tuple(src.shape) != tuple(v.shape):
            skipped.append(f"{k} (shape {tuple(src.shape)} != {tuple(v.shape)})")
            new[k] = v
        else:
            new[k] = src.to(dtype=v.dtype)
    unexpected = [k for k in sd if k not in own_legacy]
    if strict and (skipped or unexpected):
        bad = skipped[:5] + [f"{k} (unexpected)" for k in unexpected[:5]]
        raise CheckpointIncompatible(
            f"{what}: {len(skipped)} missing/mis-shaped and {len(unexpected)} unexpected keys, e.g. "
            f"{', '.join(bad)}; it was made for another model architecture"
        )
    for s in skipped:
        log.info("%s: %s not loaded, keeping the initial value", what, s)
    target.load_state_dict(new, strict=False)
    return skipped


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
    version: str | None = None, sr: str | None = None, f0: bool | None = None, what: str = "checkpoint",
    strict: bool = False, kind: str = "G",
) -> dict[str, Any]:
    """Load a checkpoint into `model` (and `optimizer`); returns the checkpoint dict minus tensors.

    version/sr/f0 given: the file must be of that architecture, a generator (kind 'G') or a
    discriminator ('D'); CheckpointIncompatible otherwise."""
    ckpt = read_checkpoint(path)
    sd = ckpt["model"]
    if version is not None and sr is not None and f0 is not None:
        check_model_compat(sd, model, version, sr, f0, f"{what} {path}", kind)
    skipped = load_into(model, sd, strict=strict, what=f"{what} {Path(path).name}")
    if optimizer is not None and ckpt.get("optimizer"):
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            log.warning("%s %s: optimizer state not restored (%s); starting it fresh", what, path, e)
            ckpt["optimizer_restored"] = False
        else:
            ckpt["optimizer_restored"] = True
    info = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}
    info["skipped_keys"] = skipped
    info["path"] = str(path)
    return info
