"""spec.convert and the optional `convert` step: validated with field-named errors, never in the default
steps, and invisible to the step hashes of manifests that do not use it (nothing reruns)."""

from __future__ import annotations

from typing import Any

import pytest
from rvc_pipeline.core.catalog import PITCH_METHODS
from rvc_pipeline.core.layout import CONVERT_FORMATS, converted_name
from rvc_pipeline.core.spec import DEFAULT_STEPS, STEP_ORDER, SpecError, parse_manifest, step_hashes

# step_hashes of manifest() computed with the spec before the convert step existed (HEAD 4ae4962)
HASHES_BEFORE = {"preprocess": "e5e8fd695dedf87e", "f0": "ed4d572b41c006a8", "features": "84cc46d229cce706",
                 "train": "5983c66586b270e3", "index": "c7e090b1312c8837"}


def manifest(**over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"dataset": {"source": "s3://voices/alice/"}, "storage": {"uri": "s3://models/rvc"},
                            "f0": {"method": "harvest"}, "train": {"epochs": 8}, "resources": {"shards": 2},
                            "steps": ["features", "train", "index"], **over}
    return {"apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment", "metadata": {"name": "alice"},
            "spec": spec}


def test_default_steps_and_hashes_are_unchanged() -> None:
    exp = parse_manifest(manifest())
    assert step_hashes(exp) == {**HASHES_BEFORE, "convert": step_hashes(exp)["convert"]}
    bare = parse_manifest(manifest(steps=None) | {"spec": {"dataset": {"source": "s3://v/a/"},
                                                            "storage": {"uri": "s3://m/r"}}})
    assert bare.spec.steps == list(DEFAULT_STEPS) and "convert" not in bare.spec.steps
    assert STEP_ORDER[-1] == "convert" and bare.spec.convert is None
    # spec.convert set (the step unused or used) changes the convert hash only
    with_convert = step_hashes(parse_manifest(manifest(steps=["train", "convert"],
                                                       convert={"source": "s3://voices/todo/"})))
    assert {s: with_convert[s] for s in HASHES_BEFORE} == HASHES_BEFORE
    assert with_convert["convert"] != step_hashes(exp)["convert"]


def test_defaults_are_rvcs() -> None:
    conv = parse_manifest(manifest(steps=["convert", "train"], convert={"source": "s3://voices/todo/"})).spec
    assert conv.steps == ["train", "convert"]  # recipe order
    c = conv.convert
    assert c is not None and (c.transpose, c.index_rate, c.protect, c.filter_radius, c.rms_mix_rate) == (
        0, 0.75, 0.33, 3, 0.25)
    assert c.format == "wav" and c.f0_method is None  # None: the training's f0.method


def test_convert_listed_without_source_names_the_field() -> None:
    with pytest.raises(SpecError, match=r"^spec\.convert\.source: Field required$"):
        parse_manifest(manifest(steps=["train", "convert"]))
    with pytest.raises(SpecError, match=r"^spec\.convert\.source: Field required$"):
        parse_manifest(manifest(steps=["convert"], convert={"format": "flac"}))
    # listed, with a source: fine; a source without the step listed: fine (unused)
    parse_manifest(manifest(convert={"source": "s3://voices/todo/"}))


@pytest.mark.parametrize(("field", "value", "words"), [
    ("format", "aac", "spec.convert.format: got 'aac'; allowed values: 'wav', 'flac', 'ogg' or 'mp3'"),
    ("f0Method", "yin", "spec.convert.f0Method: got 'yin'; allowed values: 'pm'"),
    ("indexRate", 1.5, "spec.convert.indexRate: Input should be less than or equal to 1"),
    ("protect", 0.6, "spec.convert.protect: Input should be less than or equal to 0.5"),
    ("transpose", 30, "spec.convert.transpose: Input should be less than or equal to 24"),
    ("filterRadius", -1, "spec.convert.filterRadius: Input should be greater than or equal to 0"),
    ("rmsMixRate", True, "spec.convert.rmsMixRate: Value error, expected a number, got the boolean True"),
    ("source", "", "spec.convert.source: Value error, must not be empty"),
    ("source", "s3:/bucket/x", "spec.convert.source: Value error, 's3:/bucket/x': an S3 URI is written"),
    ("outDir", "x", "spec.convert.outDir: unknown field"),
])
def test_bad_values_are_named(field: str, value: Any, words: str) -> None:
    conv = {"source": "s3://voices/todo/", field: value}
    with pytest.raises(SpecError) as e:
        parse_manifest(manifest(steps=["convert"], convert=conv))
    assert words in str(e.value)


def test_every_pitch_method_and_format_is_accepted() -> None:
    for method in PITCH_METHODS:
        for fmt in CONVERT_FORMATS:
            conv = {"source": "s3://v/t/", "f0Method": method, "format": fmt}
            exp = parse_manifest(manifest(steps=["convert"], convert=conv))
            assert exp.spec.convert is not None and exp.spec.convert.f0_method == method


def test_output_names_keep_the_stem() -> None:
    assert converted_name("take 1.flac", "mp3") == "take 1.mp3"
    assert converted_name("a.b.wav", "wav") == "a.b.wav" and converted_name("noext", "ogg") == "noext.ogg"
