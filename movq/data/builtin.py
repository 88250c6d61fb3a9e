"""The built-in offline dataset: random crops of the photographs shipped with scikit-image and
scikit-learn, packed once into train/val shards (``movq.shards`` format) in a cache folder.

It lets a fresh install train without downloading anything. The cache key hashes the recipe
(``_BUILTIN_VERSION``, image size, seed, photo lists, sizes, shard counts, JPEG quality), so
equal settings always give byte-identical shards. ``movq.data`` reads them like any shards.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from movq.config import DataConfig
from movq.data.shards import ShardWriter, write_manifest
from movq.utils import atomic_folder, cache_dir

logger = logging.getLogger(__name__)

_BUILTIN_VERSION = 1  # part of the cache key: bump it when the recipe below changes
# Validation photographs are never cropped for training; the stereo pair stays together.
BUILTIN_TRAIN_PHOTOS = (
    "astronaut", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
    "motorcycle_left", "motorcycle_right", "china", "camera", "moon", "grass", "gravel", "brick",
)
BUILTIN_VAL_PHOTOS = ("chelsea", "flower", "coins")
_BUILTIN_SHARDS = {"train": 8, "val": 4}  # enough for 2 ranks x 2 workers to each get shards
_BUILTIN_QUALITY = 95


def require_photo_packages() -> None:
    """The photographs ship inside scikit-image and scikit-learn, an optional extra of movq."""
    missing = [pkg for pkg, module in (("scikit-image", "skimage"), ("scikit-learn", "sklearn"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise ModuleNotFoundError(
            f"data.source=builtin crops photographs that ship inside scikit-image and scikit-learn, and "
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: "
            "pip install 'movq[builtin]' (or use data.source=folder / shards)", name="movq[builtin]")


def _photo(name: str) -> np.ndarray:
    """[H, W, 3] uint8 of a photograph shipped inside scikit-learn or scikit-image (offline)."""
    if name in ("china", "flower"):
        # The file load_sample_image reads, opened directly: importing sklearn costs seconds.
        spec = importlib.util.find_spec("sklearn")
        if spec is None or not spec.submodule_search_locations:
            require_photo_packages()
        path = Path(spec.submodule_search_locations[0]) / "datasets" / "images" / f"{name}.jpg"
        with Image.open(path) as img:
            a = np.asarray(img.convert("RGB"))
    else:
        import skimage.data

        if name.startswith("motorcycle_"):
            left, right, _ = skimage.data.stereo_motorcycle()
            a = left if name == "motorcycle_left" else right
        else:
            a = getattr(skimage.data, name)()
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a[..., :3], dtype=np.uint8)


def _builtin_crops(photos: Sequence[str], n: int, size: int, rng: np.random.Generator):
    """n JPEG crops: a random photo, a square of log-uniform side between max(size, short/4)
    and the short side (textures to whole scenes), resized to size x size."""
    images = [Image.fromarray(_photo(p)) for p in photos]
    for _ in range(n):
        j = int(rng.integers(len(images)))
        W, H = images[j].size
        short = min(W, H)
        lo = min(short, max(size, short // 4))
        side = int(round(float(np.exp(rng.uniform(np.log(lo), np.log(short))))))
        left, top = int(rng.integers(0, W - side + 1)), int(rng.integers(0, H - side + 1))
        crop = images[j].resize((size, size), Image.Resampling.BICUBIC,
                                box=(left, top, left + side, top + side))
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=_BUILTIN_QUALITY)
        yield buf.getvalue(), {"photo": photos[j], "box": [left, top, side]}


def builtin_dataset(cfg: DataConfig) -> Path:
    """Build (once) and return the builtin dataset's folder, holding ``train/`` and ``val/``
    shards with manifests, under ``cache_dir(cfg.cache_dir)/builtin/`` keyed by its parameters.

    Atomic and safe to race: each process builds in its own temp folder and renames it into
    place; if another got there first, its (identical) result is kept."""
    spec = {"version": _BUILTIN_VERSION, "image_size": cfg.image_size, "seed": cfg.seed % 2**32,
            "train": [list(BUILTIN_TRAIN_PHOTOS), cfg.builtin_train_size],
            "val": [list(BUILTIN_VAL_PHOTOS), cfg.builtin_val_size],
            "shards": _BUILTIN_SHARDS, "quality": _BUILTIN_QUALITY}
    if cfg.builtin_train_size < 1 or cfg.builtin_val_size < 1:
        raise ValueError("data.builtin_train_size and data.builtin_val_size must be ≥ 1")
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    root = cache_dir(cfg.cache_dir) / "builtin" / f"{cfg.image_size}px-{key}"
    if (root / "spec.json").is_file():  # written last, so the folder is complete
        return root
    require_photo_packages()  # only to build it: a cached copy reads without them
    logger.info("building the builtin dataset in %s", root)
    with atomic_folder(root) as tmp:
        for tag, split in enumerate(("train", "val")):
            photos, n = spec[split]
            n_shards = min(_BUILTIN_SHARDS[split], n)
            writer = ShardWriter(tmp / split, maxcount=n)
            rng = np.random.default_rng([spec["seed"], _BUILTIN_VERSION, tag])
            for i, (data, meta) in enumerate(_builtin_crops(photos, n, cfg.image_size, rng)):
                if i and i * n_shards // n != (i - 1) * n_shards // n:
                    writer.flush()
                writer.write(f"{i:06d}", {"jpg": data, "json": json.dumps(meta).encode()})
            write_manifest(tmp / split, writer.close(), classes=[], image_size=cfg.image_size,
                           image_format="jpg", photos=photos)
        (tmp / "spec.json").write_text(json.dumps(spec, indent=1))
    return root
