"""The convert step (spec.convert) on a real S3 API (moto server): a tiny exported model in the experiment
folder, real speech clips and a corrupt file in an S3 source prefix, real inference and real ffmpeg.
One output per input in the chosen format, a rerun converts nothing (a source file added: only it), two
shards make the unsharded run's outputs, a bad file is reported and skipped, and a missing model or a
bad command line fails in one line naming what is wrong."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import soundfile as sf
import yaml
from rvc_pipeline import cli
from rvc_pipeline.core import layout
from rvc_pipeline.core.errors import EXIT_BAD_INPUT, StepFailed
from rvc_pipeline.core.spec import load_manifest
from rvc_pipeline.stepio import Shard
from rvc_pipeline.steps.runner import run_shard, run_steps

from tests.s3server import S3Endpoint
from tests.support.tiny_voice import save_tiny_hubert, save_tiny_model

pytestmark = [
    pytest.mark.skipif(not shutil.which("ffmpeg"), reason="needs ffmpeg"),
    pytest.mark.usefixtures("offline_weights", "one_torch_thread"),
]

SECONDS = 0.8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, voice_dir: Path) -> dict[str, Any]:
    """The model and HuBERT files, and three short speech clips (32 kHz WAV) with distinct names."""
    d = tmp_path_factory.mktemp("convert-step")
    clips = {}
    for i, src in enumerate(sorted(voice_dir.glob("*.wav"))[:3]):
        out = d / f"take {i}.wav"
        subprocess.run(["ffmpeg", "-v", "error", "-i", str(src), "-ss", "1", "-t", str(SECONDS), str(out)],
                       check=True)
        clips[out.name] = out.read_bytes()
    return {"model": save_tiny_model(d / "voice.pth"), "hubert": save_tiny_hubert(d / "hubert.pt"),
            "clips": clips}


def put(s3: S3Endpoint, key: str, data: bytes) -> None:
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=data)


def manifest(tmp_path: Path, s3: S3Endpoint, tiny: dict[str, Any], name: str, *, model: bool = True,
             **convert: Any) -> Path:
    """An experiment that runs only the convert step on s3://<bucket>/todo/ (its model uploaded)."""
    spec = {"dataset": {"source": s3.uri("voices")}, "storage": {"uri": s3.uri("runs"), "endpoint": s3.url},
            "resources": {"device": "cpu", "parallelism": 1}, "features": {"embedder": str(tiny["hubert"])},
            "steps": ["convert"], "convert": {"source": s3.uri("todo/"), "format": "flac", **convert}}
    doc = {"apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment", "metadata": {"name": name},
           "spec": spec}
    if model:
        put(s3, f"runs/logs/{name}/{layout.exported_model(name)}", Path(tiny["model"]).read_bytes())
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def converted(s3: S3Endpoint, name: str) -> dict[str, bytes]:
    prefix = f"runs/logs/{name}/{layout.CONVERTED_DIR}/"
    got = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"][len(prefix):]: s3.client().get_object(Bucket=s3.bucket, Key=o["Key"])["Body"].read()
            for o in got}


