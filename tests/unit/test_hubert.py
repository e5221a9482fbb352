"""HuBERT embedder: fairseq-format loading without fairseq, HF equivalence, frame counts, batching.

The reference is the pre-issue-9 re-implementation (tests/support/fairseq_hubert.py, fairseq's names);
the package runs transformers.HubertModel, and every result here is checked against the reference."""

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
from rvc_pipeline import safeload
from rvc_pipeline.components.embedders import fairseq_convert, hf_hubert
from rvc_pipeline.components.embedders.base import batches_by_seconds, load_embedder
from rvc_pipeline.components.embedders.hf_hubert import HFHubert
from rvc_pipeline.components.embedders.random import random_embedder

from tests.support.fairseq_hubert import (
    SMALL_CONV,
    HubertConfig,
    HubertModel,
    run_alone,
    save_fairseq_checkpoint,
    small_cfg,
    small_model,
    speechlike,
    to_embedder,
)


def run_new(emb: HFHubert, wav: np.ndarray, version: str) -> torch.Tensor:
    return torch.from_numpy(emb.extract(wav, version)[0])  # type: ignore[arg-type]


# ---- fairseq format -------------------------------------------------------------------------


def test_fairseq_checkpoint_loads_through_stub_unpickler(tmp_path: Path) -> None:
    m = small_model()
    path = save_fairseq_checkpoint(m, tmp_path / "hubert_small.pt")
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

    state, cfg = fairseq_convert.load_fairseq_checkpoint(path)
    assert cfg["model"]["encoder_layers"] == 3
    assert cfg["model"]["encoder_embed_dim"] == 64
    assert cfg["model"]["conv_feature_layers"].startswith("[(32,10,5)]")
    assert cfg["task"]["normalize"] is False
    assert state["mask_emb"].shape == (64,) and state["label_embs_concat"].shape == (504, 16)
    assert state["encoder.pos_conv.0.weight_g"].shape == (1, 1, 16)

    loaded = load_embedder(path)
    assert loaded.kernels == [(k, s) for _, k, s in SMALL_CONV]
    assert loaded.layers == 3 and loaded.dim("v1") == 16
    wav = speechlike(16000, 1)
    for version in ("v1", "v2"):
        a, b = run_alone(m, wav, version), run_new(loaded, wav, version)
        assert a.shape == b.shape == (49, 16 if version == "v1" else 64)
        assert torch.allclose(a, b, atol=1e-6), (version, (a - b).abs().max())
    # the embedder front door detects the format
    emb = load_embedder(path, "cpu")
    assert emb.dtype == torch.float32
    out = emb.extract(wav, "v2")
    assert out[0].dtype == np.float32
    np.testing.assert_allclose(out[0], run_alone(m, wav, "v2").numpy(), atol=1e-5)
    # half on a CPU: bf16 where the CPU has it natively (features.cpuBf16), else fp32; fp32 out either way
    from rvc_pipeline.core.fileio import cpu_bf16_supported

    half = load_embedder(path, "cpu", half=True)
    assert half.dtype == (torch.bfloat16 if cpu_bf16_supported() else torch.float32)
    got, want = half.extract(wav, "v2")[0], out[0]
    assert got.dtype == np.float32
    cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    assert cos.min() > 0.99


def test_fp16_checkpoint_is_cast_to_fp32_and_normalize_is_honoured(tmp_path: Path) -> None:
    m = small_model(1, conv_bias=True)
    path = save_fairseq_checkpoint(m, tmp_path / "h16.pt", {"task": {"normalize": True}}, fp16=True)
    state, cfg = fairseq_convert.load_fairseq_checkpoint(path)
    assert state["post_extract_proj.weight"].dtype == torch.float16
    assert cfg["model"]["conv_bias"] is True and cfg["task"]["normalize"] is True
    loaded = load_embedder(path)
    assert loaded.normalize is True and loaded.model.config.conv_bias is True
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    # reference: the same fp16-rounded weights, normalize off, waveform layer-normed by hand
    ref = HubertModel(small_cfg(conv_bias=True)).eval()
    ref.load_state_dict({k: v.half().float() for k, v in m.state_dict().items()})
    wav = speechlike(12000, 2) * 0.01  # quiet: the unnormalised conv bias dominates
    normed = ((wav - wav.mean()) / np.sqrt(wav.var() + 1e-5)).astype(np.float32)
    got = run_new(loaded, wav, "v2")
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
        fairseq_convert.load_fairseq_checkpoint(tmp_path / "evil.pt")
    assert not target.exists()


