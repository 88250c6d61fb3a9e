"""PatchGAN discriminator (Isola et al., pix2pix 2017), as taming-transformers' NLayerDiscriminator.

``n_layers`` stride-2 4×4 convolutions double the width (capped at 8× base) and a stride-1 pair ends in
one logit per patch: a 256² image gives a 30×30 map of real/fake logits.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import spectral_norm

from movq.config import DiscriminatorConfig


def _init_weights(m: nn.Module) -> None:
    """DCGAN init as taming's ``weights_init``: N(0, 0.02) conv weights (biases keep PyTorch's
    default), N(1, 0.02) norm scales and zero norm shifts."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class PatchDiscriminator(nn.Module):
    """[B, in_channels, H, W] → logits [B, 1, H', W'] (one per receptive-field patch)."""

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        if cfg.norm not in ("batch", "spectral", "none"):
            raise ValueError(f"discriminator.norm must be batch, spectral or none, got {cfg.norm!r}")
        if cfg.n_layers < 1:
            raise ValueError(f"discriminator.n_layers must be ≥ 1, got {cfg.n_layers}")
        self.cfg = cfg
        ndf = cfg.base_channels

        def conv(c_in: int, c_out: int, stride: int, bias: bool) -> nn.Module:
            layer = nn.Conv2d(c_in, c_out, 4, stride=stride, padding=1, bias=bias)
            _init_weights(layer)
            return spectral_norm(layer) if cfg.norm == "spectral" else layer

        def norm(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if cfg.norm == "batch" else nn.Identity()

        use_bias = cfg.norm != "batch"  # a bias before BatchNorm is redundant
        layers: list[nn.Module] = [conv(cfg.in_channels, ndf, 2, True), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, cfg.n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < cfg.n_layers else 1
            layers += [conv(ndf * prev, ndf * mult, stride, use_bias), norm(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(conv(ndf * mult, 1, 1, True))
        self.main = nn.Sequential(*layers)
        self.main.apply(lambda m: _init_weights(m) if isinstance(m, nn.BatchNorm2d) else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)
