"""Building blocks of the MoVQ encoder and decoder.

* ``SpatialNorm`` — MoVQ's spatially conditional normalization (Zheng et al., "MoVQ: Modulating
  Quantized Vectors for High-Fidelity Image Generation", NeurIPS 2022, eq. 4):
  ``GroupNorm(f) * conv_y(zq↑) + conv_b(zq↑)`` where ``zq`` is the quantized map nearest-upsampled to
  ``f``'s size. It lets the decoder inject the quantized vectors at every scale, so neighbouring cells
  with equal codes still decode to different content.
* ``ResnetBlock``, ``AttnBlock``, ``Downsample``, ``Upsample`` — the VQGAN blocks of
  taming-transformers, with the norm chosen by ``norm="group" | "spatial"``.

Every module that may be conditioned takes ``zq`` in ``forward``; with ``norm="group"`` it is ignored,
which keeps the encoder, the VQGAN baseline and the MoVQ decoder one code path.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class SpatialNorm(nn.Module):
    """GroupNorm whose scale and shift are 1×1 convolutions of the (upsampled) quantized map.

    Args:
        channels: channels of the normalized feature map ``f``.
        zq_channels: channels of the conditioning map ``zq`` (C·d for multichannel VQ).
        zq_conv: MoVQGAN's ``add_conv``: a 3×3 conv ``conv_zq`` on the upsampled ``zq`` before
            ``conv_y`` / ``conv_b`` (off in the paper and in Kandinsky's MoVQ).
    """

    def __init__(
        self, channels: int, zq_channels: int, num_groups: int = 32, eps: float = 1e-6, zq_conv: bool = False
    ):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, channels, eps=eps, affine=True)
        self.conv_zq = nn.Conv2d(zq_channels, zq_channels, kernel_size=3, padding=1) if zq_conv else None
        self.conv_y = nn.Conv2d(zq_channels, channels, kernel_size=1)
        self.conv_b = nn.Conv2d(zq_channels, channels, kernel_size=1)

    @torch.no_grad()
    def init_identity_(self) -> None:
        """Start as the plain GroupNorm: ``conv_y`` weight 0 / bias 1, ``conv_b`` weight 0 / bias 0, so the
        modulation begins at scale 1, shift 0 (as DiT's adaLN-zero starts its modulation) and ``zq``
        enters through the gradients of the zero weights (``model.spatial_norm_init="identity"``).

        PyTorch's default init (the default here, as in MoVQGAN and diffusers) starts the scale near 0
        with random signs (``|conv_y(zq)|`` ≈ 0.12 at the tiny size) and the shift a random projection of
        ``zq``: the decoder reads ``zq`` at every scale from step 0. Measured at the tiny size (1 × 32
        channels, 600 steps, 3 seeds; benchmarks/results/ablation_tiny_cpu.md, README "Does each part
        help?"), the default start is ahead in held-out PSNR at steps 200 and 400 in every seed and ends
        0.32 ± 0.64 dB ahead (2 of 3 seeds), while the identity start ends with the higher SSIM (3 of 3):
        no clear winner at the end, so the default stays the default."""
        for conv, bias in ((self.conv_y, 1.0), (self.conv_b, 0.0)):
            conv.weight.zero_()
            conv.bias.fill_(bias)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        """f: [B, channels, H, W]; zq: [B, zq_channels, h, w] with h ≤ H → [B, channels, H, W]."""
        zq = F.interpolate(zq, size=f.shape[-2:], mode="nearest")
        if self.conv_zq is not None:
            zq = self.conv_zq(zq)
        return self.norm(f) * self.conv_y(zq) + self.conv_b(zq)


class Norm(nn.Module):
    """``GroupNorm`` or ``SpatialNorm`` behind one call signature ``norm(f, zq)``."""

    def __init__(
        self, channels: int, norm: str, num_groups: int, zq_channels: Optional[int] = None, zq_conv: bool = False
    ):
        super().__init__()
        if channels % num_groups != 0:
            raise ValueError(f"{channels} channels cannot be split into {num_groups} norm groups")
        if zq_conv and norm != "spatial":
            raise ValueError("zq_conv (MoVQGAN's add_conv) needs norm='spatial'")
        if norm == "group":
            self.inner = nn.GroupNorm(num_groups, channels, eps=1e-6, affine=True)
        elif norm == "spatial":
            if not zq_channels:
                raise ValueError("norm='spatial' needs zq_channels")
            self.inner = SpatialNorm(channels, zq_channels, num_groups, zq_conv=zq_conv)
        else:
            raise ValueError(f"norm must be 'group' or 'spatial', got {norm!r}")
        self.spatial = norm == "spatial"

    def forward(self, f: torch.Tensor, zq: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.spatial:
            if zq is None:
                raise ValueError("a spatially conditioned norm needs zq")
            return self.inner(f, zq)
        return self.inner(f)


class ResnetBlock(nn.Module):
    """norm → swish → conv3 → norm → swish → dropout → conv3, plus a (1×1 projected) skip."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        norm: str = "group",
        num_groups: int = 32,
        zq_channels: Optional[int] = None,
        dropout: float = 0.0,
        zq_conv: bool = False,
    ):
        super().__init__()
        self.norm1 = Norm(in_channels, norm, num_groups, zq_channels, zq_conv)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Norm(out_channels, norm, num_groups, zq_channels, zq_conv)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor, zq: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x, zq)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h, zq))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H·W positions with 1×1 q/k/v/out projections."""

    def __init__(
        self,
        channels: int,
        *,
        norm: str = "group",
        num_groups: int = 32,
        zq_channels: Optional[int] = None,
        zq_conv: bool = False,
    ):
        super().__init__()
        self.norm = Norm(channels, norm, num_groups, zq_channels, zq_conv)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, zq: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x, zq)
        q, k, v = (rearrange(p(h), "b c h w -> b 1 (h w) c") for p in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # [B, 1, H*W, C]
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=H, w=W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3×3 conv with taming's asymmetric (0, 1, 0, 1) padding: H → H/2 for even H."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest ×2 then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
