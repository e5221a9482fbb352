"""Forward/infer shapes, flow invertibility, NSF source, attention, discriminators, configs.

The decoder costs about 1 GMAC per 1000 output samples at RVC's widths, so most structural checks use
the real classes at reduced widths (same rates, kernels, layer layout); the full v2 40k generator and
both full discriminators are exercised once each.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from rvc_pipeline.nn import (
    DiscriminatorP,
    RVCConfig,
    SineGen,
    SourceModuleHnNSF,
    SynthesizerTrn,
    build_discriminator,
    build_generator,
    constructor_args,
    get_config,
)
from rvc_pipeline.nn.attentions import MultiHeadAttention
from rvc_pipeline.nn.commons import rand_slice_segments, slice_segments
from rvc_pipeline.nn.modules import ResidualCouplingBlock
from torch import nn

SEGMENTS = {  # (version, sr) -> (segment samples, hop)
    ("v1", "32k"): (12800, 320), ("v1", "40k"): (12800, 400), ("v1", "48k"): (11520, 480),
    ("v2", "32k"): (12800, 320), ("v2", "40k"): (12800, 400), ("v2", "48k"): (17280, 480),
}
PHONE = {"v1": 256, "v2": 768}


# small convs on a shared 2-core machine run much faster on one intra-op thread
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_generator(version: str, sr: str, f0: bool, seed: int = 0) -> SynthesizerTrn:
    """The real classes with RVC's rates/kernels/layer counts but narrow channels."""
    args = constructor_args(get_config(version, sr))
    args[2], args[3], args[4], args[6] = 16, 16, 32, 2  # inter, hidden, filter, n_layers
    args[13], args[16] = 64, 16  # upsample_initial_channel, gin
    torch.manual_seed(seed)
    return SynthesizerTrn(*args, version=version, f0=f0)


def batch(version: str, spec_channels: int, lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths)
    return {
        "phone": torch.randn(b, t, PHONE[version], generator=gen),
        "lengths": torch.tensor(lengths),
        "pitch": torch.randint(1, 256, (b, t), generator=gen),
        "pitchf": 100.0 + 200.0 * torch.rand(b, t, generator=gen),
        "spec": torch.rand(b, spec_channels, t, generator=gen),
        "sid": torch.zeros(b, dtype=torch.long),
    }


def train_forward(model: SynthesizerTrn, d: dict[str, torch.Tensor]) -> tuple:
    if model.use_f0:
        return model(d["phone"], d["lengths"], d["pitch"], d["pitchf"], d["spec"], d["lengths"], d["sid"])
    return model(d["phone"], d["lengths"], d["spec"], d["lengths"], d["sid"])


def infer(model: SynthesizerTrn, d: dict[str, torch.Tensor], seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    if model.use_f0:
        return model.infer(d["phone"], d["lengths"], d["pitch"], d["pitchf"], d["sid"], generator=gen)
    return model.infer(d["phone"], d["lengths"], d["sid"], generator=gen)


# --- configs -------------------------------------------------------------------------------------

def test_configs_match_rvc_files() -> None:
    c = get_config("v2", "40k")
    assert c is get_config("v1", "40k")  # v2 40k uses v1/40k.json
    assert (c.sampling_rate, c.filter_length, c.win_length, c.hop_length, c.n_mel_channels) == (
        40000, 2048, 2048, 400, 125)
    assert (c.segment_size, c.segment_frames, c.spec_channels) == (12800, 32, 1025)
    c48 = get_config("v2", "48k")
    assert (c48.segment_size, c48.segment_frames, c48.model.upsample_rates) == (17280, 36, (12, 10, 2, 2))
    assert get_config("v1", "48k").segment_frames == 24
    assert get_config("v2", "32k").model.upsample_kernel_sizes == (20, 16, 4, 4)
    assert get_config("v1", "32k").spec_channels == 513
    for (version, sr), (seg, hop) in SEGMENTS.items():
        cfg = get_config(version, sr)
        assert (cfg.segment_size, cfg.hop_length) == (seg, hop)
        assert math.prod(cfg.model.upsample_rates) == hop
    assert get_config("v2", 48000) is c48


def test_config_json_structure_round_trip() -> None:
    j = get_config("v2", "48k").to_json()
    assert list(j) == ["train", "data", "model"]
    assert list(j["train"])[:3] == ["log_interval", "seed", "epochs"]
    assert j["train"]["betas"] == [0.8, 0.99] and j["train"]["lr_decay"] == 0.999875
    assert j["train"]["c_mel"] == 45 and j["train"]["fp16_run"] is True and j["train"]["eps"] == 1e-9
    assert j["data"]["mel_fmax"] is None and j["data"]["max_wav_value"] == 32768.0
    assert j["model"]["resblock_dilation_sizes"] == [[1, 3, 5]] * 3
    assert j["model"]["upsample_rates"] == [12, 10, 2, 2] and j["model"]["spk_embed_dim"] == 109
    text = json.dumps(j)
    back = RVCConfig.from_json(json.loads(text))
    assert back == get_config("v2", "48k")
    assert back.replace_train(batch_size=8).train.batch_size == 8


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="sample rate"):
        get_config("v2", "44k")
    with pytest.raises(ValueError, match="version"):
        get_config("v3", "40k")
    bad = get_config("v2", "40k").to_json()
    bad["data"]["hop_length"] = 512
    with pytest.raises(ValueError, match="hop_length"):
        RVCConfig.from_json(bad)
    with pytest.raises(ValueError, match="missing section"):
        RVCConfig.from_json({"train": {}, "data": {}})


