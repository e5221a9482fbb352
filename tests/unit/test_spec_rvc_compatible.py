"""`preprocess.rvcCompatible`: parsed strictly enough, in the CRD, and part of preprocess's step hash only
when set (manifests written before the field existed keep their hashes, so nothing reruns)."""

from __future__ import annotations

from typing import Any

import pytest
from rvc_operator import crd
from rvc_pipeline.core.spec import SpecError, parse_manifest, step_hashes

# step_hashes of _manifest() computed before the field existed
HASHES_BEFORE = {"preprocess": "3cfab1719f6c23d5", "f0": "0f8b6e32e5364771", "features": "e0e25f80ffe5ad9c",
                 "train": "3cbb88eb727e34d7", "index": "2f5565d1d3b39981"}


def manifest_with(section: str, **fields: Any) -> dict[str, Any]:
    """The manifest HASHES_BEFORE was computed for, with `fields` set in spec.<section> (none: as it was)."""
    spec: dict[str, Any] = {"dataset": {"source": "/data"}, "storage": {"uri": "/store"},
                            "model": {"sampleRate": "40k"}}
    if fields:
        spec[section] = fields
    return {"apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment", "metadata": {"name": "pp"},
            "spec": spec}


def _manifest(**pre: Any) -> dict[str, Any]:
    return manifest_with("preprocess", **pre)


def test_default_is_off_and_hashes_are_unchanged() -> None:
    exp = parse_manifest(_manifest())
    assert exp.spec.preprocess.rvc_compatible is False
    assert {s: h for s, h in step_hashes(exp).items() if s in HASHES_BEFORE} == HASHES_BEFORE
    off = step_hashes(parse_manifest(_manifest(rvcCompatible=False)))
    assert {s: h for s, h in off.items() if s in HASHES_BEFORE} == HASHES_BEFORE


def test_turning_it_on_reruns_from_preprocess() -> None:
    on = step_hashes(parse_manifest(_manifest(rvcCompatible=True)))
    assert all(on[s] != HASHES_BEFORE[s] for s in HASHES_BEFORE)
    exp = parse_manifest(_manifest(rvcCompatible=True))
    assert exp.spec.preprocess.rvc_compatible is True
    assert exp.spec.model_dump(by_alias=True)["preprocess"]["rvcCompatible"] is True


@pytest.mark.parametrize("bad", [2, None, [], {}, "maybe", "", 1.5])
def test_careless_values_fail_naming_the_field(bad: Any) -> None:
    with pytest.raises(SpecError, match=r"spec\.preprocess\.rvcCompatible"):
        parse_manifest(_manifest(rvcCompatible=bad))


def test_misspelt_field_is_refused() -> None:
    with pytest.raises(SpecError, match="rvc_compatible|rvcCompat"):
        parse_manifest(_manifest(rvcCompat=True))


def test_crd_declares_a_boolean_with_default_false() -> None:
    schema = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    node = schema["properties"]["spec"]["properties"]["preprocess"]["properties"]["rvcCompatible"]
    assert node["type"] == "boolean" and node.get("default") is False
    assert "byte for byte" in node["description"]
