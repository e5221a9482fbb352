"""RVC's training losses, computed in fp32 whatever the autocast state.

* discriminator: LSGAN, sum over sub-discriminators of mean((1 - D(y))^2) + mean(D(y_hat)^2);
* generator adversarial: sum of mean((1 - D(y_hat))^2);
* feature matching: 2 * sum over discriminators and layers of mean|f_real - f_fake| (real detached);
* KL: the flowed-posterior form (z_p is the posterior sample pushed through the flow), not the
  closed-form Gaussian KL: sum[(logs_p - logs_q - 0.5) + 0.5 (z_p - m_p)^2 exp(-2 logs_p)] * mask
  / sum(mask);
* mel: c_mel (45) * L1(y_mel, y_hat_mel).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def discriminator_loss(
    real_outputs: Sequence[torch.Tensor], fake_outputs: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(loss, per-discriminator real losses, per-discriminator fake losses)."""
    loss = torch.zeros((), device=real_outputs[0].device)
    r_losses: list[torch.Tensor] = []
    g_losses: list[torch.Tensor] = []
    for dr, dg in zip(real_outputs, fake_outputs):
        r = torch.mean((1 - dr.float()) ** 2)
        g = torch.mean(dg.float() ** 2)
        loss = loss + r + g
        r_losses.append(r.detach())
        g_losses.append(g.detach())
    return loss, r_losses, g_losses


def generator_loss(fake_outputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = torch.zeros((), device=fake_outputs[0].device)
    parts: list[torch.Tensor] = []
    for dg in fake_outputs:
        part = torch.mean((1 - dg.float()) ** 2)
        parts.append(part.detach())
        loss = loss + part
    return loss, parts


def feature_loss(
    real_fmaps: Sequence[Sequence[torch.Tensor]], fake_fmaps: Sequence[Sequence[torch.Tensor]],
) -> torch.Tensor:
    loss = torch.zeros((), device=real_fmaps[0][0].device)
    for dr, dg in zip(real_fmaps, fake_fmaps):
        for rl, gl in zip(dr, dg):
            loss = loss + torch.mean(torch.abs(rl.float().detach() - gl.float()))
    return loss * 2


def kl_loss(
    z_p: torch.Tensor, logs_q: torch.Tensor, m_p: torch.Tensor, logs_p: torch.Tensor, z_mask: torch.Tensor,
) -> torch.Tensor:
    """z_p, logs_q: [B, H, T] (posterior sample after the flow, posterior log-std);
    m_p, logs_p: [B, H, T] (prior); z_mask: [B, 1, T]."""
    z_p, logs_q, m_p, logs_p, z_mask = (t.float() for t in (z_p, logs_q, m_p, logs_p, z_mask))
    kl = logs_p - logs_q - 0.5
    kl = kl + 0.5 * ((z_p - m_p) ** 2) * torch.exp(-2.0 * logs_p)
    return torch.sum(kl * z_mask) / torch.sum(z_mask)


def mel_loss(y_mel: torch.Tensor, y_hat_mel: torch.Tensor, c_mel: float = 45.0) -> torch.Tensor:
    return torch.nn.functional.l1_loss(y_mel.float(), y_hat_mel.float()) * c_mel
