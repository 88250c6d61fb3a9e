"""Image conditions for the priors: the one place where a condition is made from an image.

A condition is ``uint8 [channels, H', W']``, made from the same decoded ``uint8 [S, S, 3]`` image the tokens
come from (:func:`movq.data.decode.load_image`), stored beside the tokens in the token shards
(:mod:`movq.data.tokens`) and encoded by :class:`movq.models.condition.ConditionEncoder`:

* ``edges``: Canny edges (Canny 1986; ``skimage.feature.canny``) at the image size, 1 channel in {0, 1}:
  the union of the edges of the R, G and B channels, not of the grey image, because a shape of another hue
  but the same luminance as its background has no grey edge at all (8 of the first 64 shapes validation
  images of recipe 2 gave an empty grey edge map, 5 of recipe 5's; the colour edges covered 99.7% of the
  recipe-2 shapes' outlines). A picture that already is a black-and-white line drawing is its own edge map
  (:func:`edges_from_drawing`: the rarer of the two colours is the line).
* ``lowres``: the RGB image box-downsampled by ``factor`` (the mean of each ``factor × factor`` block), 3
  channels at ``S / factor`` (the input of super-resolution).
* ``segmentation``: an integer label map (class ids ``0 … n − 1``) at the image size, 1 channel; one-hot in
  the encoder. It is read from a label PNG (palette index or grey value = class id) found in a folder by
  the image's file stem (:func:`find_label_file`), or a shard sample's ``seg.png``, and cropped and
  resized (nearest) exactly as the image; for the built-in shapes data it is the shape's mask
  (:func:`movq.data.shapes.shape_label_map`: 0 = background, 1 + class = the shape).

Which kind and parameters a token folder holds is in its manifest (``condition``); the prior trainer refuses
a model whose ``condition`` differs.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from movq.config import CONDITION_KINDS, ConditionConfig

# A picture is a line drawing when this share of its pixels is near pure black or white and grey.
_DRAWING_SHARE = 0.99
_DRAWING_TOLERANCE = 32  # in 0…255: how far from black / white, and between channels
LABEL_EXTS = ("png",)  # label maps must be lossless
SEG_MEMBER = "seg.png"  # the member of a shard sample that holds its label map


class ConditionError(ValueError):
    """A condition that cannot be made; the message names the file or setting."""


def _canny():
    try:
        from skimage.feature import canny
    except ImportError:
        raise ImportError("edge conditions need scikit-image: pip install 'movq[conditions]'") from None
    return canny


# --------------------------------------------------------------------------------------
# Making conditions
# --------------------------------------------------------------------------------------
def edge_map(image: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Canny edges of ``uint8 [H, W, 3]``: ``uint8 [1, H, W]`` in {0, 1}, the union over the R, G and B
    channels (each in [0, 1], skimage's default thresholds)."""
    canny, x = _canny(), image.astype(np.float64) / 255.0
    edges = np.zeros(image.shape[:2], dtype=bool)
    for c in range(image.shape[2]):
        edges |= canny(x[..., c], sigma=sigma)
    return edges[None].astype(np.uint8)


def is_line_drawing(image: np.ndarray) -> bool:
    """Whether ``uint8 [H, W, 3]`` is a black-and-white drawing (≥ 99% of pixels grey and near 0 or 255)."""
    x = image.astype(np.int16)
    grey = (x.max(-1) - x.min(-1)) <= _DRAWING_TOLERANCE
    extreme = (x.mean(-1) <= _DRAWING_TOLERANCE) | (x.mean(-1) >= 255 - _DRAWING_TOLERANCE)
    return bool((grey & extreme).mean() >= _DRAWING_SHARE)


def edges_from_drawing(image: np.ndarray) -> np.ndarray:
    """A line drawing ``uint8 [H, W, 3]`` as an edge map ``uint8 [1, H, W]``: the rarer colour is the line
    (white on black, as :func:`condition_pictures` draws edges, or black on white, as a pencil sketch)."""
    bright = image.astype(np.float64).mean(-1) >= 128
    lines = bright if bright.mean() <= 0.5 else ~bright
    return lines[None].astype(np.uint8)