def test_bad_checkpoints_give_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        fairseq_convert.load_fairseq_checkpoint(tmp_path / "junk.pt")
    m = small_model()
    path = save_fairseq_checkpoint(m, tmp_path / "h.pt", {"model": {"encoder_layers": 4}})
    with pytest.raises(ValueError, match=r"h\.pt.*missing \['encoder\.layers\.3"):
        load_embedder(path)
    with pytest.raises(ValueError, match="parse"):
        fairseq_convert.parse_conv_layers("[(512,10,5)")
    with pytest.raises(ValueError, match="unsupported"):
        fairseq_convert.parse_conv_layers("__import__('os')")
    assert (
        fairseq_convert.parse_conv_layers(fairseq_convert.HUBERT_BASE_CONV)
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
    ours = load_embedder(tmp_path / "hf")
    assert ours.dim("v1") == 16 and ours.layers == 3
    wav = torch.from_numpy(np.stack([speechlike(9000, 4), speechlike(9000, 5)]))
    with torch.inference_mode():
        states = hf(wav, output_hidden_states=True).hidden_states
        assert len(states) == 4
        for k in (1, 2, 3):
            with hf_hubert._first_layers(ours.model.encoder, k):
                o = ours.model(wav).last_hidden_state
            assert ours.frames(9000) == (9000 - 400) // 320 + 1 == o.shape[1]
            assert torch.allclose(o, states[k], atol=1e-5), (k, (o - states[k]).abs().max())
        v1 = ours.forward(wav, "v1")
        assert torch.allclose(v1, hf.final_proj(states[3]), atol=1e-5)
    # folder without final_proj: v2 works, v1 says why not
    torch.manual_seed(3)
    transformers.HubertModel(cfg).save_pretrained(tmp_path / "plain")
    emb = load_embedder(tmp_path / "plain", "cpu", False)
    assert emb.extract(speechlike(4000, 6), "v2")[0].shape == (12, 64)
    with pytest.raises(ValueError, match="final_proj"):
        emb.extract(speechlike(4000, 6), "v1")


def test_hf_key_mapping_accepts_legacy_weight_norm_names() -> None:
    key = fairseq_convert.hf_key
    assert key("encoder.pos_conv.0.weight_g") == "encoder.pos_conv_embed.conv.weight_g"
    own = {"encoder.pos_conv_embed.conv.parametrizations.weight.original1", "encoder.legacy.conv.weight_g"}
    assert hf_hubert._own_name("encoder.pos_conv_embed.conv.weight_v", own) == (
        "encoder.pos_conv_embed.conv.parametrizations.weight.original1"
    )
    assert hf_hubert._own_name("encoder.legacy.conv.parametrizations.weight.original0", own) == (
        "encoder.legacy.conv.weight_g"
    )
    assert key("encoder.layers.5.self_attn_layer_norm.bias") == "encoder.layers.5.layer_norm.bias"
    assert key("encoder.layers.5.self_attn.q_proj.bias") == "encoder.layers.5.attention.q_proj.bias"
    assert key("encoder.layers.0.fc2.weight") == "encoder.layers.0.feed_forward.output_dense.weight"
    assert key("encoder.layers.3.final_layer_norm.weight") == "encoder.layers.3.final_layer_norm.weight"
    assert key("feature_extractor.conv_layers.0.2.weight") == (
        "feature_extractor.conv_layers.0.layer_norm.weight"
    )
    assert key("feature_extractor.conv_layers.6.0.weight") == "feature_extractor.conv_layers.6.conv.weight"
    assert key("layer_norm.bias") == "feature_projection.layer_norm.bias"
    assert key("post_extract_proj.weight") == "feature_projection.projection.weight"
    assert key("mask_emb") == "masked_spec_embed"
    assert key("label_embs_concat") is None
    assert key("final_proj.bias") == "final_proj.bias"


# ---- frames, sizes, batching ----------------------------------------------------------------


@pytest.mark.parametrize("n", [400, 719, 720, 1040, 16000, 12345, 59200])
def test_frame_count(n: int) -> None:
    emb = to_embedder(small_model())
    expect = (n - 400) // 320 + 1
    assert emb.frames(n) == HubertConfig().frames(n) == expect
    assert emb.extract(speechlike(n, n), "v2")[0].shape == (expect, 64)


def test_too_short_clip_is_rejected() -> None:
    emb = to_embedder(small_model())
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
    # every fairseq key of the full-size model has its place in transformers.HubertModel
    own = set(_transformers().HubertModel(hf_hubert.hf_config()).state_dict())
    mapped = {hf_hubert._own_name(str(fairseq_convert.hf_key(k)), own) for k in sd}
    assert mapped - own == {"final_proj.weight", "final_proj.bias"}
    assert own - mapped == {"masked_spec_embed"}  # mask_emb: dropped from `sd` above, optional in loading
    emb = random_embedder("cpu", False, seed=0)
    wav = speechlike(8000, 9)
    v1, v2 = emb.extract(wav, "v1")[0], emb.extract(wav, "v2")[0]
    assert v1.shape == (24, 256) and v2.shape == (24, 768)
    assert v1.dtype == v2.dtype == np.float32 and np.isfinite(v2).all()
    assert emb.output_layer("v1") == 9 and emb.output_layer("v2") == 12
    # the same seed gives the same demo model, and the caller's RNG is left alone
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = random_embedder("cpu", False, seed=0)
    assert torch.equal(torch.rand(3), expected)
    proj = "feature_projection.projection.weight"
    assert torch.equal(again.model.state_dict()[proj], emb.model.state_dict()[proj])


@pytest.mark.parametrize("normalize", [False, True])
def test_batched_equals_one_by_one(normalize: bool) -> None:
    m = small_model(5, normalize=normalize)
    emb = to_embedder(m)
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
    assert batches_by_seconds([16000] * 5, 2.0) == [[0, 1], [2, 3], [4]]
    assert batches_by_seconds([8000, 8000, 16000, 48000], 2.0) == [[0, 1], [2], [3]]
    assert batches_by_seconds([1, 2, 3], None) == [[0, 1, 2]]
    assert batches_by_seconds([], 1.0) == []
