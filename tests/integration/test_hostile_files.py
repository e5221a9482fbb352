"""Hostile weights files through every documented load path (issue 8): nothing in a file ever runs.

Each path gets the hostile kinds below (payloads of tests/support/hostile.py, which a full unpickle
does run: tests/unit/test_safeload.py::test_payloads_are_real). For each, the test asserts that the
payload's marker file was not created and that the error names the file. A training run is too slow
for a 2-core machine, so the training paths call the lowest real function train.run goes through:
`steps.train.state.choose_init` (own checkpoints, resumeFrom, pretrained G/D, the weights cache), then
`checkpoints.load_checkpoint` / `checkpoints.read_checkpoint` / `state.load_pretrained_d` (what
train.run does with the plan), and `prepare.mute_features` (the mute set). The features step's
embedder is `features.resolve_spec_embedder` + `features.load_spec_embedder`; `rvc-pipeline infer`
is driven through `cli.main` (exit code 2, one line, no traceback).
"""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from rvc_pipeline import checkpoints as ck
from rvc_pipeline import cli, infer, safeload
from rvc_pipeline.components.embedders.base import load_embedder
from rvc_pipeline.components.pitch import crepe, fcpe
from rvc_pipeline.components.pitch.rmvpe import get_rmvpe
from rvc_pipeline.core.errors import StepFailed
from rvc_pipeline.core.spec import Experiment, parse_spec
from rvc_pipeline.core.storage import open_storage
from rvc_pipeline.data import TextAudioDataset, spec_cache_path
from rvc_pipeline.export import load_small_model
from rvc_pipeline.progress import Reporter
from rvc_pipeline.steps import features
from rvc_pipeline.steps.runner import StepContext
from rvc_pipeline.steps.train import prepare, state
from rvc_pipeline.weights import resolve_weight

from tests.s3server import S3Endpoint
from tests.support import hostile
from tests.support.fairseq_hubert import HubertConfig, HubertModel, save_fairseq_checkpoint
from tests.support.hostile import torch_zip, write_legacy

pytestmark = pytest.mark.usefixtures("offline_weights")

Writer = Callable[[Path, Path], Path]  # (marker, destination) -> the hostile file


def _payload(name: str, legacy: bool = False) -> Writer:
    p = next(x for x in hostile.PAYLOADS if x.name == name)
    return lambda marker, dest: (write_legacy if legacy else torch_zip)(p.pickle(marker), dest)


def _protocol4(marker: Path, dest: Path) -> Path:
    return write_legacy(pickle.dumps(hostile.Touch(marker), protocol=4), dest)


KINDS: dict[str, Writer] = {
    "reduce os.system": _payload("os.system"),
    "reduce builtins.exec, no container": _payload("builtins.exec", legacy=True),
    "reduce subprocess.getoutput": _payload("subprocess.getoutput"),
    "dotted torch serialization.os.system": _payload("torch serialization.os.system"),
    "dotted os.path os.system, no container": _payload("os.path os.system", legacy=True),
    "getattr chain from an allowed global": _payload("getattr chain from torch._utils"),
    "module global sys.modules": _payload("sys.modules"),
    "nested in a valid checkpoint": lambda m, d: hostile.nested_in_checkpoint(m, d, where="optimizer"),
    "nested, legacy torch.save": lambda m, d: hostile.nested_in_checkpoint(m, d, where="model", legacy=True),
    "pickle protocol 4 (STACK_GLOBAL), no container": _protocol4,
}
EMBEDDER_KINDS: dict[str, Writer] = {
    **KINDS,
    "fairseq cfg is the payload": lambda m, d: hostile.fairseq_with_payload(m, d, where="cfg"),
    "payload inside the DictConfig": lambda m, d: hostile.fairseq_with_payload(m, d, where="content"),
    "payload as the Dictionary state": lambda m, d: hostile.fairseq_with_payload(m, d, where="dictionary"),
}


def _experiment(root: Path, **spec: Any) -> Experiment:
    data: dict[str, Any] = {"dataset": {"source": str(root / "data")},
                            "storage": {"uri": str(root / "store")},
                            "resources": {"device": "cpu", "parallelism": 1}}
    for k, v in spec.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return Experiment(metadata={"name": "exp"}, spec=parse_spec(data))


