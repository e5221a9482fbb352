"""Every name under `logs/<experiment>/`, in one place (torch-free: the operator reads them too).

    logs/<exp>/0_gt_wavs/            preprocess: pieces at the model's rate (RVC's names)
    logs/<exp>/1_16k_wavs/           preprocess: the same pieces at 16 kHz
    logs/<exp>/2a_f0/  2b-f0nsf/     f0: coarse bins and Hz, `<piece>.wav.npy`
    logs/<exp>/3_feature{256,768}/   features: HuBERT output, size from the model version
    logs/<exp>/.rvc/                 our bookkeeping: `<step>.done.json` markers, `<step>.params.json`
                                     provenance, the dataset manifest, the writer lease, the owner record,
                                     shard markers `<step>.shard-<I>-of-<N>.done.json`,
                                     `<step>.generation.json`, preprocess's records `preprocess.files/`
    logs/<exp>/progress.jsonl        progress events (core/events.py)
    logs/<exp>/filelist.txt config.json train.log G_<n>.pth D_<n>.pth        training
    logs/<exp>/weights/<exp>.pth     the exported voice model
    logs/<exp>/trained_IVF... added_IVF... total_fea.npy                     the index step
    logs/<exp>/eval.jsonl report.html previews/    checkpoint evaluation (best = weights/<exp>.pth)
    logs/<exp>/converted/<stem>.<format>          the convert step: spec.convert.source converted

The folder and file names are RVC's own where RVC has one, so RVC and Applio read our experiments.
Paths here are relative to the experiment folder unless the function says `key` (a storage key).
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Literal

Version = Literal["v1", "v2"]
VERSIONS: tuple[Version, ...] = ("v1", "v2")
FEATURE_DIMS: dict[str, int] = {"v1": 256, "v2": 768}
"""Model version -> HuBERT feature size (v1: final_proj of layer 9; v2: layer 12)."""

LOGS_DIR = "logs"
GT_WAVS_DIR = "0_gt_wavs"
WAVS_16K_DIR = "1_16k_wavs"
F0_COARSE_DIR = "2a_f0"
F0_NSF_DIR = "2b-f0nsf"
F0_DIRS: tuple[str, str] = (F0_COARSE_DIR, F0_NSF_DIR)

MARKER_DIR = ".rvc"
MARKER_SUFFIX = ".done.json"
PROGRESS_FILE = "progress.jsonl"
DATASET_MANIFEST_FILE = f"{MARKER_DIR}/dataset.manifest.json"
OWNER_FILE = "owner.json"  # in MARKER_DIR: which RVCExperiment (namespace, name, uid) owns the folder
LEASE_FILE = "lease.json"  # in MARKER_DIR: the writer lease (its holder)
LEASE_LOCK_FILE = "lease.lock"  # in MARKER_DIR: the local storage's lock file
FILELIST_FILE = "filelist.txt"
CONFIG_FILE = "config.json"
TRAIN_LOG_FILE = "train.log"
WEIGHTS_DIR = "weights"
TOTAL_FEA_FILE = "total_fea.npy"
INDEX_KINDS: tuple[str, str] = ("trained", "added")


def feature_dim(version: str) -> int:
    """Feature size of a model version; ValueError naming it when it is not v1 or v2."""
    try:
        return FEATURE_DIMS[version]
    except KeyError:
        raise ValueError(f"model version {version!r} is not one of {list(VERSIONS)}") from None


def version_of_dim(dim: int) -> str | None:
    """The model version whose features have `dim` channels (None: no RVC version)."""
    return next((v for v, d in FEATURE_DIMS.items() if d == dim), None)


def feature_dir(version: str) -> str:
    """RVC's feature folder of a model version: 3_feature256 (v1) or 3_feature768 (v2)."""
    return f"3_feature{feature_dim(version)}"


FEATURE_DIRS: tuple[str, ...] = tuple(feature_dir(v) for v in VERSIONS)


def exp_key(experiment: str) -> str:
    """Storage key of the experiment folder."""
    return f"{LOGS_DIR}/{experiment}"


def marker_name(step: str) -> str:
    return f"{step}{MARKER_SUFFIX}"


def marker_prefix(experiment: str) -> str:
    """Storage prefix of the experiment's bookkeeping folder (markers, lease, owner record), with '/'."""
    return f"{exp_key(experiment)}/{MARKER_DIR}/"


def bookkeeping_key(experiment: str, name: str) -> str:
    """Storage key of a file in the experiment's bookkeeping folder logs/<exp>/.rvc/."""
    return marker_prefix(experiment) + name


def marker_key(experiment: str, step: str) -> str:
    """Storage key of a step's completion marker."""
    return bookkeeping_key(experiment, marker_name(step))


def step_of_marker(name: str) -> str | None:
    """The step a marker file name belongs to (None: not a marker name)."""
    if not name.endswith(MARKER_SUFFIX) or name == MARKER_SUFFIX:
        return None
    return name[: -len(MARKER_SUFFIX)]


# ------------------------------------------------------------------------------ sharded data steps
SHARDED_STEPS: tuple[str, ...] = ("preprocess", "f0", "features", "convert")
"""The per-file steps that run as N shards (`rvc-pipeline <step> --shard I/N`, spec.resources.shards)."""
MAX_SHARDS = 64  # spec.resources.shards' upper bound
SHARD_MARKER_RE = re.compile(r"^(?P<step>[a-z0-9]+)\.shard-(?P<index>\d+)-of-(?P<count>\d+)\.done\.json$")