def test_one_output_per_input_bad_file_skipped_rerun_converts_nothing(
        tmp_path: Path, s3: S3Endpoint, tiny: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    for n, data in tiny["clips"].items():
        put(s3, f"todo/{n}", data)
    put(s3, "todo/broken.mp3", b"ID3 this is not an mp3 at all")
    put(s3, "todo/sub/deeper.wav", next(iter(tiny["clips"].values())))  # sub-folders are not read
    spec = manifest(tmp_path, s3, tiny, "conv", transpose=2)
    (summary,) = run_steps(load_manifest(spec), ["convert"])
    assert (summary["files"], summary["converted"], summary["failed"], summary["resumed"]) == (4, 3, 1, 0)
    (bad,) = summary["failed_files"]
    assert bad["file"] == "broken.mp3" and "broken.mp3" in bad["error"] and "/tmp" not in bad["error"]
    outs = converted(s3, "conv")
    assert sorted(outs) == ["take 0.flac", "take 1.flac", "take 2.flac"]
    for data in outs.values():
        info = sf.info(io.BytesIO(data))
        assert (info.format, info.samplerate, info.channels) == ("FLAC", 40000, 1)
        assert info.duration == pytest.approx(SECONDS, abs=0.05)
    # a rerun (the operator's Job command line) converts nothing: the step is complete
    capsys.readouterr()
    assert cli.main(["convert", "--spec", str(spec), "--json"]) == 0
    (again,) = json.loads(capsys.readouterr().out)
    assert again["skipped"] is True and converted(s3, "conv") == outs
    # a source file added: the rerun converts it alone and keeps the others as they are
    put(s3, "todo/late.wav", tiny["clips"]["take 1.wav"])
    (late,) = run_steps(load_manifest(spec), ["convert"])
    assert (late["converted"], late["resumed"], late["failed"]) == (1, 3, 1)
    now = converted(s3, "conv")
    assert sorted(now) == ["late.flac", *sorted(outs)] and all(now[k] == outs[k] for k in outs)
    # a source file removed: its output goes, nothing is converted
    s3.client().delete_object(Bucket=s3.bucket, Key="todo/take 0.wav")
    (gone,) = run_steps(load_manifest(spec), ["convert"])
    assert (gone["files"], gone["converted"], gone["resumed"]) == (4, 0, 3)
    assert sorted(converted(s3, "conv")) == ["late.flac", "take 1.flac", "take 2.flac"]


def test_two_shards_make_the_outputs_of_one_run(tmp_path: Path, s3: S3Endpoint, tiny: dict[str, Any]) -> None:
    for n, data in tiny["clips"].items():
        put(s3, f"todo/{n}", data)
    one = load_manifest(manifest(tmp_path, s3, tiny, "one", format="ogg"))
    two = load_manifest(manifest(tmp_path, s3, tiny, "two", format="ogg"))
    run_steps(one, ["convert"])
    first = run_shard(two, "convert", Shard(0, 2))
    assert first["complete"] is False and first["files"] == 2  # files 0 and 2 of 3
    assert sorted(converted(s3, "two")) == ["take 0.ogg", "take 2.ogg"]
    second = run_shard(two, "convert", Shard(1, 2))
    assert second["complete"] is True and second["converted"] == 3 and second["shards"] == 2
    a, b = converted(s3, "one"), converted(s3, "two")
    assert sorted(a) == sorted(b) == ["take 0.ogg", "take 1.ogg", "take 2.ogg"]
    for k in a:
        x, y = sf.read(io.BytesIO(a[k]))[0], sf.read(io.BytesIO(b[k]))[0]
        assert sf.info(io.BytesIO(b[k])).format == "OGG" and x.shape == y.shape
    key = "runs/" + layout.marker_key("two", "convert")
    marker = json.loads(s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    assert marker["files"] == 3 and marker["failed"] == 0 and marker["failed_files"] == []


def test_missing_model_and_bad_command_lines_fail_in_one_line(
        tmp_path: Path, s3: S3Endpoint, tiny: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    put(s3, "todo/a.wav", next(iter(tiny["clips"].values())))
    spec = manifest(tmp_path, s3, tiny, "nomodel", model=False)
    assert cli.main(["convert", "--spec", str(spec)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{s3.uri('runs')}/logs/nomodel/weights/nomodel.pth does not exist" in err and "run train" in err
    assert converted(s3, "nomodel") == {}
    with pytest.raises(StepFailed, match=r"weights/nomodel\.pth does not exist"):
        run_steps(load_manifest(spec), ["convert"])
    assert cli.main(["convert", "--spec", str(spec), "--model", str(tiny["model"])]) == EXIT_BAD_INPUT
    assert "--spec and --model: give one" in capsys.readouterr().err
    assert cli.main(["convert", "--spec", str(spec), "--shard", "2/2"]) == EXIT_BAD_INPUT
    assert "--shard '2/2'" in capsys.readouterr().err
    assert cli.main(["convert", "--spec", str(spec), "--shard", "0/2", "--force"]) == EXIT_BAD_INPUT
    assert "--shard cannot be combined with --force" in capsys.readouterr().err


def test_every_file_bad_fails_and_a_source_inside_the_experiment_is_refused(
        tmp_path: Path, s3: S3Endpoint, tiny: dict[str, Any]) -> None:
    put(s3, "todo/x.wav", b"RIFF but nothing else")
    spec = load_manifest(manifest(tmp_path, s3, tiny, "allbad"))
    with pytest.raises(StepFailed, match=r"not one of the 1 files .* could be converted: .*x\.wav"):
        run_steps(spec, ["convert"])
    inside = manifest(tmp_path, s3, tiny, "inside")
    doc = yaml.safe_load(inside.read_text())
    doc["spec"]["convert"]["source"] = s3.uri("runs/logs/inside/weights/")
    inside.write_text(yaml.safe_dump(doc))
    with pytest.raises(StepFailed, match=r"spec\.convert\.source: .*overlaps the experiment folder"):
        run_steps(load_manifest(inside), ["convert"])


def test_local_storage_and_source(tmp_path: Path, tiny: dict[str, Any]) -> None:
    """The same step with a local folder for both (`rvc-pipeline run` on a workstation): mp3 outputs."""
    src, store = tmp_path / "todo", tmp_path / "store"
    src.mkdir()
    for n in ("take 0.wav", "take 1.wav"):
        (src / n).write_bytes(tiny["clips"][n])
    model = store / "logs" / "loc" / layout.exported_model("loc")
    model.parent.mkdir(parents=True)
    model.write_bytes(Path(tiny["model"]).read_bytes())
    body = {"dataset": {"source": str(src)}, "storage": {"uri": str(store)},
            "resources": {"device": "cpu", "parallelism": 1}, "features": {"embedder": str(tiny["hubert"])},
            "steps": ["convert"], "convert": {"source": str(src), "format": "mp3"}}
    doc = {"apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment", "metadata": {"name": "loc"},
           "spec": body}
    spec = tmp_path / "loc.yaml"
    spec.write_text(yaml.safe_dump(doc))
    (summary,) = run_steps(load_manifest(spec), ["convert"])
    assert (summary["converted"], summary["failed"]) == (2, 0)
    out = store / "logs" / "loc" / layout.CONVERTED_DIR
    assert sorted(p.name for p in out.iterdir()) == ["take 0.mp3", "take 1.mp3"]
    assert sf.info(out / "take 0.mp3").format == "MP3"
    (again,) = run_steps(load_manifest(spec), ["convert"])
    assert again["skipped"] is True
