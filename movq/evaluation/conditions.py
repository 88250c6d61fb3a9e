"""Do samples follow their image condition? Scores of samples against held-out conditions of the shapes data,
with the condition and with the null condition (the same prior's unconditional branch of guidance).

* ``edges``: F1 of the Canny edges of the sample against the condition's edges with a 1-pixel tolerance
  (precision: the sample's edge pixels within 1 px of a condition edge; recall: the condition's edge pixels
  within 1 px of a sample edge), as the boundary F-measure of BSDS (Martin et al. 2004) with a fixed tolerance.
* ``lowres``: PSNR (dB, on 0…255) of the sample box-downsampled by the factor against the low-resolution input.
* ``segmentation``: IoU of the sample's shape mask with the label map's foreground (class > 0); the mask is the
  pixels whose colour lies more than ``FOREGROUND_DISTANCE`` from the background's estimate (the median colour
  of the image border: the shapes lie inside the image and their colour is ≥ 110 from the mean background,
  movq/data/shapes.py). The same estimator on the real held-out images is reported as its own ceiling.

The held-out conditions are made from the shapes validation split with :mod:`movq.data.conditions`, as the
token folders' are made from the training split. Every figure is a mean over the conditions with its standard
error; ``difference`` is the paired mean of (conditional − unconditional) per condition.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from movq.config import ConditionConfig
from movq.data.conditions import edge_map, lowres_image, make_condition
from movq.data.shapes import render_shape, shape_label_map

EDGE_TOLERANCE = 1  # pixels
FOREGROUND_DISTANCE = 60.0  # RGB distance from the border's median colour that counts as the shape
METRICS = {"edges": "edge_f1", "lowres": "psnr_db", "segmentation": "mask_iou"}


# --------------------------------------------------------------------------------------
# Held-out conditions and scores
# --------------------------------------------------------------------------------------
def held_out(cfg: ConditionConfig, n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` images of the shapes validation split and their conditions:
    ``(uint8 [n, S, S, 3], uint8 [n, ch, H', W'])``."""
    images, conds = [], []
    for i in range(n):
        img, _, _ = render_shape(i, size, seed, "val")
        labels = shape_label_map(i, size, seed, "val") if cfg.kind == "segmentation" else None
        images.append(img)
        conds.append(make_condition(cfg, img, labels, f"val image {i}"))
    return np.stack(images), np.stack(conds)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    t = torch.from_numpy(mask.astype(np.float32))[:, None]
    return (F.max_pool2d(t, 2 * r + 1, stride=1, padding=r)[:, 0] > 0).numpy()


def edge_f1(images: np.ndarray, conditions: np.ndarray, sigma: float, tolerance: int = EDGE_TOLERANCE) -> np.ndarray:
    """Per image: F1 of its Canny edges against ``conditions`` (uint8 [N, 1, H, W]) with ``tolerance`` px."""
    pred = np.stack([edge_map(im, sigma)[0] for im in images]).astype(bool)
    gt = conditions[:, 0].astype(bool)
    hit_p = (pred & _dilate(gt, tolerance)).sum((1, 2))
    hit_r = (gt & _dilate(pred, tolerance)).sum((1, 2))
    p = np.where(pred.sum((1, 2)) > 0, hit_p / np.maximum(pred.sum((1, 2)), 1), 0.0)
    r = np.where(gt.sum((1, 2)) > 0, hit_r / np.maximum(gt.sum((1, 2)), 1), 0.0)
    return np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)


def lowres_psnr(images: np.ndarray, conditions: np.ndarray, factor: int) -> np.ndarray:
    """Per image: PSNR (dB) of its ``factor``× box downsample against ``conditions`` (uint8 [N, 3, h, w])."""
    small = np.stack([lowres_image(im, factor) for im in images]).astype(np.float64)
    mse = ((small - conditions.astype(np.float64)) ** 2).mean((1, 2, 3))
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))


def foreground(images: np.ndarray, distance: float = FOREGROUND_DISTANCE) -> np.ndarray:
    """bool [N, H, W]: pixels far in colour from the median colour of the image's border."""
    x = images.astype(np.float64)
    border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], 1)  # [N, 4S, 3]
    bg = np.median(border, 1)[:, None, None]
    return np.linalg.norm(x - bg, axis=-1) > distance