# --- generator shapes -----------------------------------------------------------------------------

@pytest.mark.parametrize("version,sr", sorted(SEGMENTS))
def test_training_forward_and_infer_shapes(version: str, sr: str) -> None:
    seg, hop = SEGMENTS[(version, sr)]
    frames = seg // hop
    model = small_generator(version, sr, f0=True)
    lengths = [frames + 7, frames + 2]
    d = batch(version, model.spec_channels, lengths)
    o, ids, x_mask, y_mask, (z, z_p, m_p, logs_p, m_q, logs_q) = train_forward(model, d)
    assert o.shape == (2, 1, seg)
    assert ids.dtype == torch.long and ids.shape == (2,)
    assert all(0 <= int(i) <= n - frames for i, n in zip(ids, lengths))
    t = max(lengths)
    assert x_mask.shape == y_mask.shape == (2, 1, t)
    assert float(x_mask[1, 0, lengths[1]:].abs().sum()) == 0.0
    for a in (z, z_p, m_p, logs_p, m_q, logs_q):
        assert a.shape == (2, 16, t)
    assert float(z[1, :, lengths[1]:].detach().abs().sum()) == 0.0
    assert float(o.detach().min()) >= -1.0 and float(o.detach().max()) <= 1.0  # tanh output

    model.eval()
    d1 = batch(version, model.spec_channels, [5])
    audio, mask, (z, z_p, m_p, logs_p) = infer(model, d1)
    assert audio.shape == (1, 1, 5 * hop)
    assert z.shape == z_p.shape == (1, 16, 5) and mask.shape == (1, 1, 5)


