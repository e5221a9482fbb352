"""Data safety (issue 8, parts 2, 4 and 6): a step deletes only the files it owns, inside logs/<exp>/,
never through a symlink, and only after its inputs were checked; the dataset may not overlap the
experiment folder; every step checks its prerequisites; a changed dataset reruns preprocess and says
what changed; per-file outputs record what made them and are never mixed. Local storage and a real
S3 API (moto server)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from rvc_pipeline import cli, provenance, stepio
from rvc_pipeline.components.embedders.base import load_embedder
from rvc_pipeline.core.errors import StepFailed
from rvc_pipeline.core.layout import marker_key
from rvc_pipeline.core.spec import STEP_ORDER, Experiment, parse_manifest
from rvc_pipeline.core.storage import S3Storage, open_storage
from rvc_pipeline.stepio import is_complete
from rvc_pipeline.steps import f0 as f0step
from rvc_pipeline.steps import features as feat
from rvc_pipeline.steps import preprocess as pp
from rvc_pipeline.steps.runner import StepContext, run_step

from tests.s3server import S3Endpoint
from tests.support.fairseq_hubert import HubertConfig, HubertModel, save_fairseq_checkpoint

pytestmark = [
    pytest.mark.skipif(not shutil.which("ffmpeg"), reason="needs ffmpeg"),
    pytest.mark.usefixtures("offline_weights"),
]

EXP = "x"
LATER_OUTPUTS = ("2a_f0/0_0.wav.npy", "2b-f0nsf/0_0.wav.npy", "3_feature768/0_0.npy", "G_10.pth",
                 "added_IVF1_Flat_nprobe_1_x_v2.index")


def experiment(source: str | Path, store: str | Path, endpoint: str | None = None, **spec: Any) -> Experiment:
    storage: dict[str, Any] = {"uri": str(store)}
    if endpoint:
        storage["endpoint"] = endpoint
    data: dict[str, Any] = {"dataset": {"source": str(source)}, "storage": storage,
                            "resources": {"device": "cpu", "parallelism": 1}, **spec}
    return parse_manifest({"apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment",
                           "metadata": {"name": EXP}, "spec": data})


def _lease(name: str) -> bool:
    """The one-writer lease (cli.py) is not the data this file checks."""
    return name.startswith("lease")


def tree(root: Path) -> dict[str, bytes | str]:
    """Every file and link below `root` (links not followed): relative path -> bytes or '-> target'."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            if _lease(n):
                continue
            p = Path(dirpath) / n
            rel = p.relative_to(root).as_posix()
            out[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else p.read_bytes()
    return out


def s3_tree(s3: S3Endpoint, prefix: str = "") -> dict[str, bytes]:
    c = s3.client()
    out = {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            if _lease(o["Key"].rsplit("/", 1)[-1]):
                continue
            out[o["Key"]] = c.get_object(Bucket=s3.bucket, Key=o["Key"])["Body"].read()
    return out


def noop(ctx: StepContext) -> dict[str, Any]:
    return {}


def dataset(voice_dir: Path, dest: Path, n: int = 2) -> Path:
    dest.mkdir(parents=True)
    for p in sorted(voice_dir.glob("*.wav"))[:n]:
        shutil.copy2(p, dest / p.name)
    return dest


def finish(exp: Experiment, plant: Any) -> None:
    """A finished experiment: a real preprocess, then every later step's outputs and markers."""
    run_step(exp, "preprocess", pp.run, check_inputs=True)
    for s in STEP_ORDER[1:]:
        run_step(exp, s, noop)
    for key in LATER_OUTPUTS:
        plant(f"logs/{EXP}/{key}", b"hours of work")


def local_plant(store: Path) -> Any:
    def plant(key: str, data: bytes) -> None:
        p = store / key
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    return plant


def s3_plant(s3: S3Endpoint, prefix: str = "runs") -> Any:
    def plant(key: str, data: bytes) -> None:
        s3.client().put_object(Bucket=s3.bucket, Key=f"{prefix}/{key}", Body=data)

    return plant


def precious(root: Path) -> Path:
    """An unrelated folder tree that must survive whatever a step does."""
    d = root / "precious"
    (d / "sub").mkdir(parents=True)
    for name in ("0_0.npy", "0_0.wav", "0_0.wav.npy", "sub/1_0.npy", "notes.txt"):
        (d / name).write_bytes(b"irreplaceable " + name.encode())
    return d


# ================================================================== deleting only what a step owns


@pytest.mark.parametrize("folder,step,force", [
    ("3_feature768", "preprocess", False),  # cleared as a later step's stale outputs
    ("3_feature768", "features", True),  # the step's own, forced
    ("2a_f0", "preprocess", False),
    ("2b-f0nsf", "f0", True),
    ("0_gt_wavs", "preprocess", False),  # the step's own output folder
    ("1_16k_wavs", "preprocess", True),
])
def test_symlinked_output_folder_is_refused_and_its_target_survives(
    tmp_path: Path, folder: str, step: str, force: bool
) -> None:
    store = tmp_path / "store"
    target = precious(tmp_path)
    before = tree(target)
    (store / "logs" / EXP).mkdir(parents=True)
    (store / "logs" / EXP / folder).symlink_to(target, target_is_directory=True)
    st = open_storage(str(store))
    st.write_bytes(marker_key(EXP, "index"), b"{}")
    with pytest.raises(StepFailed, match=f"{folder}: is a symbolic link"):
        run_step(experiment(tmp_path / "data", store), step, noop, force=force)
    assert tree(target) == before
    assert is_complete(st, EXP, "index")  # refused before any marker was touched


def test_real_preprocess_refuses_a_symlinked_gt_folder(tmp_path: Path, voice_dir: Path) -> None:
    data = dataset(voice_dir, tmp_path / "data", n=1)
    store = tmp_path / "store"
    target = precious(tmp_path)
    before = tree(target)
    (store / "logs" / EXP).mkdir(parents=True)
    (store / "logs" / EXP / pp.GT_DIR).symlink_to(target)
    for check in (True, False):
        with pytest.raises(StepFailed, match=f"{pp.GT_DIR}: is a symbolic link"):
            run_step(experiment(data, store), "preprocess", pp.run, check_inputs=check)
    assert tree(target) == before


def test_links_and_foreign_files_inside_an_owned_folder_survive(tmp_path: Path) -> None:
    store = tmp_path / "store"
    target = precious(tmp_path)
    before = tree(target)
    fd = store / "logs" / EXP / "3_feature768"
    (fd / "keep").mkdir(parents=True)
    (fd / "0_0.npy").write_bytes(b"stale")
    (fd / "0_1.npy.partial").write_bytes(b"half")
    (fd / "link.npy").symlink_to(target / "0_0.npy")  # the link goes, never what it points to
    (fd / "dirlink.npy").symlink_to(target, target_is_directory=True)
    (fd / "notes.txt").write_bytes(b"mine")
    (fd / "keep" / "1_0.npy").write_bytes(b"in a sub-folder")
    (fd / "d.npy").mkdir()  # a folder with an owned-looking name
    (fd / "d.npy" / "x.npy").write_bytes(b"inside")
    cleared = stepio.clear_stale_outputs(open_storage(str(store)), EXP, "preprocess", force=False)
    assert cleared == ["3_feature768"]
    assert sorted(os.listdir(fd)) == ["d.npy", "keep", "notes.txt"]
    assert (fd / "keep" / "1_0.npy").read_bytes() == b"in a sub-folder"
    assert (fd / "d.npy" / "x.npy").read_bytes() == b"inside"
    assert tree(target) == before


def test_an_output_folder_that_is_a_file_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / "logs" / EXP).mkdir(parents=True)
    (store / "logs" / EXP / "2a_f0").write_bytes(b"a file, not a folder")
    with pytest.raises(StepFailed, match="2a_f0: exists but is not a folder"):
        run_step(experiment(tmp_path / "data", store), "preprocess", noop)
    assert (store / "logs" / EXP / "2a_f0").read_bytes() == b"a file, not a folder"


def test_s3_clearing_stays_inside_the_owned_prefixes(s3: S3Endpoint) -> None:
    plant = s3_plant(s3)
    doomed = ["3_feature768/0_0.npy", "3_feature768/0_1.npy.partial", "2a_f0/0_0.wav.npy",
              "2b-f0nsf/0_0.wav.npy"]
    kept = ["3_feature768_backup/0_0.npy", "3_feature768/sub/0_0.npy", "3_feature768/notes.txt",
            "3_feature768/../../../escape.npy", "2a_f0.npy", "G_10.pth"]
    for k in doomed + kept:
        plant(f"logs/{EXP}/{k}", b"v")
    plant("logs/x2/3_feature768/0_0.npy", b"another experiment")
    plant(f"elsewhere/logs/{EXP}/3_feature768/0_0.npy", b"outside the storage prefix")
    st = S3Storage(s3.uri("runs"), endpoint=s3.url)
    stepio.clear_stale_outputs(st, EXP, "preprocess", force=False)
    left = set(s3_tree(s3))
    assert not {f"runs/logs/{EXP}/{k}" for k in doomed} & left
    assert {f"runs/logs/{EXP}/{k}" for k in kept} <= left
    assert {"runs/logs/x2/3_feature768/0_0.npy", f"runs/elsewhere/logs/{EXP}/3_feature768/0_0.npy"} <= left


def test_s3_push_mirror_and_pull_ignore_sibling_prefixes(s3: S3Endpoint, tmp_path: Path) -> None:
    plant = s3_plant(s3)
    plant(f"logs/{EXP}/out/a.txt", b"a")
    plant(f"logs/{EXP}/out/stale.txt", b"old")
    plant(f"logs/{EXP}/out_old/keep.txt", b"keep me")
    seen: list[str] = []

    def step(ctx: StepContext) -> dict[str, Any]:
        ctx.pull("out")
        seen.extend(sorted(p.relative_to(ctx.exp_dir).as_posix() for p in ctx.exp_dir.rglob("*.txt")))
        (ctx.exp_dir / "out" / "stale.txt").unlink()
        ctx.push("out", mirror=True)
        return {}

    run_step(experiment(s3.uri("voices"), s3.uri("runs"), s3.url), "f0", step, workdir=tmp_path / "w")
    assert seen == ["out/a.txt", "out/stale.txt"]  # out_old/ was not pulled as part of out/
    left = s3_tree(s3, f"runs/logs/{EXP}/")
    assert f"runs/logs/{EXP}/out_old/keep.txt" in left and f"runs/logs/{EXP}/out/stale.txt" not in left


# ================================================================== the dataset may not overlap outputs


def _overlap_cases(tmp_path: Path, store: Path) -> dict[str, str]:
    exp_dir = store / "logs" / EXP
    link = tmp_path / "link-to-gt"
    link.symlink_to(exp_dir / pp.GT_DIR)
    files_link = tmp_path / "files-link"
    files_link.mkdir()
    (files_link / "a.wav").symlink_to(sorted((exp_dir / pp.GT_DIR).iterdir())[0])
    return {
        "inside 0_gt_wavs": str(exp_dir / pp.GT_DIR),
        "equal to logs/<exp>": str(exp_dir),
        "containing logs/<exp>": str(store),
        "relative path": os.path.relpath(exp_dir / pp.GT_DIR),
        "file:// URI": f"file://{exp_dir / pp.WAV16_DIR}",
        "symlink to 0_gt_wavs": str(link),
        "a file linked into 0_gt_wavs": str(files_link),
        "trailing slash and dots": f"{exp_dir}/./{pp.GT_DIR}/../{pp.GT_DIR}/",
    }


def test_local_dataset_overlapping_the_experiment_is_refused_before_anything(
    tmp_path: Path, voice_dir: Path
) -> None:
    store = tmp_path / "store"
    finish(experiment(dataset(voice_dir, tmp_path / "data"), store), local_plant(store))
    before = tree(store)
    cases = _overlap_cases(tmp_path, store)
    for case, source in cases.items():
        with pytest.raises(StepFailed, match="overlaps the experiment folder|is a link into") as e:
            cli.run_steps(experiment(source, store))
        assert "logs/x/" in str(e.value), case
        assert tree(store) == before, case  # not a marker, not a byte touched
    gt = {k: v for k, v in before.items() if f"/{pp.GT_DIR}/" in k}
    assert gt
    for case, source in cases.items():
        # called directly (no input check in the shell), preprocess itself refuses before deleting pieces
        with pytest.raises(StepFailed, match="overlaps the experiment folder|is a link into"):
            run_step(experiment(source, store), "preprocess", pp.run, force=True)
        assert {k: v for k, v in tree(store).items() if f"/{pp.GT_DIR}/" in k} == gt, case


@pytest.mark.parametrize("source,refused", [
    ("runs/logs/x/0_gt_wavs", True),
    ("runs/logs/x", True),
    ("runs/logs/x/", True),
    ("runs", True),
    ("", True),  # the whole bucket
    ("runs/logs/x2", False),  # another experiment whose name starts with x
    ("runs/logs/x_gt", False),
    ("voices", False),
])
def test_s3_dataset_overlap(s3: S3Endpoint, voice_dir: Path, source: str, refused: bool) -> None:
    plant = s3_plant(s3)
    for i, p in enumerate(sorted(voice_dir.glob("*.wav"))[:1]):
        plant(f"logs/{EXP}/0_gt_wavs/{i}_1.wav", p.read_bytes())
        key = f"{source.rstrip('/')}/{p.name}".lstrip("/")
        s3.client().put_object(Bucket=s3.bucket, Key=key, Body=p.read_bytes())
    st = S3Storage(s3.uri("runs"), endpoint=s3.url)
    st.write_bytes(marker_key(EXP, "preprocess"), b"{}")
    before = s3_tree(s3)
    exp = experiment(f"s3://{s3.bucket}/{source}", s3.uri("runs"), s3.url)
    if refused:
        with pytest.raises(StepFailed, match="overlaps the experiment folder logs/x/"):
            run_step(exp, "preprocess", pp.run, check_inputs=True, force=True)
        assert s3_tree(s3) == before
    else:
        checked = pp.check_inputs(exp, st)
        assert [f.name for f in checked.data.files] == [sorted(voice_dir.glob("*.wav"))[0].name]


def test_s3_dataset_in_another_bucket_does_not_overlap(s3: S3Endpoint) -> None:
    other = f"{s3.bucket}-other"
    s3.client().create_bucket(Bucket=other)
    s3.client().put_object(Bucket=other, Key="runs/logs/x/a.wav", Body=b"RIFF")
    exp = experiment(f"s3://{other}/runs/logs/x", s3.uri("runs"), s3.url)
    checked = pp.check_inputs(exp, S3Storage(s3.uri("runs"), endpoint=s3.url))
    assert [f.name for f in checked.data.files] == ["a.wav"]


# ================================================================== nothing invalidated before the inputs


@pytest.mark.parametrize("what", ["typo", "empty", "only sub-folders"])
def test_bad_dataset_on_a_finished_local_experiment_keeps_everything(
    tmp_path: Path, voice_dir: Path, what: str
) -> None:
    store = tmp_path / "store"
    data = dataset(voice_dir, tmp_path / "data")
    finish(experiment(data, store), local_plant(store))
    if what == "typo":
        exp = experiment(tmp_path / "dat", store)
    else:
        for p in data.iterdir():
            p.unlink()
        if what == "only sub-folders":
            (data / "old").mkdir()
        exp = experiment(data, store)
    before = tree(store)
    assert sum("/.rvc/" in k and k.endswith(".done.json") for k in before) == len(STEP_ORDER)
    with pytest.raises(StepFailed, match="no such folder" if what == "typo" else "no files"):
        cli.run_steps(exp)
    assert tree(store) == before


def test_cli_exit_code_and_message_for_a_typo(tmp_path: Path, voice_dir: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    finish(experiment(dataset(voice_dir, tmp_path / "data"), store), local_plant(store))
    before = tree(store)
    spec = tmp_path / "exp.yaml"
    spec.write_text(json.dumps({"apiVersion": "rvc-operator.dev/v1alpha1", "kind": "RVCExperiment",
                                "metadata": {"name": EXP},
                                "spec": {"dataset": {"source": str(tmp_path / "dta")},
                                         "storage": {"uri": str(store)}}}))
    assert cli.main(["run", "--spec", str(spec)]) == 2
    assert f"dataset {tmp_path / 'dta'}: no such folder" in capsys.readouterr().err
    assert tree(store) == before


@pytest.mark.parametrize("what", ["typo", "empty"])
def test_bad_dataset_on_a_finished_s3_experiment_keeps_everything(
    s3: S3Endpoint, voice_dir: Path, what: str
) -> None:
    c = s3.client()
    for p in sorted(voice_dir.glob("*.wav"))[:2]:
        c.upload_file(str(p), s3.bucket, f"voices/{p.name}")
    finish(experiment(s3.uri("voices"), s3.uri("runs"), s3.url), s3_plant(s3))
    if what == "empty":
        for p in sorted(voice_dir.glob("*.wav"))[:2]:
            c.delete_object(Bucket=s3.bucket, Key=f"voices/{p.name}")
    before = s3_tree(s3, "runs/")
    assert sum(k.endswith(".done.json") for k in before) == len(STEP_ORDER)
    source = s3.uri("vioces") if what == "typo" else s3.uri("voices")
    with pytest.raises(StepFailed, match="no files"):
        cli.run_steps(experiment(source, s3.uri("runs"), s3.url))
    assert s3_tree(s3, "runs/") == before


# ================================================================== prerequisites


def _pieces(store: Path, n: int = 1) -> None:
    """What a preprocess leaves: n pieces of noise in 1_16k_wavs/ (and, as stand-ins, 0_gt_wavs/)."""
    rng = np.random.default_rng(0)
    for sub in ("1_16k_wavs", "0_gt_wavs"):
        d = store / "logs" / EXP / sub
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            sf.write(d / f"0_{i}.wav", (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000,
                     subtype="FLOAT")


def test_f0_on_unfinished_preprocess_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    _pieces(store, 2)  # a half-finished preprocess: pieces, no marker
    exp = experiment(tmp_path / "data", store)
    want = ("preprocess has not completed for experiment x (no marker logs/x/.rvc/preprocess.done.json); "
            "run it first")
    with pytest.raises(StepFailed) as e:
        cli.run_steps(exp, ["f0"])
    assert want in str(e.value)
    assert not (store / "logs" / EXP / "2a_f0").exists()
    assert not is_complete(open_storage(str(store)), EXP, "f0")
    spec = tmp_path / "exp.yaml"
    spec.write_text(json.dumps({"kind": "RVCExperiment", "metadata": {"name": EXP}, "spec": {
        "dataset": {"source": str(tmp_path / "data")}, "storage": {"uri": str(store)}}}))
    assert cli.main(["f0", "--spec", str(spec)]) == 2
    assert want in capsys.readouterr().err


@pytest.mark.parametrize("step,missing", [("features", "preprocess"), ("train", "f0"), ("index", "features")])
def test_every_step_checks_its_prerequisites(tmp_path: Path, step: str, missing: str) -> None:
    store = tmp_path / "store"
    _pieces(store)
    exp = experiment(tmp_path / "data", store)
    for s in STEP_ORDER[: STEP_ORDER.index(step)]:
        if s != missing:
            run_step(exp, s, noop)
    with pytest.raises(StepFailed, match=f"{missing} has not completed for experiment x"):
        cli.run_steps(exp, [step])


def test_prerequisite_out_of_date_or_without_outputs(tmp_path: Path) -> None:
    store = tmp_path / "store"
    _pieces(store)
    exp = experiment(tmp_path / "data", store)
    for s in ("preprocess", "f0", "features"):
        run_step(exp, s, noop)
    st = open_storage(str(store))
    with pytest.raises(StepFailed, match="logs/x/3_feature768/ is missing or empty .made by features"):
        stepio.check_prerequisites(exp, st, "index")
    changed = experiment(tmp_path / "data", store, preprocess={"segmentSeconds": 3.0})
    with pytest.raises(StepFailed, match="preprocess is out of date for experiment x"):
        stepio.check_prerequisites(changed, st, "f0")


def test_prerequisites_follow_the_spec(tmp_path: Path) -> None:
    store = tmp_path / "store"
    st = open_storage(str(store))
    # a model without pitch trains without f0
    nopitch = experiment(tmp_path / "data", store, model={"pitchGuidance": False})
    _pieces(store)
    run_step(nopitch, "preprocess", noop)
    run_step(nopitch, "features", noop)
    (store / "logs" / EXP / "3_feature768").mkdir(parents=True)
    (store / "logs" / EXP / "3_feature768" / "0_0.npy").write_bytes(b"f")
    stepio.check_prerequisites(nopitch, st, "train")
    with pytest.raises(StepFailed, match="f0 has not completed"):
        stepio.check_prerequisites(experiment(tmp_path / "data", store), st, "train")
    # pieces made elsewhere, preprocess left out of spec.steps: no marker needed, but the pieces are
    byo = experiment(tmp_path / "data", tmp_path / "s2", steps=["f0", "features", "train", "index"])
    with pytest.raises(StepFailed, match="logs/x/0_gt_wavs/ is missing or empty"):
        stepio.check_prerequisites(byo, open_storage(str(tmp_path / "s2")), "f0")
    for sub in ("0_gt_wavs", "1_16k_wavs"):
        (tmp_path / "s2" / "logs" / EXP / sub).mkdir(parents=True)
        (tmp_path / "s2" / "logs" / EXP / sub / "0_0.wav").write_bytes(b"w")
    stepio.check_prerequisites(byo, open_storage(str(tmp_path / "s2")), "f0")


def test_s3_f0_on_unfinished_preprocess_is_refused(s3: S3Endpoint) -> None:
    s3_plant(s3)(f"logs/{EXP}/1_16k_wavs/0_0.wav", b"RIFF")
    before = s3_tree(s3)
    with pytest.raises(StepFailed, match="preprocess has not completed for experiment x"):
        cli.run_steps(experiment(s3.uri("voices"), s3.uri("runs"), s3.url), ["f0"])
    assert s3_tree(s3) == before


# ================================================================== the dataset manifest


def test_changed_dataset_reruns_preprocess_and_says_what_changed(tmp_path: Path, voice_dir: Path) -> None:
    store = tmp_path / "store"
    voices = sorted(voice_dir.glob("*.wav"))
    data = dataset(voice_dir, tmp_path / "data", n=2)
    exp = experiment(data, store)
    first = run_step(exp, "preprocess", pp.run, check_inputs=True)
    assert first["dataset_changes"] is None and first["dataset_files"] == 2
    run_step(exp, "f0", noop)
    os.utime(data / voices[0].name)  # touched, same content: nothing to redo
    assert run_step(exp, "preprocess", pp.run, check_inputs=True).get("skipped") is True

    shutil.copy2(voices[2], data / voices[2].name)
    added = run_step(exp, "preprocess", pp.run, check_inputs=True)
    assert "skipped" not in added
    assert added["dataset_changes"] == {"added": [voices[2].name], "removed": [], "changed": []}
    assert not is_complete(open_storage(str(store)), EXP, "f0")  # later steps rerun too
    report = json.loads((store / "logs" / EXP / pp.REPORT).read_text())
    assert report["dataset_changes"]["added"] == [voices[2].name] and report["files_total"] == 3
    assert voices[2].name in (store / "logs" / EXP / pp.LOGFILE).read_text()

    (data / voices[0].name).unlink()  # consent withdrawn
    removed = run_step(exp, "preprocess", pp.run, check_inputs=True)
    assert removed["dataset_changes"] == {"added": [], "removed": [voices[0].name], "changed": []}
    assert removed["files_total"] == 2
    gt = sorted(p.name for p in (store / "logs" / EXP / pp.GT_DIR).iterdir())
    assert {n.split("_")[0] for n in gt} == {"0", "1"}  # no piece of a third file is left

    raw = bytearray((data / voices[1].name).read_bytes())
    raw[-2:] = b"\x01\x02"  # same size, new content
    (data / voices[1].name).write_bytes(bytes(raw))
    changed = run_step(exp, "preprocess", pp.run, check_inputs=True)
    assert changed["dataset_changes"] == {"added": [], "removed": [], "changed": [voices[1].name]}
    manifest = json.loads((store / "logs" / EXP / pp.MANIFEST_FILE).read_text())
    assert [f["name"] for f in manifest["files"]] == sorted(p.name for p in data.iterdir())
    assert manifest["digest"] == changed["dataset_digest"]


def test_s3_dataset_change_reruns_preprocess(s3: S3Endpoint, voice_dir: Path) -> None:
    c = s3.client()
    voices = sorted(voice_dir.glob("*.wav"))
    c.upload_file(str(voices[0]), s3.bucket, f"voices/{voices[0].name}")
    exp = experiment(s3.uri("voices"), s3.uri("runs"), s3.url)
    run_step(exp, "preprocess", pp.run, check_inputs=True)
    assert run_step(exp, "preprocess", pp.run, check_inputs=True).get("skipped") is True
    c.upload_file(str(voices[1]), s3.bucket, f"voices/{voices[1].name}")
    again = run_step(exp, "preprocess", pp.run, check_inputs=True)
    assert again["dataset_changes"] == {"added": [voices[1].name], "removed": [], "changed": []}
    c.put_object(Bucket=s3.bucket, Key=f"voices/{voices[0].name}", Body=voices[2].read_bytes())
    third = run_step(exp, "preprocess", pp.run, check_inputs=True)
    assert third["dataset_changes"]["changed"] == [voices[0].name]
    stored = json.loads(s3_tree(s3, "runs/")[f"runs/logs/{EXP}/{pp.MANIFEST_FILE}"])
    assert stored["digest"] == third["dataset_digest"]


def test_dataset_change_detection_functions() -> None:
    old = pp.Dataset("d", [pp.DatasetFile("a", 1, "sha256:1"), pp.DatasetFile("b", 2, "sha256:2")])
    new = pp.Dataset("d", [pp.DatasetFile("b", 2, "sha256:3"), pp.DatasetFile("c", 3, "sha256:4")])
    assert pp.dataset_changes(old.manifest(), new) == {"added": ["c"], "removed": ["a"], "changed": ["b"]}
    assert pp.dataset_changes(None, new) is None
    assert pp.dataset_changes({"files": "garbage"}, new) is None  # a corrupt manifest is no manifest
    assert old.digest != new.digest and old.digest == pp.Dataset("e", list(old.files)).digest


# ================================================================== provenance of per-file outputs


def tiny_hubert(path: Path, seed: int) -> Path:
    import torch

    torch.manual_seed(seed)
    cfg = HubertConfig(conv_layers=[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2,
                              embed_dim=768, ffn_dim=64, heads=12, layers=1, conv_pos=16,
                              conv_pos_groups=16, final_dim=256)
    return save_fairseq_checkpoint(HubertModel(cfg), path)


def _features_of(store: Path) -> dict[str, np.ndarray]:
    d = store / "logs" / EXP / "3_feature768"
    return {p.name: np.load(p) for p in sorted(d.glob("*.npy"))}


def _interrupt(store: Path, step: str, output: str) -> None:
    (store / "logs" / EXP / output).unlink()
    (store / "logs" / EXP / ".rvc" / f"{step}.done.json").unlink()


def test_random_then_real_embedder_recomputes_everything(tmp_path: Path, offline_weights: Path) -> None:
    store = tmp_path / "store"
    _pieces(store, 3)
    exp = experiment(tmp_path / "data", store, features={"embedder": "tiny_hubert.pt"},
                     demoRandomWeights=True)
    first = run_step(exp, "features", feat.run)
    assert first["random_weights"] is True and first["embedder_weights"] == "random"
    _interrupt(store, "features", "3_feature768/0_1.npy")  # interrupted; then the real file turns up
    real = tiny_hubert(offline_weights / "tiny_hubert.pt", seed=1)
    again = run_step(exp, "features", feat.run)
    assert again["files_written"] == 3 and again["files_skipped"] == 0
    assert again["random_weights"] is False
    assert again["embedder_weights"] == f"sha256:{provenance.sha256_file(real)}"
    emb = load_embedder(real, "cpu")
    for name, f in _features_of(store).items():
        x, _ = sf.read(store / "logs" / EXP / "1_16k_wavs" / name.replace("npy", "wav"), dtype="float32")
        np.testing.assert_allclose(f, emb.extract(x, "v2")[0], atol=1e-4)
    stored = json.loads((store / "logs" / EXP / "features.json").read_text())
    assert stored["random_weights"] is False


def test_swapped_embedder_or_a_lost_record_recomputes(tmp_path: Path) -> None:
    store = tmp_path / "store"
    _pieces(store, 2)
    a, b = tiny_hubert(tmp_path / "a.pt", 1), tiny_hubert(tmp_path / "b.pt", 2)
    exp = experiment(tmp_path / "data", store, features={"embedder": str(a)})
    run_step(exp, "features", feat.run)
    _interrupt(store, "features", "3_feature768/0_1.npy")
    shutil.copy(b, a)  # same path, other weights
    again = run_step(exp, "features", feat.run)
    assert again["files_written"] == 2 and again["embedder_weights"] == f"sha256:{provenance.sha256_file(b)}"
    # the record is lost or garbled: whatever made the outputs is unknown, so they are made again
    for garbage in (None, b"{not json", b"[]"):
        _interrupt(store, "features", "3_feature768/0_0.npy")
        rec = store / "logs" / EXP / feat.PARAMS_FILE
        if garbage is None:
            rec.unlink()
        else:
            rec.write_bytes(garbage)
        s = run_step(exp, "features", feat.run)
        assert s["files_written"] == 2, garbage
    # unchanged: a resume computes only what is missing
    _interrupt(store, "features", "3_feature768/0_0.npy")
    s = run_step(exp, "features", feat.run)
    assert s["files_written"] == 1 and s["files_skipped"] == 1


def test_s3_features_provenance_mismatch_removes_stored_outputs(s3: S3Endpoint, tmp_path: Path) -> None:
    c = s3.client()
    a, b = tiny_hubert(tmp_path / "a.pt", 1), tiny_hubert(tmp_path / "b.pt", 2)
    _pieces(tmp_path / "local", 2)
    for p in sorted((tmp_path / "local" / "logs" / EXP / "1_16k_wavs").iterdir()):
        c.upload_file(str(p), s3.bucket, f"runs/logs/{EXP}/1_16k_wavs/{p.name}")
    c.put_object(Bucket=s3.bucket, Key=f"runs/logs/{EXP}/3_feature768/9_9.npy", Body=b"orphan of another run")
    exp_a = experiment(s3.uri("voices"), s3.uri("runs"), s3.url, features={"embedder": str(a)})
    run_step(exp_a, "features", feat.run)
    assert f"runs/logs/{EXP}/3_feature768/9_9.npy" not in s3_tree(s3)  # no record: not ours to keep
    c.delete_object(Bucket=s3.bucket, Key=f"runs/logs/{EXP}/.rvc/features.done.json")
    exp_b = experiment(s3.uri("voices"), s3.uri("runs"), s3.url, features={"embedder": str(b)})
    s = run_step(exp_b, "features", feat.run)
    assert s["files_written"] == 2 and s["files_skipped"] == 0
    rec = json.loads(s3_tree(s3)[f"runs/logs/{EXP}/{feat.PARAMS_FILE}"])
    assert rec["embedder"] == f"sha256:{provenance.sha256_file(b)}"


def test_f0_outputs_without_a_record_are_recomputed(tmp_path: Path) -> None:
    store = tmp_path / "store"
    _pieces(store, 2)
    exp = experiment(tmp_path / "data", store)
    run_step(exp, "f0", f0step.run)
    _interrupt(store, "f0", "2a_f0/0_1.wav.npy")
    (store / "logs" / EXP / f0step.PARAMS_FILE).unlink()
    assert run_step(exp, "f0", f0step.run)["computed"] == 2


def test_rmvpe_weights_identity_is_recorded(tmp_path: Path) -> None:
    w = tmp_path / "rmvpe.pt"
    w.write_bytes(b"weights one")
    ctx = SimpleNamespace(spec=SimpleNamespace(f0=SimpleNamespace(rmvpe_checkpoint="rmvpe.pt")))
    one = f0step._params(ctx, "rmvpe", {"checkpoint": str(w)})  # type: ignore[arg-type]
    w.write_bytes(b"other weights, two")
    two = f0step._params(ctx, "rmvpe", {"checkpoint": str(w)})  # type: ignore[arg-type]
    assert one["rmvpe_weights"] != two["rmvpe_weights"]
    assert provenance.record_changes(one, two) == [f"rmvpe_weights: {one['rmvpe_weights']} -> "
                                                   f"{two['rmvpe_weights']}"]


def test_mute_set_uses_the_embedder_that_made_the_features(tmp_path: Path, offline_weights: Path) -> None:
    from rvc_pipeline.steps.train import prepare

    exp_dir = tmp_path / "logs" / EXP
    provenance.write_record(exp_dir / feat.PARAMS_FILE, {"embedder": "sha256:not-this-one"})
    tiny_hubert(offline_weights / "tiny_hubert.pt", 3)
    spec = experiment(tmp_path / "d", tmp_path, features={"embedder": "tiny_hubert.pt"}).spec
    ctx = SimpleNamespace(spec=spec, exp_dir=exp_dir)
    feats, kind = prepare.mute_features(ctx, "v2")  # type: ignore[arg-type]
    assert feats is None and kind == "zeros"  # another embedder made the features: never mixed
    provenance.write_record(exp_dir / feat.PARAMS_FILE,
                            {"embedder": provenance.weight_identity(offline_weights / "tiny_hubert.pt")})
    feats, kind = prepare.mute_features(ctx, "v2")  # type: ignore[arg-type]
    assert feats is not None and kind.startswith("embedder:tiny_hubert.pt@sha256:")


# ================================================================== careless and hostile odds and ends


def test_dataset_with_pipes_devices_and_dangling_links_does_not_hang(tmp_path: Path, voice_dir: Path) -> None:
    data = dataset(voice_dir, tmp_path / "data", n=1)
    os.mkfifo(data / "a_pipe.wav")  # hashing or decoding a FIFO would block forever
    (data / "b_zero.wav").symlink_to("/dev/zero")  # endless
    (data / "c_dangling.wav").symlink_to(tmp_path / "gone.wav")
    (data / "d_sub.wav").mkdir()
    summary = run_step(experiment(data, tmp_path / "store"), "preprocess", pp.run, check_inputs=True)
    assert summary["files_total"] == summary["dataset_files"] == 1 and summary["pieces"] > 0


def test_dataset_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "voices.zip").write_bytes(b"PK")
    with pytest.raises(StepFailed, match="voices.zip: not a folder"):
        cli.run_steps(experiment(tmp_path / "voices.zip", tmp_path / "store"))


def test_s3_console_folder_objects_are_not_recordings(s3: S3Endpoint, voice_dir: Path) -> None:
    c = s3.client()
    c.put_object(Bucket=s3.bucket, Key="voices/", Body=b"")
    c.put_object(Bucket=s3.bucket, Key="voices/sub/", Body=b"")
    c.upload_file(str(sorted(voice_dir.glob("*.wav"))[0]), s3.bucket, "voices/a.wav")
    exp = experiment(s3.uri("voices"), s3.uri("runs"), s3.url)
    checked = pp.check_inputs(exp, S3Storage(s3.uri("runs"), endpoint=s3.url))
    assert [f.name for f in checked.data.files] == ["a.wav"]
    c.delete_object(Bucket=s3.bucket, Key="voices/a.wav")
    with pytest.raises(StepFailed, match="no files"):
        pp.check_inputs(exp, S3Storage(s3.uri("runs"), endpoint=s3.url))


@pytest.mark.parametrize("garbage", [b"", b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_unreadable_marker_means_not_complete(tmp_path: Path, garbage: bytes) -> None:
    store = tmp_path / "store"
    _pieces(store)
    exp = experiment(tmp_path / "data", store)
    run_step(exp, "preprocess", noop)
    calls: list[str] = []
    run_step(exp, "f0", lambda ctx: calls.append("f0") or {})
    (store / marker_key(EXP, "f0")).write_bytes(garbage)
    run_step(exp, "f0", lambda ctx: calls.append("f0") or {})
    assert calls == ["f0", "f0"]  # rerun, not "already complete"
    (store / marker_key(EXP, "preprocess")).write_bytes(garbage)
    with pytest.raises(StepFailed, match="preprocess has not completed"):
        stepio.check_prerequisites(exp, open_storage(str(store)), "features")


def test_tampered_dataset_digest_in_the_marker_reruns(tmp_path: Path, voice_dir: Path) -> None:
    store = tmp_path / "store"
    exp = experiment(dataset(voice_dir, tmp_path / "data", n=1), store)
    run_step(exp, "preprocess", pp.run, check_inputs=True)
    m = store / marker_key(EXP, "preprocess")
    marker = json.loads(m.read_text())
    for fake in (12345, ["x"], "0" * 16):
        m.write_text(json.dumps({**marker, "dataset_digest": fake}))
        assert "skipped" not in run_step(exp, "preprocess", pp.run, check_inputs=True)
        marker = json.loads(m.read_text())
    assert run_step(exp, "preprocess", pp.run, check_inputs=True).get("skipped") is True


def test_finished_random_features_rerun_once_real_weights_turn_up(tmp_path: Path,
                                                                  offline_weights: Path) -> None:
    store = tmp_path / "store"
    _pieces(store, 2)
    exp = experiment(tmp_path / "data", store, features={"embedder": "tiny_hubert.pt"},
                     demoRandomWeights=True)
    run_step(exp, "preprocess", noop)
    first = cli.run_steps(exp, ["features"])[0]
    assert first["random_weights"] is True
    assert cli.run_steps(exp, ["features"])[0].get("skipped") is True  # nothing new: complete
    real = tiny_hubert(offline_weights / "tiny_hubert.pt", seed=4)
    again = cli.run_steps(exp, ["features"])[0]
    assert "skipped" not in again and again["random_weights"] is False and again["files_written"] == 2
    assert again["embedder_weights"] == provenance.weight_identity(real)
    real.unlink()  # a file that cannot be found now never makes finished work look stale
    assert cli.run_steps(exp, ["features"])[0].get("skipped") is True


def test_finished_f0_reruns_when_the_rmvpe_file_changes(tmp_path: Path, offline_weights: Path) -> None:
    store = tmp_path / "store"
    _pieces(store)
    exp = experiment(tmp_path / "data", store, f0={"method": "rmvpe"})
    run_step(exp, "preprocess", noop)
    offline_weights.mkdir(parents=True, exist_ok=True)
    w = offline_weights / "rmvpe.pt"
    w.write_bytes(b"first weights")  # never loaded: the step below is a stand-in
    calls: list[str] = []

    def step(ctx: StepContext) -> dict[str, Any]:
        calls.append("f0")
        return {"rmvpe_weights": provenance.weight_identity(w)}

    run_step(exp, "f0", step, check_inputs=True)
    assert run_step(exp, "f0", step, check_inputs=True).get("skipped") is True
    w.write_bytes(b"other weights, longer")
    assert "skipped" not in run_step(exp, "f0", step, check_inputs=True)
    assert calls == ["f0", "f0"]