def lowres_image(image: np.ndarray, factor: int = 4) -> np.ndarray:
    """The box (area) downsample of ``uint8 [H, W, 3]`` by ``factor``: ``uint8 [3, H / f, W / f]``."""
    h, w = image.shape[:2]
    if factor < 1 or h % factor or w % factor:
        raise ConditionError(f"lowres: the image size {h}×{w} is not a multiple of the factor {factor}")
    blocks = image.reshape(h // factor, factor, w // factor, factor, 3).astype(np.float64).mean((1, 3))
    return np.round(blocks).astype(np.uint8).transpose(2, 0, 1).copy()


def read_label_map(data: bytes, where: str) -> np.ndarray:
    """A label PNG → integer class ids ``[H, W]``: palette images give their palette index, grey images
    their value (RGB is accepted when grey). ``where`` names the file in errors."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ConditionError(f"label map {where} is not a readable image ({e})") from None
    if img.mode in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
        return np.asarray(img).astype(np.int64)
    if img.mode in ("RGB", "RGBA", "LA"):
        a = np.asarray(img.convert("RGB")).astype(np.int64)
        if (a == a[..., :1]).all():
            return a[..., 0]
    raise ConditionError(f"label map {where}: mode {img.mode} is not a palette or grey image of class ids")


def fit_label_map(labels: np.ndarray, size: int) -> np.ndarray:
    """The label map cropped and resized as :func:`movq.data.decode.crop_square` does the image (the centred
    largest square, to ``size × size``), with nearest sampling so class ids stay class ids."""
    h, w = labels.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = labels[top : top + side, left : left + side]
    if side == size:
        return crop
    # nearest at the pixel centres, as PIL's NEAREST (integer ids of any size, not only uint8)
    idx = np.minimum(((np.arange(size) + 0.5) * side / size).astype(np.int64), side - 1)
    return crop[idx][:, idx]


def check_label_map(labels: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    """``labels`` as ``uint8 [1, H, W]``, or a ``ConditionError`` naming ``where`` for ids outside [0, n)."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConditionError(f"label map {where} holds class id {int(labels.max())}, outside the "
                             f"{num_classes} classes [0, {num_classes - 1}] (set --condition-classes)")
    return labels[None].astype(np.uint8)


def find_label_file(folder: Union[str, os.PathLike], relpath: str) -> Path:
    """The label PNG of the image ``relpath`` (relative to its folder): ``folder/<relpath without
    extension>.png``, else ``folder/<file stem>.png``; a ``ConditionError`` naming both when neither exists."""
    stem = relpath.rpartition(".")[0] or relpath
    candidates = [Path(folder) / f"{stem}.png", Path(folder) / f"{Path(stem).name}.png"]
    for c in candidates:
        if c.is_file():
            return c
    raise ConditionError(f"no label map for {relpath}: looked for {candidates[0]}"
                         + (f" and {candidates[1]}" if candidates[1] != candidates[0] else ""))


def make_condition(cfg: ConditionConfig, image: np.ndarray, labels: Optional[np.ndarray] = None,
                   where: str = "") -> np.ndarray:
    """The condition of ``uint8 [S, S, 3]``: ``uint8 [channels, H', W']`` (``labels``: the label map
    ``[S, S]`` of a segmentation condition, already fitted to the image)."""
    if cfg.kind == "edges":
        return edge_map(image, cfg.sigma)
    if cfg.kind == "lowres":
        return lowres_image(image, cfg.factor)
    if cfg.kind == "segmentation":
        if labels is None:
            raise ConditionError(f"{where or 'a sample'}: a segmentation condition needs a label map")
        if labels.shape != image.shape[:2]:
            raise ConditionError(f"label map {where}: {labels.shape} does not match the image {image.shape[:2]}")
        return check_label_map(labels, cfg.num_classes, where)
    raise ConditionError(f"condition kind must be one of {list(CONDITION_KINDS)}, got {cfg.kind!r}")