def mask_iou(images: np.ndarray, conditions: np.ndarray) -> np.ndarray:
    """Per image: IoU of :func:`foreground` with the label map's foreground (class > 0)."""
    pred, gt = foreground(images), conditions[:, 0] > 0
    union = (pred | gt).sum((1, 2))
    return np.where(union > 0, (pred & gt).sum((1, 2)) / np.maximum(union, 1), 1.0)


def score(cfg: ConditionConfig, images: np.ndarray, conditions: np.ndarray) -> np.ndarray:
    """Per image: how well ``images`` (uint8 [N, S, S, 3]) follow ``conditions`` (higher is better)."""
    if cfg.kind == "edges":
        return edge_f1(images, conditions, cfg.sigma)
    if cfg.kind == "lowres":
        return lowres_psnr(images, conditions, cfg.factor)
    if cfg.kind == "segmentation":
        return mask_iou(images, conditions)
    raise ValueError(f"condition kind must be one of {list(METRICS)}, got {cfg.kind!r}")


def summary(values: np.ndarray) -> dict:
    """Mean, standard error and count."""
    v = np.asarray(values, dtype=np.float64)
    sem = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return {"mean": round(float(v.mean()), 4), "sem": round(sem, 4), "n": int(len(v))}


# --------------------------------------------------------------------------------------
# One prior
# --------------------------------------------------------------------------------------
@dataclass
class PriorCheck:
    """What :func:`check_prior` measured: per setting the per-condition scores."""

    scores: dict  # name → np.ndarray [N]
    samples: dict  # name → uint8 [N, S, S, 3]


# draw(conditions uint8 [B, ch, H', W'] or None, B, cfg_scale, generator) -> samples uint8 [B, S, S, 3]
Draw = Callable[[Optional[torch.Tensor], int, float, torch.Generator], np.ndarray]


@torch.no_grad()
def check_prior(draw: Draw, cfg: ConditionConfig, conditions: np.ndarray, cfg_scales: tuple[float, ...],
                seed: int = 0, batch: int = 64, real: Optional[np.ndarray] = None,
                reconstruct: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> PriorCheck:
    """Sample once per condition with it (``draw`` at each of ``cfg_scales``) and with the null condition
    (``unconditional``: ``draw(None, B, 1, g)``: no condition, no guidance), and score against the conditions; the
    same noise (generator seeds) for every setting. With ``real`` images also the tokenizer's reconstructions of
    them (``reconstruction``: ``reconstruct(real)``, the ceiling the tokens allow) and ``real`` itself."""
    runs = {f"conditional_cfg{s:g}": (s, True) for s in cfg_scales}
    runs["unconditional"] = (1.0, False)
    scores, samples = {}, {}
    for name, (scale, with_condition) in runs.items():
        out = []
        for start in range(0, len(conditions), batch):
            cond = torch.from_numpy(conditions[start : start + batch])
            g = torch.Generator().manual_seed(seed + start)
            out.append(draw(cond if with_condition else None, len(cond), scale, g))
        samples[name] = np.concatenate(out)
        scores[name] = score(cfg, samples[name], conditions)
    if real is not None and reconstruct is not None:
        recon = reconstruct(real)
        scores["reconstruction"], samples["reconstruction"] = score(cfg, recon, conditions), recon
        scores["real"] = score(cfg, real, conditions)
    return PriorCheck(scores, samples)


def report(check: PriorCheck) -> dict:
    """The JSON-ready figures of a :class:`PriorCheck`: a summary per setting and the paired differences of each
    conditional setting against ``unconditional``."""
    out = {name: summary(v) for name, v in check.scores.items()}
    base = check.scores["unconditional"]
    out["difference"] = {name: summary(v - base) for name, v in check.scores.items() if name.startswith("conditional")}
    return out


__all__ = ["held_out", "edge_f1", "lowres_psnr", "foreground", "mask_iou", "score", "summary", "check_prior",
           "report", "PriorCheck", "METRICS", "EDGE_TOLERANCE", "FOREGROUND_DISTANCE"]