@pytest.mark.parametrize("version,sr", [("v1", "48k"), ("v2", "32k")])
def test_no_f0_variants(version: str, sr: str) -> None:
    seg, hop = SEGMENTS[(version, sr)]
    model = small_generator(version, sr, f0=False)
    assert not hasattr(model.enc_p, "emb_pitch") and not hasattr(model.dec, "m_source")
    d = batch(version, model.spec_channels, [seg // hop + 3])
    o = train_forward(model, d)[0]
    assert o.shape == (1, 1, seg)
    model.eval()
    audio = infer(model, batch(version, model.spec_channels, [4]))[0]
    assert audio.shape == (1, 1, 4 * hop)
    with pytest.raises(TypeError, match="without f0"):
        model.infer(d["phone"], d["lengths"], d["pitch"], d["pitchf"], d["sid"])
    f0_model = small_generator(version, sr, f0=True)
    with pytest.raises(TypeError, match="pitch"):
        f0_model.infer(d["phone"], d["lengths"], d["sid"])


def test_full_v2_40k_generator_forward_and_infer() -> None:
    torch.manual_seed(0)
    model = build_generator(get_config("v2", "40k"), "v2", True)
    d = batch("v2", 1025, [34])
    o, ids, *_ = train_forward(model, d)
    assert o.shape == (1, 1, 12800) and 0 <= int(ids[0]) <= 2
    assert torch.isfinite(o).all() and float(o.detach().std()) > 0
    model.eval()
    d3 = batch("v2", 1025, [3])
    audio = infer(model, d3)[0]
    assert audio.shape == (1, 1, 1200)
    again = infer(model, d3)[0]
    assert torch.equal(audio, again)  # fixed generator: same prior and NSF noise
    model.remove_weight_norm()
    assert not any(k.endswith("weight_g") for k in model.state_dict())
    assert torch.allclose(infer(model, d3)[0], audio, atol=1e-5)


def test_training_step_gradients_reach_every_part() -> None:
    model = small_generator("v2", "40k", f0=True)
    d = batch("v2", model.spec_channels, [36, 33])
    o, _, _, _, (z, z_p, m_p, logs_p, m_q, logs_q) = train_forward(model, d)
    loss = o.abs().mean() + (z_p - m_p).pow(2).mean() + logs_q.mean()
    loss.backward()
    for prefix in ("enc_p.", "enc_q.", "flow.", "dec.", "emb_g."):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
        assert grads and any(g is not None and float(g.abs().sum()) > 0 for g in grads), prefix
    assert model.dec.m_source.l_linear.weight.grad is not None


def test_determinism_under_seed() -> None:
    model = small_generator("v1", "40k", f0=True)
    d = batch("v1", model.spec_channels, [40, 36])
    torch.manual_seed(1234)
    a = train_forward(model, d)
    torch.manual_seed(1234)
    b = train_forward(model, d)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[4][0], b[4][0])
    torch.manual_seed(99)
    c = train_forward(model, d)
    assert not torch.equal(a[4][0], c[4][0])  # posterior sample differs
    model.eval()
    d1 = batch("v1", model.spec_channels, [6])
    assert torch.equal(infer(model, d1, seed=5)[0], infer(model, d1, seed=5)[0])
    assert not torch.equal(infer(model, d1, seed=5)[0], infer(model, d1, seed=6)[0])


def test_slice_segments() -> None:
    x = torch.arange(2 * 3 * 10, dtype=torch.float32).view(2, 3, 10)
    out = slice_segments(x, torch.tensor([2, 5]), 4)
    assert torch.equal(out[0], x[0, :, 2:6]) and torch.equal(out[1], x[1, :, 5:9])
    f = torch.arange(20, dtype=torch.float32).view(2, 10)
    assert torch.equal(slice_segments(f, torch.tensor([0, 6]), 4), torch.stack([f[0, 0:4], f[1, 6:10]]))
    # past the end: zero-padded instead of failing
    assert torch.equal(slice_segments(f, torch.tensor([8, 0]), 4)[0], torch.tensor([8.0, 9.0, 0.0, 0.0]))
    torch.manual_seed(0)
    seg, ids = rand_slice_segments(x, torch.tensor([10, 6]), 4)
    assert 0 <= int(ids[0]) <= 6 and 0 <= int(ids[1]) <= 2
    assert torch.equal(seg[1], x[1, :, int(ids[1]):int(ids[1]) + 4])


# --- flow -----------------------------------------------------------------------------------------

def test_flow_reverse_inverts_forward() -> None:
    torch.manual_seed(0)
    flow = ResidualCouplingBlock(192, 192, 5, 1, 3, gin_channels=256)
    with torch.no_grad():  # post convs start at zero (identity coupling); make the test non-trivial
        for i in range(0, 8, 2):
            flow.flows[i].post.weight.normal_(0.0, 0.05)
            flow.flows[i].post.bias.normal_(0.0, 0.05)
    lengths = torch.tensor([20, 13])
    mask = (torch.arange(20).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(1).float()
    z = torch.randn(2, 192, 20) * mask
    g = torch.randn(2, 256, 1)
    z_p = flow(z, mask, g=g)
    assert z_p.shape == z.shape
    assert float((z_p - torch.flip(z, [1])).abs().max()) > 1e-2  # couplings changed something
    back = flow(z_p, mask, g=g, reverse=True)
    assert torch.allclose(back, z, atol=1e-5)
    assert float(z_p[1, :, 13:].abs().max()) == 0.0


# --- attention ------------------------------------------------------------------------------------

def reference_attention(attn: MultiHeadAttention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """VITS relative attention written out with loops (relative distance j - i within the window)."""
    b, c, t = x.shape
    h, d, w = attn.n_heads, attn.k_channels, attn.window_size
    q = attn.conv_q(x).view(b, h, d, t)
    k = attn.conv_k(x).view(b, h, d, t)
    v = attn.conv_v(x).view(b, h, d, t)
    ek, ev = attn.emb_rel_k[0], attn.emb_rel_v[0]
    out = torch.zeros(b, h, d, t)
    for bi in range(b):
        for hi in range(h):
            scores = torch.zeros(t, t)
            for i in range(t):
                for j in range(t):
                    qi = q[bi, hi, :, i] / math.sqrt(d)
                    s = qi @ k[bi, hi, :, j]
                    if abs(j - i) <= w:
                        s = s + qi @ ek[j - i + w]
                    scores[i, j] = s if mask[bi, 0, j] > 0 and mask[bi, 0, i] > 0 else -1e4
            p = torch.softmax(scores, dim=-1)
            for i in range(t):
                acc = torch.zeros(d)
                for j in range(t):
                    acc = acc + p[i, j] * v[bi, hi, :, j]
                    if abs(j - i) <= w:
                        acc = acc + p[i, j] * ev[j - i + w]
                out[bi, hi, :, i] = acc
    return attn.conv_o(out.reshape(b, h * d, t))


@pytest.mark.parametrize("t,window", [(6, 10), (15, 10), (9, 2)])
def test_relative_attention_matches_reference(t: int, window: int) -> None:
    torch.manual_seed(0)
    attn = MultiHeadAttention(8, 8, 2, window_size=window).eval()
    assert attn.emb_rel_k.shape == (1, 2 * window + 1, 4)
    x = torch.randn(2, 8, t)
    lengths = torch.tensor([t, t - 2])
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(1).float()
    attn_mask = mask.unsqueeze(2) * mask.unsqueeze(-1)
    with torch.no_grad():
        ours = attn(x, attn_mask)
        ref = reference_attention(attn, x, mask)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_text_encoder_padding_does_not_leak() -> None:
    model = small_generator("v2", "40k", f0=True).eval()
    d = batch("v2", model.spec_channels, [12, 7])
    with torch.no_grad():
        m_p, logs_p, mask = model.enc_p(d["phone"], d["pitch"], d["lengths"])
        m1, l1, _ = model.enc_p(d["phone"][1:, :7], d["pitch"][1:, :7], torch.tensor([7]))
    assert torch.allclose(m_p[1:, :, :7], m1, atol=1e-5) and torch.allclose(logs_p[1:, :, :7], l1, atol=1e-5)
    assert float(m_p[1, :, 7:].abs().max()) == 0.0


# --- NSF source -----------------------------------------------------------------------------------

def test_sine_source_frequency_and_phase() -> None:
    sr, upp, f0 = 40000, 400, 220.0
    gen = SineGen(sr, noise_std=0.0)
    f = torch.full((1, 100), f0)  # 1 s
    sine, uv, noise = gen(f, upp)
    assert sine.shape == (1, 40000, 1) and uv.shape == (1, 40000, 1) and float(uv.min()) == 1.0
    n = np.arange(40000, dtype=np.float64)
    expected = 0.1 * np.sin(2 * np.pi * ((f0 * (n + 1) / sr) % 1.0))  # phase f0*(n+1)/sr from 0
    assert np.max(np.abs(sine[0, :, 0].numpy() - expected)) < 1e-5
    spec = np.abs(np.fft.rfft(sine[0, :, 0].numpy() * np.hanning(40000)))
    peak_hz = np.argmax(spec) * sr / 40000
    assert abs(peak_hz - f0) <= 1.0


def test_sine_phase_stays_exact_for_long_inputs() -> None:
    sr, upp, f0 = 48000, 480, 441.37
    frames = 6000  # 60 s
    sine, _, _ = SineGen(sr, noise_std=0.0)(torch.full((1, frames), f0), upp)
    n = np.arange(frames * upp - 4800, frames * upp, dtype=np.float64)  # the last 0.1 s
    f0_32 = float(np.float32(f0))  # the model sees the float32 value
    expected = 0.1 * np.sin(2 * np.pi * ((f0_32 * (n + 1) / sr) % 1.0))
    assert np.max(np.abs(sine[0, -4800:, 0].numpy() - expected)) < 1e-5
    # a plain float32 cumulative sum over samples drifts by far more than that
    naive = torch.cumsum(torch.full((frames * upp,), f0 / sr, dtype=torch.float32), 0)[-4800:]
    drift = np.max(np.abs(0.1 * np.sin(2 * np.pi * naive.double().numpy()) - expected))
    assert drift > 1e-3


def test_sine_source_voicing_noise_and_harmonics() -> None:
    torch.manual_seed(0)
    gen = SineGen(40000)
    sine, uv, noise = gen(torch.zeros(1, 50), 400)  # unvoiced: noise only, std 0.1/3
    assert float(uv.max()) == 0.0
    assert abs(float(sine.std()) - 0.1 / 3) < 0.003
    f = torch.full((1, 50), 300.0)
    voiced, _, noise = gen(f, 400)
    assert abs(float(noise.std()) - 0.003) < 3e-4
    clean, _, _ = SineGen(40000, noise_std=0.0)(f, 400)
    assert torch.allclose(voiced - noise, clean, atol=1e-6)
    # mixed voicing changes per frame (nearest upsampling of uv)
    mixed = torch.tensor([[0.0, 200.0, 200.0, 0.0]])
    _, uv, _ = gen(mixed, 400)
    assert uv[0, :400].sum() == 0 and uv[0, 400:1200].sum() == 800 and uv[0, 1200:].sum() == 0
    # overtones: peaks at f, 2f, 3f
    h, _, _ = SineGen(40000, harmonic_num=2, noise_std=0.0).eval()(torch.full((1, 100), 200.0), 400)
    assert h.shape == (1, 40000, 3)
    for i in range(3):
        spec = np.abs(np.fft.rfft(h[0, :, i].numpy()))
        assert abs(np.argmax(spec) * 40000 / 40000 - 200.0 * (i + 1)) <= 1.0
    src = SourceModuleHnNSF(40000)
    with torch.no_grad():
        out = src(f, 400)
    assert out.shape == (1, 20000, 1) and float(out.abs().max()) < 1.0


@pytest.mark.parametrize("harmonic_num,batch,train", [(0, 1, True), (0, 2, False), (2, 2, True)])
def test_sine_source_same_seed_same_audio_as_rvc(harmonic_num: int, batch: int, train: bool) -> None:
    """RVC draws the overtones' initial phase (U[0,1) of [1, 1, dim]) before the noise, even with one
    harmonic: consuming that draw makes a seed give RVC's noise, sample for sample."""
    from tests.support.rvc_port import sine_gen

    sr, upp = 40000, 400
    t = torch.arange(60, dtype=torch.float32)
    f0 = torch.stack([110.0 + 90.0 * torch.sin(t / (7.0 + b)) ** 2 for b in range(batch)])
    f0[:, 20:27] = 0.0  # an unvoiced stretch
    gen = SineGen(sr, harmonic_num).train(train)
    torch.manual_seed(1234)
    ours, uv, noise = gen(f0, upp)
    torch.manual_seed(1234)
    want, want_uv, want_noise = sine_gen(f0, upp, sr, harmonic_num)
    assert torch.equal(uv, want_uv) and torch.equal(noise, want_noise)
    assert float((ours - want).abs().max()) < 1e-5  # the sines agree up to float32 phase rounding
    # an explicit generator seeded alike draws the same numbers
    _, _, noise_g = gen(f0, upp, torch.Generator().manual_seed(1234))
    assert torch.equal(noise_g, want_noise)


def test_sine_source_runs_in_fp32_under_autocast() -> None:
    gen = SineGen(40000, noise_std=0.0)
    f = torch.full((1, 10), 220.0)
    ref, _, _ = gen(f, 400)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _, _ = gen(f, 400)
    assert out.dtype == torch.float32 and torch.equal(out, ref)


# --- discriminators -------------------------------------------------------------------------------

@pytest.mark.parametrize("version,n", [("v1", 7), ("v2", 9)])
def test_discriminator_outputs(version: str, n: int) -> None:
    torch.manual_seed(0)
    d = build_discriminator(version)
    t = 2999  # not a multiple of any period: reflect padding
    y = torch.randn(2, 1, t) * 0.1
    y_hat = torch.randn(2, 1, t) * 0.1
    real, fake, fr, ff = d(y, y_hat)
    assert len(real) == len(fake) == len(fr) == len(ff) == n
    assert [len(f) for f in fr] == [7] + [6] * (n - 1)
    assert [len(f) for f in ff] == [7] + [6] * (n - 1)
    assert fr[0][0].shape == (2, 16, t)
    for i, p in enumerate(d.periods, start=1):
        rows = math.ceil(t / p)
        assert fr[i][0].shape == (2, 32, (rows - 1) // 3 + 1, p)
        assert fr[i][-1].shape[1] == 1 and real[i].shape == (2, fr[i][-1][0].numel())
    # one batched pass equals separate passes
    sub = d.discriminators[2]
    with torch.no_grad():
        lr, fm = sub(y_hat)
    assert torch.allclose(fake[2], lr, atol=1e-5) and torch.allclose(ff[2][3], fm[3], atol=1e-5)
    with pytest.raises(ValueError, match="differ"):
        d(y, y_hat[..., :-1])


def test_discriminator_p_gradients() -> None:
    torch.manual_seed(0)
    d = DiscriminatorP(3)
    y = torch.randn(1, 1, 600, requires_grad=True)
    logits, fmap = d(y)
    (logits.pow(2).mean() + sum(f.abs().mean() for f in fmap)).backward()
    assert y.grad is not None and float(y.grad.abs().sum()) > 0
    assert all(isinstance(m, nn.Module) for m in d.convs)
