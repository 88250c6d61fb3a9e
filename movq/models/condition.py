"""The condition encoder of both priors: an image condition → one embedding per token cell.

A condition (:mod:`movq.data.conditions`) is ``uint8 [B, channels, H', W']``: Canny edges {0, 1}, a label map
(class ids, one-hot here) or a low-resolution RGB image (0…255 → [-1, 1]). The encoder resizes it to 4× the
token grid (area averaging when larger, nearest when smaller, e.g. a low-resolution image smaller than 4× the
grid), then a small conv stack (3×3, two 3×3 stride-2, 1×1; GELU)
gives ``[B, D, h, w]``, read out as ``[B, h·w, D]`` in raster order. Each cell's embedding sees its own 4×4
sub-cells and a ring around them; the transformer mixes the rest (ControlNet / T2I-Adapter take the same
"small conv stack to the latent grid" approach to spatial conditions).

Classifier-free guidance (Ho & Salimans 2022) needs an unconditional model: a learned null condition
(``null [h·w, D]``) replaces the encoded condition of the rows dropped in training and of the unconditional
half of a guided batch. How the priors use the embeddings: MaskGIT adds them to the cells' input embeddings,
the autoregressive prior reads them as a prefix (:mod:`movq.models.maskgit`, :mod:`movq.models.autoregressive`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from movq.config import ConditionConfig

NULL_INIT_STD = 0.02  # the null condition starts like the transformers' embeddings (BERT / GPT-2 init)
SUBCELLS = 4  # the encoder reads the condition at 4× the token grid: two stride-2 convolutions to the grid


class ConditionEncoder(nn.Module):
    """``forward(condition uint8 [B, ch, H', W'] or None, batch, drop bool [B]) -> [B, h·w, width]``."""

    def __init__(self, cfg: ConditionConfig, grid_hw: tuple[int, int], width: int):
        super().__init__()
        self.cfg, self.grid_hw = cfg, tuple(grid_hw)
        h, w = self.grid_hw
        c_in = cfg.num_classes if cfg.kind == "segmentation" else cfg.channels
        hid = cfg.hidden
        self.net = nn.Sequential(
            nn.Conv2d(c_in, hid, 3, padding=1), nn.GELU(),
            nn.Conv2d(hid, hid, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(hid, hid, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(hid, width, 1),
        )
        self.null = nn.Parameter(torch.empty(h * w, width))
        nn.init.trunc_normal_(self.null, std=NULL_INIT_STD, a=-2 * NULL_INIT_STD, b=2 * NULL_INIT_STD)

    @property
    def in_channels(self) -> int:
        return self.net[0].in_channels

    def check(self, condition: Tensor, batch: int) -> Tensor:
        """``condition`` as given (integers ``[batch, channels, H', W']`` of the trained size), or a
        ``ValueError`` that says what is wrong."""
        cfg = self.cfg
        if condition.dtype.is_floating_point or condition.dtype.is_complex or condition.dtype == torch.bool:
            raise ValueError(f"condition ({cfg.kind}) must be an integer tensor (uint8 as stored), got {condition.dtype}")
        want = (batch, cfg.channels, *(cfg.size or condition.shape[-2:]))
        if condition.ndim != 4 or tuple(condition.shape) != tuple(want):
            raise ValueError(f"condition ({cfg.kind}) must have shape {list(want)}, got {list(condition.shape)}")
        if not torch.compiler.is_compiling() and condition.numel():
            hi = {"edges": 1, "segmentation": cfg.num_classes - 1, "lowres": 255}[cfg.kind]
            lo_v, hi_v = int(condition.min()), int(condition.max())
            if lo_v < 0 or hi_v > hi:
                raise ValueError(f"condition ({cfg.kind}) values must lie in [0, {hi}], got [{lo_v}, {hi_v}]")
        return condition

    def features(self, condition: Tensor) -> Tensor:
        """The encoder's input ``float [B, C_in, 4h, 4w]`` of a checked condition."""
        cfg, (h, w) = self.cfg, self.grid_hw
        dtype = self.null.dtype
        if cfg.kind == "segmentation":
            x = F.one_hot(condition[:, 0].long(), cfg.num_classes).permute(0, 3, 1, 2).to(dtype)
        elif cfg.kind == "edges":
            x = condition.to(dtype)
        else:
            x = condition.to(dtype) / 127.5 - 1
        size = (SUBCELLS * h, SUBCELLS * w)
        if tuple(x.shape[-2:]) != size:
            larger = x.shape[-2] >= size[0] and x.shape[-1] >= size[1]
            x = F.adaptive_avg_pool2d(x, size) if larger else F.interpolate(x, size=size, mode="nearest")
        return x

    def forward(self, condition: Optional[Tensor], batch: int, drop: Optional[Tensor] = None) -> Tensor:
        """``[batch, h·w, width]``: the encoded condition, the null condition where ``drop`` (bool ``[batch]``)
        is True, or everywhere when ``condition`` is None."""
        null = self.null[None].expand(batch, -1, -1)
        if condition is None:
            return null
        emb = rearrange(self.net(self.features(self.check(condition, batch))), "b d h w -> b (h w) d")
        if drop is not None:
            if drop.dtype != torch.bool or tuple(drop.shape) != (batch,):
                raise ValueError(f"drop must be a bool tensor of shape [{batch}], got {drop.dtype} {tuple(drop.shape)}")
            emb = torch.where(drop.to(emb.device)[:, None, None], null.to(emb.dtype), emb)
        return emb


def conditioning_summary(cfg) -> str:
    """What a prior config conditions on, for model cards: "8 classes", "unconditional", "8 classes and an
    image condition (edges: Canny sigma 1.0)", ..."""
    parts = [f"{cfg.num_classes} classes"] if cfg.num_classes else []
    cond = getattr(cfg, "condition", None)
    if cond is not None:
        how = {"edges": f"Canny sigma {cond.sigma}", "lowres": f"downsampled {cond.factor}×",
               "segmentation": f"{cond.num_classes} label classes"}[cond.kind]
        parts.append(f"an image condition ({cond.kind}: {how})")
    return " and ".join(parts) if parts else "unconditional"


def draw_dropout(cfg, batch: int, generator: Optional[torch.Generator], device: torch.device,
                 uniform) -> tuple[Tensor, Optional[Tensor]]:
    """One draw per sample for both dropouts of a prior's training step: ``(class dropped [B], condition
    dropped [B] or None)``; a sample is dropped where ``u < rate``, so with equal rates both go together.
    Nothing is drawn when neither dropout applies (the random stream of models without them is unchanged)."""
    cond = getattr(cfg, "condition", None)
    use_class = cfg.num_classes > 0 and cfg.class_dropout > 0
    use_cond = cond is not None and cond.dropout > 0
    none = torch.zeros(batch, dtype=torch.bool, device=device)
    if not (use_class or use_cond):
        return none, (none if cond is not None else None)
    u = uniform((batch,), generator, device)
    return (u < cfg.class_dropout) if use_class else none, ((u < cond.dropout) if use_cond else
                                                           (none if cond is not None else None))


__all__ = ["ConditionEncoder", "conditioning_summary", "draw_dropout", "SUBCELLS"]
