"""core/layout.py: the names under logs/<experiment>/ are RVC's (the on-disk format), and in one place."""

from __future__ import annotations

import pytest
from rvc_pipeline.core import layout
from rvc_pipeline.core.spec import parse_manifest


def test_feature_size_per_version_and_its_folder() -> None:
    assert [layout.feature_dim(v) for v in layout.VERSIONS] == [256, 768]
    assert [layout.feature_dir(v) for v in layout.VERSIONS] == ["3_feature256", "3_feature768"]
    assert layout.FEATURE_DIRS == ("3_feature256", "3_feature768")
    assert [layout.version_of_dim(d) for d in (256, 768, 512, 0)] == ["v1", "v2", None, None]
    for bad in ("v3", "V1", "", "256"):
        with pytest.raises(ValueError, match=f"model version '{bad}' is not one of"):
            layout.feature_dim(bad)
    for version in layout.VERSIONS:  # the spec reads the same table
        exp = parse_manifest({"metadata": {"name": "a"}, "spec": {
            "dataset": {"source": "/d"}, "storage": {"uri": "/s"}, "model": {"version": version}}})
        assert exp.spec.model.feature_dim == layout.feature_dim(version)


def test_folder_and_file_names_are_rvcs() -> None:
    assert (layout.GT_WAVS_DIR, layout.WAVS_16K_DIR, layout.F0_COARSE_DIR, layout.F0_NSF_DIR) == (
        "0_gt_wavs", "1_16k_wavs", "2a_f0", "2b-f0nsf")
    assert (layout.FILELIST_FILE, layout.CONFIG_FILE, layout.TRAIN_LOG_FILE) == (
        "filelist.txt", "config.json", "train.log")
    assert layout.checkpoint_names(2333333) == ("G_2333333.pth", "D_2333333.pth")
    assert layout.exported_model("alice") == "weights/alice.pth"
    assert layout.epoch_model("alice", 3, 120) == "weights/alice_e3_s120.pth"
    assert layout.index_name("added", 458, "voice1", "v2") == "added_IVF458_Flat_nprobe_1_voice1_v2.index"
    assert layout.index_name("trained", 1, "a", "v1") == "trained_IVF1_Flat_nprobe_1_a_v1.index"
    with pytest.raises(ValueError, match="index kind 'total'"):
        layout.index_name("total", 1, "a", "v1")


def test_bookkeeping_keys() -> None:
    assert layout.marker_key("alice", "f0") == "logs/alice/.rvc/f0.done.json"
    assert layout.marker_prefix("alice") == "logs/alice/.rvc/"
    assert layout.progress_key("alice") == "logs/alice/progress.jsonl"
    assert layout.bookkeeping_key("alice", layout.OWNER_FILE) == "logs/alice/.rvc/owner.json"
    assert layout.bookkeeping_key("alice", layout.LEASE_FILE) == "logs/alice/.rvc/lease.json"
    assert layout.params_file("f0") == ".rvc/f0.params.json"
    assert layout.DATASET_MANIFEST_FILE == ".rvc/dataset.manifest.json"


@pytest.mark.parametrize(("name", "step"), [
    ("f0.done.json", "f0"), ("preprocess.done.json", "preprocess"),
    (".done.json", None), ("f0.done.json.tmp", None), ("f0.done.jsonx", None), ("f0.params.json", None),
    ("", None), ("owner.json", None),
])
def test_step_of_marker_refuses_what_is_no_marker(name: str, step: str | None) -> None:
    assert layout.step_of_marker(name) == step


def test_checkpoint_pairs_and_index_patterns() -> None:
    assert layout.discriminator_of("G_120.pth") == "D_120.pth"
    assert layout.discriminator_of("D_120.pth") is None and layout.discriminator_of("xG_1.pth") is None
    pat = layout.index_name_pattern("a.b", "v2")
    assert pat.match("added_IVF12_Flat_nprobe_1_a.b_v2.index")
    assert pat.match("trained_IVF3_Flat_nprobe_1_a.b_v2.index")
    for other in ("added_IVF12_Flat_nprobe_1_axb_v2.index",  # '.' is not a wildcard
                  "added_IVF12_Flat_nprobe_1_a.b_v1.index", "added_IVF_Flat_nprobe_1_a.b_v2.index",
                  "added_IVF12_Flat_nprobe_1_a.b_v2.index.bak", "x_added_IVF12_Flat_nprobe_1_a.b_v2.index"):
        assert not pat.match(other), other
    assert layout.is_added_index("added_IVF1_Flat_nprobe_1_a_v2.index")
    assert not layout.is_added_index("trained_IVF1_Flat_nprobe_1_a_v2.index")
    assert not layout.is_added_index("added_IVF1.index.partial")
