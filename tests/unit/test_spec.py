"""The RVCExperiment spec: RVC's defaults, errors that name the field, manifests, step order, no torch."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rvc_pipeline.spec import (
    API_GROUP,
    API_VERSION,
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
    assert s.steps == list(STEP_ORDER) == ["preprocess", "f0", "features", "train", "index"]
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
     "spec.f0.method: got 'yin'; allowed values: 'pm', 'harvest', 'dio', 'crepe' or 'rmvpe'"),
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
        "import rvc_pipeline.spec as s\n"
        "s.load_manifest\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'numpy', 'faiss', 'librosa', 'transformers'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert "torch" not in heavy, heavy
    assert heavy == [], f"importing rvc_pipeline.spec pulled in {heavy}"
