"""The checked-in CRD is the generated one, and its schema is structural (apiextensions.k8s.io/v1 rules)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from rvc_operator import crd
from rvc_pipeline.core.catalog import PITCH_METHODS
from rvc_pipeline.core.spec import API_GROUP, API_VERSION, KIND, PLURAL, SHORT_NAMES, ExperimentSpec

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "rvcexperiments.yaml"

# Keywords a v1 CRD's JSONSchemaProps accepts (what we may emit).
ALLOWED = {
    "type", "description", "enum", "default", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minLength", "maxLength", "pattern", "minItems", "maxItems", "format", "properties", "required", "items",
    "additionalProperties", "nullable", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-list-type",
    "x-kubernetes-map-type",
}


def _nodes(schema: dict[str, Any], path: str = ""):
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _nodes(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _nodes(schema["additionalProperties"], f"{path}{{*}}")


@pytest.fixture(scope="module")
def generated() -> dict[str, Any]:
    return crd.build_crd()


@pytest.fixture(scope="module")
def schema(generated: dict[str, Any]) -> dict[str, Any]:
    return generated["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _prop(schema: dict[str, Any], dotted: str) -> dict[str, Any]:
    node = schema
    for part in dotted.split("."):
        node = node["properties"][part]
    return node


def test_checked_in_crd_is_generated() -> None:
    have = CRD_FILE.read_text() if CRD_FILE.exists() else ""
    assert have == crd.render(), (
        f"{CRD_FILE} is out of date with rvc_pipeline/core/spec.py; regenerate it with:\n"
        "    python -m rvc_operator.crd > crds/rvcexperiments.yaml"
    )


def test_module_entry_point_prints_the_same_text() -> None:
    out = subprocess.run([sys.executable, "-m", "rvc_operator.crd"], capture_output=True, text=True,
                         check=True)
    assert out.stdout == crd.render()
    bad = subprocess.run([sys.executable, "-m", "rvc_operator.crd", "--check", "/nonexistent/crd.yaml"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "python -m rvc_operator.crd" in bad.stderr


def test_names_scope_and_subresources(generated: dict[str, Any]) -> None:
    spec = generated["spec"]
    assert generated["apiVersion"] == "apiextensions.k8s.io/v1"
    assert generated["metadata"]["name"] == f"{PLURAL}.{API_GROUP}"
    assert spec["group"] == API_GROUP and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == KIND and spec["names"]["plural"] == PLURAL
    assert spec["names"]["shortNames"] == SHORT_NAMES
    (v,) = spec["versions"]
    assert v["name"] == API_VERSION and v["served"] and v["storage"]
    assert v["subresources"] == {"status": {}}
    cols = {c["name"]: c for c in v["additionalPrinterColumns"]}
    assert cols["Phase"]["jsonPath"] == ".status.phase"
    assert cols["Step"]["jsonPath"] == ".status.currentStep"
    assert cols["Epoch"]["jsonPath"] == ".status.progress.epochText"
    assert cols["Age"]["type"] == "date"


def test_structural_every_node_typed_no_refs_known_keywords(schema: dict[str, Any]) -> None:
    count = 0
    for path, node in _nodes(schema):
        count += 1
        assert "$ref" not in node and "anyOf" not in node and "allOf" not in node, path
        assert set(node) <= ALLOWED, (path, set(node) - ALLOWED)
        assert "type" in node, f"{path or '<root>'}: no type"
        if node["type"] == "object":
            # properties and additionalProperties exclude each other; additionalProperties: false is banned
            assert not ("properties" in node and "additionalProperties" in node), path
            assert node.get("additionalProperties") is not False, path
            if "properties" not in node and "additionalProperties" not in node and path != ".metadata":
                assert node.get("x-kubernetes-preserve-unknown-fields") is True, path
        for k in ("exclusiveMinimum", "exclusiveMaximum"):
            if k in node:
                assert node[k] is True, f"{path}: {k} must be boolean in a v1 CRD"
                assert ("minimum" if k == "exclusiveMinimum" else "maximum") in node, path
        if "required" in node:
            assert set(node["required"]) <= set(node["properties"]), path
    assert count > 100


def test_every_property_has_a_description(schema: dict[str, Any]) -> None:
    missing = [p for p, node in _nodes(schema)
               if p and not p.endswith(("[]", "{*}")) and not node.get("description")]
    assert missing == [".metadata"]  # the API server refuses anything but `type` on the root metadata
    assert schema["properties"]["metadata"] == {"type": "object"}


def test_preserve_unknown_fields_only_where_loose(schema: dict[str, Any]) -> None:
    loose = sorted(p for p, node in _nodes(schema) if node.get("x-kubernetes-preserve-unknown-fields"))
    assert loose == [".spec.resources.affinity", ".status.progress"]


def test_enums_from_literals(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]
    assert _prop(spec, "model.version")["enum"] == ["v1", "v2"]
    assert _prop(spec, "model.sampleRate")["enum"] == ["32k", "40k", "48k"]
    # RVC's methods first, then one per file added to rvc_pipeline/components/pitch (the catalog)
    assert _prop(spec, "f0.method")["enum"][:5] == ["pm", "harvest", "dio", "crepe", "rmvpe"]
    assert _prop(spec, "f0.method")["enum"] == list(PITCH_METHODS)
    assert _prop(spec, "resources.device")["enum"] == ["gpu", "cpu"]
    assert spec["properties"]["steps"]["items"]["enum"] == ["preprocess", "f0", "features", "train", "index",
                                                            "convert"]
    assert _prop(spec, "convert.format")["enum"] == ["wav", "flac", "ogg", "mp3"]
    assert _prop(spec, "convert.f0Method")["enum"] == list(PITCH_METHODS)
    assert _prop(schema, "status.phase")["enum"] == ["Pending", "Queued", "Running", "Succeeded", "Failed",
                                                     "Suspended"]


def test_numeric_ranges(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]
    seg = _prop(spec, "preprocess.segmentSeconds")
    assert (seg["minimum"], seg["exclusiveMinimum"], seg["maximum"]) == (0.5, True, 30.0)
    assert "exclusiveMaximum" not in seg
    ov = _prop(spec, "preprocess.overlapSeconds")
    assert (ov["minimum"], ov["maximum"], ov["exclusiveMaximum"]) == (0.0, 5.0, True)
    sid = _prop(spec, "model.speakerId")
    assert (sid["minimum"], sid["maximum"], sid["type"]) == (0, 108, "integer")
    gpus = _prop(spec, "train.gpus")
    assert (gpus["minimum"], gpus["maximum"]) == (1, 64)
    lr = _prop(spec, "train.lrDecay")
    assert (lr["minimum"], lr["exclusiveMinimum"], lr["maximum"]) == (0, True, 1)
    assert _prop(spec, "index.kmeansThreshold")["minimum"] == 1000
    assert _prop(spec, "preprocess.slicer.thresholdDb")["maximum"] == 0


def test_defaults_required_and_nullable(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]
    assert schema["required"] == ["spec"]
    assert spec["required"] == ["dataset", "storage"]
    assert _prop(spec, "dataset")["required"] == ["source"]
    assert _prop(spec, "storage")["required"] == ["uri"]
    assert _prop(spec, "model.sampleRate")["default"] == "40k"
    assert _prop(spec, "train.epochs")["default"] == 20
    assert spec["properties"]["steps"]["default"] == ["preprocess", "f0", "features", "train", "index"]
    assert _prop(spec, "train")["default"] == {}  # the API server then fills in the field defaults
    # the operator default (RVC_DEFAULT_DEVICE) must be able to apply, so no CRD default here
    assert "default" not in _prop(spec, "resources.device")
    assert "RVC_DEFAULT_DEVICE" in _prop(spec, "resources.device")["description"]
    assert _prop(spec, "storage.endpoint")["nullable"] is True
    assert "default" not in _prop(spec, "storage.endpoint")
    assert _prop(spec, "resources.nodeSelector")["additionalProperties"] == {"type": "string"}
    tol = _prop(spec, "resources.tolerations")["items"]
    assert tol["properties"]["effect"]["enum"] == ["NoSchedule", "PreferNoSchedule", "NoExecute"]


def test_defaults_validate_against_the_spec_model(schema: dict[str, Any]) -> None:
    """Applying the CRD defaults the way the API server does must give what pydantic gives."""

    def apply(node: dict[str, Any], value: Any) -> Any:
        if isinstance(value, dict) and "properties" in node:
            for k, sub in node["properties"].items():
                if k not in value and "default" in sub:
                    value[k] = yaml.safe_load(yaml.safe_dump(sub["default"]))
                if k in value:
                    value[k] = apply(sub, value[k])
        return value

    spec = schema["properties"]["spec"]
    minimal = {"dataset": {"source": "s3://b/d/"}, "storage": {"uri": "s3://b/o"}, "train": {"epochs": 3}}
    defaulted = apply(spec, minimal)
    assert defaulted["preprocess"]["slicer"]["minLengthMs"] == 1500
    assert "device" not in defaulted["resources"]
    a = ExperimentSpec.model_validate(defaulted).model_dump()
    b = ExperimentSpec.model_validate({**minimal}).model_dump()
    assert a == b


def test_status_schema_matches_model(schema: dict[str, Any]) -> None:
    status = schema["properties"]["status"]
    steps = status["properties"]["steps"]["properties"]
    assert list(steps) == ["preprocess", "f0", "features", "train", "index", "convert"]
    step = steps["train"]["properties"]
    assert {"phase", "job", "startTime", "endTime", "message", "attempts"} <= set(step)
    assert step["phase"]["enum"] == ["Pending", "Running", "Succeeded", "Failed", "Skipped"]
    prog = status["properties"]["progress"]["properties"]
    assert {"epoch", "epochs", "globalStep", "lossG", "lossD", "lossMel", "secondsPerEpoch", "percent",
            "epochText"} <= set(prog)
    cond = status["properties"]["conditions"]["items"]
    assert cond["required"] == ["type", "status", "reason", "lastTransitionTime"]
    assert set(status["properties"]["artifacts"]["properties"]) == {"model", "index", "logs", "converted"}


def test_unsupported_construct_is_refused() -> None:
    with pytest.raises(crd.CRDSchemaError, match="anyOf"):
        crd.structural({"anyOf": [{"type": "string"}, {"type": "integer"}]}, {}, ("x",))
    with pytest.raises(crd.CRDSchemaError, match="no type"):
        crd.structural({"description": "untyped"}, {}, ("y",))
