"""The RVCExperiment spec: one typed model read by the pipeline, the operator and the CRD generator.

Field names are camelCase in YAML (Kubernetes convention) and snake_case in Python.
Importing this module must never import torch (the operator image has no torch).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from rvc_pipeline.core.catalog import METRIC_NAMES, PITCH_METHODS
from rvc_pipeline.core.layout import CONVERT_FORMATS, feature_dim

API_GROUP = "rvc-operator.dev"
API_VERSION = "v1alpha1"
KIND = "RVCExperiment"
PLURAL = "rvcexperiments"
SINGULAR = "rvcexperiment"
SHORT_NAMES = ["rvcx", "rvcexp"]

DEFAULT_STEPS: tuple[str, ...] = ("preprocess", "f0", "features", "train", "index")
"""The training steps: spec.steps' default (one-click training)."""
STEP_ORDER: tuple[str, ...] = (*DEFAULT_STEPS, "convert")
"""Every step in the order they run; `convert` (spec.convert) runs only when spec.steps lists it."""

SAMPLE_RATES: dict[str, int] = {"32k": 32000, "40k": 40000, "48k": 48000}
# Piece lengths (s) the trainer can use: its sampler keeps items of 101..900 frames, counted as
# wav_bytes // (3 * hop) on float32 WAVs with hop = sr / 100, i.e. about 133 frames per second
# (rvc_pipeline.data BUCKET_BOUNDARIES, as RVC). Longer or shorter pieces are silently dropped.
PIECE_SECONDS: tuple[float, float] = (0.76, 6.75)
MAX_MANIFEST_BYTES = 1 << 20  # the API server stores objects of about 1.5 MB at most
F0Method = Literal[PITCH_METHODS]  # type: ignore[valid-type]  # one per file of components/pitch
MetricName = Literal[METRIC_NAMES]  # type: ignore[valid-type]  # declared by components/metrics files
StepName = Literal[STEP_ORDER]  # type: ignore[valid-type]
ConvertFormat = Literal[CONVERT_FORMATS]  # type: ignore[valid-type]

class SpecError(ValueError):
    """A manifest that does not describe a valid experiment. The message names the field."""


# ------------------------------------------------------------------------------- string checks
# Every string of the spec is bounded and free of control characters (C0, DEL, C1) and of invisible
# format characters (zero-width, bidi overrides); names and URIs are checked for what the run needs.
# The CRD gets the length bound and the control-character pattern, so the API server refuses them too.
NO_CONTROL_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*$"
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$"
MAX_NAME = 253  # a Kubernetes object name; the operator shortens Job names itself
MAX_URI = 2048
MAX_TEXT = 256
_NAME_RE = re.compile(NAME_PATTERN[1:-1])
_K8S_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")  # DNS-1123 subdomain
_LABEL_VALUE_RE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
_LABEL_KEY_RE = re.compile(
    r"([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_QUANTITY_RE = re.compile(
    r"([0-9]+(\.[0-9]*)?|\.[0-9]+)(n|u|m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?[0-9]+)?")
