"""The one way an image file becomes a tensor, used by training, tokenizing, FID and sampling edits.

bytes → RGB (``decode_image``: EXIF rotation applied; L / LA / P / RGBA / CMYK / 16-bit / float modes
converted, transparency shown over white as a viewer would, 16-bit samples mapped 0..65535 → 0..255)
→ the largest square, centred or at a random offset, resized to S×S with bicubic filtering
(``crop_square``; taming's and MaskGIT's "shorter side to S, then crop") → uint8 ``[S, S, 3]`` →
float ``[B, 3, S, S]`` in [-1, 1] (``images_from_uint8``; ``images_to_uint8`` is its inverse). A file
that cannot be used raises ``SkipSample`` with the reason it is counted under (``empty`` for no bytes at
all). Which files of a folder are images is ``list_images`` (regular files by extension, hidden files and
folders left out: a FIFO or device named ``x.jpg`` would block or never end when read).
"""
from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm")


# --------------------------------------------------------------------------------------
# Decoding: bytes → RGB image → S×S uint8, or a counted reason why not
# --------------------------------------------------------------------------------------
class SkipSample(Exception):
    """A sample that cannot be used; ``reason`` is the key it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_image(data: bytes, min_size: int = 0) -> tuple[Image.Image, Optional[str]]:
    """Decode to RGB. Returns (image, conversion), conversion ``"mode:<mode>"`` when the stored
    mode was not RGB. ``min_size`` lets JPEG decode at a reduced scale that stays ≥ min_size.
    Raises ``SkipSample`` (corrupt | truncated | too_large | empty | unsupported_mode)."""
    if not data:
        raise SkipSample("empty", "the file holds no bytes")
    try:
        img = Image.open(io.BytesIO(data))
        if min_size and img.format == "JPEG":
            img.draft(img.mode, (min_size, min_size))
        img.load()
    except Image.DecompressionBombError as e:
        raise SkipSample("too_large", str(e)) from None
    except UnidentifiedImageError as e:
        raise SkipSample("corrupt", str(e)) from None
    except Exception as e:  # PIL reports damage as OSError, ValueError, SyntaxError, struct.error...
        reason = "truncated" if "truncat" in str(e).lower() else "corrupt"
        raise SkipSample(reason, f"{type(e).__name__}: {e}") from None
    if img.width == 0 or img.height == 0:
        raise SkipSample("empty")
    try:  # in place: without an orientation tag the default would copy every image
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # a broken EXIF block must not cost the image; keep it as it is
        pass
    return to_rgb(img)


def to_rgb(img: Image.Image) -> tuple[Image.Image, Optional[str]]:
    mode = img.mode
    if mode == "RGB":
        return img, None
    conversion = f"mode:{mode}"
    try:
        if mode == "I" or mode.startswith("I;16"):
            # 16-bit samples (PNG/TIFF): map 0..65535 onto 0..255 rather than clip at 255.
            a = np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 257.0
            return Image.fromarray(np.round(a).astype(np.uint8)).convert("RGB"), conversion
        if mode == "F":
            a = np.nan_to_num(np.asarray(img, dtype=np.float64))
            a = a * 255.0 if a.max(initial=0.0) <= 1.0 else a  # float images are [0,1] or [0,255]
            return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8)).convert("RGB"), conversion
        if mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            if img.mode == "RGB":
                return img, conversion
        if img.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
            # Transparent pixels hold arbitrary colours; show them over white as a viewer would.
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB"), conversion
        return img.convert("RGB"), conversion
    except (ValueError, OSError) as e:
        raise SkipSample("unsupported_mode", f"{mode}: {e}") from None


def crop_square(
    img: Image.Image, size: int, rng: Optional[np.random.Generator] = None
) -> tuple[Image.Image, bool]:
    """The largest square (centred, or at a random offset when ``rng`` is given) resized to
    size × size, i.e. shorter side → size then crop. Returns (image, upscaled)."""
    W, H = img.size
    side = min(W, H)
    if rng is None:
        left, top = (W - side) // 2, (H - side) // 2
    else:
        left, top = int(rng.integers(0, W - side + 1)), int(rng.integers(0, H - side + 1))
    box = (left, top, left + side, top + side)
    if side == size:
        return img.crop(box), False
    return img.resize((size, size), Image.Resampling.BICUBIC, box=box), side < size


def load_image(
    data: bytes, size: int, rng: Optional[np.random.Generator] = None
) -> tuple[np.ndarray, list[str]]:
    """Decode and crop to ``uint8 [size, size, 3]`` (centred, or at a random offset with ``rng``).
    Returns (array, conversions: ``"mode:<mode>"`` and/or ``"upscaled"``); raises ``SkipSample``."""
    img, conversion = decode_image(data, min_size=size)
    img, upscaled = crop_square(img, size, rng)
    conversions = [c for c in (conversion, "upscaled" if upscaled else None) if c]
    return np.asarray(img, dtype=np.uint8), conversions


def images_from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] → float32 [B, 3, H, W] in [-1, 1], the inverse of
    ``images_to_uint8``. The result keeps the input's channels-last strides (not contiguous)."""
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def walk_files(root: Path, others: Optional[list[str]] = None) -> Iterator[str]:
    """Regular files under ``root`` (recursive, following links, hidden files and folders left out), as
    '/'-joined relative paths in ``os.walk``'s top-down order. Entries that are neither folders nor regular
    files (FIFOs, sockets, devices, broken links) are left out, and appended to ``others`` if given."""
    pending = [(str(root), "")]
    while pending:
        folder, rel = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:  # as os.walk: an unreadable folder is passed over
            continue
        folders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            name = f"{rel}/{entry.name}" if rel else entry.name
            try:  # both follow links; a FIFO, socket or device is neither
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError:
                is_dir = is_file = False
            if is_dir:
                folders.append((entry.path, name))
            elif is_file:
                yield name
            elif others is not None:
                others.append(name)
        pending.extend(reversed(folders))


def is_image_file(path: str) -> bool:
    """Whether the file name's extension is one of ``IMAGE_EXTS`` (any case)."""
    return path.rpartition("/")[2].rpartition(".")[2].lower() in IMAGE_EXTS


def list_images(root: Path) -> list[str]:
    """Image files under ``root`` (``walk_files`` by extension), as sorted relative paths."""
    others: list[str] = []
    files = sorted(f for f in walk_files(root, others) if is_image_file(f))
    odd = [f for f in others if is_image_file(f)]
    if odd:
        log.warning("%s: %d entries named as images are not regular files (FIFOs, sockets, devices, broken "
                    "links) and are left out, e.g. %s", root, len(odd), ", ".join(odd[:3]))
    return files


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float ``[B, 3, H, W]`` in [-1, 1] → uint8 ``[B, H, W, 3]`` on the same device (rounded, clamped;
    a channels-last view): the inverse of :func:`images_from_uint8`."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1)


def read_image_file(path: os.PathLike, size: Optional[int] = None) -> tuple[np.ndarray, list[str]]:
    """An image file as uint8 ``[H, W, 3]`` (``size``: centre-cropped to ``[size, size, 3]``), with its
    conversions; raises ``SkipSample`` (``io_error`` when it cannot be read)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SkipSample("io_error", f"{path}: {e.strerror or type(e).__name__}") from None
    if size is not None:
        return load_image(data, size)
    img, conversion = decode_image(data)
    return np.asarray(img, dtype=np.uint8), [conversion] if conversion else []
