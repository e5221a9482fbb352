"""The CEL rules (x-kubernetes-validations) of the CRD's CEL variant, evaluated with cel-python.

No cluster here runs CEL (the e2e cluster is v1.20), so each generated rule runs on dumped spec dicts the
way the API server runs it: on the node it sits on (`self`), transition rules (`oldSelf`) only on updates,
nothing on absent fields. Every bad spec the rules refuse is refused by the pipeline's validators too
(or, for local storage, by the operator's s3:// policy), so the API server and the pipeline agree.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from rvc_operator import crd
from rvc_pipeline.core.spec import SpecError, parse_spec

ROOT = Path(__file__).resolve().parents[2]
CEL = "x-kubernetes-validations"
_MISSING = object()

GOOD: dict[str, Any] = {
    "dataset": {"source": "s3://voices/alice/"},
    "storage": {"uri": "s3://models/rvc"},
    "train": {"epochs": 8, "saveEveryEpoch": 4},
}


def _rules(node: dict[str, Any], path: tuple[str, ...] = ()):
    """(path of the node, rule) for every rule in a structural schema."""
    for rule in node.get(CEL, []):
        yield path, rule
    for name, sub in (node.get("properties") or {}).items():
        yield from _rules(sub, (*path, name))
    assert "items" not in node or CEL not in str(node["items"]), "rules under lists: extend _rules"


@pytest.fixture(scope="module")
def spec_rules() -> list[tuple[tuple[str, ...], dict[str, str], Any]]:
    schema = crd.build_crd(cel=True)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    env = celpy.Environment()
    rules = [(path, rule, env.program(env.compile(rule["rule"]))) for path, rule in _rules(schema)]
    assert all(path[0] == "spec" for path, _, _ in rules)
    return [(path[1:], rule, prog) for path, rule, prog in rules]


def _at(value: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def failures(spec_rules, new: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """Messages of the rules that refuse `new` (an update from `old` when given)."""
    out = []
    for path, rule, prog in spec_rules:
        this = _at(new, path)
        before = _MISSING if old is None else _at(old, path)
        transition = "oldSelf" in rule["rule"]
        if this is _MISSING or this is None or (transition and before is _MISSING):
            continue
        act = {"self": celpy.json_to_cel(this)}
        if transition:
            act["oldSelf"] = celpy.json_to_cel(before)
        result = prog.evaluate(act)
        assert isinstance(result, celpy.celtypes.BoolType), (rule, result)  # not an evaluation error
        if not result:
            out.append(f"{'.'.join(path)}: {rule['message']}")
    return out


def dumped(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as the API server holds it after defaulting (every default filled, unset optionals absent)."""
    return parse_spec(spec).model_dump(by_alias=True, mode="json", exclude_none=True)


def with_value(spec: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(spec)
    node = out
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


# (field, bad value, a word of the rule's message); the pipeline's validators refuse each as well
CREATE_CASES = [
    ("preprocess.slicer.minIntervalMs", 2000, "minLengthMs >= minIntervalMs"),
    ("preprocess.slicer.hopSizeMs", 500, "minLengthMs >= minIntervalMs"),
    ("preprocess.slicer.maxSilKeptMs", 10, "maxSilKeptMs"),
    ("preprocess.overlapSeconds", 4.0, "overlapSeconds must be smaller"),
    ("preprocess.segmentSeconds", 7.5, "pieces of 0.76 to 6.75"),
    ("preprocess.segmentSeconds", 0.6, "pieces of 0.76 to 6.75"),
    ("storage.uri", "/data/models", "s3://"),
    ("dataset.source", "voices/alice", "s3://"),
    ("convert.source", "voices/bob", "s3://"),
    ("steps", ["train", "convert"], "convert.source is required"),
]
UPDATE_CASES = [
    ("storage.uri", "s3://models/other", "immutable"),
    ("experimentName", "bob", "cannot be added or removed"),
]


def test_a_good_spec_passes_on_create_and_update(spec_rules) -> None:
    good = dumped(GOOD)
    assert failures(spec_rules, good) == []
    assert failures(spec_rules, good, good) == []
    longer = with_value(good, "train.epochs", 50)  # mutable fields stay mutable
    assert failures(spec_rules, longer, good) == []
    named = dumped({**GOOD, "experimentName": "alice"})
    assert failures(spec_rules, named, named) == []
    assert failures(spec_rules, with_value(good, "preprocess.segmentSeconds", 6.75)) == []


@pytest.mark.parametrize(("field", "value", "word"), CREATE_CASES)
def test_bad_cross_field_spec_is_refused_like_the_pipeline_does(spec_rules, field, value, word) -> None:
    bad = with_value(dumped(GOOD), field, value)
    got = failures(spec_rules, bad)
    assert len(got) == 1 and word in got[0], got
    if value in ("/data/models", "voices/alice", "voices/bob"):
        # a local folder is fine for the pipeline; the operator's policy refuses it on clusters
        from rvc_operator.status import Policy, _validate_for_cluster
        from rvc_pipeline.core.spec import parse_manifest
        exp = parse_manifest({"apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment",
                              "metadata": {"name": "alice"}, "spec": bad})
        with pytest.raises(SpecError, match="s3://"):
            _validate_for_cluster(exp, Policy())
    else:
        with pytest.raises(SpecError):
            parse_spec(bad)


@pytest.mark.parametrize(("field", "value", "word"), UPDATE_CASES)
def test_immutable_fields(spec_rules, field, value, word) -> None:
    old = dumped({**GOOD, "experimentName": "alice"}) if field == "experimentName" else dumped(GOOD)
    new = with_value(old, field, value)
    got = failures(spec_rules, new, old)
    assert len(got) == 1 and "immutable" in got[0], got
    assert failures(spec_rules, new) == []  # a create has no oldSelf
    if field == "experimentName":
        added = failures(spec_rules, new, dumped(GOOD))
        removed = failures(spec_rules, dumped(GOOD), old)
        assert [word in m for m in added + removed] == [True, True], (added, removed)


def test_every_rule_is_exercised_and_compiles(spec_rules) -> None:
    hit: set[str] = set()
    good = dumped(GOOD)
    for field, value, _ in CREATE_CASES:
        hit.update(failures(spec_rules, with_value(good, field, value)))
    named = dumped({**GOOD, "experimentName": "alice"})
    for field, value, _ in UPDATE_CASES:
        hit.update(failures(spec_rules, with_value(named, field, value), named))
    hit.update(failures(spec_rules, good, named))
    every = {f"{'.'.join(path)}: {rule['message']}" for path, rule, _ in spec_rules}
    assert hit == every and len(every) == 11


def test_shipped_examples_pass_the_rules(spec_rules) -> None:
    for path in sorted((ROOT / "examples").glob("experiment*.yaml")):
        doc = yaml.safe_load(path.read_text())
        assert failures(spec_rules, dumped(doc["spec"])) == [], path


def test_plain_variant_is_the_cel_one_without_rules() -> None:
    plain, with_cel = crd.build_crd(), crd.build_crd(cel=True)
    assert CEL not in yaml.safe_dump(plain) and CEL in yaml.safe_dump(with_cel)
    crd._strip_cel(with_cel)
    assert with_cel == plain
    assert (ROOT / "crds" / "rvcexperiments-cel.yaml").read_text() == crd.render(cel=True)
    chart_copy = ROOT / "charts" / "rvc-operator" / "files" / "rvcexperiments-cel.yaml"
    assert chart_copy.read_text() == crd.render(cel=True), f"regenerate {chart_copy}"