_REGION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_BUCKET_RE = re.compile(r"[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
BUCKET_RULE = ("lower-case letters, digits, '.' and '-', at most 63 characters, starting and ending with a "
               "letter or digit, no '..', not an IP address")


def _check_text(v: str, limit: int) -> str:
    if len(v) > limit:
        raise ValueError(f"too long ({len(v)} characters; at most {limit})")
    for i, c in enumerate(v):
        if unicodedata.category(c) in ("Cc", "Cf"):
            raise ValueError(f"contains the control character {c!r} at position {i}")
    return v


def _text(limit: int = MAX_TEXT, check: Callable[[str], str] | None = None,
          pattern: str = NO_CONTROL_PATTERN) -> Any:
    """A str type: at most `limit` characters, no control characters, then `check` (raises ValueError)."""

    def validate(v: str) -> str:
        v = _check_text(v, limit)
        return check(v) if check is not None else v

    return Annotated[str, AfterValidator(validate),
                     Field(json_schema_extra={"maxLength": limit, "pattern": pattern})]


def check_name(v: str) -> str:
    """An experiment name: a DNS-1123-like label that is also a safe folder name (no '/', '..', '.x')."""
    if not _NAME_RE.fullmatch(v) or ".." in v or len(v) > MAX_NAME:
        raise ValueError("must be lower-case letters, digits, '-', '_' or '.' (a folder name): start and "
                         f"end with a letter or digit, no '..', at most {MAX_NAME} characters")
    return v


def _matches(regex: re.Pattern[str], what: str) -> Callable[[str], str]:
    def check(v: str) -> str:
        if not regex.fullmatch(v):
            raise ValueError(f"{v[:80]!r} is not {what}")
        return v

    return check


def _check_s3(v: str, need_key: bool) -> str:
    bucket, _, key = v[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError("s3:// URI without a bucket; expected s3://bucket/prefix")
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket or re.fullmatch(r"[0-9.]+", bucket):
        raise ValueError(f"{bucket[:80]!r} is not a valid S3 bucket name ({BUCKET_RULE})")
    if any(seg in (".", "..") for seg in key.split("/")):
        raise ValueError("'.' and '..' are not allowed as parts of an S3 key")
    if len(key.encode()) > 1024:
        raise ValueError("S3 keys are at most 1024 bytes")
    if need_key and (not key.strip("/") or key.endswith("/")):
        raise ValueError("needs an object after the bucket: s3://bucket/path/file")
    return v


def _location(need_key: bool) -> Callable[[str], str]:
    """A local path, file://path or s3://bucket[/key] (`need_key`: a file, not a folder)."""

    def check(v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        if v != v.strip():
            raise ValueError("must not start or end with white space")
        if v.startswith("s3://"):
            return _check_s3(v, need_key)
        if v.lower().startswith("s3:"):
            raise ValueError(f"{v[:80]!r}: an S3 URI is written s3://bucket/prefix")
        if v.startswith("file://"):
            if not v[len("file://"):]:
                raise ValueError("file:// needs a path")
            return v
        if "://" in v or _SCHEME_RE.match(v):
            raise ValueError(f"{v[:80]!r}: unsupported URI; allowed: s3://bucket/prefix or a local path")
        return v

    return check


def _check_http(v: str) -> str:
    """An http(s) URL of a service: scheme, host, optional port and path; no credentials or spaces."""
    try:
        parts = urlsplit(v)
        _ = parts.port  # raises ValueError for a port that is not a number in 0..65535
    except ValueError as e:
        raise ValueError(f"{v[:80]!r} is not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in v):
        raise ValueError(f"{v[:80]!r}: expected an http:// or https:// URL with a host, e.g. http://minio:9000")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain credentials (use a Secret)")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    return v


def _check_resume(v: str) -> str:
    v = _location(need_key=True)(v)
    if not re.fullmatch(r"G_[^/]+\.pth", v.rstrip("/").rsplit("/", 1)[-1]):
        raise ValueError(f"{v[:80]!r} is not a G_*.pth checkpoint (its D_ sibling is used too)")
    return v


def check_free_form(v: Any, max_nodes: int = 10_000, max_depth: int = 32) -> Any:
    """A free-form value (Kubernetes affinity): bounded in size and depth (walked without recursion, so
    neither deep nesting nor a YAML alias bomb can exhaust the stack or memory), strings and keys free of
    control characters."""
    stack: list[tuple[Any, int]] = [(v, 0)]
    seen = 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > max_nodes or depth > max_depth:
            raise ValueError(f"too large (more than {max_nodes} values or nested deeper than {max_depth})")
        if isinstance(node, dict):
            for k, sub in node.items():
                _check_text(str(k), MAX_TEXT)
                stack.append((sub, depth + 1))
        elif isinstance(node, list):
            stack.extend((sub, depth + 1) for sub in node)
        elif isinstance(node, str):
            _check_text(node, MAX_URI)
    return v


def _no_space(v: str) -> str:
    if not v or any(c.isspace() for c in v):
        raise ValueError("must be non-empty and without white space")
    return v


_check_label_key = _matches(_LABEL_KEY_RE, "a Kubernetes label key")
_check_label_value = _matches(_LABEL_VALUE_RE, "a Kubernetes label value")

if TYPE_CHECKING:  # to a type checker each is a str; at run time an Annotated str with its checks
    Folder = str
    FileRef = str
    HttpUrl = str
    K8sName = str
    Quantity = str
    LabelKey = str
    LabelValue = str
    Region = str
    ExperimentName = str
    ResumeRef = str
    ImageRef = str
else:
    Folder = _text(MAX_URI, _location(need_key=False))  # local folder or s3://bucket/prefix
    FileRef = _text(MAX_URI, _location(need_key=True))  # a file: s3:// object, path or bare weights name
    HttpUrl = _text(MAX_URI, _check_http)
    K8sName = _text(MAX_NAME,
                    _matches(_K8S_NAME_RE, "a Kubernetes name (lower-case letters, digits, '-', '.')"))
    Quantity = _text(64, _matches(_QUANTITY_RE, "a Kubernetes quantity such as 4, 500m, 16Gi or 1.5G"))
    LabelKey = _text(317, _check_label_key)
    LabelValue = _text(63, _check_label_value)
    Region = _text(64, _matches(_REGION_RE, "an S3 region name such as us-east-1"))
    ExperimentName = _text(MAX_NAME, check_name, pattern=NAME_PATTERN)
    ResumeRef = _text(MAX_URI, _check_resume)
    ImageRef = _text(512, _no_space)


def cel(*rules: tuple[str, str]) -> dict[str, Any]:
    """API-server validation rules (`x-kubernetes-validations`, CEL) for a model or field's JSON schema.

    Each rule is (CEL expression on `self` (and `oldSelf` for transition rules), message). They repeat in
    the API server what the validators here check, so a bad spec is refused at `kubectl apply`; crd.py
    emits them only in the CEL variant of the CRD (Kubernetes >= 1.25)."""
    return {"x-kubernetes-validations": [{"rule": r, "message": m} for r, m in rules]}


# s3:// everywhere on clusters: step pods share no filesystem (the operator's Policy.require_s3).
_CEL_S3 = ("self.startsWith('s3://')", "must be an s3:// URI: step pods share no filesystem")
_CEL_IMMUTABLE = ("self == oldSelf", "is immutable: artifacts of a running experiment live there")


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
        allow_inf_nan=False,
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        # YAML reads yes/no/on/off as booleans, and pydantic would take True as the number 1
        if isinstance(v, bool) and info.field_name is not None:
            ann = cls.model_fields[info.field_name].annotation
            kinds = (set(get_args(ann)) or {ann}) - {type(None)}
            if kinds and kinds <= {int, float}:
                raise ValueError(f"expected a number, got the boolean {v}")
        return v


class Device(str, Enum):
    gpu = "gpu"
    cpu = "cpu"


class DatasetSpec(_Model):
    source: Folder = Field(
        description="Folder of voice recordings: a local path or s3://bucket/prefix/. Only files directly "
        "inside it are used (not sub-folders); any format ffmpeg reads.",
        json_schema_extra=cel(_CEL_S3),
    )


class StorageSpec(_Model):
    uri: Folder = Field(
        description="Where artifacts go: a local folder or s3://bucket/prefix. "
        "An experiment writes to <uri>/logs/<experiment>/.",
        json_schema_extra=cel(_CEL_S3, _CEL_IMMUTABLE),
    )
    endpoint: HttpUrl | None = Field(
        default=None,
        description="S3 endpoint URL for S3-compatible stores (MinIO, Ceph, moto). Empty means AWS.",
    )
    region: Region | None = Field(default=None, description="S3 region name.")
    credentials_secret: K8sName | None = Field(
        default=None,
        description="Name of a Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, mounted into the "
        "step pods as environment variables (operator only).",
    )


class ModelSpec(_Model):
    version: Literal["v1", "v2"] = Field(
        default="v2", description="RVC model version: v1 (256-d HuBERT layer 9) or v2 (768-d layer 12)."
    )
    sample_rate: Literal["32k", "40k", "48k"] = Field(
        default="40k", description="Target sample rate of the model: 32k, 40k or 48k."
    )
    pitch_guidance: bool = Field(
        default=True, description="Use pitch (f0). Without it the model is lighter but unfit for singing."
    )
    speaker_id: int = Field(default=0, ge=0, le=108, description="Speaker id written to the filelist.")

    @property
    def sr(self) -> int:
        return SAMPLE_RATES[self.sample_rate]

    @property
    def feature_dim(self) -> int:
        return feature_dim(self.version)


class SlicerSpec(_Model):
    model_config = ConfigDict(json_schema_extra=cel(
        ("self.minLengthMs >= self.minIntervalMs && self.minIntervalMs >= self.hopSizeMs",
         "need minLengthMs >= minIntervalMs >= hopSizeMs"),
        ("self.maxSilKeptMs >= self.hopSizeMs", "maxSilKeptMs must be >= hopSizeMs"),
    ))

    threshold_db: float = Field(default=-42.0, ge=-120, le=0, description="Silence threshold in dB (RMS).")
    min_length_ms: int = Field(default=1500, ge=1, le=60_000,
                               description="Minimum length of a sliced clip in ms.")
    min_interval_ms: int = Field(default=400, ge=1, le=60_000,
                                 description="Minimum silence length to cut at, in ms.")
    hop_size_ms: int = Field(default=15, ge=1, le=1000, description="Frame hop of the RMS analysis in ms.")
    max_sil_kept_ms: int = Field(default=500, ge=0, le=60_000,
                                 description="Longest silence kept around a cut, in ms.")

    @model_validator(mode="after")
    def _order(self) -> SlicerSpec:
        if not self.min_length_ms >= self.min_interval_ms >= self.hop_size_ms:
            raise ValueError(
                "need minLengthMs >= minIntervalMs >= hopSizeMs "
                f"(got {self.min_length_ms}, {self.min_interval_ms}, {self.hop_size_ms})"
            )
        if self.max_sil_kept_ms < self.hop_size_ms:
            raise ValueError("maxSilKeptMs must be >= hopSizeMs")
        return self


class PreprocessSpec(_Model):
    model_config = ConfigDict(json_schema_extra=cel(
        ("self.overlapSeconds < self.segmentSeconds", "overlapSeconds must be smaller than segmentSeconds"),
        (f"self.segmentSeconds >= {PIECE_SECONDS[0]!r} && self.segmentSeconds <= {PIECE_SECONDS[1]!r}",
         f"segmentSeconds: training uses pieces of {PIECE_SECONDS[0]:g} to {PIECE_SECONDS[1]:g} s"),
    ))

    segment_seconds: float = Field(
        default=3.7, gt=0.5, le=30.0, description="Piece length in seconds before overlap (RVC 'per')."
    )
    overlap_seconds: float = Field(default=0.3, ge=0.0, lt=5.0, description="Overlap between pieces.")
    high_pass: Literal["lfilter", "filtfilt", "none"] = Field(
        default="lfilter",
        description="48 Hz order-5 Butterworth high-pass: lfilter (causal, as RVC) or filtfilt "
        "(zero-phase, as the original workflow document says), or none.",
    )
    max_peak: float = Field(
        default=2.5, gt=0, le=100, description="Pieces whose peak exceeds this are skipped (RVC: 2.5)."
    )
    slicer: SlicerSpec = Field(default_factory=SlicerSpec, description="Silence slicer parameters.")
    rvc_compatible: bool = Field(
        default=False,
        description="Reproduce RVC's pieces and names byte for byte (docs/preprocess.md): turn off the "
        "deliberate differences (renumbering instead of overwriting a chunk's last piece, dropping pieces "
        "under 0.76 s, 60 s blocks cut at silences). Each file is then held in memory whole: about 3.3 GB "
        "per hour of audio at 40 kHz.",
    )

    @model_validator(mode="after")
    def _overlap(self) -> PreprocessSpec:
        if self.overlap_seconds >= self.segment_seconds:
            raise ValueError("overlapSeconds must be smaller than segmentSeconds")
        lo, hi = PIECE_SECONDS
        if not lo <= self.segment_seconds <= hi:
            raise ValueError(f"segmentSeconds {self.segment_seconds:g}: training uses pieces of {lo:g} to "
                             f"{hi:g} s (the trainer drops pieces of at most 100 or more than 900 "
                             "spectrogram frames)")
        return self


class F0Spec(_Model):
    method: F0Method = Field(
        default="pm",
        description=f"Pitch extractor: {', '.join(PITCH_METHODS)} (pm: Parselmouth; harvest, dio: PyWorld; "
        "networks run on the GPU when resources.device is gpu; rmvpe needs rmvpeCheckpoint).",
    )
    rmvpe_checkpoint: FileRef | None = Field(
        default=None, description="URI of rmvpe.pt (S3 or path); required for method rmvpe."
    )
    crepe_model: Literal["full", "tiny"] = Field(default="full", description="CREPE capacity.")


class FeaturesSpec(_Model):
    embedder: Folder = Field(
        default="hubert_base.pt",
        description="HuBERT/ContentVec checkpoint: a fairseq hubert_base.pt or a Hugging Face model "
        "folder, as s3:// URI, path, or bare file name looked up in the weights cache.",
    )
    batch_seconds: float = Field(
        default=60.0, gt=0, le=3600, description="Audio seconds per forward batch (bounds memory)."
    )
    half_precision: bool = Field(default=True, description="Use fp16/bf16 on GPUs.")
    cpu_bf16: bool = Field(
        default=False,
        description="On a CPU with native bf16 (AVX512-BF16 or AMX), run HuBERT in bf16: about 1.7x faster, "
                    "features within cosine 0.9997 of RVC's fp32 ones (bench/README.md). Other CPUs: fp32.")


class TrainSpec(_Model):
    batch_size: int = Field(default=4, ge=1, le=1024, description="Batch size per GPU.")
    epochs: int = Field(default=20, ge=1, le=100000, description="Total epochs to train.")
    save_every_epoch: int = Field(default=5, ge=1, le=100000,
                                  description="Save G_/D_ checkpoints every N epochs.")
    save_latest_only: bool = Field(
        default=False, description="Keep only G_2333333.pth/D_2333333.pth (overwritten each save)."
    )
    save_every_weights: bool = Field(
        default=False, description="Also export the small model at every save."
    )
    pretrained_g: FileRef | None = Field(
        default=None,
        description="URI of the pretrained generator. Default: RVC's file name for the model, e.g. "
        "pretrained_v2/f0G40k.pth, looked up in the weights cache.",
    )
    pretrained_d: FileRef | None = Field(default=None, description="URI of the pretrained discriminator.")
    from_scratch: bool = Field(
        default=False, description="Train from random initialisation instead of pretrained weights."
    )
    resume_from: ResumeRef | None = Field(
        default=None,
        description="Start from this G_*.pth checkpoint URI (its D_ sibling is used too), also one of "
        "another experiment. Ignored once this experiment has checkpoints of its own.",
    )
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        default="auto", description="auto: bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU. "
                                    "bf16 on a CPU with native bf16 (AVX512-BF16 or AMX): bf16 autocast."
    )
    learning_rate: float = Field(default=1e-4, gt=0, le=1, description="AdamW learning rate.")
    lr_decay: float = Field(default=0.999875, gt=0, le=1, description="Per-epoch exponential decay.")
    seed: int = Field(default=1234, ge=0, le=2**32 - 1, description="Random seed.")
    gpus: int = Field(default=1, ge=1, le=64, description="GPUs per node (torch DDP).")
    data_workers: int = Field(default=2, ge=0, le=64, description="DataLoader worker processes.")
    cache_data_in_gpu: bool = Field(default=False, description="Keep the whole dataset on the GPU.")
    max_steps_per_epoch: int | None = Field(
        default=None, ge=1, le=10**9, description="Cap steps per epoch (tests and quick demos)."
    )


class IndexSpec(_Model):
    kmeans_threshold: int = Field(
        default=200_000, ge=1000, le=10**10,
        description="Above this many vectors, reduce to 10000 k-means centroids."
    )
    add_batch_size: int = Field(default=8192, ge=1, le=10**7, description="Vectors per add batch.")


class Toleration(_Model):
    """A Kubernetes toleration."""

    key: LabelKey | None = Field(default=None, description="Taint key to tolerate; empty with Exists = all.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal.")
    value: LabelValue | None = Field(default=None, description="Taint value (with Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty = all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, ge=0, le=10**9, description="How long a NoExecute taint is tolerated before eviction."
    )


class ResourcesSpec(_Model):
    device: Device = Field(
        default=Device.gpu, description="gpu: GPU steps request nvidia.com/gpu; cpu: the CPU fallback."
    )
    parallelism: int = Field(
        default=0, ge=0, le=256, description="Worker processes for CPU-bound steps; 0 = all cores."
    )
    cpu: Quantity | None = Field(default=None, description="CPU request of step pods, e.g. '4'.")
    memory: Quantity | None = Field(default=None,
                                    description="Memory request and limit of step pods, e.g. 16Gi.")
    node_selector: dict[str, str] | None = Field(
        default=None, description="nodeSelector for step pods (default: the operator's GPU pool selector)."
    )
    tolerations: list[Toleration] | None = Field(default=None, description="Tolerations for step pods.")
    affinity: Annotated[dict[str, Any], AfterValidator(check_free_form)] | None = Field(
        default=None, description="Affinity for step pods (Kubernetes Affinity object)."
    )
    priority_class_name: K8sName | None = Field(default=None, description="PriorityClass of step pods.")
    queue_name: K8sName | None = Field(
        default=None, description="Kueue LocalQueue; sets the kueue.x-k8s.io/queue-name label on Jobs."
    )
    image: ImageRef | None = Field(default=None, description="Override the pipeline image of step pods.")
    shards: int = Field(
        default=1, ge=1, le=64,
        description="Run preprocess, f0, features and convert as this many pods at once, each on a disjoint, "
        "deterministic part of the files (1: one pod per step). The outputs are the same for any value.",
    )

    @field_validator("node_selector")
    @classmethod
    def _labels(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        # checked here rather than by the dict's types, which the CRD could not express (patternProperties)
        for key, value in (v or {}).items():
            _check_label_key(_check_text(key, 317))
            _check_label_value(_check_text(value, 63))
        return v


class MetricsSpec(_Model):
    pushgateway: HttpUrl | None = Field(
        default=None, description="Prometheus Pushgateway URL; steps push progress there when set."
    )


class EvalSpec(_Model):
    """Checkpoint evaluation: held-out pieces, voice metrics after each save, the best checkpoint."""

    enabled: bool = Field(default=True, description="Evaluate each saved checkpoint (needs held-out pieces).")
    held_out_share: float = Field(
        default=0.1, ge=0.0, le=0.5, description="Share of the pieces held out of training for evaluation."
    )
    min_files: int = Field(
        default=5, ge=2, le=10_000,
        description="Hold out whole source files when there are at least this many; else the last pieces "
        "of the longest file.",
    )
    max_pieces: int = Field(default=24, ge=1, le=1000, description="At most this many held-out pieces.")
    reference: Folder | None = Field(
        default=None,
        description="Folder or s3:// prefix of source-speaker clips converted for the previews "
        "(default: the first held-out pieces).",
    )
    previews: int = Field(default=2, ge=0, le=16, description="Preview clips converted per evaluation.")
    transpose: int = Field(default=0, ge=-24, le=24,
                           description="Semitones applied to the references when converting them.")
    metrics: list[MetricName] | None = Field(
        default=None, max_length=16,
        description=f"Metrics to compute: {', '.join(METRIC_NAMES)} (default: all that can run here).",
    )
    score: dict[str, Annotated[float, Field(ge=-1000, le=1000)]] | None = Field(
        default=None,
        description="Weights of the score that picks the best checkpoint (higher is better); default "
        "speaker_sim 1.0, dnsmos_ovrl 0.1, mel_l1 -0.1.",
    )
    patience: int | None = Field(
        default=None, ge=1, le=10_000,
        description="Stop training after this many evaluations in a row without a better score.",
    )
    min_delta: float = Field(default=0.0, ge=0.0, le=100.0, description="Improvement that counts (score).")
    save_every_evaluated: bool = Field(
        default=False, description="Also export weights/<exp>_e<epoch>.pth for every evaluated epoch."
    )

    @field_validator("score")
    @classmethod
    def _score_keys(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        # checked here rather than by the dict's types, which the CRD could not express (patternProperties)
        for key in v or {}:
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,39}", key):
                raise ValueError(f"score: {key!r} is not a metric key (lower-case letters, digits, _)")
        if v is not None and (not v or len(v) > 32):
            raise ValueError("score: give 1 to 32 weighted metric keys")
        return v


class LifecycleSpec(_Model):
    """Per-experiment lifecycle: overrides the operator's defaults. Changes how the experiment is run and
    kept, never what a step makes (no step hash covers it)."""

    active_deadline_seconds: int | None = Field(
        default=None, ge=1, le=31_536_000,
        description="Fail the whole experiment (reason DeadlineExceeded, active Jobs stopped) this many "
        "seconds after status.startTime.",
    )
    retries_per_step: int | None = Field(
        default=None, ge=0, le=100,
        description="Retries of a step after transient failures (default: the operator's "
        "RVC_STEP_MAX_RETRIES).",
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, le=31_536_000,
        description="Delete the RVCExperiment (and its Jobs) this many seconds after it Succeeded or Failed.",
    )
    termination_grace_period_seconds: int = Field(
        default=120, ge=10, le=3600,
        description="terminationGracePeriodSeconds of step pods: time between SIGTERM (preemption, node "
        "drain, suspend) and SIGKILL, in which training finishes its step and uploads a resumable "
        "checkpoint and data steps upload what they made.",
    )
    artifacts_on_deletion: Literal["Keep", "Delete"] = Field(
        default="Keep",
        description="What happens to logs/<experiment>/ in storage when the RVCExperiment is deleted "
        "(Delete, or the annotation rvc-operator.dev/delete-artifacts: \"true\", deletes it).",
    )


@dataclass(frozen=True)
class ConversionDefaults:
    """RVC's defaults of a conversion (infer, convert, eval and spec.convert share them)."""

    index_rate: float = 0.75
    protect: float = 0.33
    filter_radius: int = 3
    rms_mix_rate: float = 0.25


RVC_CONVERSION = ConversionDefaults()


class ConvertSpec(_Model):
    """The optional `convert` step: a folder of recordings converted with the experiment's model."""

    source: Folder = Field(
        description="Folder of recordings to convert: a local path or s3://bucket/prefix/. Only files "
        "directly inside it are used (not sub-folders), as for the dataset; any format ffmpeg reads. "
        "Must lie outside the experiment folder logs/<experiment>/.",
        json_schema_extra=cel(_CEL_S3),
    )
    transpose: int = Field(default=0, ge=-24, le=24, description="Semitones to shift the pitch by.")
    index_rate: float = Field(
        default=RVC_CONVERSION.index_rate, ge=0.0, le=1.0,
        description="Share of the retrieval index's features mixed in (0: index not used).",
    )
    protect: float = Field(
        default=RVC_CONVERSION.protect, ge=0.0, le=0.5,
        description="Keep unvoiced consonants and breaths from the source (0.5: off, as RVC).",
    )
    f0_method: F0Method | None = Field(
        default=None,
        description=f"Pitch extractor: {', '.join(PITCH_METHODS)} (default: f0.method, the training's).",
    )
    format: ConvertFormat = Field(
        default="wav", description=f"Output format: {', '.join(CONVERT_FORMATS)} (others through ffmpeg).",
    )
    filter_radius: int = Field(
        default=RVC_CONVERSION.filter_radius, ge=0, le=7,
        description="Median filter radius of the pitch curve (3 or more: applied).",
    )
    rms_mix_rate: float = Field(
        default=RVC_CONVERSION.rms_mix_rate, ge=0.0, le=1.0,
        description="Loudness envelope: 0 keeps the source's, 1 the converted voice's (RVC's default 0.25).",
    )


class ExperimentSpec(_Model):
    """spec of an RVCExperiment."""

    # train.saveEveryEpoch > train.epochs has no rule: _cross clamps it (a short run keeps the default 5)
    model_config = ConfigDict(json_schema_extra=cel(
        ("has(self.experimentName) == has(oldSelf.experimentName)",
         "experimentName cannot be added or removed after creation"),
        ("!has(self.steps) || !self.steps.exists(s, s == 'convert') || has(self.convert)",
         "convert.source is required when steps lists convert"),
    ))

    experiment_name: ExperimentName | None = Field(
        default=None,
        description="Name of the experiment folder logs/<name>/. Default: metadata.name.",
        json_schema_extra=cel(_CEL_IMMUTABLE),
    )
    dataset: DatasetSpec = Field(description="Where the voice recordings are.")
    storage: StorageSpec = Field(description="Where artifacts are written.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Model version, rate and pitch.")
    preprocess: PreprocessSpec = Field(default_factory=PreprocessSpec, description="Step 2a options.")
    f0: F0Spec = Field(default_factory=F0Spec, description="Step 2b pitch options.")
    features: FeaturesSpec = Field(default_factory=FeaturesSpec, description="Step 2b HuBERT options.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Step 3 training options.")
    index: IndexSpec = Field(default_factory=IndexSpec, description="Step 4 faiss index options.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Checkpoint evaluation and selection.")
    steps: list[StepName] = Field(
        default_factory=lambda: list(DEFAULT_STEPS),
        description=f"Steps to run, in recipe order ({', '.join(STEP_ORDER)}). Default: the training steps "
        "(one-click training); convert runs only when listed.",
    )
    convert: ConvertSpec | None = Field(
        default=None,
        description="The convert step's options: recordings converted with the finished model into "
        "logs/<experiment>/converted/ (used when steps lists convert).",
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Where step pods run.")
    metrics: MetricsSpec = Field(default_factory=MetricsSpec, description="Progress reporting.")
    lifecycle: LifecycleSpec = Field(
        default_factory=LifecycleSpec,
        description="Deadline, retries, TTL after finishing and artifacts on deletion (overrides the "
        "operator's defaults).",
    )
    suspend: bool = Field(
        default=False,
        description="true: stop the running step gracefully (it saves what it made) and start nothing "
        "more, keeping every artifact; false: continue where it stopped.",
    )
    weights_cache: Folder | None = Field(
        default=None,
        description="Folder or s3:// prefix searched for weights given as bare names "
        "(hubert_base.pt, rmvpe.pt, pretrained_v2/f0G40k.pth).",
    )
    demo_random_weights: bool = Field(
        default=False,
        description="DEMO ONLY: when HuBERT or pretrained weights cannot be found, use random "
        "initialisation. The pipeline runs end to end but the voice is not meaningful.",
    )

    @model_validator(mode="before")
    @classmethod
    def _convert_listed(cls, data: Any) -> Any:
        # steps lists convert without spec.convert: validate an empty one, so the error names
        # spec.convert.source
        steps = data.get("steps") if isinstance(data, dict) else None
        if isinstance(steps, list) and "convert" in steps and data.get("convert") is None:
            return {**data, "convert": {}}
        return data

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must name at least one step")
        if len(set(v)) != len(v):
            raise ValueError("must not repeat a step")
        return sorted(v, key=STEP_ORDER.index)

    @model_validator(mode="after")
    def _cross(self) -> ExperimentSpec:
        if self.f0.method == "rmvpe" and not self.f0.rmvpe_checkpoint and self.model.pitch_guidance:
            # rmvpe.pt may also be found by name in the weights cache, so this is not an error here.
            self.f0.rmvpe_checkpoint = "rmvpe.pt"
        if self.train.save_every_epoch > self.train.epochs:
            self.train.save_every_epoch = self.train.epochs
        return self

    # convenience ---------------------------------------------------------------------------------
    @property
    def gpu(self) -> bool:
        return self.resources.device == "gpu"

    def default_pretrained(self, which: Literal["G", "D"]) -> str:
        """RVC's pretrained file name for this model, e.g. pretrained_v2/f0G40k.pth."""
        folder = "pretrained" if self.model.version == "v1" else "pretrained_v2"
        prefix = "f0" if self.model.pitch_guidance else ""
        return f"{folder}/{prefix}{which}{self.model.sample_rate}.pth"


class Experiment(_Model):
    """A whole manifest: apiVersion/kind/metadata/spec, as `kubectl apply` takes it."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", use_enum_values=True
    )
    api_version: str = Field(default=f"{API_GROUP}/{API_VERSION}")
    kind: str = Field(default=KIND)
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: ExperimentSpec

    @property
    def name(self) -> str:
        """The experiment folder name: spec.experimentName, else metadata.name."""
        n = self.spec.experiment_name or self.metadata.get("name")
        if not n:
            raise SpecError("metadata.name: required when spec.experimentName is not set")
        try:
            return check_name(_check_text(str(n), MAX_NAME))
        except ValueError as e:
            raise SpecError(f"metadata.name: {str(n)[:80]!r} is not a valid experiment name; {e}") from None

    @property
    def namespace(self) -> str:
        return str(self.metadata.get("namespace") or "default")


def _short(value: Any, limit: int = 80) -> str:
    """repr of a value a user gave, shortened: an error line must stay one short line."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _format_errors(err: ValidationError, prefix: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        msg = e["msg"]
        if e["type"] == "literal_error" and "expected" in e.get("ctx", {}):
            msg = f"got {_short(e.get('input'))}; allowed values: {e['ctx']['expected']}"
        elif e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{loc}: {msg}")
    return "; ".join(lines)


def parse_spec(data: dict[str, Any]) -> ExperimentSpec:
    """Validate a spec mapping (camelCase keys). Raises SpecError naming each bad field."""
    try:
        return ExperimentSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_errors(e, "spec")) from None


def parse_manifest(data: dict[str, Any]) -> Experiment:
    if not isinstance(data, dict):
        raise SpecError("manifest: expected a mapping with apiVersion, kind, metadata and spec")
    kind = data.get("kind", KIND)
    if kind != KIND:
        raise SpecError(f"kind: got {kind!r}; expected {KIND!r}")
    api = data.get("apiVersion", f"{API_GROUP}/{API_VERSION}")
    if api != f"{API_GROUP}/{API_VERSION}":
        raise SpecError(f"apiVersion: got {api!r}; expected '{API_GROUP}/{API_VERSION}'")
    if "spec" not in data:
        raise SpecError("spec: required")
    spec = parse_spec(data["spec"] or {})
    meta = data.get("metadata") or {}
    if not isinstance(meta, dict):
        raise SpecError(f"metadata: expected a mapping with name (and namespace), got {type(meta).__name__}")
    exp = Experiment(api_version=api, kind=kind, metadata=meta, spec=spec)
    _ = exp.name  # validates the name early
    return exp


def load_manifest(path: str | Path) -> Experiment:
    """Read an RVCExperiment manifest (the file a user would `kubectl apply`)."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_MANIFEST_BYTES:
            raise SpecError(f"{p}: {p.stat().st_size} bytes; a manifest is at most {MAX_MANIFEST_BYTES}")
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"{p}: cannot read manifest: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise SpecError(f"{p}: not a UTF-8 text file (byte {e.start})") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except RecursionError:
        raise SpecError(f"{p}: nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise SpecError(f"{p}: not valid YAML: {getattr(e, 'problem', None) or e}{where}") from None
    except (ValueError, OverflowError) as e:  # e.g. an integer of more than 4300 digits
        raise SpecError(f"{p}: not valid YAML: {str(e)[:200]}") from None
    others = sorted({type(d).__name__ for d in docs if not isinstance(d, dict)})
    docs = [d for d in docs if isinstance(d, dict) and d.get("kind", KIND) == KIND]
    if len(docs) != 1:
        why = f" (a YAML {', '.join(others)} is not a manifest)" if others and not docs else ""
        raise SpecError(f"{p}: expected exactly one {KIND} document, found {len(docs)}{why}")
    try:
        return parse_manifest(docs[0])
    except SpecError as e:
        raise SpecError(f"{p}: {e}") from None


# The spec fields each step's outputs depend on. A step's hash also covers every earlier step's, so a
# change reruns the first affected step and everything after it. Fields not listed (resources, metrics,
# steps, storage endpoint/region/secret, weightsCache) change where or how a step runs, not what it makes.
# Used by the step markers (a rerun after a spec change recomputes) and by the operator (spec updates).
STEP_INPUTS: dict[str, tuple[str, ...]] = {
    "preprocess": ("dataset", "storage.uri", "@name", "model.sampleRate", "preprocess"),
    "f0": ("f0", "model.pitchGuidance"),
    "features": ("features", "model.version", "demoRandomWeights"),
    "train": ("train", "model", "eval"),
    "index": ("index",),
    "convert": ("convert",),
}


# Fields added after manifests were first hashed: left out of the hash while at this default, so the
# step hashes (markers, operator status) of manifests that do not set them stay what they were.
HASH_NEUTRAL_DEFAULTS: dict[str, Any] = {
    "preprocess.rvcCompatible": False,
    "features.cpuBf16": False,
    "eval": EvalSpec().model_dump(mode="json", by_alias=True),
}


def _drop_neutral_defaults(spec: dict[str, Any]) -> None:
    for dotted, default in HASH_NEUTRAL_DEFAULTS.items():
        *parents, leaf = dotted.split(".")
        parent = _get(spec, ".".join(parents)) if parents else spec
        if isinstance(parent, dict) and parent.get(leaf, default) == default:
            parent.pop(leaf, None)


def _get(d: dict[str, Any], dotted: str) -> Any:
    cur: Any = d
    for k in dotted.split("."):
        cur = cur.get(k) if isinstance(cur, dict) else None
    return cur


def step_hashes(exp: Experiment) -> dict[str, str]:
    """Cumulative hash of the inputs of each step (see STEP_INPUTS)."""
    spec = exp.spec.model_dump(mode="json", by_alias=True)
    _drop_neutral_defaults(spec)
    out: dict[str, str] = {}
    prev = ""
    for s in STEP_ORDER:
        values = {k: (exp.name if k == "@name" else _get(spec, k)) for k in STEP_INPUTS[s]
                  if k not in HASH_NEUTRAL_DEFAULTS or k in spec}  # (a dropped neutral top-level field)
        blob = prev + json.dumps(values, sort_keys=True, default=str)
        prev = hashlib.sha256(blob.encode()).hexdigest()[:16]
        out[s] = prev
    return out
