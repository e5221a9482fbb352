"""`features.cpuBf16`: off by default, strict, in the CRD, and part of the features step's hash only when
set (manifests written before the field existed keep their hashes, so nothing reruns)."""

from __future__ import annotations

from typing import Any

import pytest
from rvc_operator import crd
from rvc_pipeline.core.spec import SpecError, parse_manifest, step_hashes

from tests.unit.test_spec_rvc_compatible import HASHES_BEFORE, manifest_with


def _manifest(**feat: Any) -> dict[str, Any]:
    return manifest_with("features", **feat)


def test_default_is_off_and_hashes_are_unchanged() -> None:
    exp = parse_manifest(_manifest())
    assert exp.spec.features.cpu_bf16 is False
    for m in (_manifest(), _manifest(cpuBf16=False)):
        hashes = step_hashes(parse_manifest(m))
        assert {s: h for s, h in hashes.items() if s in HASHES_BEFORE} == HASHES_BEFORE


def test_turning_it_on_reruns_from_features() -> None:
    on = step_hashes(parse_manifest(_manifest(cpuBf16=True)))
    assert on["preprocess"] == HASHES_BEFORE["preprocess"] and on["f0"] == HASHES_BEFORE["f0"]
    assert all(on[s] != HASHES_BEFORE[s] for s in ("features", "train", "index"))


@pytest.mark.parametrize("bad", [2, None, [], "maybe", "", 1.5])
def test_careless_values_fail_naming_the_field(bad: Any) -> None:
    with pytest.raises(SpecError, match=r"spec\.features\.cpuBf16"):
        parse_manifest(_manifest(cpuBf16=bad))


def test_in_the_crd() -> None:
    schema = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    field = schema["properties"]["spec"]["properties"]["features"]["properties"]["cpuBf16"]
    assert field["type"] == "boolean" and field["default"] is False and "AVX512-BF16" in field["description"]
