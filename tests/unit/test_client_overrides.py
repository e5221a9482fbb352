"""`submit`'s spec: defaults, -f files, --set dotted paths; errors name the field and the option; a bad
override stops the command before anything is uploaded or sent to the cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
from rvc_pipeline.client import commands, overrides
from rvc_pipeline.client.overrides import OverrideError, SubmitOptions, build
from rvc_pipeline.core.errors import EXIT_BAD_INPUT, classify
from rvc_pipeline.core.spec import ExperimentSpec, TrainSpec

from tests.support.fake_kube import FakeKube

STORE = "s3://voices/models"


def _built(*sets: str, files: tuple[Path, ...] = (), storage: str | None = STORE) -> overrides.Built:
    return build(SubmitOptions("alice", storage, files, sets))


def _error(*sets: str, files: tuple[Path, ...] = (), storage: str | None = STORE, name: str = "alice") -> str:
    with pytest.raises(OverrideError) as e:
        build(SubmitOptions(name, storage, files, sets))
    assert classify(e.value).code == EXIT_BAD_INPUT
    return str(e.value)


def test_defaults_fill_everything_but_storage_and_the_dataset_prefix_follows_storage() -> None:
    b = _built()
    assert b.manifest == {"apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment",
                          "metadata": {"name": "alice"},
                          "spec": {"storage": {"uri": STORE},
                                   "dataset": {"source": f"{STORE}/datasets/alice/"}}}
    assert b.dataset_uri == f"{STORE}/datasets/alice/"
    defaults = ExperimentSpec(dataset={"source": "s3://x/y"}, storage={"uri": "s3://x/z"})
    assert b.experiment.spec.train == defaults.train and b.experiment.spec.model == defaults.model
    assert "resources" not in b.manifest["spec"]  # the operator's defaults apply (e.g. RVC_DEFAULT_DEVICE)


def test_set_maps_nested_numbers_booleans_lists_and_free_keys() -> None:
    b = _built("train.epochs=50", "resources.shards=2", "model.pitchGuidance=false",
               "train.learningRate=2e-4",
               "steps=[preprocess, f0, features]", "resources.tolerations.0.key=nvidia.com/gpu",
               "resources.tolerations.0.operator=Exists", "resources.nodeSelector.pool=gpu-l4",
               "eval.score.speaker_sim=2")
    spec = b.experiment.spec
    assert spec.train.epochs == 50 and spec.resources.shards == 2 and spec.model.pitch_guidance is False
    assert spec.train.learning_rate == pytest.approx(2e-4)
    assert spec.steps == ["preprocess", "f0", "features"]
    assert spec.resources.tolerations is not None and spec.resources.tolerations[0].key == "nvidia.com/gpu"
    assert spec.resources.node_selector == {"pool": "gpu-l4"} and spec.eval.score == {"speaker_sim": 2.0}
    assert b.manifest["spec"]["train"] == {"epochs": 50, "learningRate": 2e-4}  # YAML's '2e-4' is a str
    # only what was given goes to the API server, typed: no nulls for the fields left out
    assert b.manifest["spec"]["resources"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]


def test_file_merges_into_defaults_and_set_wins_over_it(tmp_path: Path) -> None:
    f = tmp_path / "o.yaml"
    f.write_text("storage: {uri: s3://other/p, region: eu-west-1}\ntrain: {epochs: 30, batchSize: 8}\n"
                 "dataset: {source: s3://other/recordings/}\n")
    b = _built("train.epochs=40", files=(f,), storage=None)
    assert b.experiment.spec.train.epochs == 40 and b.experiment.spec.train.batch_size == 8
    assert b.experiment.spec.storage.region == "eu-west-1"
    assert b.dataset_uri == "s3://other/recordings/"  # given by the file: no default prefix
    b = _built(files=(f,), storage=STORE)  # --storage wins over the file's storage.uri
    assert b.experiment.spec.storage.uri == STORE and b.experiment.spec.storage.region == "eu-west-1"


def test_a_whole_manifest_as_file_gives_its_spec(tmp_path: Path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text("apiVersion: rvc-operator.dev/v1alpha1\nkind: RVCExperiment\nmetadata: {name: x}\n"
                 "spec:\n  f0: {method: harvest}\n")
    assert _built(files=(f,)).experiment.spec.f0.method == "harvest"


def test_null_restores_the_default() -> None:
    b = _built("train.epochs=50", "train.epochs=null")
    assert b.experiment.spec.train.epochs == TrainSpec().epochs
    assert "epochs" not in b.manifest["spec"].get("train", {})


@pytest.mark.parametrize(("sets", "expected"), [
    (("train.epoch=5",), "spec.train.epoch: unknown field (--set train.epoch=5); did you mean 'epochs'?"),
    (("train.batch_size=5",), "spec.train.batch_size: unknown field (--set train.batch_size=5); did you "
                              "mean 'batchSize'?"),
    (("nosuch=1",), "spec.nosuch: unknown field (--set nosuch=1)"),
    (("train.epochs=abc",), "spec.train.epochs: Input should be a valid integer"),
    (("train.epochs=0",), "spec.train.epochs: Input should be greater than or equal to 1 "
                          "(--set train.epochs=0)"),
    (("train.epochs=true",), "spec.train.epochs: Value error, expected a number, got the boolean True"),
    (("model.sampleRate=44k",), "spec.model.sampleRate: got '44k'; allowed values: '32k', '40k' or '48k' "
                                "(--set model.sampleRate=44k)"),
    (("steps=[preprocess, nope]",), "spec.steps.1: got 'nope'"),
    (("train.epochs.x=1",), "spec.train.epochs.x: spec.train.epochs is a single value, not a mapping"),
    (("resources.tolerations.key=x",), "spec.resources.tolerations is a list; give an index"),
    (("resources.tolerations.3.key=x",), "index 3 skips items"),
    (("preprocess.slicer.minLengthMs=10",), "spec.preprocess.slicer: Value error, need minLengthMs >= "
                                            "minIntervalMs >= hopSizeMs (got 10, 400, 15) (--set "
                                            "preprocess.slicer.minLengthMs=10)"),
])
def test_bad_set_names_the_field_and_the_option(sets: tuple[str, ...], expected: str) -> None:
    assert expected in _error(*sets)


@pytest.mark.parametrize(("text", "expected"), [
    ("train.epochs", "--set train.epochs: expected KEY=VALUE"),
    ("=5", "--set =5: expected KEY=VALUE"),
    ("train..epochs=5", "empty part in the path"),
    ("0.x=1", "a path starts with a field name"),
    ("train.epochs=[1,", "--set train.epochs=[1,: the value is not valid YAML"),
])
def test_bad_set_syntax(text: str, expected: str) -> None:
    assert expected in _error(text)


def test_bad_file_names_the_file_and_the_field(tmp_path: Path) -> None:
    f = tmp_path / "o.yaml"
    f.write_text("train:\n  epochs: 30\n  batchSiz: 3\n")
    assert _error(files=(f,)) == f"spec.train.batchSiz: unknown field (-f {f}); did you mean 'batchSize'?"
    f.write_text("train: {epochs: -1}\n")
    assert f"spec.train.epochs: Input should be greater than or equal to 1 (-f {f})" in _error(files=(f,))
    f.write_text("train: [1, 2\n")
    assert f"-f {f}: not valid YAML" in _error(files=(f,))
    f.write_text("- a\n- b\n")
    assert "expected a mapping of spec fields, got a YAML list" in _error(files=(f,))
    assert "cannot read" in _error(files=(tmp_path / "missing.yaml",))


def test_storage_and_name_errors() -> None:
    assert "spec.storage.uri: required: give --storage" in _error(storage=None)
    assert "spec.storage.uri: must be an s3:// URI on a cluster" in _error(storage="/data/models")
    assert "(--storage)" in _error(storage="/data/models")
    assert "spec.dataset.source: must be an s3:// URI" in _error("dataset.source=/local/voices")
    assert "is not a valid S3 bucket name" in _error(storage="s3://Bad_Bucket/x")
    assert _error(name="Alice_1").startswith("metadata.name: 'Alice_1' from --name")


def test_nothing_is_uploaded_or_applied_on_a_bad_override(tmp_path: Path) -> None:
    (tmp_path / "a.wav").write_bytes(b"RIFF")
    opened: list[str] = []
    kube = FakeKube()
    ctx = commands.Ctx(kube, "default", open_storage=lambda *a, **k: opened.append(a[0]))  # type: ignore[arg-type]
    with pytest.raises(OverrideError):
        commands.submit(ctx, tmp_path, SubmitOptions("alice", STORE, (), ("train.epochs=zero",)))
    assert opened == [] and kube.calls == [] and kube.objects == {}
