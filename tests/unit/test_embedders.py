"""The embedder registry and loader (rvc_pipeline.components.embedders): one loader for every door,
the same features through a fairseq file and a Hugging Face folder, equal-length batching, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rvc_pipeline.components.embedders import base, fairseq_convert
from rvc_pipeline.components.embedders.base import equal_length_batches, load_embedder
from rvc_pipeline.core import catalog

from tests.support.fairseq_hubert import (
    HubertConfig,
    HubertModel,
    run_alone,
    save_fairseq_checkpoint,
    small_model,
    speechlike,
)


@pytest.fixture(scope="module")
def reference() -> HubertModel:
    return small_model(7, normalize=False)


@pytest.fixture(scope="module")
def fairseq_file(reference: HubertModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_fairseq_checkpoint(reference, tmp_path_factory.mktemp("fs") / "hubert_base.pt", fp16=False)


def write_hf_folder(fairseq_file: Path, d: Path, fmt: str) -> Path:
    """The converted weights as an HF folder (legacy weight_g/weight_v names, final_proj beside the model)."""
    w = fairseq_convert.convert(fairseq_file)
    d.mkdir(parents=True)
    w.config.to_json_file(str(d / "config.json"))
    state = {k if k.startswith("final_proj") else f"hubert.{k}": v.contiguous() for k, v in w.state.items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(d / "model.safetensors"))
    else:
        torch.save(state, d / "pytorch_model.bin")
    return d


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_fairseq_file_and_hf_folder_give_the_reference_features(
    reference: HubertModel, fairseq_file: Path, tmp_path: Path, fmt: str
) -> None:
    folder = write_hf_folder(fairseq_file, tmp_path / "hf", fmt)
    from_file, from_folder = load_embedder(fairseq_file), load_embedder(folder)
    assert type(from_file).__name__ == type(from_folder).__name__ == "HFHubert"
    assert from_file.source == str(fairseq_file) and from_folder.source == str(folder)
    clips = [speechlike(n, i) for i, n in enumerate([16000, 9000, 16000, 401])]
    for version in ("v1", "v2"):
        a, b = from_file.extract(clips, version), from_folder.extract(clips, version)
        for c, x, y in zip(clips, a, b):
            ref = run_alone(reference, c, version).numpy()
            dim = 16 if version == "v1" else 64
            assert x.shape == y.shape == ref.shape == ((len(c) - 400) // 320 + 1, dim)
            np.testing.assert_allclose(x, ref, atol=2e-5)
            np.testing.assert_allclose(y, ref, atol=2e-5)


def test_registry_matches_the_catalog_and_the_loader_picks_by_path(fairseq_file: Path) -> None:
    rnd = load_embedder(None)
    assert set(base.EMBEDDERS) == set(catalog.EMBEDDERS) == {"fairseq_hubert", "hf_hubert", "random"}
    assert catalog.EMBEDDERS["fairseq_hubert"].weights == ("hubert_base.pt",)
    assert all(c.needs_gpu for c in catalog.EMBEDDERS.values())
    assert rnd.source == "random(seed=0)" and rnd.dim("v1") == 256 and rnd.dim("v2") == 768
    assert load_embedder(fairseq_file).dim("v2") == 64


def test_careless_inputs_get_one_line_errors_naming_the_thing(tmp_path: Path, fairseq_file: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.pt does not exist"):
        load_embedder(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"junk\.pt"):
        load_embedder(tmp_path / "junk.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: not a Hugging Face model folder"):
        load_embedder(tmp_path / "empty")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match=r"list: config.json is not an object"):
        load_embedder(tmp_path / "list")
    (tmp_path / "large").mkdir()
    (tmp_path / "large" / "config.json").write_text(json.dumps({"do_stable_layer_norm": True}))
    with pytest.raises(ValueError, match=r"large: do_stable_layer_norm=true"):
        load_embedder(tmp_path / "large")
    emb = load_embedder(fairseq_file)
    with pytest.raises(ValueError, match="version must be 'v1' or 'v2', got 'v3'"):
        emb.extract(speechlike(1000, 1), "v3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"clip 0: expected a 1-D waveform, got shape \(2, 800\)"):
        emb.extract([np.zeros((2, 800), np.float32)], "v2")
    no_proj = save_fairseq_checkpoint(HubertModel(HubertConfig(
        conv_layers=[(8, 10, 5)] + [(8, 3, 2)] * 4 + [(8, 2, 2)] * 2, embed_dim=16, ffn_dim=16, heads=2,
        layers=1, conv_pos=4, conv_pos_groups=2, final_dim=0)), tmp_path / "noproj.pt")
    emb = load_embedder(no_proj)
    assert emb.dim("v1") == 0 and emb.dim("v2") == 16
    with pytest.raises(ValueError, match="v1 features need final_proj"):
        emb.extract(speechlike(1000, 2), "v1")


def test_equal_length_batches_never_pad() -> None:
    assert equal_length_batches([5, 3, 5, 3, 7], None) == [[1, 3], [0, 2], [4]]
    # cut by seconds within one length (2 s cap: two 1-s clips per batch)
    assert equal_length_batches([16000] * 5 + [8000], 2.0) == [[5], [0, 1], [2, 3], [4]]
    assert equal_length_batches([], 1.0) == []
    for batch in equal_length_batches([16000, 9000, 16000, 401, 9000, 16000], 2.0):
        assert len({[16000, 9000, 16000, 401, 9000, 16000][i] for i in batch}) == 1


def test_hf_front_end_on_a_padded_batch_is_not_exact(fairseq_file: Path) -> None:
    """Why batches hold equal lengths only: HF's GroupNorm takes its statistics over the padding."""
    emb = load_embedder(fairseq_file)
    clip = speechlike(7000, 3)
    padded = np.zeros(20000, np.float32)
    padded[:7000] = clip
    alone = emb.extract(clip, "v2")[0]
    naive = emb.extract(padded, "v2")[0][: len(alone)]
    assert np.abs(naive - alone).max() > 1e-3


