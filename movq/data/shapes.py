"""The shapes dataset: procedurally drawn, class-labelled images whose samples a person and a
classifier (``movq.evaluation.judge``) can judge, packed once into train/val shards.

The photo crops of ``movq.data.builtin`` look like texture, so a sample grid cannot tell a working
prior from a broken one. Here every image holds one filled shape of a known kind (the class) on a
varied background, so "is this a star?" has an answer:

* classes (``SHAPE_CLASSES``): circle, square, triangle, cross, ring, star, crescent, heart;
  image i of a split has class ``i % 8`` (balanced splits);
* the shape: one of 8 evenly spaced hues at high saturation and value, kept far (in RGB) from the
  background; a size of 34–45% of the image side as its outer radius; a random position fully inside
  the image; standing near upright, tilted by at most ±15° (a triangle and a star point up, a crescent
  opens to the right);
* the background: a linear or radial gradient between two muted colours (the second pulled halfway
  to the first), smooth value noise, or soft stripes (period 20–40% of the side) at a random angle.

Recipe history (README, "The shapes dataset and the judge"). Recipe 1 → 2 (bigger shapes, half the
background contrast, wider stripes) kept the shape the dominant structure at 32²: the judge recognised
80% of a 600-step tokenizer's reconstructions of recipe 1 (K = 256), 87–92% of recipe 2's (K = 64).
Recipe 2 → 5 is for the priors: with recipe 2's any-angle rotation, any hue and radii of 28–42%, the
class is written in the sub-cell geometry of the ~22 token cells the outline crosses (only ~6 of the
8 × 8 cells lie inside a shape; an autoregressive prior spent 9.2 bits on each outline cell), and
both priors drew coloured blobs (class accuracy 0.37 / 0.21 of the judge's 1.00). Trial recipes 3
(upright only: 0.45 / 0.29) and 4 (3 without value noise: 0.43 / 0.25, so the background was not what
cost them) were measured and not kept; recipe 5 (upright, 8 hues, radii 34–45%) gave 0.77 / 0.55 with
the same recipe-2 tokenizer and prior settings.

Shapes are drawn as a mask at 4× the size and box-downsampled (anti-aliased edges), then blended
over the background. Image i of a split comes from its own generator, seeded by (seed, recipe
version, split, i): a split of n images is the first n images of a longer one, and
:func:`render_shapes` gives the same pixels the shards hold (the judge trains on them directly).

:func:`shapes_split` writes a split in the ``movq.data.shards`` format (PNG, ``.cls`` labels, ``.json``
with what was drawn; the manifest lists the classes) under ``cache_dir()/shapes/`` keyed by a hash
of the recipe, like the builtin dataset: equal settings give byte-identical shards, and
``data.source=shapes`` reads them with labels.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from movq.config import DataConfig
from movq.data.shards import ShardWriter, write_manifest
from movq.utils import atomic_folder, cache_dir

logger = logging.getLogger(__name__)

# Part of the cache key and of every image's seed: bump it when the recipe changes (3 and 4 were trials,
# see the module docstring).
_SHAPES_VERSION = 5
SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "ring", "star", "crescent", "heart")
BACKGROUNDS = ("linear", "radial", "noise", "stripes")
_SPLIT_TAGS = {"train": 0, "val": 1}  # a split's images come from generators of their own
_SHARDS = {"train": 8, "val": 4}  # as the builtin dataset: 2 ranks × 2 workers each get shards
_SUPERSAMPLE = 4  # the mask is drawn at 4× and box-downsampled: 16 samples per pixel
_RADIUS = (0.34, 0.45)  # outer radius as a fraction of the image side (v1: 0.22-0.40, v2: 0.28-0.42)
_BACKGROUND_CONTRAST = 0.5  # the second background colour is pulled halfway to the first (v1: 1)
_MIN_COLOUR_DISTANCE = 110.0  # RGB distance of the shape from the mean background colour
_TILT = math.radians(15)  # shapes stand near upright: a tilt of at most ±15° (v2: any rotation; hearts ±25°)
# The upright angle of each kind as :func:`_shape_mask` draws it (image y points down): a triangle's and
# a star's first vertex points up, a crescent opens to the right; the others look the same at 0.
_UPRIGHT = {"triangle": -math.pi / 2, "star": -math.pi / 2}
_HUES = 8  # the shape's hue is one of 8 evenly spaced hues (v2: any hue, saturation ≥ 0.65, value ≥ 0.55)


# --------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------
def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _polygon(draw: ImageDraw.ImageDraw, points: np.ndarray, centre: np.ndarray, fill: int) -> None:
    draw.polygon([tuple(p) for p in (points + centre).tolist()], fill=fill)


def _ellipse(draw: ImageDraw.ImageDraw, centre: np.ndarray, r: float, fill: int) -> None:
    x, y = centre.tolist()
    draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)


def _shape_mask(kind: str, size: int, centre: np.ndarray, r: float, angle: float,
                rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """float32 [size, size] coverage in [0, 1] of one shape, and the parameters drawn for it."""
    big = size * _SUPERSAMPLE
    c, R = centre * _SUPERSAMPLE, r * _SUPERSAMPLE
    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)
    extra: dict = {}
    if kind == "circle":
        _ellipse(draw, c, R, 255)
    elif kind == "square":
        half = R / math.sqrt(2)  # the corners lie on the outer radius
        pts = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
        _polygon(draw, _rotate(pts, angle), c, 255)
    elif kind == "triangle":
        t = angle + np.arange(3) * 2 * math.pi / 3
        _polygon(draw, R * np.stack([np.cos(t), np.sin(t)], 1), c, 255)
    elif kind == "cross":
        arm = float(rng.uniform(0.32, 0.45)) * R  # half the arm's width
        bar = np.array([[-R, -arm], [R, -arm], [R, arm], [-R, arm]])
        _polygon(draw, _rotate(bar, angle), c, 255)
        _polygon(draw, _rotate(bar[:, ::-1], angle), c, 255)
        extra["arm"] = round(arm / R, 3)
    elif kind == "ring":
        inner = float(rng.uniform(0.5, 0.68))
        _ellipse(draw, c, R, 255)
        _ellipse(draw, c, inner * R, 0)
        extra["inner"] = round(inner, 3)
    elif kind == "star":
        inner = float(rng.uniform(0.38, 0.5))
        t = angle + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, R, inner * R)
        _polygon(draw, radii[:, None] * np.stack([np.cos(t), np.sin(t)], 1), c, 255)
        extra["inner"] = round(inner, 3)
    elif kind == "crescent":
        cut, shift = float(rng.uniform(0.78, 0.9)), float(rng.uniform(0.4, 0.55))
        _ellipse(draw, c, R, 255)
        _ellipse(draw, c + shift * R * np.array([math.cos(angle), math.sin(angle)]), cut * R, 0)
        extra.update(cut=round(cut, 3), shift=round(shift, 3))
    elif kind == "heart":
        t = np.linspace(0, 2 * math.pi, 96, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # image y points down
        pts = np.stack([x, y - 2.5], 1) * (R / 16.5)  # centred on its bounding box (y in [-14.5, 14.5]), within ~R
        _polygon(draw, _rotate(pts, angle), c, 255)
    else:
        raise ValueError(f"shape kind must be one of {list(SHAPE_CLASSES)}, got {kind!r}")
    mask = img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(mask, dtype=np.float32) / 255.0, extra


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (all in [0, 1]) → RGB float in [0, 255]."""
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32) * 255.0


