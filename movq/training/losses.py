"""The tokenizer's training loss, a module apart from the model (taming's VQLPIPSWithDiscriminator).

Generator:  L1 (+ L2) + w_p · LPIPS + w_q · (codebook + β · commitment) + λ · w_d · (−mean D(x̂))
Discriminator:  w_d · hinge(D(x), D(x̂))

λ is the adaptive weight of Esser et al. 2021 (eq. 7): ‖∇_L L_rec‖ / (‖∇_L L_G‖ + δ) on the decoder's
last layer L, clamped to [0, adaptive_weight_max] and never back-propagated. Both GAN terms are gated
off before ``disc_start``. The training loop owns the discriminator, its optimizer and the schedule;
this module only turns logits and images into named terms for logging.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from movq.config import LossConfig


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 · (E[relu(1 − D(x))] + E[relu(1 + D(x̂))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, eps: float = 1e-4, max_value: float = 1e4
) -> torch.Tensor:
    """‖∇_last rec_loss‖ / (‖∇_last g_loss‖ + eps), clamped to [0, max_value] and detached."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + eps)
    return weight.clamp(0.0, max_value).detach()


class TokenizerLoss(nn.Module):
    """Reconstruction + perceptual + quantizer + GAN terms; returns ``(loss, logs)``.

    ``lpips`` may be passed in (tests, shared instances); otherwise it is loaded from the paths in
    ``cfg`` when ``cfg.perceptual_weight > 0``.
    """

    def __init__(self, cfg: LossConfig, lpips: Optional[nn.Module] = None):
        super().__init__()
        self.cfg = cfg
        if cfg.perceptual_weight > 0 and lpips is None:
            from movq.evaluation.lpips import LPIPS

            lpips = LPIPS.from_pretrained(vgg_path=cfg.lpips_vgg_path, lin_path=cfg.lpips_lin_path)
        self.lpips = lpips if cfg.perceptual_weight > 0 else None

    def gan_active(self, step: int) -> bool:
        """Whether the GAN terms (generator and discriminator) count at this step."""
        return step >= self.cfg.disc_start and self.cfg.disc_factor > 0

    def reconstruction_loss(self, x: torch.Tensor, x_rec: torch.Tensor) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        x, x_rec = x.float(), x_rec.float()
        diff = x - x_rec
        l1 = diff.abs().mean()
        l2 = diff.pow(2).mean()
        rec = cfg.l1_weight * l1 + cfg.l2_weight * l2
        logs = {"l1": l1.detach(), "l2": l2.detach()}
        if self.lpips is not None:
            p = self.lpips(x, x_rec).mean()
            rec = rec + cfg.perceptual_weight * p
            logs["lpips"] = p.detach()
        logs["rec_loss"] = rec.detach()
        return rec, logs

    def generator_loss(
        self,
        x: torch.Tensor,
        x_rec: torch.Tensor,
        quant_loss: torch.Tensor,
        step: int,
        logits_fake: Optional[torch.Tensor] = None,
        last_layer: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, dict]:
        """x, x_rec: [B, 3, H, W]; quant_loss: the quantizer's loss; logits_fake: D(x̂) when the GAN is on."""
        cfg = self.cfg
        rec, logs = self.reconstruction_loss(x, x_rec)
        loss = rec + cfg.codebook_weight * quant_loss
        logs["quant_loss"] = quant_loss.detach()
        if self.gan_active(step):
            if logits_fake is None:
                raise ValueError(f"step {step} ≥ disc_start={cfg.disc_start}: generator_loss needs logits_fake")
            g_loss = -logits_fake.float().mean()
            training = torch.is_grad_enabled() and g_loss.requires_grad
            if training and last_layer is None:
                raise ValueError(f"step {step} ≥ disc_start={cfg.disc_start}: training generator_loss needs "
                                 "last_layer (the decoder's last weight, MoVQ.get_last_layer()) for the adaptive "
                                 "GAN weight; without it the GAN term would silently get weight 0")
            if training:
                d_weight = adaptive_weight(rec, g_loss, last_layer, cfg.adaptive_weight_eps, cfg.adaptive_weight_max)
            else:  # evaluation: no graph to measure gradients on (taming logs 0 here too)
                d_weight = torch.zeros((), device=x.device)
            d_weight = d_weight * cfg.disc_weight
            loss = loss + d_weight * cfg.disc_factor * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight.detach())
        logs["loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Hinge loss for D times ``disc_factor``; the trainer runs D only while ``gan_active(step)``."""
        d_loss = hinge_d_loss(logits_real.float(), logits_fake.float())
        logs = {
            "d_loss": d_loss.detach(),
            "logits_real": logits_real.detach().float().mean(),
            "logits_fake": logits_fake.detach().float().mean(),
        }
        return self.cfg.disc_factor * d_loss, logs
