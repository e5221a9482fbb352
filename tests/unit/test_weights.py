"""Where weights come from (resolve_weight), and how inference finds the files a pitch method needs.

The pitch side is generic: the catalog says which files a method needs, the method says how the spec
names them and which extract options carry them; inference and the f0 step's input check only ask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rvc_pipeline.components.pitch import base as pitch
from rvc_pipeline.core.catalog import PITCH
from rvc_pipeline.core.errors import WeightsNotFound
from rvc_pipeline.core.spec import ExperimentSpec
from rvc_pipeline.infer import InferError, extract_f0, pitch_weights
from rvc_pipeline.weights import resolve_weight


def _spec(**extra: object) -> ExperimentSpec:
    return ExperimentSpec.model_validate({"dataset": {"source": "."}, "storage": {"uri": "."}, **extra})


def _file(path: Path, data: bytes = b"weights") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_resolve_weight_order_and_careless_references(tmp_path: Path, offline_weights: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    spec_cache = tmp_path / "spec-cache"
    spec = _spec(weightsCache=str(spec_cache))
    local = _file(offline_weights / "hubert_base.pt")
    assert resolve_weight("hubert_base.pt", spec, what="HuBERT") == local
    # the spec's cache comes first; a nested name is also found by its bare file name
    first = _file(spec_cache / "hubert_base.pt")
    assert resolve_weight("hubert_base.pt", spec, what="HuBERT") == first
    bare = _file(offline_weights / "f0G40k.pth")
    assert resolve_weight("pretrained_v2/f0G40k.pth", spec, what="G") == bare
    given = _file(tmp_path / "mine.pt")
    assert resolve_weight(str(given), spec, what="HuBERT") == given
    monkeypatch.chdir(tmp_path)
    assert resolve_weight("mine.pt", spec, what="HuBERT") == Path("mine.pt")  # an existing relative file
    # careless references: each one a WeightsNotFound naming what and where
    for ref, match in [("./nope.pt", r"HuBERT: \./nope\.pt does not exist"),
                       (str(tmp_path / "gone.pt"), "gone.pt does not exist"),
                       ("nested/deeper/x.pt", r"cannot find 'nested/deeper/x\.pt'. Tried: .*spec-cache"),
                       ("missing.pt", r"HuBERT: cannot find 'missing\.pt'. Tried: .*weights-cache/missing")]:
        with pytest.raises(WeightsNotFound, match=match) as err:
            resolve_weight(ref, spec, what="HuBERT")
        assert "huggingface" not in str(err.value)  # offline: no download was tried
        assert len(str(err.value).splitlines()) == 1


def test_pitch_weights_come_from_the_catalog_and_the_method(offline_weights: Path) -> None:
    assert PITCH["rmvpe"].weights == ("rmvpe.pt",)
    assert pitch_weights("pm", None, None) == {}  # needs nothing: answered from the catalog
    assert pitch.get("fcpe").required_weights() == ()  # ships its file: finds it itself
    assert pitch_weights("fcpe", None, None) == {}
    with pytest.raises(WeightsNotFound, match=r"RMVPE checkpoint: cannot find 'rmvpe\.pt'"):
        pitch_weights("rmvpe", None, None)
    with pytest.raises(WeightsNotFound, match="RMVPE checkpoint"):
        pitch_weights("rmvpe", {"rmvpe.pt": ""}, None)  # an empty path is no path
    found = _file(offline_weights / "rmvpe.pt")
    assert pitch_weights("rmvpe", None, None) == {"rmvpe.pt": str(found)}
    assert pitch_weights("rmvpe", {"rmvpe.pt": "/given/r.pt"}, None) == {"rmvpe.pt": "/given/r.pt"}
    other = _file(offline_weights / "other" / "r2.pt")
    spec = _spec(f0={"method": "rmvpe", "rmvpeCheckpoint": str(other)})
    assert pitch_weights("rmvpe", None, spec) == {"rmvpe.pt": str(other)}  # the spec's reference
    assert pitch.needed_weights(spec) == {"rmvpe.pt": str(other)}
    assert pitch.needed_weights(_spec(f0={"method": "harvest"})) == {}
    assert pitch.get("rmvpe").weight_options({"rmvpe.pt": "/r.pt"}) == {"checkpoint": "/r.pt"}
    assert pitch.weights_key("rmvpe") == "rmvpe_weights"


def test_extract_f0_refuses_what_a_method_cannot_run_with() -> None:
    x = np.zeros(16000)
    with pytest.raises(InferError, match=r"f0 method 'yin': expected one of pm, .*rmvpe"):
        extract_f0(x, 100, "yin")
    for weights in (None, {}, {"rmvpe.pt": ""}, {"other.pt": "/x.pt"}):
        with pytest.raises(InferError, match=r"f0 method rmvpe needs rmvpe\.pt"):
            extract_f0(x, 100, "rmvpe", weights=weights)
    f0 = extract_f0(x, 100, "pm", options={})  # silence: unvoiced, p_len frames
    assert f0.shape == (100,) and not f0.any()