def _ctx(exp: Experiment, root: Path, step: str = "train") -> StepContext:
    wd = root / "work"
    exp_dir = wd / "logs" / exp.name
    exp_dir.mkdir(parents=True, exist_ok=True)
    st = exp.spec.storage
    return StepContext(experiment=exp, step=step, storage=open_storage(st.uri, st.endpoint, st.region),
                       workdir=wd, reporter=Reporter(exp_dir, exp.name, step), workers=1)


def _valid(dest: Path) -> Path:
    torch.save(hostile.valid_checkpoint(), dest)
    return dest


def _check(err: BaseException, path: Path, marker: Path) -> None:
    assert str(path) in str(err) and "refused" in str(err), str(err)
    assert not marker.exists()


def _each_kind(tmp_path: Path, kinds: dict[str, Writer]):  # noqa: ANN202 - generator of (kind, dir, marker, writer)
    for i, (kind, writer) in enumerate(kinds.items()):
        d = tmp_path / f"k{i}"
        d.mkdir()
        yield kind, d, d / "ran", writer


# ---- training: own checkpoints, resumeFrom, pretrained G/D --------------------------------------


def test_resume_from_own_checkpoint_G_999(tmp_path: Path) -> None:
    """A G_999.pth (or D_999.pth) dropped into the experiment: choose_init refuses it."""
    for _kind, d, marker, writer in _each_kind(tmp_path, KINDS):
        for bad in ("G_999.pth", "D_999.pth"):
            exp = _experiment(d / bad)
            ctx = _ctx(exp, d / bad)
            for name in ("G_1.pth", "D_1.pth", "G_999.pth", "D_999.pth"):
                target = ctx.exp_dir / name
                writer(marker, target) if name == bad else _valid(target)
            with pytest.raises(safeload.UnsafeFile) as err:
                state.choose_init(ctx, "v2", "40k", True)
            _check(err.value, ctx.exp_dir / bad, marker)
    # the control: a truncated newest checkpoint is corrupt, and resume falls back to the older one
    exp = _experiment(tmp_path / "trunc")
    ctx = _ctx(exp, tmp_path / "trunc")
    for name in ("G_1.pth", "D_1.pth", "G_999.pth", "D_999.pth"):
        _valid(ctx.exp_dir / name)
    data = (ctx.exp_dir / "G_999.pth").read_bytes()
    (ctx.exp_dir / "G_999.pth").write_bytes(data[: len(data) // 2])
    plan = state.choose_init(ctx, "v2", "40k", True)
    assert plan.kind == "resume" and Path(plan.g).name == "G_1.pth"


def test_own_checkpoint_dropped_into_s3_storage(tmp_path: Path, s3: S3Endpoint) -> None:
    marker = tmp_path / "ran"
    exp = _experiment(tmp_path, storage={"uri": s3.uri("runs"), "endpoint": s3.url})
    ctx = _ctx(exp, tmp_path)
    KINDS["reduce os.system"](marker, tmp_path / "G_999.pth")
    _valid(tmp_path / "D_999.pth")
    for name in ("G_999.pth", "D_999.pth"):
        s3.client().upload_file(str(tmp_path / name), s3.bucket, f"runs/logs/exp/{name}")
    with pytest.raises(safeload.UnsafeFile) as err:
        state.choose_init(ctx, "v2", "40k", True)
    _check(err.value, ctx.exp_dir / "G_999.pth", marker)


def test_resume_from(tmp_path: Path) -> None:
    """spec.train.resumeFrom: choose_init plans it, load_checkpoint (what train.run calls) refuses it."""
    for _kind, d, marker, writer in _each_kind(tmp_path, KINDS):
        g = writer(marker, d / "G_5.pth")
        _valid(d / "D_5.pth")
        exp = _experiment(d, train={"resumeFrom": str(g)})
        plan = state.choose_init(_ctx(exp, d), "v2", "40k", True)
        assert plan.kind == "resume_from"
        with pytest.raises(safeload.UnsafeFile) as err:
            ck.load_checkpoint(Path(plan.g), torch.nn.Linear(3, 2), None)
        _check(err.value, g, marker)


def test_pretrained_g_and_d(tmp_path: Path) -> None:
    for _kind, d, marker, writer in _each_kind(tmp_path, KINDS):
        bad = writer(marker, d / "f0G40k.pth")
        good = _valid(d / "f0D40k.pth")
        exp = _experiment(d, train={"pretrainedG": str(bad), "pretrainedD": str(good)})
        plan = state.choose_init(_ctx(exp, d), "v2", "40k", True)
        assert plan.kind == "pretrained"
        with pytest.raises(safeload.UnsafeFile) as err:
            ck.read_checkpoint(Path(plan.g))  # train.run's pretrained branch
        _check(err.value, bad, marker)
        exp = _experiment(d, train={"pretrainedG": str(good), "pretrainedD": str(bad)})
        with pytest.raises(safeload.UnsafeFile) as err:  # the discriminator of a resumeFrom without D_
            state.load_pretrained_d(torch.nn.Linear(3, 2), exp.spec, "v2", "40k", True)
        _check(err.value, bad, marker)


# ---- the shared weights cache on S3 ---------------------------------------------------------------


def test_weights_cache_on_s3(tmp_path: Path, s3: S3Endpoint) -> None:
    """Embedder, pretrained G and rmvpe.pt found by bare name in spec.weightsCache (s3://)."""
    marker = tmp_path / "ran"
    src = tmp_path / "src"
    src.mkdir()
    names = {"hubert_base.pt": EMBEDDER_KINDS["fairseq cfg is the payload"],
             "pretrained_v2/f0G40k.pth": KINDS["nested in a valid checkpoint"],
             "pretrained_v2/f0D40k.pth": KINDS["reduce os.system"], "rmvpe.pt": KINDS["reduce os.system"]}
    for name, writer in names.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        s3.client().upload_file(str(writer(marker, src / name)), s3.bucket, f"cache/{name}")
    exp = _experiment(tmp_path, weightsCache=s3.uri("cache"), storage={"endpoint": s3.url},
                      f0={"method": "rmvpe"})
    ctx = _ctx(exp, tmp_path, "features")
    path = features.resolve_spec_embedder(ctx)
    with pytest.raises(StepFailed, match="refused") as err:
        features.load_spec_embedder(ctx, "cpu", path)
    _check(err.value, path, marker)
    with pytest.raises(safeload.UnsafeFile) as err:  # the mute set: refused loudly, not zeros
        prepare.mute_features(ctx, "v2")
    _check(err.value, path, marker)
    plan = state.choose_init(ctx, "v2", "40k", True)
    assert plan.kind == "pretrained"
    for p in (plan.g, plan.d):
        with pytest.raises(safeload.UnsafeFile) as err:
            ck.read_checkpoint(Path(p))
        _check(err.value, Path(p), marker)
    rmvpe_path = resolve_weight(exp.spec.f0.rmvpe_checkpoint, exp.spec, what="RMVPE checkpoint")
    with pytest.raises(safeload.UnsafeFile) as err:
        get_rmvpe(rmvpe_path)
    _check(err.value, rmvpe_path, marker)


# ---- the embedder: features step, mute set, HF folders ---------------------------------------------


def test_embedder_via_features_and_mute_set(tmp_path: Path) -> None:
    for _kind, d, marker, writer in _each_kind(tmp_path, EMBEDDER_KINDS):
        bad = writer(marker, d / "hubert_base.pt")
        exp = _experiment(d, features={"embedder": str(bad)})
        ctx = _ctx(exp, d, "features")
        with pytest.raises(StepFailed) as err:
            features.load_spec_embedder(ctx, "cpu", features.resolve_spec_embedder(ctx))
        _check(err.value, bad, marker)
        with pytest.raises(safeload.UnsafeFile) as err:  # a train-only run fails naming the file
            prepare.mute_features(ctx, "v2")
        _check(err.value, bad, marker)
        assert not marker.exists()


def test_hugging_face_folder_with_hostile_bin(tmp_path: Path) -> None:
    for _kind, d, marker, writer in _each_kind(tmp_path, KINDS):
        (d / "hf").mkdir()
        (d / "hf" / "config.json").write_text("{}")
        bad = writer(marker, d / "hf" / "pytorch_model.bin")
        with pytest.raises(safeload.UnsafeFile) as err:
            load_embedder(d / "hf")
        _check(err.value, bad, marker)


# ---- f0 weights, exported models, caches -----------------------------------------------------------


def test_rmvpe_crepe_exported_models_and_spectrogram_cache(tmp_path: Path) -> None:
    wav = tmp_path / "a.wav"
    sf.write(wav, np.sin(np.arange(16000) / 10).astype(np.float32) * 0.3, 40000, subtype="FLOAT")
    for _kind, d, marker, writer in _each_kind(tmp_path, KINDS):
        bad = writer(marker, d / "w.pth")
        loaders: list[Callable[[Path], Any]] = [
            get_rmvpe,  # what the f0 step and infer use
            lambda p: crepe.Crepe("tiny", weights=p),
            lambda p: fcpe.FCPE(weights=p),
            load_small_model,
            infer.load_model,
        ]
        for load in loaders:
            with pytest.raises(safeload.UnsafeFile) as err:
                load(bad)
            _check(err.value, bad, marker)
        # the training dataset's spectrogram cache: never run, recomputed and overwritten
        cache = spec_cache_path(wav)
        shutil.copy(bad, cache)
        ds = TextAudioDataset([[str(wav), "p", "f", "f", "0"]], f0=True, sampling_rate=40000,
                              filter_length=2048, hop_length=400, win_length=2048)
        spec = ds._spec(str(wav), torch.from_numpy(sf.read(wav, dtype="float32")[0])[None])
        assert spec.shape == (1025, 40) and not marker.exists()
        assert torch.equal(safeload.load(cache), spec)


# ---- rvc-pipeline infer ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small exported v2 model, a small HuBERT in fairseq format, a 1 s recording."""
    from rvc_pipeline.nn import constructor_args, get_config
    from rvc_pipeline.nn.synthesizer import SynthesizerTrn

    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    args = constructor_args(get_config("v2", "40k"), spk_embed_dim=1, segment_frames=32)
    args[2], args[3], args[4], args[5], args[6], args[13], args[16] = 16, 16, 32, 2, 1, 32, 16
    g = SynthesizerTrn(*args, version="v2", f0=True).eval()
    sd = {k: v.half() for k, v in g.state_dict().items() if "enc_q" not in k}
    torch.save({"weight": sd, "config": args, "info": "1epoch", "sr": "40k", "f0": 1, "version": "v2"},
               d / "model.pth")
    hc = HubertConfig(conv_layers=[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2, embed_dim=768,
                             ffn_dim=64, heads=12, layers=1, conv_pos=16, conv_pos_groups=16, final_dim=256)
    save_fairseq_checkpoint(HubertModel(hc), d / "hubert.pt")
    t = np.arange(16000) / 16000
    sf.write(d / "in.wav", (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 16000)
    return {"model": d / "model.pth", "embedder": d / "hubert.pt", "input": d / "in.wav"}


def _infer(tiny: dict[str, Path], out: Path, **over: str) -> list[str]:
    args = {"--model": str(tiny["model"]), "--input": str(tiny["input"]), "--output": str(out / "o.wav"),
            "--embedder": str(tiny["embedder"]), "--device": "cpu", **over}
    return ["infer", *[x for kv in args.items() for x in kv]]


def test_infer_cli_model_embedder_rmvpe(tmp_path: Path, tiny_files: dict[str, Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(_infer(tiny_files, tmp_path)) == 0  # the control: the good files convert
    capsys.readouterr()
    cases = [("--model", {}), ("--embedder", {}), ("--rmvpe", {"--f0-method": "rmvpe"})]
    kinds = {**KINDS, "fairseq cfg is the payload": EMBEDDER_KINDS["fairseq cfg is the payload"]}
    for _kind, d, marker, writer in _each_kind(tmp_path, kinds):
        bad = writer(marker, d / "bad.pth")
        for flag, extra in cases:
            code = cli.main(_infer(tiny_files, d, **{flag: str(bad), **extra}))
            err = capsys.readouterr().err
            assert code == 2, (flag, err)
            assert "Traceback" not in err and str(bad) in err and "refused" in err, err
            assert len(err.strip().splitlines()) == 1, err
            assert not marker.exists() and not (d / "o.wav").exists()