def condition_size(cfg: ConditionConfig, image_size: int) -> tuple[int, int]:
    """``(H', W')`` of the condition of an ``image_size``² image."""
    s = image_size // cfg.factor if cfg.kind == "lowres" else image_size
    return (s, s)


def condition_from_picture(cfg: ConditionConfig, picture: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, str]:
    """What ``tools/sample.py --condition-image`` makes of a picture, at the training ``size`` (H', W'):
    ``(uint8 [channels, H', W'], how)``. edges: a line drawing is the edge map itself, any other picture
    gets Canny's at the training image size; lowres: the picture is the small image; segmentation: the
    picture is a label map (integer ids ``[H, W]``, from :func:`read_label_map`). A picture of another size
    is resized (nearest for label maps and edge maps, area / bicubic for images)."""
    h, w = size
    if cfg.kind == "segmentation":
        labels = picture if picture.shape == (h, w) else _resize_nearest(picture, (h, w))
        how = "label map" if picture.shape == (h, w) else f"label map resized (nearest) from {picture.shape[1]}×{picture.shape[0]}"
        return check_label_map(labels, cfg.num_classes, "--condition-image"), how
    resized = picture.shape[:2] != (h, w)
    if cfg.kind == "edges" and is_line_drawing(picture):
        edges = edges_from_drawing(picture)
        if resized:
            edges = _resize_nearest(edges[0], (h, w))[None]
        return edges, "line drawing taken as the edge map" + (" (resized, nearest)" if resized else "")
    if resized:
        img = Image.fromarray(picture)
        method = Image.Resampling.BOX if img.width >= w and img.height >= h else Image.Resampling.BICUBIC
        picture = np.asarray(img.resize((w, h), method), dtype=np.uint8)
    suffix = f" (resized from {img.width}×{img.height})" if resized else ""
    if cfg.kind == "edges":
        return edge_map(picture, cfg.sigma), "Canny edges" + suffix
    return picture.transpose(2, 0, 1).copy(), "low-resolution image" + suffix


def _resize_nearest(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = a.shape
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    return a[rows][:, cols]


# --------------------------------------------------------------------------------------
# Pictures of conditions
# --------------------------------------------------------------------------------------
def _palette(n: int) -> torch.Tensor:
    """n colours in [-1, 1]: black for class 0 (background), then well spread hues."""
    rng = np.random.default_rng(1)
    colours = rng.uniform(-0.8, 1.0, (n, 3)).astype(np.float32)
    colours[0] = -1.0
    return torch.from_numpy(colours)


def condition_pictures(cfg: ConditionConfig, conditions: torch.Tensor, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """``uint8 [B, channels, H', W']`` → images ``[B, 3, H, W]`` in [-1, 1] (``size``: nearest-resized to it):
    edges white on black, a label map in palette colours, a low-resolution image as itself."""
    c = conditions.detach().cpu()
    if cfg.kind == "edges":
        x = (c.float() * 2 - 1).expand(-1, 3, -1, -1)
    elif cfg.kind == "segmentation":
        x = _palette(cfg.num_classes)[c[:, 0].long().clamp(0, cfg.num_classes - 1)].permute(0, 3, 1, 2)
    else:
        x = c.float() / 127.5 - 1
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        x = torch.nn.functional.interpolate(x, size=size, mode="nearest")
    return x.contiguous()


__all__ = [
    "ConditionError", "edge_map", "is_line_drawing", "edges_from_drawing", "lowres_image", "read_label_map",
    "fit_label_map", "check_label_map", "find_label_file", "make_condition", "condition_size",
    "condition_from_picture", "condition_pictures", "SEG_MEMBER", "LABEL_EXTS",
]