def test_packed_linear_equals_linear_repacks_and_copies() -> None:
    import copy
    import pickle

    from rvc_pipeline.components.embedders.hf_hubert import PackedLinear, _onednn_linear, pack_linears

    if not _onednn_linear():
        pytest.skip("this torch has no oneDNN packed linear")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.Linear(40, 8, bias=False))
    x = torch.randn(3, 5, 24)
    ref = net(x).detach()
    keys = list(net.state_dict())
    assert pack_linears(net) == 2 and all(isinstance(m, PackedLinear) for m in (net[0], net[2]))
    assert list(net.state_dict()) == keys
    with torch.inference_mode():
        torch.testing.assert_close(net(x), ref, atol=1e-5, rtol=1e-5)
    assert net[0].packed is not None and net[0].packed.is_mkldnn  # the fast path really ran
    with torch.no_grad():
        net[0].weight.mul_(2.0)  # changed in place: packed again, not stale
        changed = net(x)
    assert (changed - ref).abs().max() > 1e-2
    torch.testing.assert_close(net(x), changed, atol=1e-5, rtol=1e-5)  # autograd: plain F.linear
    net(x).sum().backward()
    assert net[0].weight.grad is not None
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert clone[0].packed is None
        with torch.no_grad():
            torch.testing.assert_close(clone(x), changed, atol=1e-5, rtol=1e-5)


def test_batched_extract_equals_a_plain_hf_loop() -> None:
    """Packed linears and the clip-by-clip front end give what HubertModel gives on each clip alone."""
    import transformers
    from rvc_pipeline.components.embedders.hf_hubert import HFHubert, PackedLinear, hf_config

    cfg = hf_config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                    conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    torch.manual_seed(5)
    plain = transformers.HubertModel(cfg).eval()
    torch.manual_seed(5)
    emb = HFHubert(transformers.HubertModel(cfg), None)
    packed = sum(isinstance(m, PackedLinear) for m in emb.model.modules())
    from rvc_pipeline.components.embedders.hf_hubert import _onednn_linear

    assert packed == (2 * 6 + 1 if _onednn_linear() else 0)  # q k v out ffn1 ffn2 per layer + projection
    clips = [speechlike(n, i) for i, n in enumerate([9000, 9000, 5000, 9000, 401])]
    got = emb.extract(clips, "v2", batch_seconds=1.2)
    with torch.no_grad():
        for c, g in zip(clips, got):
            ref = plain(torch.from_numpy(c)[None]).last_hidden_state[0].numpy()
            np.testing.assert_allclose(g, ref, atol=1e-5)