def shard_marker_name(step: str, index: int, count: int) -> str:
    """A shard's completion marker file name: `<step>.shard-<I>-of-<N>.done.json` (I zero-based)."""
    return f"{step}.shard-{index}-of-{count}{MARKER_SUFFIX}"


def shard_marker_key(experiment: str, step: str, index: int, count: int) -> str:
    """Storage key of shard I of N's completion marker, logs/<exp>/.rvc/<step>.shard-<I>-of-<N>.done.json."""
    return bookkeeping_key(experiment, shard_marker_name(step, index, count))


def shard_of_marker(name: str) -> tuple[str, int, int] | None:
    """(step, index, count) of a shard marker file name (None: not a shard marker)."""
    m = SHARD_MARKER_RE.match(name)
    return (m["step"], int(m["index"]), int(m["count"])) if m else None


def generation_file(step: str) -> str:
    """What the current run of a data step makes its outputs for (its inputs hash and params): shard 0 or
    an unsharded run writes it before any output; the other shards wait for it (steps/shards.py)."""
    return f"{MARKER_DIR}/{step}.generation.json"


PREPROCESS_RECORDS_DIR = f"{MARKER_DIR}/preprocess.files"
"""preprocess's per-file records (`<idx0>.json`: the dataset file, its pieces, its report): a file with a
record whose pieces exist is done (resume, shards); the completing process sums them into the report."""


def preprocess_record(idx0: int) -> str:
    """The record of dataset file number `idx0` (its position in the sorted listing)."""
    return f"{PREPROCESS_RECORDS_DIR}/{idx0}.json"


def progress_key(experiment: str) -> str:
    return f"{exp_key(experiment)}/{PROGRESS_FILE}"


def params_file(step: str) -> str:
    """A step's provenance record (what made its outputs), relative to the experiment folder."""
    return f"{MARKER_DIR}/{step}.params.json"


CHECKPOINT_PREFIXES: tuple[str, str] = ("G_", "D_")
"""Training checkpoints: G_<n>.pth (generator) and D_<n>.pth (discriminator), side by side."""
TRAIN_SUMMARY_FILE = "train_summary.json"


def checkpoint_names(number: int | str) -> tuple[str, str]:
    """(generator, discriminator) training checkpoint names: G_<n>.pth, D_<n>.pth."""
    g, d = CHECKPOINT_PREFIXES
    return f"{g}{number}.pth", f"{d}{number}.pth"


def discriminator_of(generator_name: str) -> str | None:
    """D_<n>.pth beside G_<n>.pth (None: not a generator checkpoint name)."""
    g, d = CHECKPOINT_PREFIXES
    return d + generator_name[len(g):] if generator_name.startswith(g) else None


def exported_model(experiment: str) -> str:
    """The exported voice model (RVC's small-model format), relative to the experiment folder."""
    return f"{WEIGHTS_DIR}/{experiment}.pth"


def epoch_model(experiment: str, epoch: int, global_step: int) -> str:
    """The per-epoch export of saveEveryWeights, relative to the experiment folder."""
    return f"{WEIGHTS_DIR}/{experiment}_e{epoch}_s{global_step}.pth"


def index_name(kind: str, n_ivf: int, experiment: str, version: str) -> str:
    """RVC's index file name; kind 'trained' (empty IVF) or 'added' (the one RVC users load)."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"index kind {kind!r} is not one of {list(INDEX_KINDS)}")
    return f"{kind}_IVF{n_ivf}_Flat_nprobe_1_{experiment}_{version}.index"


def index_name_pattern(experiment: str, version: str) -> re.Pattern[str]:
    """Matches every index file name of this experiment and version, whatever its n_ivf."""
    kinds, tail = "|".join(INDEX_KINDS), f"{re.escape(experiment)}_{re.escape(version)}"
    return re.compile(rf"^({kinds})_IVF\d+_Flat_nprobe_1_{tail}\.index$")


def is_added_index(name: str) -> bool:
    """An added_*.index file name (what the operator reports as the experiment's index)."""
    return name.startswith("added_") and name.endswith(".index")


# ------------------------------------------------------------------------------ checkpoint evaluation
EVAL_FILE = "eval.jsonl"  # one line per evaluated checkpoint (evaluation/history.py)
REPORT_FILE = "report.html"  # the self-contained evaluation report
PREVIEWS_DIR = "previews"  # a WAV per preview clip and evaluated epoch
HELDOUT_FILE = f"{MARKER_DIR}/heldout.json"  # which pieces training never sees


def preview_name(epoch: int, index: int) -> str:
    """A preview WAV, relative to the experiment folder."""
    return f"{PREVIEWS_DIR}/e{epoch:05d}_{index:02d}.wav"


def evaluated_model(experiment: str, epoch: int) -> str:
    """The export of one evaluated epoch (spec.eval.saveEveryEvaluated)."""
    return f"{WEIGHTS_DIR}/{experiment}_e{epoch}.pth"


CONVERT_REPORT_FILE = "convert_report.json"  # in the output folder of `rvc-pipeline convert`
CONVERT_FORMATS: tuple[str, ...] = ("wav", "flac", "ogg", "mp3")
"""Output formats of conversion (`rvc-pipeline convert --format`, spec.convert.format)."""
CONVERTED_DIR = "converted"  # the convert step's outputs: converted/<source stem>.<format>


def converted_name(source_name: str, fmt: str) -> str:
    """The convert step's output for a source file name: `<stem>.<format>` (in CONVERTED_DIR)."""
    return f"{PurePosixPath(source_name).stem}.{fmt}"
