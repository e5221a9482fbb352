"""The RVCExperiment spec: RVC's defaults, errors that name the field, manifests, step order, no torch."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rvc_pipeline.core.spec import (
    API_GROUP,
    API_VERSION,
    DEFAULT_STEPS,
    KIND,
    STEP_ORDER,
    Experiment,
    SpecError,
    load_manifest,
    parse_manifest,
    parse_spec,
)

BASE: dict[str, Any] = {"dataset": {"source": "s3://voices/alice/"}, "storage": {"uri": "s3://art/runs"}}


def _spec(**over: Any) -> dict[str, Any]:
    d = copy.deepcopy(BASE)
    for k, v in over.items():
        d[k] = v
    return d


def _manifest(name: str = "alice", **over: Any) -> dict[str, Any]:
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "metadata": {"name": name},
            "spec": _spec(**over)}


# ---------------------------------------------------------------- defaults follow RVC


def test_defaults_follow_rvc() -> None:
    s = parse_spec(BASE)
    # preprocessing: per = 3.7 s, overlap 0.3 s, causal 48 Hz HPF, slicer (-42, 1500, 400, 15, 500), 2.5 peak
    assert s.preprocess.segment_seconds == 3.7
    assert s.preprocess.overlap_seconds == 0.3
    assert s.preprocess.high_pass == "lfilter"
    assert s.preprocess.max_peak == 2.5
    sl = s.preprocess.slicer
    assert (sl.threshold_db, sl.min_length_ms, sl.min_interval_ms, sl.hop_size_ms, sl.max_sil_kept_ms) == (
        -42.0, 1500, 400, 15, 500)
    # model: v2, 40k, with pitch; 768-d features; speaker 0
    assert (s.model.version, s.model.sample_rate, s.model.pitch_guidance) == ("v2", "40k", True)
    assert s.model.sr == 40000 and s.model.feature_dim == 768 and s.model.speaker_id == 0
    # training: configs' batch 4, lr 1e-4, per-epoch decay 0.999875, seed 1234; UI's 20 epochs, save every 5
    t = s.train
    assert (t.batch_size, t.learning_rate, t.lr_decay, t.seed) == (4, 1e-4, 0.999875, 1234)
    assert (t.epochs, t.save_every_epoch) == (20, 5)
    assert t.save_latest_only is False and t.from_scratch is False and t.gpus == 1
    # index: k-means above 2e5 vectors, add batches of 8192
    assert (s.index.kmeans_threshold, s.index.add_batch_size) == (200_000, 8192)
    # one-click training: every step, in recipe order
    assert s.steps == list(DEFAULT_STEPS) == ["preprocess", "f0", "features", "train", "index"]
    assert STEP_ORDER[-1] == "convert" and STEP_ORDER[:-1] == tuple(DEFAULT_STEPS) and s.convert is None
    assert s.default_pretrained("G") == "pretrained_v2/f0G40k.pth"
    assert s.default_pretrained("D") == "pretrained_v2/f0D40k.pth"
    assert s.gpu is True and s.demo_random_weights is False


def test_feature_dim_and_pretrained_names_per_version() -> None:
    v1 = parse_spec(_spec(model={"version": "v1", "sampleRate": "48k", "pitchGuidance": False}))
    assert v1.model.feature_dim == 256 and v1.model.sr == 48000
    assert v1.default_pretrained("G") == "pretrained/G48k.pth"
    v2 = parse_spec(_spec(model={"sampleRate": "32k"}))
    assert v2.default_pretrained("D") == "pretrained_v2/f0D32k.pth" and v2.model.sr == 32000


def test_camel_case_and_snake_case_both_accepted() -> None:
    a = parse_spec(_spec(train={"batchSize": 8, "saveEveryEpoch": 2}))
    b = parse_spec(_spec(train={"batch_size": 8, "save_every_epoch": 2}))
    assert a.train.batch_size == b.train.batch_size == 8
    assert a.train.save_every_epoch == b.train.save_every_epoch == 2
    dumped = a.model_dump(by_alias=True)
    assert dumped["train"]["batchSize"] == 8 and "batch_size" not in dumped["train"]


def test_save_every_epoch_capped_at_epochs() -> None:
    s = parse_spec(_spec(train={"epochs": 3, "saveEveryEpoch": 10}))
    assert s.train.save_every_epoch == 3


def test_rmvpe_defaults_to_the_named_checkpoint() -> None:
    s = parse_spec(_spec(f0={"method": "rmvpe"}))
    assert s.f0.rmvpe_checkpoint == "rmvpe.pt"


# ---------------------------------------------------------------- errors name the field


@pytest.mark.parametrize(("over", "expect"), [
    ({"f0": {"method": "yin"}},
     "spec.f0.method: got 'yin'; allowed values: 'pm', 'harvest', 'dio', 'crepe', 'rmvpe'"),  # + newer
    ({"model": {"sampleRate": "44k"}},
     "spec.model.sampleRate: got '44k'; allowed values: '32k', '40k' or '48k'"),
    ({"model": {"version": "v3"}}, "spec.model.version: got 'v3'; allowed values: 'v1' or 'v2'"),
    ({"preprocess": {"highPass": "iir"}}, "spec.preprocess.highPass: got 'iir'; allowed values:"),
    ({"colour": "blue"}, "spec.colour: unknown field"),
    ({"train": {"batchSise": 4}}, "spec.train.batchSise: unknown field"),
    ({"train": {"batchSize": -1}}, "spec.train.batchSize: Input should be greater than or equal to 1"),
    ({"train": {"batchSize": 0}}, "spec.train.batchSize: Input should be greater than or equal to 1"),
    ({"steps": []}, "spec.steps: Value error, must name at least one step"),
    ({"steps": ["train", "train"]}, "spec.steps: Value error, must not repeat a step"),
    ({"steps": ["tune"]}, "spec.steps.0: got 'tune'; allowed values:"),
    ({"experimentName": "Alice Voice"}, "spec.experimentName: Value error, must be lower-case letters"),
    ({"preprocess": {"segmentSeconds": 3.0, "overlapSeconds": 3.0}},
     "spec.preprocess: Value error, overlapSeconds must be smaller than segmentSeconds"),
    ({"preprocess": {"slicer": {"minLengthMs": 100}}},
     "spec.preprocess.slicer: Value error, need minLengthMs >= minIntervalMs >= hopSizeMs "
     "(got 100, 400, 15)"),
    ({"index": {"kmeansThreshold": 10}},
     "spec.index.kmeansThreshold: Input should be greater than or equal to 1000"),
    ({"resources": {"device": "tpu"}}, "spec.resources.device: Input should be 'gpu' or 'cpu'"),
])
def test_bad_fields_name_field_and_allowed_values(over: dict[str, Any], expect: str) -> None:
    with pytest.raises(SpecError) as ei:
        parse_spec(_spec(**over))
    assert expect in str(ei.value)


def test_missing_required_fields_named() -> None:
    with pytest.raises(SpecError) as ei:
        parse_spec({})
    assert str(ei.value) == "spec.dataset: Field required; spec.storage: Field required"


def test_several_errors_reported_together() -> None:
    with pytest.raises(SpecError) as ei:
        parse_spec(_spec(model={"version": "v3", "sampleRate": "44k"}, train={"epochs": 0}))
    msg = str(ei.value)
    assert "spec.model.version" in msg and "spec.model.sampleRate" in msg and "spec.train.epochs" in msg
    assert msg.count("spec.") == 3


def test_empty_dataset_source_rejected() -> None:
    with pytest.raises(SpecError, match=r"spec\.dataset\.source: Value error, must not be empty"):
        parse_spec(_spec(dataset={"source": "  "}))


# ---------------------------------------------------------------- steps


def test_steps_sorted_into_recipe_order() -> None:
    s = parse_spec(_spec(steps=["index", "preprocess", "train"]))
    assert s.steps == ["preprocess", "train", "index"]
    s = parse_spec(_spec(steps=["features", "f0"]))
    assert s.steps == ["f0", "features"]


# ---------------------------------------------------------------- manifests


def test_parse_manifest_and_name() -> None:
    exp = parse_manifest(_manifest("alice"))
    assert isinstance(exp, Experiment)
    assert exp.name == "alice" and exp.namespace == "default"
    exp = parse_manifest({**_manifest("alice"), "metadata": {"name": "alice", "namespace": "voices"}})
    assert exp.namespace == "voices"
    exp = parse_manifest(_manifest("alice", experimentName="alice-v2.take_3"))
    assert exp.name == "alice-v2.take_3"


@pytest.mark.parametrize("bad", ["Alice", "alice voice", "-alice", "alice-", "al/ice", "ali\u00e9", ""])
def test_experiment_name_validation(bad: str) -> None:
    with pytest.raises(SpecError, match="metadata.name"):
        parse_manifest(_manifest(bad))


@pytest.mark.parametrize("good", ["a", "alice", "alice-2", "a.b_c-9", "0voice"])
def test_experiment_name_valid(good: str) -> None:
    assert parse_manifest(_manifest(good)).name == good


def test_manifest_kind_and_api_version_checked() -> None:
    with pytest.raises(SpecError, match=r"kind: got 'Job'; expected 'RVCExperiment'"):
        parse_manifest({**_manifest(), "kind": "Job"})
    with pytest.raises(SpecError, match=r"apiVersion: got 'rvc-operator.dev/v9'; expected"):
        parse_manifest({**_manifest(), "apiVersion": "rvc-operator.dev/v9"})
    m = _manifest()
    del m["spec"]
    with pytest.raises(SpecError, match=r"^spec: required$"):
        parse_manifest(m)
    with pytest.raises(SpecError, match="expected a mapping"):
        parse_manifest(["not", "a", "mapping"])  # type: ignore[arg-type]


def test_load_manifest_yaml(tmp_path: Path) -> None:
    p = tmp_path / "exp.yaml"
    p.write_text(f"""
