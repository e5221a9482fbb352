"""The training iteration `gan_step` against RVC's recipe written out plainly with the same modules.

gan_step freezes D's parameters during G's discriminator pass and batches real and fake audio in D's
own step; RVC runs D on real and fake separately and lets G's backward also fill D's gradients (which
optim_d.zero_grad() then discards). Same losses, same G gradients, same D gradients for D's update.
"""

from __future__ import annotations

import pytest
import torch
from rvc_pipeline.losses import discriminator_loss, feature_loss, generator_loss, kl_loss, mel_loss
from rvc_pipeline.nn import MultiPeriodDiscriminator, RVCConfig, build_generator, get_config
from rvc_pipeline.steps.train.trainer import GanStep, _generate, gan_step, optimizer_flags

SEED = 7


def small_config() -> RVCConfig:
    """v2 40k with a narrow generator and a 4-frame segment."""
    j = get_config("v2", "40k").to_json()
    j["model"].update(inter_channels=8, hidden_channels=8, filter_channels=16, n_layers=1,
                      resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3, 5]],
                      upsample_initial_channel=16, gin_channels=8)
    j["train"]["segment_size"] = 1600
    return RVCConfig.from_json(j)


def batch(cfg: RVCConfig, b: int = 2, frames: int = 12) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    pitchf = 100 + 150 * torch.rand(b, frames, generator=g)
    lengths = torch.tensor([frames, frames - 3])
    return (torch.randn(b, frames, 768, generator=g), lengths, (pitchf / 2).long().clamp(1, 255), pitchf,
            torch.rand(b, cfg.spec_channels, frames, generator=g),
            lengths, 0.1 * torch.randn(b, 1, frames * cfg.hop_length, generator=g), lengths * cfg.hop_length,
            torch.zeros(b, dtype=torch.long))


def rvc_recipe(st: GanStep, data: tuple[torch.Tensor, ...]) -> tuple[list[float], dict[str, torch.Tensor]]:
    """RVC's train.py iteration (fp32) with our modules: D on real and fake separately, D unfrozen for G.

    Returns the losses [loss_g, loss_d, mel, kl, fm] and D's gradients as D's update used them."""
    y_hat, y_mel, y_hat_mel, wave, (z_p, m_p, logs_p, logs_q, z_mask) = _generate(st, data)
    d = st.net_d
    assert isinstance(d, MultiPeriodDiscriminator)
    (r, _), (f, _) = d.run(wave), d.run(y_hat.detach())
    loss_d, _, _ = discriminator_loss(r, f)
    st.optim_d.zero_grad()
    loss_d.backward()
    d_grads = {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}
    st.optim_d.step()
    (_, fmap_r), (d_fake, fmap_g) = d.run(wave), d.run(y_hat)
    l_mel, l_kl = mel_loss(y_mel, y_hat_mel), kl_loss(z_p, logs_q, m_p, logs_p, z_mask)
    l_fm, l_gen = feature_loss(fmap_r, fmap_g), generator_loss(d_fake)[0]
    loss_g = l_gen + l_fm + l_mel + l_kl
    st.optim_g.zero_grad()
    loss_g.backward()
    st.optim_g.step()
    return [float(x.detach()) for x in (loss_g, loss_d, l_mel, l_kl, l_fm)], d_grads


def make_step(cfg: RVCConfig) -> GanStep:
    torch.manual_seed(0)
    g, d = build_generator(cfg, "v2", True).train(), MultiPeriodDiscriminator((2, 3)).train()
    flags = optimizer_flags(torch.device("cpu"))
    og = torch.optim.AdamW(g.parameters(), lr=1e-4, betas=(0.8, 0.99), eps=1e-9, **flags)
    od = torch.optim.AdamW(d.parameters(), lr=1e-4, betas=(0.8, 0.99), eps=1e-9, **flags)
    return GanStep(g, d, og, od, torch.amp.GradScaler("cpu", enabled=False), cfg, True)


@pytest.fixture(scope="module")
def both() -> tuple[tuple, tuple]:
    """(ours: losses, G grads, D grads, step), (RVC's recipe: the same) after one iteration from the same
    weights and seed."""
    cfg = small_config()
    data = batch(cfg)
    ours, ref = make_step(cfg), make_step(cfg)
    ref.net_g.load_state_dict(ours.net_g.state_dict())
    ref.net_d.load_state_dict(ours.net_d.state_dict())
    torch.manual_seed(SEED)
    ok_d, ok_g, vals = gan_step(ours, data, 1)
    assert ok_d and ok_g
    lg, _gng, ld, _gnd, lm, lk, lf = vals
    torch.manual_seed(SEED)
    ref_losses, ref_d_grads = rvc_recipe(ref, data)
    grads = lambda m: {n: p.grad for n, p in m.named_parameters()}  # noqa: E731
    return ((lg, ld, lm, lk, lf), grads(ours.net_g), grads(ours.net_d), ours), \
        (tuple(ref_losses), grads(ref.net_g), ref_d_grads, ref)


def test_losses_equal_rvc_recipe(both: tuple) -> None:
    (ours, *_), (ref, *_) = both
    assert ours == pytest.approx(ref, rel=1e-5)


def test_generator_gradients_equal(both: tuple) -> None:
    (_, g_ours, _, _), (_, g_ref, _, _) = both
    assert g_ours.keys() == g_ref.keys()
    for name, grad in g_ours.items():
        if g_ref[name] is None:
            assert grad is None, name
            continue
        torch.testing.assert_close(grad, g_ref[name], rtol=1e-4, atol=1e-7, msg=name)


def test_discriminator_update_uses_the_same_gradients(both: tuple) -> None:
    (_, _, d_ours, st), (_, _, d_ref, ref) = both
    for name, grad in d_ours.items():
        torch.testing.assert_close(grad, d_ref[name], rtol=1e-4, atol=1e-7, msg=name)
    for name, p in st.net_d.named_parameters():
        assert p.requires_grad, f"{name}: left frozen after G's pass"
