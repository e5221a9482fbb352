"""RVC's losses (reference §8.3) against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from rvc_pipeline.losses import discriminator_loss, feature_loss, generator_loss, kl_loss, mel_loss


def test_kl_flowed_posterior_by_hand() -> None:
    # one item, 1 channel, 3 frames, the last one masked out
    z_p = torch.tensor([[[0.5, -1.0, 9.0]]])
    m_p = torch.tensor([[[0.0, 1.0, 0.0]]])
    logs_p = torch.tensor([[[0.0, math.log(2.0), 5.0]]])
    logs_q = torch.tensor([[[-1.0, 0.0, 7.0]]])
    mask = torch.tensor([[[1.0, 1.0, 0.0]]])
    t0 = (0.0 - (-1.0) - 0.5) + 0.5 * 0.25 * 1.0  # 0.625
    t1 = (math.log(2.0) - 0.0 - 0.5) + 0.5 * 4.0 * math.exp(-2 * math.log(2.0))  # log2 - 0.5 + 0.5
    expected = (t0 + t1) / 2
    assert kl_loss(z_p, logs_q, m_p, logs_p, mask).item() == pytest.approx(expected, rel=1e-6)


def test_kl_differs_from_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    shape = (2, 4, 5)
    z_p, m_p, logs_p, logs_q = (torch.randn(shape, generator=g) * 0.5 for _ in range(4))
    mask = torch.ones(2, 1, 5)
    ours = kl_loss(z_p, logs_q, m_p, logs_p, mask)
    manual = ((logs_p - logs_q - 0.5) + 0.5 * (z_p - m_p) ** 2 * torch.exp(-2 * logs_p)).sum() / mask.sum()
    torch.testing.assert_close(ours, manual)
    # in fp32 even for bf16 inputs
    assert kl_loss(*(t.bfloat16() for t in (z_p, logs_q, m_p, logs_p, mask))).dtype == torch.float32


def test_lsgan_losses_by_hand() -> None:
    real = [torch.tensor([1.0, 0.0]), torch.tensor([[0.5]])]
    fake = [torch.tensor([0.0, 1.0]), torch.tensor([[2.0]])]
    loss, r, f = discriminator_loss(real, fake)
    # D0: mean((1-[1,0])^2)=0.5, mean([0,1]^2)=0.5; D1: (0.5)^2=0.25, 4
    assert loss.item() == pytest.approx(0.5 + 0.5 + 0.25 + 4.0)
    assert [x.item() for x in r] == pytest.approx([0.5, 0.25])
    assert [x.item() for x in f] == pytest.approx([0.5, 4])
    g, parts = generator_loss(fake)
    assert g.item() == pytest.approx(0.5 + 1.0) and len(parts) == 2


def test_feature_loss_times_two_and_real_detached() -> None:
    r = [[torch.ones(2, 3, requires_grad=True), torch.zeros(4)], [torch.full((5,), 2.0)]]
    f = [[torch.zeros(2, 3, requires_grad=True), torch.ones(4)], [torch.full((5,), 1.0)]]
    loss = feature_loss(r, f)
    assert loss.item() == pytest.approx(2 * (1 + 1 + 1))
    loss.backward()
    assert r[0][0].grad is None and f[0][0].grad is not None


def test_mel_l1_scaled() -> None:
    a = torch.zeros(1, 4, 3)
    b = torch.full((1, 4, 3), 0.1)
    assert mel_loss(a, b).item() == pytest.approx(4.5, rel=1e-5)
    assert mel_loss(a, b, c_mel=1.0).item() == pytest.approx(0.1, rel=1e-5)
