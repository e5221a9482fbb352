"""RVC small-model export/load (reference §8.5, §11) and architecture recognition."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from rvc_pipeline.export import ModelFileError, export_small_model, load_small_model
from rvc_pipeline.nn import (
    SynthesizerTrn,
    build_generator,
    check_compatible,
    describe_state_dict,
    discriminator_shapes,
    generator_shapes,
    get_config,
    to_parametrization_names,
)

CFG = get_config("v2", "40k")
ALL_GENERATORS = [(v, sr, f0) for v in ("v1", "v2") for sr in ("32k", "40k", "48k") for f0 in (True, False)]


# small convs on a shared 2-core machine run much faster on one intra-op thread
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> SynthesizerTrn:
    torch.manual_seed(0)
    g = build_generator(CFG, "v2", True)
    with torch.no_grad():  # non-zero flow post convs, so the flow matters for the comparison
        for i in range(0, 8, 2):
            g.flow.flows[i].post.weight.normal_(0.0, 0.02)
    return g.eval()


@pytest.fixture(scope="module")
def exported(model: SynthesizerTrn, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("export") / "voice.pth"
    summary = export_small_model(model.state_dict(), CFG, "v2", True, path, "20epoch")
    assert summary["tensors"] == 457 and summary["params"] == 27_537_346
    return path


def zeros_state_dict(version: str, sr: str, f0: bool, enc_q: bool = True) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(s, dtype=torch.float16) for k, s in generator_shapes(version, sr, f0).items()
            if enc_q or not k.startswith("enc_q.")}


def meta_state_dict(shapes: dict[str, tuple[int, ...]], drop_enc_q: bool = False) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()
            if not (drop_enc_q and k.startswith("enc_q."))}


def run_infer(net: SynthesizerTrn) -> torch.Tensor:
    data = torch.Generator().manual_seed(1)
    t = 3
    phone = torch.randn(1, t, 768, generator=data)
    pitch = torch.randint(1, 256, (1, t), generator=data)
    nsff0 = torch.tensor([[0.0, 150.0, 210.0]])
    return net.infer(phone, torch.tensor([t]), pitch, nsff0, torch.tensor([0]),
                     generator=torch.Generator().manual_seed(42))[0]


def test_export_has_exactly_rvcs_keys_and_types(model: SynthesizerTrn, exported: Path) -> None:
    ckpt = torch.load(exported, map_location="cpu", weights_only=True)
    assert isinstance(ckpt, OrderedDict)
    assert list(ckpt) == ["weight", "config", "info", "sr", "f0", "version"]
    weight = ckpt["weight"]
    assert len(weight) == 457 and sum(v.numel() for v in weight.values()) == 27_537_346
    assert not any("enc_q" in k for k in weight)
    assert all(v.dtype == torch.float16 for v in weight.values())
    assert list(weight) == [k for k in model.state_dict() if "enc_q" not in k]
    assert torch.equal(weight["dec.ups.0.weight_v"], model.state_dict()["dec.ups.0.weight_v"].half())
    assert ckpt["config"] == [1025, 32, 192, 192, 768, 2, 6, 3, 0, "1", [3, 7, 11],
                              [[1, 3, 5], [1, 3, 5], [1, 3, 5]], [10, 10, 2, 2], 512, [16, 16, 4, 4], 109,
                              256, 40000]
    assert len(ckpt["config"]) == 18 and type(ckpt["config"][-1]) is int
    assert ckpt["info"] == "20epoch"
    assert ckpt["sr"] == "40k" and ckpt["f0"] == 1 and type(ckpt["f0"]) is int and ckpt["version"] == "v2"


def test_load_reproduces_the_models_inference(model: SynthesizerTrn, exported: Path) -> None:
    net, meta = load_small_model(exported)
    assert net.enc_q is None and not net.training
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert meta["version"] == "v2" and meta["f0"] is True and meta["sr"] == 40000 and meta["sr_name"] == "40k"
    assert meta["info"] == "20epoch" and meta["format"] == "rvc" and meta["spk_embed_dim"] == 109
    ref = run_infer(model)
    out = run_infer(net)
    assert out.shape == ref.shape == (1, 1, 1200)
    # fp16 storage: close to the fp32 model ...
    assert float((out - ref).abs().max()) < 2e-2
    assert float(torch.corrcoef(torch.stack([out.flatten(), ref.flatten()]))[0, 1]) > 0.999
    # ... and identical to the fp32 model with fp16-rounded weights
    rounded = {k: v.half().float() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    twin = build_generator(CFG, "v2", True).eval()
    twin.load_state_dict(rounded)
    assert torch.allclose(run_infer(twin), out, atol=1e-5)


def test_applio_variant_loads(exported: Path, tmp_path: Path) -> None:
    ckpt = torch.load(exported, map_location="cpu", weights_only=True)
    applio = OrderedDict(
        weight=ckpt["weight"], config=ckpt["config"], version="v2", sr=40000, f0=True, info="20epoch",
        epoch=20, step=400, creation_date="2026-08-01T12:00:00", model_hash="ab" * 32, dataset_length=103,
        model_name="voice", author="me", embedder_model="contentvec", speakers_id=1, vocoder="HiFi-GAN",
    )
    path = tmp_path / "voice_20e_400s.pth"
    torch.save(applio, path)
    net, meta = load_small_model(path)
    assert meta["format"] == "applio" and meta["sr"] == 40000 and meta["f0"] is True
    assert meta["extra"]["epoch"] == 20 and meta["extra"]["model_name"] == "voice"
    ref, _ = load_small_model(exported)
    assert torch.equal(run_infer(net), run_infer(ref))

    # old files without 'version'/'f0': read from the weights (emb_phone 768-d, emb_pitch present)
    bare = OrderedDict(weight=ckpt["weight"], config=ckpt["config"], info="x", sr="40k")
    torch.save(bare, tmp_path / "old.pth")
    _, meta = load_small_model(tmp_path / "old.pth")
    assert meta["version"] == "v2" and meta["f0"] is True

    with pytest.raises(ModelFileError, match="vocoder 'RefineGAN'"):
        torch.save(OrderedDict(applio, vocoder="RefineGAN"), tmp_path / "refine.pth")
        load_small_model(tmp_path / "refine.pth")


def test_export_extra_keys(model: SynthesizerTrn, tmp_path: Path) -> None:
    extra = {"epoch": 3, "step": 12, "model_name": "voice", "dataset_length": 10}
    export_small_model(model.state_dict(), CFG, "v2", True, tmp_path / "e.pth", "3epoch", extra=extra)
    ckpt = torch.load(tmp_path / "e.pth", weights_only=True)
    assert list(ckpt)[:6] == ["weight", "config", "info", "sr", "f0", "version"]
    assert {k: ckpt[k] for k in extra} == extra
    with pytest.raises(ValueError, match="override"):
        export_small_model(model.state_dict(), CFG, "v2", True, tmp_path / "x.pth", "1epoch", extra={"sr": 1})
    # torch's parametrization spelling is written back with RVC's names
    export_small_model(to_parametrization_names(model.state_dict()), CFG, "v2", True, tmp_path / "p.pth", "p")
    assert list(torch.load(tmp_path / "p.pth", weights_only=True)["weight"]) == list(ckpt["weight"])


def test_wrong_files_give_clear_errors(exported: Path, tmp_path: Path) -> None:
    ckpt = torch.load(exported, map_location="cpu", weights_only=True)
    # contradicting fields
    torch.save(OrderedDict(ckpt, version="v1"), tmp_path / "liar.pth")
    with pytest.raises(ModelFileError, match=r"liar\.pth.*'version' says v1 but the weights are v2"):
        load_small_model(tmp_path / "liar.pth")
    torch.save(OrderedDict(ckpt, f0=0), tmp_path / "nof0.pth")
    with pytest.raises(ModelFileError, match="'f0' says 0"):
        load_small_model(tmp_path / "nof0.pth")
    # weights of another architecture (v1 48k) under a 40k config
    other = zeros_state_dict("v1", "48k", True, enc_q=False)
    torch.save(OrderedDict(ckpt, weight=other, version="v1"), tmp_path / "mixed.pth")
    with pytest.raises(ModelFileError) as err:
        load_small_model(tmp_path / "mixed.pth")
    msg = str(err.value)
    assert "mixed.pth" in msg and "v1 48k" in msg and "dec.ups.4" in msg and "mismatched" in msg
    # a training checkpoint, and not a model at all
    torch.save({"model": {}, "iteration": 3}, tmp_path / "G_300.pth")
    with pytest.raises(ModelFileError, match="training checkpoint"):
        load_small_model(tmp_path / "G_300.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a zip")
    with pytest.raises(ModelFileError, match=r"junk\.pth: cannot be read"):
        load_small_model(tmp_path / "junk.pth")
    with pytest.raises(ModelFileError, match="no such file"):
        load_small_model(tmp_path / "missing.pth")


def test_export_refuses_another_architecture(tmp_path: Path) -> None:
    sd = zeros_state_dict("v1", "48k", True)
    with pytest.raises(ValueError, match=r"looks like a v1 48k generator with f0 .*but the spec says v2 40k"):
        export_small_model(sd, CFG, "v2", True, tmp_path / "bad.pth", "1epoch")
    assert not (tmp_path / "bad.pth").exists()


def test_check_compatible_messages() -> None:
    sd = meta_state_dict(generator_shapes("v1", "48k", True))
    with pytest.raises(ValueError) as err:
        check_compatible(sd, "v2", "40k", True, "pretrained G f0G40k.pth")
    msg = str(err.value)
    assert msg.startswith("pretrained G f0G40k.pth: looks like a v1 48k generator with f0 (emb_phone 256-d, "
                          "5 upsampling stages")
    assert "but the spec says v2 40k generator with f0" in msg
    assert "enc_p.emb_phone.weight [192, 256] (expected [192, 768])" in msg and "dec.ups.4" in msg

    ok = meta_state_dict(generator_shapes("v2", "40k", True))
    info = check_compatible(ok, "v2", 40000, True, "G")
    assert info["exact"] and info["sr"] == "40k"
    check_compatible({"model": to_parametrization_names(ok)}, "v2", "40k", True, "G checkpoint")
    with pytest.raises(ValueError, match="without f0"):
        check_compatible(ok, "v2", "40k", False, "G")
    with pytest.raises(ValueError, match="missing key"):
        check_compatible(meta_state_dict(generator_shapes("v2", "40k", True), drop_enc_q=True),
                         "v2", "40k", True, "G")
    check_compatible(meta_state_dict(generator_shapes("v2", "40k", True), drop_enc_q=True), "v2", "40k",
                     True, "G", allow_missing_enc_q=True)
    with pytest.raises(ValueError, match=r"emb_g.weight \[109, 256\] \(expected \[1, 256\]\)"):
        check_compatible(ok, "v2", "40k", True, "G", spk_embed_dim=1)
    d2 = meta_state_dict(discriminator_shapes("v2"))
    check_compatible(d2, "v2", "40k", True, "D")
    with pytest.raises(ValueError, match="D: looks like a v2 discriminator .*spec says v1 discriminator"):
        check_compatible(d2, "v1", "40k", True, "D")
    with pytest.raises(ValueError, match="expected a v2 40k generator"):
        check_compatible(d2, "v2", "40k", True, "G", kind="G")


@pytest.mark.parametrize("version,sr,f0", ALL_GENERATORS)
def test_describe_identifies_every_generator(version: str, sr: str, f0: bool) -> None:
    shapes = generator_shapes(version, sr, f0)
    info = describe_state_dict(meta_state_dict(shapes))
    assert info["kind"] == "generator" and info["exact"]
    assert (info["version"], info["sr"], info["f0"]) == (version, sr, f0)
    assert info["has_enc_q"] and info["spk_embed_dim"] == 109
    assert info["n_upsamples"] == len(get_config(version, sr).model.upsample_rates)
    # exported form (no enc_q): unique except v1 32k/48k without f0, whose decoders are identical
    small = describe_state_dict({"weight": meta_state_dict(shapes, drop_enc_q=True)})
    assert (small["version"], small["f0"], small["exact"], small["has_enc_q"]) == (version, f0, True, False)
    if version == "v1" and not f0 and sr in ("32k", "48k"):
        assert small["sr"] is None and small["sr_candidates"] == ["32k", "48k"]
    else:
        assert small["sr"] == sr
    # weight-norm spellings do not matter
    param = describe_state_dict(to_parametrization_names(meta_state_dict(shapes)))
    assert (param["version"], param["sr"], param["f0"]) == (version, sr, f0)


def test_describe_discriminators_and_folded_weights(model: SynthesizerTrn) -> None:
    for v, n in (("v1", 7), ("v2", 9)):
        info = describe_state_dict(meta_state_dict(discriminator_shapes(v)))
        assert (info["kind"], info["version"], info["n_discriminators"], info["exact"]) == (
            "discriminator", v, n, True)
    folded = {k[: -len("_v")] if k.endswith("weight_v") else k: torch.empty(s, device="meta")
              for k, s in generator_shapes("v2", "48k", True).items() if not k.endswith("weight_g")}
    assert "dec.ups.0.weight" in folded
    info = describe_state_dict(folded)
    assert (info["version"], info["sr"], info["f0"], info["exact"]) == ("v2", "48k", True, True)
    assert describe_state_dict({"foo": torch.zeros(1)})["kind"] == "unknown"
