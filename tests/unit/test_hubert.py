"""HuBERT embedder: fairseq-format loading without fairseq, HF equivalence, frame counts, batching."""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from rvc_pipeline import hubert, safeload
from rvc_pipeline.hubert import Embedder, HubertConfig, HubertModel

SMALL_CONV = [(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2  # HuBERT's strides, narrow channels


def small_cfg(**kw: object) -> HubertConfig:
    base: dict[str, object] = dict(
        conv_layers=SMALL_CONV,
        embed_dim=64,
        ffn_dim=128,
        heads=4,
        layers=3,
        conv_pos=16,
        conv_pos_groups=4,
        final_dim=16,
    )
    base.update(kw)
    return HubertConfig(**base)  # type: ignore[arg-type]


def small_model(seed: int = 0, **kw: object) -> HubertModel:
    torch.manual_seed(seed)
    m = HubertModel(small_cfg(**kw)).eval()
    with torch.no_grad():  # non-trivial norms/biases so that a wrong mapping cannot go unnoticed
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name or name.endswith("weight_g"):
                p.add_(0.1 * torch.randn_like(p))
    return m


def speechlike(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    f0 = 120 + 30 * np.sin(2 * np.pi * 1.3 * t)
    x = 0.3 * np.sin(2 * np.pi * np.cumsum(f0) / 16000) + 0.02 * rng.standard_normal(n)
    return (x * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)).astype(np.float32)


def run_alone(m: HubertModel, wav: np.ndarray, version: str) -> torch.Tensor:
    with torch.inference_mode():
        return m(torch.from_numpy(wav)[None], version)[0]  # type: ignore[arg-type]


# ---- fairseq format -------------------------------------------------------------------------


def test_fairseq_checkpoint_loads_through_stub_unpickler(tmp_path: Path) -> None:
    m = small_model()
    path = hubert.save_fairseq_checkpoint(m, tmp_path / "hubert_small.pt")
    # the classes the pickle refers to really are absent now
    for mod in ("omegaconf.dictconfig", "omegaconf.nodes", "fairseq.data.dictionary"):
        with pytest.raises(ImportError):
            importlib.import_module(mod)
        assert mod not in sys.modules
    with zipfile.ZipFile(path) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"omegaconf.dictconfig" in pkl and b"DictConfig" in pkl
    assert b"fairseq.data.dictionary" in pkl and b"Dictionary" in pkl
    with pytest.raises(Exception):  # noqa: B017 - a plain unpickler cannot load it
        torch.load(path, map_location="cpu", weights_only=False)

    state, cfg = hubert.load_fairseq_checkpoint(path)
    assert cfg["model"]["encoder_layers"] == 3
    assert cfg["model"]["encoder_embed_dim"] == 64
    assert cfg["model"]["conv_feature_layers"].startswith("[(32,10,5)]")
    assert cfg["task"]["normalize"] is False
    assert state["mask_emb"].shape == (64,) and state["label_embs_concat"].shape == (504, 16)
    assert state["encoder.pos_conv.0.weight_g"].shape == (1, 1, 16)

    loaded = hubert.hubert_from_fairseq(path)
    assert loaded.cfg.conv_layers == SMALL_CONV and loaded.cfg.layers == 3 and loaded.cfg.final_dim == 16
    wav = speechlike(16000, 1)
    for version in ("v1", "v2"):
        a, b = run_alone(m, wav, version), run_alone(loaded, wav, version)
        assert a.shape == b.shape == (49, 16 if version == "v1" else 64)
        assert torch.allclose(a, b, atol=1e-6), (version, (a - b).abs().max())
    # the embedder front door detects the format
    emb = hubert.load_embedder(path, "cpu", half=True)  # half is ignored on CPU
    assert emb.dtype == torch.float32
    out = emb.extract(wav, "v2")
    assert out[0].dtype == np.float32
    np.testing.assert_allclose(out[0], run_alone(m, wav, "v2").numpy(), atol=1e-5)


def test_fp16_checkpoint_is_cast_to_fp32_and_normalize_is_honoured(tmp_path: Path) -> None:
    m = small_model(1, conv_bias=True)
    path = hubert.save_fairseq_checkpoint(m, tmp_path / "h16.pt", {"task": {"normalize": True}}, fp16=True)
    state, cfg = hubert.load_fairseq_checkpoint(path)
    assert state["post_extract_proj.weight"].dtype == torch.float16
    assert cfg["model"]["conv_bias"] is True and cfg["task"]["normalize"] is True
    loaded = hubert.hubert_from_fairseq(path)
    assert loaded.cfg.normalize is True and loaded.cfg.conv_bias is True
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    # reference: the same fp16-rounded weights, normalize off, waveform layer-normed by hand
    ref = HubertModel(small_cfg(conv_bias=True)).eval()
    ref.load_state_dict({k: v.half().float() for k, v in m.state_dict().items()})
    wav = speechlike(12000, 2) * 0.01  # quiet: the unnormalised conv bias dominates
    normed = ((wav - wav.mean()) / np.sqrt(wav.var() + 1e-5)).astype(np.float32)
    got = run_alone(loaded, wav, "v2")
    assert torch.allclose(run_alone(ref, normed, "v2"), got, atol=1e-5)
    assert (run_alone(ref, wav, "v2") - got).abs().max() > 1e-2  # normalize really changed the input


class _Evil:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):  # type: ignore[override]
        return (Path.touch, (self.target,))


def test_stub_unpickler_never_calls_unknown_callables(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    torch.save({"model": small_model().state_dict(), "cfg": None, "x": _Evil(target)}, tmp_path / "evil.pt")
    # issue 8: a file that needs any Python object outside the allow-list is refused, not stubbed
    with pytest.raises(safeload.UnsafeFile, match=r"evil\.pt: refused: .*'builtins\.getattr'"):
        hubert.load_fairseq_checkpoint(tmp_path / "evil.pt")
    assert not target.exists()


def test_bad_checkpoints_give_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        hubert.load_fairseq_checkpoint(tmp_path / "junk.pt")
    m = small_model()
    path = hubert.save_fairseq_checkpoint(m, tmp_path / "h.pt", {"model": {"encoder_layers": 4}})
    with pytest.raises(ValueError, match=r"h\.pt.*missing \['encoder\.layers\.3"):
        hubert.hubert_from_fairseq(path)
    with pytest.raises(ValueError, match="parse"):
        hubert.parse_conv_layers("[(512,10,5)")
    with pytest.raises(ValueError, match="unsupported"):
        hubert.parse_conv_layers("__import__('os')")
    assert (
        hubert.parse_conv_layers(hubert.HUBERT_BASE_CONV)
        == [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
    )


# ---- Hugging Face ---------------------------------------------------------------------------


def _transformers():
    try:
        import torchaudio  # noqa: F401
    except Exception:  # noqa: BLE001 - a torchaudio that does not load beside CPU torch breaks transformers
        for k in [k for k in sys.modules if k.startswith("torchaudio")]:
            del sys.modules[k]
        mod = types.ModuleType("torchaudio")
        mod.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
        sys.modules["torchaudio"] = mod
    return pytest.importorskip("transformers")


def test_hf_folder_matches_transformers_hidden_states(tmp_path: Path) -> None:
    transformers = _transformers()
    cfg = transformers.HubertConfig(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        conv_dim=[32] * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        do_stable_layer_norm=False,
        feat_extract_norm="group",
        conv_bias=False,
        classifier_proj_size=16,
    )

    class WithFinalProj(transformers.HubertModel):  # the layout of RVC's HF ContentVec
        def __init__(self, config):  # type: ignore[no-untyped-def]
            super().__init__(config)
            self.final_proj = torch.nn.Linear(config.hidden_size, config.classifier_proj_size)

    torch.manual_seed(3)
    hf = WithFinalProj(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    ours = hubert.load_hf_dir(tmp_path / "hf")
    assert ours.cfg.final_dim == 16 and ours.cfg.layers == 3
    wav = torch.from_numpy(np.stack([speechlike(9000, 4), speechlike(9000, 5)]))
    with torch.inference_mode():
        states = hf(wav, output_hidden_states=True).hidden_states
        assert len(states) == 4
        for k in (1, 2, 3):
            o, frames = ours.extract_features(wav, k)
            assert frames == [(9000 - 400) // 320 + 1] * 2 == [o.shape[1]] * 2
            assert torch.allclose(o, states[k], atol=1e-5), (k, (o - states[k]).abs().max())
        v1 = ours(wav, "v1")
        assert torch.allclose(v1, hf.final_proj(states[3]), atol=1e-5)
    # folder without final_proj: v2 works, v1 says why not
    torch.manual_seed(3)
    transformers.HubertModel(cfg).save_pretrained(tmp_path / "plain")
    emb = hubert.load_embedder(tmp_path / "plain", "cpu", False)
    assert emb.extract(speechlike(4000, 6), "v2")[0].shape == (12, 64)
    with pytest.raises(ValueError, match="final_proj"):
        emb.extract(speechlike(4000, 6), "v1")


def test_hf_key_mapping_accepts_legacy_weight_norm_names() -> None:
    assert hubert._hf_key("encoder.pos_conv_embed.conv.weight_g") == "encoder.pos_conv.0.weight_g"
    assert hubert._hf_key("encoder.pos_conv_embed.conv.parametrizations.weight.original1") == (
        "encoder.pos_conv.0.weight_v"
    )
    assert (
        hubert._hf_key("hubert.encoder.layers.5.layer_norm.bias")
        == "encoder.layers.5.self_attn_layer_norm.bias"
    )
    assert hubert._hf_key("feature_extractor.conv_layers.0.layer_norm.weight") == (
        "feature_extractor.conv_layers.0.2.weight"
    )
    assert hubert._hf_key("masked_spec_embed") is None
    assert hubert._hf_key("lm_head.weight") is None
    assert hubert._hf_key("hubert.final_proj.bias") == "final_proj.bias"


# ---- frames, sizes, batching ----------------------------------------------------------------


@pytest.mark.parametrize("n", [400, 719, 720, 1040, 16000, 12345, 59200])
def test_frame_count(n: int) -> None:
    emb = Embedder(small_model(), "cpu")
    expect = (n - 400) // 320 + 1
    assert emb.frames(n) == HubertConfig().frames(n) == expect
    assert emb.extract(speechlike(n, n), "v2")[0].shape == (expect, 64)


def test_too_short_clip_is_rejected() -> None:
    emb = Embedder(small_model(), "cpu")
    with pytest.raises(ValueError, match="clip 1: 399 samples"):
        emb.extract([speechlike(1000, 1), speechlike(399, 2)], "v2")


def test_full_size_hubert_base_shapes() -> None:
    model = HubertModel()
    sd = model.state_dict()
    assert len(sd) == 214 - 2  # the §4.1 inventory less mask_emb and label_embs_concat
    n_params = sum(v.numel() for v in sd.values())
    assert n_params + 768 + 504 * 256 == pytest.approx(94.7e6, rel=0.002)
    expect = {
        "feature_extractor.conv_layers.0.0.weight": (512, 1, 10),
        "feature_extractor.conv_layers.0.2.weight": (512,),
        "feature_extractor.conv_layers.4.0.weight": (512, 512, 3),
        "feature_extractor.conv_layers.6.0.weight": (512, 512, 2),
        "layer_norm.bias": (512,),
        "post_extract_proj.weight": (768, 512),
        "encoder.pos_conv.0.weight_g": (1, 1, 128),
        "encoder.pos_conv.0.weight_v": (768, 48, 128),
        "encoder.layers.11.self_attn.out_proj.weight": (768, 768),
        "encoder.layers.11.fc1.weight": (3072, 768),
        "encoder.layers.0.fc2.weight": (768, 3072),
        "encoder.layers.3.final_layer_norm.weight": (768,),
        "encoder.layer_norm.weight": (768,),
        "final_proj.weight": (256, 768),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(k.startswith("feature_extractor.conv_layers.1.2") for k in sd)
    emb = hubert.random_embedder("cpu", False, seed=0)
    wav = speechlike(8000, 9)
    v1, v2 = emb.extract(wav, "v1")[0], emb.extract(wav, "v2")[0]
    assert v1.shape == (24, 256) and v2.shape == (24, 768)
    assert v1.dtype == v2.dtype == np.float32 and np.isfinite(v2).all()
    assert emb.model.output_layer("v1") == 9 and emb.model.output_layer("v2") == 12
    # the same seed gives the same demo model
    again = hubert.random_embedder("cpu", False, seed=0)
    assert torch.equal(again.model.post_extract_proj.weight, emb.model.post_extract_proj.weight)


@pytest.mark.parametrize("normalize", [False, True])
def test_batched_equals_one_by_one(normalize: bool) -> None:
    m = small_model(5, normalize=normalize)
    emb = Embedder(m, "cpu")
    lengths = [16000, 12345, 20000, 7000, 16000, 401]
    clips = [speechlike(n, i) for i, n in enumerate(lengths)]
    together = emb.extract(clips, "v1")
    chunked = emb.extract(clips, "v1", batch_seconds=1.6)
    for c, a, b in zip(clips, together, chunked):
        alone = run_alone(m, c, "v1").numpy()
        assert a.shape == b.shape == alone.shape == ((len(c) - 400) // 320 + 1, 16)
        np.testing.assert_allclose(a, alone, atol=2e-5)
        np.testing.assert_allclose(b, alone, atol=2e-5)
    # padding a clip with zeros WITHOUT lengths changes the result: the mask is what makes it exact
    padded = np.zeros(20000, np.float32)
    padded[:7000] = clips[3]
    naive = run_alone(m, padded, "v1")[: together[3].shape[0]].numpy()
    assert np.abs(naive - together[3]).max() > 1e-3


def test_batches_by_seconds() -> None:
    assert hubert.batches_by_seconds([16000] * 5, 2.0) == [[0, 1], [2, 3], [4]]
    assert hubert.batches_by_seconds([8000, 8000, 16000, 48000], 2.0) == [[0, 1], [2], [3]]
    assert hubert.batches_by_seconds([1, 2, 3], None) == [[0, 1, 2]]
    assert hubert.batches_by_seconds([], 1.0) == []