apiVersion: {API_GROUP}/{API_VERSION}
kind: {KIND}
metadata:
  name: alice
spec:
  dataset: {{source: "s3://voices/alice/"}}
  storage: {{uri: "s3://art/runs", endpoint: "http://127.0.0.1:9000"}}
  model: {{version: v1, sampleRate: 48k}}
  train: {{batchSize: 8, epochs: 200}}
  steps: [index, preprocess]
""")
    exp = load_manifest(p)
    assert exp.name == "alice"
    assert exp.spec.model.version == "v1" and exp.spec.model.sr == 48000
    assert exp.spec.train.batch_size == 8 and exp.spec.train.epochs == 200
    assert exp.spec.storage.endpoint == "http://127.0.0.1:9000"
    assert exp.spec.steps == ["preprocess", "index"]


def test_load_manifest_multi_document(tmp_path: Path) -> None:
    p = tmp_path / "all.yaml"
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"}, "stringData": {"k": "v"}}
    import yaml

    p.write_text(yaml.safe_dump_all([secret, None, _manifest("bob", train={"epochs": 7})]))
    exp = load_manifest(p)
    assert exp.name == "bob" and exp.spec.train.epochs == 7
    # two experiments in one file is ambiguous
    p.write_text(yaml.safe_dump_all([_manifest("a"), _manifest("b")]))
    with pytest.raises(SpecError, match=r"all\.yaml: expected exactly one RVCExperiment document, found 2"):
        load_manifest(p)
    p.write_text(yaml.safe_dump_all([secret]))
    with pytest.raises(SpecError, match="found 0"):
        load_manifest(p)


def test_load_manifest_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"nope\.yaml: cannot read manifest"):
        load_manifest(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: not valid YAML"):
        load_manifest(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(json.dumps(_manifest("alice", model={"version": "v3"})))  # JSON is YAML too
    with pytest.raises(SpecError, match=r"wrong\.yaml: spec\.model\.version: got 'v3'"):
        load_manifest(wrong)


# ---------------------------------------------------------------- no torch


def test_importing_the_spec_does_not_import_torch() -> None:
    code = (
        "import json, sys\n"
        "import rvc_pipeline.core.spec as s\n"
        "s.load_manifest\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'numpy', 'faiss', 'librosa', 'transformers'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert "torch" not in heavy, heavy
    assert heavy == [], f"importing rvc_pipeline.core.spec pulled in {heavy}"


# ---------------------------------------------------------------- careless and hostile values


def _set(path: str, value: Any) -> dict[str, Any]:
    """BASE with the dotted camelCase `path` set to `value` (sub-mappings created as needed)."""
    d = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = d
    for k in parents:
        node = node.setdefault(k, {})
    node[last] = value
    return d


NAN, INF = float("nan"), float("inf")
LONG = "x" * 10_000
# (category, field, value): every one must be refused with a SpecError naming `spec.<field>`
HOSTILE: list[tuple[str, str, Any]] = [
    # numbers that are not finite
    *[("non-finite", f, v) for f, v in [
        ("train.learningRate", NAN), ("train.learningRate", INF), ("train.lrDecay", NAN),
        ("preprocess.segmentSeconds", NAN), ("preprocess.overlapSeconds", INF), ("preprocess.maxPeak", INF),
        ("preprocess.slicer.thresholdDb", -INF), ("features.batchSeconds", INF), ("train.epochs", NAN),
        ("train.batchSize", INF)]],
    # out of range: zero, negative, absurdly large
    *[("out-of-range", f, v) for f, v in [
        ("train.epochs", 10**12), ("train.epochs", 0), ("train.batchSize", 0), ("train.batchSize", -1),
        ("train.batchSize", 1e30), ("train.learningRate", 0), ("train.learningRate", -1e-4),
        ("train.learningRate", 5.0), ("train.lrDecay", 0), ("train.seed", -1), ("train.seed", 2**40),
        ("train.saveEveryEpoch", 10**9), ("train.gpus", 1000), ("train.dataWorkers", -1),
        ("train.maxStepsPerEpoch", 0), ("model.speakerId", 109), ("preprocess.maxPeak", 0),
        ("preprocess.maxPeak", 1e30), ("preprocess.segmentSeconds", 1e30), ("preprocess.overlapSeconds", -1),
        ("preprocess.slicer.thresholdDb", -1e6), ("preprocess.slicer.hopSizeMs", 10**6),
        ("preprocess.slicer.minLengthMs", 10**9),
        ("features.batchSeconds", 0), ("features.batchSeconds", 1e9),
        ("index.kmeansThreshold", 1e30), ("index.addBatchSize", 0), ("resources.parallelism", -3),
        ("resources.tolerations", [{"tolerationSeconds": -5}])]],
    # values the spec type accepts but the run cannot use
    *[("unusable", f, v) for f, v in [
        ("preprocess.segmentSeconds", 20.0), ("preprocess.segmentSeconds", 0.6),
        ("preprocess.overlapSeconds", 3.7), ("train.resumeFrom", "s3://b/logs/bob/D_10.pth"),
        ("train.resumeFrom", "s3://b/logs/bob/"), ("train.resumeFrom", "/runs/bob/model.pth"),
        ("f0.rmvpeCheckpoint", "s3://weights/"), ("train.pretrainedG", "s3://bucket"),
        ("resources.memory", "16GB"), ("resources.memory", "-1Gi"), ("resources.cpu", "four"),
        ("resources.memory", "16 Gi"), ("storage.credentialsSecret", "My_Secret"),
        ("resources.queueName", "Team A"), ("resources.priorityClassName", "-x"),
        ("resources.nodeSelector", {"bad key": "x"}), ("resources.nodeSelector", {"pool": "v" * 64}),
        ("resources.image", "my image:1"), ("storage.region", "us east 1")]],
    # control characters (C0, DEL, C1, zero-width, bidi override), also where a newline hides a value
    *[("control-chars", f, v) for f, v in [
        ("dataset.source", "s3://voices/alice\x00/"), ("dataset.source", "/data/voices\n"),
        ("storage.uri", "/runs\r\nX-Injected: 1"), ("experimentName", "alice\n"),
        ("experimentName", "al\x1b[31mice"), ("features.embedder", "hubert\tbase.pt"),
        ("storage.region", "us-east-1\x7f"), ("resources.image", "rvc:1\x85"),
        ("storage.credentialsSecret", "rvc\u200bs3"), ("metrics.pushgateway", "http://pgw:9091/\u202e"),
        ("weightsCache", "s3://w/\x00"), ("train.pretrainedD", "/w/D\x0b.pth"),
        ("resources.tolerations", [{"key": "gpu\x00"}]), ("resources.nodeSelector", {"pool": "a\nb"})]],
    # oversized strings
    *[("too-long", f, v) for f, v in [
        ("dataset.source", "/" + LONG), ("storage.uri", "s3://b/" + LONG), ("experimentName", "a" * 254),
        ("storage.endpoint", "http://h/" + LONG), ("resources.image", LONG), ("storage.region", LONG),
        ("resources.queueName", "q" * 300), ("features.embedder", LONG), ("train.resumeFrom", LONG),
        ("storage.uri", "s3://b/" + "k" * 1100)]],
    # unicode look-alikes (Cyrillic, Greek, full-width, non-ASCII digits)
    *[("look-alike", f, v) for f, v in [
        ("experimentName", "\u0430lice"),
        ("experimentName", "b\u03bfb"), ("storage.uri", "\u04553://bucket/x"),
        ("storage.uri", "\uff53\uff13://bucket/x"), ("dataset.source", "s3://b\u03c5cket/x"),
        ("resources.memory", "\u0661\u0666Gi"), ("storage.endpoint", "\u029c\u0074tp://minio:9000"),
        ("experimentName", "alice\u2024v2")]],
    # names that would leave or hide the experiment folder
    *[("path-traversal", f, v) for f, v in [
        ("experimentName", ".."), ("experimentName", "../other"), ("experimentName", "a/b"),
        ("experimentName", ".hidden"), ("experimentName", "a..b"), ("experimentName", "-x"),
        ("experimentName", "x-"), ("experimentName", "/abs"), ("storage.uri", "s3://art/runs/../other"),
        ("dataset.source", "s3://voices/./alice/")]],
    # bad URIs: unknown schemes, malformed s3, bad buckets, bad http endpoints
    *[("bad-uri", f, v) for f, v in [
        ("storage.uri", "ftp://host/runs"), ("storage.uri", "s3:/x"), ("storage.uri", "s3://"),
        ("storage.uri", "s3:///runs"), ("storage.uri", "S3://art/runs"), ("storage.uri", "s3:art/runs"),
        ("storage.uri", "s3://Art/runs"),
        ("storage.uri", "s3://my_bucket/x"), ("storage.uri", "s3://10.1.2.3/x"),
        ("storage.uri", "s3://a..b/x"), ("storage.uri", "s3://-art/x"), ("storage.uri", "s3://" + "a" * 64),
        ("storage.uri", "file://"), ("storage.uri", " s3://art/runs"), ("dataset.source", "http://x/voices/"),
        ("dataset.source", "gs://voices/alice"), ("features.embedder", "hf://facebook/hubert"),
        ("weightsCache", "https://w.example/"), ("storage.endpoint", "minio:9000"),
        ("storage.endpoint", "ftp://minio"),
        ("storage.endpoint", "http://"), ("storage.endpoint", "http://h:99999"),
        ("storage.endpoint", "http://key:secret@minio:9000"), ("storage.endpoint", "http://mi nio:9000"),
        ("storage.endpoint", "http://minio:9000/?x=1"),
        ("metrics.pushgateway", "pushgateway.monitoring:9091"),
        ("metrics.pushgateway", "javascript:alert(1)")]],
    # wrong types (YAML reads yes/no/on/off as booleans; a boolean is not a number here)
    *[("wrong-type", f, v) for f, v in [
        ("train.batchSize", True), ("train.epochs", False), ("train.learningRate", True),
        ("model.speakerId", True), ("train.maxStepsPerEpoch", True),
        ("train.batchSize", "lots"), ("train.epochs", [20]), ("storage", "s3://art/runs"),
        ("dataset", None), ("dataset.source", 42), ("steps", "train"), ("model.pitchGuidance", "maybe"),
        ("resources.nodeSelector", ["pool"]), ("features.embedder", {"path": "x"})]],
]


@pytest.mark.parametrize(("category", "field", "value"), HOSTILE,
                         ids=[f"{c}-{f}-{i}" for i, (c, f, _) in enumerate(HOSTILE)])
def test_hostile_and_careless_values_refused(category: str, field: str, value: Any) -> None:
    with pytest.raises(SpecError) as ei:
        parse_spec(_set(field, value))
    msg = str(ei.value)
    parent, _, last = field.rpartition(".")
    # names the field itself, or its section and the field (cross-field checks of one section)
    assert f"spec.{field}" in msg or (f"spec.{parent}:" in msg and last in msg), (category, msg)
    # one short line, no raw control character, never the whole 10 kB value echoed back
    assert "\n" not in msg and len(msg) < 600 and not any(ord(c) < 32 or 0x7f <= ord(c) <= 0x9f for c in msg)


def test_hostile_table_counts() -> None:
    counts: dict[str, int] = {}
    for c, _, _ in HOSTILE:
        counts[c] = counts.get(c, 0) + 1
    assert min(counts.values()) >= 8 and len(counts) == 9, counts


ACCEPTED: list[tuple[str, Any]] = [
    ("dataset.source", "/data/voices/alice"), ("dataset.source", "./voices"), ("dataset.source", "~/voices"),
    ("dataset.source", "file:///data/voices"), ("dataset.source", "s3://my-rvc/datasets/voix-\u00e9lodie/"),
    ("storage.uri", "s3://my.rvc-2/models"),
    ("storage.uri", "s3://b"), ("storage.endpoint", "https://minio.example:9000/"),
    ("storage.endpoint", "http://[::1]:9000"),
    ("storage.region", "eu-west-1"), ("storage.credentialsSecret", "rvc-s3"),
    ("features.embedder", "hubert_base.pt"), ("features.embedder", "s3://w/contentvec/"),
    ("train.pretrainedG", "pretrained_v2/f0G40k.pth"),
    ("train.resumeFrom", "s3://my-rvc/models/logs/bob/G_2333333.pth"),
    ("train.resumeFrom", "/runs/logs/bob/G_10.pth"), ("f0.rmvpeCheckpoint", "rmvpe.pt"),
    ("weightsCache", "/cache/weights/"), ("metrics.pushgateway", "http://pushgateway.monitoring:9091"),
    ("resources.memory", "500Mi"), ("resources.memory", "1.5G"),
    ("resources.cpu", "500m"), ("resources.cpu", "0.5"),
    ("resources.memory", "1e9"),
    ("resources.nodeSelector", {"cloud.google.com/gke-accelerator": "nvidia-l4"}),
    ("resources.tolerations", [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]),
    ("resources.image", "ghcr.io/x/rvc-pipeline:1.2@sha256:" + "a" * 64), ("experimentName", "a" * 253),
    ("experimentName", "alice-v2.take_3"),
    ("preprocess.segmentSeconds", 6.75), ("preprocess.segmentSeconds", 0.76),
    ("train.seed", 0), ("train.seed", 2**32 - 1), ("train.learningRate", 1.0),
]


@pytest.mark.parametrize(("field", "value"), ACCEPTED)
def test_ordinary_values_still_accepted(field: str, value: Any) -> None:
    parse_spec(_set(field, value))


def test_name_with_trailing_newline_refused_in_metadata() -> None:
    """`$` in a Python regex also matches before a final newline: the name check must use fullmatch."""
    with pytest.raises(SpecError, match=r"metadata.name: 'alice\\n' is not a valid experiment name"):
        parse_manifest(_manifest("alice\n"))


def test_crd_carries_bounds_and_patterns() -> None:
    from rvc_operator import crd

    spec = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    props = spec["properties"]
    assert props["experimentName"]["pattern"] == "^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$"
    assert props["experimentName"]["maxLength"] == 253
    assert props["dataset"]["properties"]["source"]["maxLength"] == 2048
    assert props["storage"]["properties"]["uri"]["pattern"] == r"^[^\x00-\x1f\x7f-\x9f]*$"
    lr = props["train"]["properties"]["learningRate"]
    assert (lr["minimum"], lr["exclusiveMinimum"], lr["maximum"]) == (0, True, 1)
    assert props["train"]["properties"]["seed"]["maximum"] == 2**32 - 1


def test_every_spec_field_is_bounded() -> None:
    """Guards fields added later: every number has a minimum and a maximum, every free string a length
    bound and the control-character (or a stricter) pattern, in the schema the CRD is generated from."""
    from rvc_operator import crd

    spec = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    unbounded = []
    stack: list[tuple[str, dict[str, Any]]] = [("spec", spec)]
    while stack:
        path, node = stack.pop()
        stack.extend((f"{path}.{k}", sub) for k, sub in (node.get("properties") or {}).items())
        if isinstance(node.get("items"), dict):
            stack.append((f"{path}[]", node["items"]))
        if node["type"] in ("integer", "number") and not ("minimum" in node and "maximum" in node):
            unbounded.append(path)
        free_string = node["type"] == "string" and "enum" not in node
        if free_string and not ("maxLength" in node and "pattern" in node):
            unbounded.append(path)
    # nodeSelector's keys and values are checked by a validator (a CRD cannot bound map keys)
    assert unbounded == [], unbounded