def _background(size: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """float32 [size, size, 3] in [0, 255] and its description."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    a = _hsv(rng.uniform(), rng.uniform(0.0, 0.45), rng.uniform(0.25, 0.9))  # muted colours
    b = _hsv(rng.uniform(), rng.uniform(0.0, 0.45), rng.uniform(0.25, 0.9))
    b = a + _BACKGROUND_CONTRAST * (b - a)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    if kind == "linear":
        t = rng.uniform(0, 2 * math.pi)
        u = math.cos(t) * (xx - 0.5) + math.sin(t) * (yy - 0.5)
        w = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    elif kind == "radial":
        cx, cy = rng.uniform(0.0, 1.0, 2)
        d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        w = d / max(float(d.max()), 1e-6)
    elif kind == "noise":
        cells = int(rng.integers(3, 8))
        coarse = rng.uniform(0, 255, (cells, cells)).astype(np.uint8)
        w = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC),
                       dtype=np.float32) / 255.0
    else:  # stripes
        t, period = rng.uniform(0, math.pi), rng.uniform(0.2, 0.4)
        u = math.cos(t) * xx + math.sin(t) * yy
        w = 0.5 + 0.5 * np.sin(2 * math.pi * u / period)
    img = a + w[..., None] * (b - a)
    return img, {"kind": kind, "colours": [a.round().astype(int).tolist(), b.round().astype(int).tolist()]}


def render_shape(index: int, size: int = 64, seed: int = 0, split: str = "train") -> tuple[np.ndarray, int, dict]:
    """Image ``index`` of a split: ``(uint8 [size, size, 3], label, what was drawn)``."""
    img, label, info, _ = _render(index, size, seed, split)
    return img, label, info


def shape_label_map(index: int, size: int = 64, seed: int = 0, split: str = "train") -> np.ndarray:
    """The segmentation of image ``index`` (same generator, so it matches the pixels): ``uint8 [size, size]``,
    0 = background, 1 + class = the shape (pixels it covers at least half of): 1 + 8 classes."""
    _, label, _, mask = _render(index, size, seed, split)
    return np.where(mask >= 0.5, 1 + label, 0).astype(np.uint8)


def _render(index: int, size: int, seed: int, split: str) -> tuple[np.ndarray, int, dict, np.ndarray]:
    """:func:`render_shape` plus the shape's coverage mask ``float32 [size, size]``."""
    if split not in _SPLIT_TAGS:
        raise ValueError(f"split must be one of {list(_SPLIT_TAGS)}, got {split!r}")
    if size < 8:
        raise ValueError(f"shape images must be at least 8 pixels wide, got {size}")
    rng = np.random.default_rng([seed % 2**32, _SHAPES_VERSION, _SPLIT_TAGS[split], index])
    label = index % len(SHAPE_CLASSES)
    kind = SHAPE_CLASSES[label]
    bg, bg_info = _background(size, rng)
    mean = bg.reshape(-1, 3).mean(0)
    for _ in range(64):  # a saturated colour far from the background (almost always the first few)
        colour = _hsv(int(rng.integers(_HUES)) / _HUES, rng.uniform(0.8, 1.0), rng.uniform(0.75, 1.0))
        if np.linalg.norm(colour - mean) >= _MIN_COLOUR_DISTANCE:
            break
    else:  # a muted mid-grey background: black or white is far enough
        colour = np.full(3, 0.0 if mean.mean() > 127 else 255.0, np.float32)
    r = float(rng.uniform(*_RADIUS)) * size
    margin = min(r + 1.0, size / 2)  # a pixel clear of the border where the image leaves room (≥ 32²)
    centre = rng.uniform(margin, size - margin, 2)
    angle = _UPRIGHT.get(kind, 0.0) + float(rng.uniform(-_TILT, _TILT))
    mask, extra = _shape_mask(kind, size, centre, r, angle, rng)
    img = bg + mask[..., None] * (colour - bg)
    info = {"kind": kind, "colour": colour.round().astype(int).tolist(), "radius": round(r, 2),
            "centre": centre.round(2).tolist(), "angle": round(angle, 4), "background": bg_info, **extra}
    return np.clip(np.round(img), 0, 255).astype(np.uint8), label, info, mask


def render_shapes(n: int, size: int = 64, seed: int = 0, split: str = "train",
                  start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images ``start … start + n − 1`` of a split: ``(uint8 [n, size, size, 3], int64 labels [n])``,
    the pixels :func:`shapes_split` stores."""
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be >= 0, got {n} and {start}")
    images, labels = np.zeros((n, size, size, 3), np.uint8), np.zeros(n, np.int64)
    for k in range(n):
        images[k], labels[k], _ = render_shape(start + k, size, seed, split)
    return images, labels


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")  # lossless; zlib at a fixed level gives the same bytes
    return buf.getvalue()


def _samples(n: int, size: int, seed: int, split: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    for i in range(n):
        img, label, info = render_shape(i, size, seed, split)
        yield f"{i:06d}", {"png": _png(img), "cls": str(label).encode(), "json": json.dumps(info).encode()}


# --------------------------------------------------------------------------------------
# The cached shards
# --------------------------------------------------------------------------------------
def shapes_split(cfg: DataConfig, split: str) -> Path:
    """Build (once) and return the folder of one split's shards with its manifest (classes =
    ``SHAPE_CLASSES``): ``cache_dir(cfg.cache_dir)/shapes/<S>px-<key>/<split>-<n>/``, n =
    ``data.builtin_train_size`` or ``data.builtin_val_size``. The key hashes the recipe (version,
    size, seed, shard counts); the split sizes are in the folder name, so a train split is shared
    by runs that differ only in their val size.

    Atomic and safe to race, as :func:`movq.data.builtin.builtin_dataset`: each process builds in
    its own temp folder and renames it into place; if another got there first, its (identical)
    result is kept."""
    if split not in _SPLIT_TAGS:
        raise ValueError(f"split must be one of {list(_SPLIT_TAGS)}, got {split!r}")
    n = cfg.builtin_train_size if split == "train" else cfg.builtin_val_size
    if n < 1:
        raise ValueError("data.builtin_train_size and data.builtin_val_size must be ≥ 1")
    spec = {"version": _SHAPES_VERSION, "image_size": cfg.image_size, "seed": cfg.seed % 2**32,
            "classes": list(SHAPE_CLASSES), "shards": _SHARDS, "format": "png"}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    root = cache_dir(cfg.cache_dir) / "shapes" / f"{cfg.image_size}px-{key}" / f"{split}-{n}"
    if (root / "spec.json").is_file():  # written last, so the folder is complete
        return root
    logger.info("building the shapes dataset's %s split (%d images) in %s", split, n, root)
    with atomic_folder(root) as tmp:
        n_shards = min(_SHARDS[split], n)
        writer = ShardWriter(tmp, maxcount=n)
        for i, (key_i, members) in enumerate(_samples(n, cfg.image_size, spec["seed"], split)):
            if i and i * n_shards // n != (i - 1) * n_shards // n:
                writer.flush()
            writer.write(key_i, members)
        write_manifest(tmp, writer.close(), classes=list(SHAPE_CLASSES), image_size=cfg.image_size,
                       image_format="png", dataset="shapes", split=split, version=_SHAPES_VERSION)
        (tmp / "spec.json").write_text(json.dumps({**spec, "split": split, "count": n}, indent=1))
    return root


def shapes_dataset(cfg: DataConfig) -> dict[str, Path]:
    """Both splits' folders (built first if needed): ``{"train": Path, "val": Path}``."""
    return {split: shapes_split(cfg, split) for split in _SPLIT_TAGS}


__all__ = ["SHAPE_CLASSES", "BACKGROUNDS", "render_shape", "render_shapes", "shape_label_map", "shapes_dataset",
           "shapes_split"]
