"""PNG outputs of the trainers: image grids and a codebook-usage chart, drawn with Pillow only (each function
also returns its picture as uint8 [H, W, 3], for the trackers)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageDraw

from movq.data.decode import images_to_uint8
from movq.utils import atomic_path


def save_grid(rows: Sequence[torch.Tensor], path: Union[str, os.PathLike], pad: int = 2) -> np.ndarray:
    """Each row is a [B, 3, H, W] batch in [-1, 1]; rows are stacked top to bottom (e.g. originals
    above reconstructions). Written through a temp file + rename; returns the grid, uint8 [H', W', 3]."""
    arrays = [images_to_uint8(r).cpu().numpy() for r in rows]
    n = max(a.shape[0] for a in arrays)
    H, W = arrays[0].shape[1:3]
    grid = np.full((len(arrays) * (H + pad) + pad, n * (W + pad) + pad, 3), 255, np.uint8)
    for r, a in enumerate(arrays):
        for c in range(a.shape[0]):
            y, x = pad + r * (H + pad), pad + c * (W + pad)
            grid[y : y + H, x : x + W] = a[c, :H, :W]
    _save_png(Image.fromarray(grid), path)
    return grid


def save_usage_chart(counts: torch.Tensor, path: Union[str, os.PathLike], height: int = 200) -> np.ndarray:
    """Bar chart of code counts sorted high → low (one column per code, log scale); the share of
    codes never used is the flat tail on the right. Returns the chart, uint8 [H, W, 3]."""
    c = counts.detach().double().cpu().sort(descending=True).values
    K = c.numel()
    width = max(K, 64)
    img = Image.new("RGB", (width, height + 20), "white")
    draw = ImageDraw.Draw(img)
    top = float(torch.log1p(c[0])) if K and c[0] > 0 else 1.0
    for k in range(K):
        h = int(height * float(torch.log1p(c[k])) / top) if top > 0 else 0
        x = int(k * width / K)
        draw.line([(x, height), (x, height - h)], fill=(40, 90, 200))
    used = int((c > 0).sum())
    draw.text((4, height + 4), f"codes used: {used}/{K} ({100.0 * used / max(K, 1):.1f}%)", fill="black")
    _save_png(img, path)
    return np.asarray(img)


def _save_png(img: Image.Image, path: Union[str, os.PathLike]) -> None:
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
