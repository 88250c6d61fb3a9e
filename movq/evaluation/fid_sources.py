"""Reading the inputs of FID: image folders, webdataset shards, ``.npz`` images, ``.npz`` statistics.

:func:`open_source` turns a command-line spec into an :class:`ImageSource` or, for a statistics
file, an :class:`FIDStats`: an image folder (recursive), webdataset shards (local ``.tar`` paths,
brace or glob patterns; one ``jpg/jpeg/png/webp`` member per sample, as in the webdataset format,
github.com/webdataset/webdataset), an ``.npz`` of uint8 NHWC images under ``arr_0`` (as DiT's
``sample_ddp.py`` writes for the ADM evaluation suite), or an ``.npz`` of ``mu`` / ``sigma`` (the
pytorch-fid statistics layout). Non-RGB images are converted and counted; unreadable ones are
skipped and counted in a :class:`SourceReport`; sizes may differ (Inception resizes each image to
299²). A problem with the source itself is a :class:`FIDError` with a one-line message.

:class:`FIDStats` and :class:`FIDError` live here, below :mod:`movq.fid`, because a statistics file
is itself a source; :mod:`movq.fid` re-exports every name.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import re
import tarfile
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image

from movq.data.decode import IMAGE_EXTS, SkipSample, decode_image, list_images, read_image_file, to_rgb
from movq.utils import atomic_path

logger = logging.getLogger(__name__)



class FIDError(ValueError):
    """A source, statistics file or setting that FID cannot use; the message is one line."""


# --------------------------------------------------------------------------------------
# Statistics files
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FIDStats:
    """Mean [D] and covariance [D, D] of features, float64. ``num_images`` 0 means unknown."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int = 0

    @classmethod
    def from_arrays(cls, mu, sigma, num_images: int = 0, name: str = "statistics") -> FIDStats:
        mu, sigma = np.asarray(mu), np.asarray(sigma)
        if mu.ndim != 1:
            raise FIDError(f"{name}: 'mu' has shape {mu.shape}, expected a vector [D]")
        d = mu.shape[0]
        if sigma.shape != (d, d):
            raise FIDError(f"{name}: 'sigma' has shape {sigma.shape}, expected ({d}, {d}) to match 'mu'")
        if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
            raise FIDError(f"{name}: 'mu'/'sigma' have dtypes {mu.dtype}/{sigma.dtype}, expected floats")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise FIDError(f"{name}: 'mu' or 'sigma' contains NaN or inf")
        return cls(mu.astype(np.float64), sigma.astype(np.float64), int(num_images))

    @classmethod
    def load(cls, path: Union[str, Path]) -> FIDStats:
        """Read an ``.npz`` with ``mu`` and ``sigma`` (and optionally ``num_images``)."""
        try:
            with np.load(path, allow_pickle=False) as f:
                keys = set(f.files)
                if not {"mu", "sigma"} <= keys:
                    raise FIDError(f"{path}: keys {sorted(keys)}; FID statistics need 'mu' and 'sigma'")
                n = int(f["num_images"]) if "num_images" in keys else 0
                return cls.from_arrays(f["mu"], f["sigma"], n, name=str(path))
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            if isinstance(e, FIDError):
                raise
            raise FIDError(f"{path}: not a readable .npz of statistics ({e})") from None

    def save(self, path: Union[str, Path], spatial: Optional[FIDStats] = None) -> None:
        """Write ``mu``, ``sigma``, ``num_images`` atomically (temp file + rename); with ``spatial`` also
        ``mu_s``, ``sigma_s``, as ADM's reference batches hold sFID's statistics."""
        extra = {} if spatial is None else {"mu_s": spatial.mu, "sigma_s": spatial.sigma}
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: savez adds no ".npz"
            np.savez(f, mu=self.mu, sigma=self.sigma, num_images=np.int64(self.num_images), **extra)

    @classmethod
    def load_spatial(cls, path: Union[str, Path]) -> Optional[FIDStats]:
        """sFID's statistics ``mu_s`` / ``sigma_s`` of a statistics file (ADM's layout), or None without them."""
        try:
            with np.load(path, allow_pickle=False) as f:
                if not {"mu_s", "sigma_s"} <= set(f.files):
                    return None
                n = int(f["num_images"]) if "num_images" in f.files else 0
                return cls.from_arrays(f["mu_s"], f["sigma_s"], n, name=f"{path} (mu_s / sigma_s)")
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            if isinstance(e, FIDError):
                raise
            raise FIDError(f"{path}: not a readable .npz of statistics ({e})") from None


# --------------------------------------------------------------------------------------
# Image sources
# --------------------------------------------------------------------------------------
@dataclass
class SourceReport:
    """What a source yielded: images used, skipped (unreadable), converted (by mode), sizes."""

    source: str
    kind: str
    images: int = 0
    skipped: int = 0
    converted: Counter = field(default_factory=Counter)
    sizes: Counter = field(default_factory=Counter)

    def merge(self, other: SourceReport) -> None:
        self.images += other.images
        self.skipped += other.skipped
        self.converted.update(other.converted)
        self.sizes.update(other.sizes)

    def as_dict(self, max_sizes: int = 20) -> dict:
        sizes = dict(self.sizes.most_common(max_sizes))
        if len(self.sizes) > max_sizes:  # e.g. ImageNet: thousands of sizes, keep the JSON readable
            sizes["other"] = sum(self.sizes.values()) - sum(sizes.values())
        return {
            "source": self.source,
            "kind": self.kind,
            "images": self.images,
            "skipped": self.skipped,
            "converted": dict(self.converted),
            "sizes": sizes,
        }


def _note(report: Optional[SourceReport], conversions: list[str]) -> None:
    """Count a decoded image's mode conversion (``"mode:RGBA"`` → ``RGBA``) in the report."""
    if report is not None:
        report.converted.update(c.split(":", 1)[1] for c in conversions if c.startswith("mode:"))


def array_to_rgb(arr: np.ndarray, report: Optional[SourceReport] = None) -> np.ndarray:
    """uint8 [H, W], [H, W, 1|3|4] -> [H, W, 3], converted as an image file of that mode would be
    (gray repeated, alpha over white: :func:`movq.data.decode.decode_image`'s rules; counted)."""
    if arr.ndim == 3 and arr.shape[2] == 3:
        return arr
    mode = {1: "L", 4: "RGBA"}[arr.shape[2]] if arr.ndim == 3 else "L"
    img, conversion = to_rgb(Image.fromarray(arr.reshape(arr.shape[:2]) if mode == "L" else arr, mode))
    _note(report, [conversion] if conversion else [])
    return np.asarray(img, dtype=np.uint8)


def _decoded(data: bytes, report: SourceReport) -> np.ndarray:
    """Image bytes → uint8 [H, W, 3] through the training decoder; ``SkipSample`` when unusable."""
    img, conversion = decode_image(data)
    _note(report, [conversion] if conversion else [])
    return np.asarray(img, dtype=np.uint8)


class ImageSource:
    """Images of a folder, webdataset shards or an ``.npz`` (``arr_0``); see :func:`open_source`.

    ``iterate(report, rank, world)`` yields uint8 [H, W, 3] arrays for the global positions ``i``
    with ``i % world == rank`` (and ``i < max_images``), so ranks see disjoint slices; others are
    skipped without decoding. Positions count entries (files, npz rows, image members), so an
    unreadable entry within the first ``max_images`` is skipped, not replaced. Every image yielded
    is counted in ``report`` (``images``, ``sizes``), as skips and conversions are.
    """

    def __init__(self, spec: str, kind: str, paths: list[Path], total: Optional[int] = None):
        if kind not in ("folder", "shards", "npz"):
            raise ValueError(f"kind must be 'folder', 'shards' or 'npz', got {kind!r}")
        self.spec, self.kind, self.paths, self.total = spec, kind, paths, total

    def new_report(self) -> SourceReport:
        return SourceReport(self.spec, self.kind)

    def expected(self, max_images: Optional[int] = None) -> Optional[int]:
        """Entries ``iterate`` visits over all ranks, for progress bars; None when unknown (shards)."""
        return self.total if max_images is None or self.total is None else min(self.total, max_images)

    def iterate(
        self, report: SourceReport, rank: int = 0, world: int = 1, max_images: Optional[int] = None
    ) -> Iterator[np.ndarray]:
        for _, img in self.iterate_keyed(report, rank, world, max_images):
            yield img

    def iterate_keyed(
        self, report: SourceReport, rank: int = 0, world: int = 1, max_images: Optional[int] = None
    ) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
        """``iterate`` with each image's place in the source, ``(shard, entry)`` (``(0, i)`` for folders and
        ``.npz``): sorting by it gives the source's own order whatever the number of ranks."""
        limit = max_images if max_images is not None else float("inf")
        read = {"folder": self._folder, "npz": self._npz, "shards": self._shards}[self.kind]
        # closing(): a consumer that stops early closes the reader's open zip / tar file at once
        with contextlib.closing(read(report, rank, world, limit)) as images:
            for key, img in images:
                report.images += 1
                report.sizes[f"{img.shape[1]}x{img.shape[0]}"] += 1
                yield key, img

    def _folder(self, report, rank, world, limit):
        for i in range(rank, min(len(self.paths), limit), world):
            path = self.paths[i]
            try:
                arr, conversions = read_image_file(path)
            except SkipSample as e:
                report.skipped += 1
                logger.warning("FID: skipped unreadable image %s (%s)", path, e)
                continue
            _note(report, conversions)
            yield (0, i), arr

    def _npz(self, report, rank, world, limit):
        path = self.paths[0]
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            shape, dtype = _npy_header(f, path)
            row = int(np.prod(shape[1:])) * dtype.itemsize
            n = min(shape[0], limit)
            chunk = max(1, (64 << 20) // max(row, 1))  # read ~64 MB at a time
            for start in range(0, n, chunk):
                k = min(chunk, n - start)
                block = np.frombuffer(f.read(k * row), dtype=dtype)
                if block.size * dtype.itemsize != k * row:
                    raise FIDError(f"{path}: arr_0 is truncated at image {start} of {shape[0]}")
                block = block.reshape(k, *shape[1:])
                for j in range(k):
                    if (start + j) % world == rank:
                        yield (0, start + j), array_to_rgb(block[j], report)

    def _shards(self, report, rank, world, limit):
        # With at least one shard per rank (and no cap to count against), ranks split whole
        # shards and each byte is read once; otherwise every rank walks every shard and decodes
        # its own positions.
        by_shard = len(self.paths) >= world and limit == float("inf")
        numbers = range(rank, len(self.paths), world) if by_shard else range(len(self.paths))
        if by_shard:
            rank, world = 0, 1
        i = 0
        for number in numbers:
            shard, entry = self.paths[number], 0
            seen: set[str] = set()
            try:
                with tarfile.open(shard, mode="r|*") as tar:
                    for member in tar:
                        if i >= limit:
                            return
                        base = member.name.rsplit("/", 1)[-1]
                        key = member.name[: len(member.name) - len(base)] + base.split(".", 1)[0]
                        ext = base.rsplit(".", 1)[-1].lower() if "." in base else ""
                        if not member.isfile() or ext not in IMAGE_EXTS or key in seen:
                            continue
                        seen.add(key)  # one image per webdataset sample
                        mine = i % world == rank
                        i, entry = i + 1, entry + 1
                        if not mine:
                            continue
                        try:
                            arr = _decoded(tar.extractfile(member).read(), report)
                        except SkipSample as e:
                            report.skipped += 1
                            logger.warning("FID: skipped unreadable %s in %s (%s)", member.name, shard, e)
                            continue
                        yield (number, entry - 1), arr
            except (tarfile.TarError, EOFError, OSError) as e:
                report.skipped += 1
                logger.warning("FID: shard %s is truncated or corrupt after %d images (%s); rest skipped", shard, i, e)


def _npy_header(f, path) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise FIDError(f"{path}: arr_0 uses .npy format {version}, expected 1.0 or 2.0")
    if dtype != np.uint8:
        raise FIDError(f"{path}: arr_0 has dtype {dtype}, expected uint8 images [N, H, W, 3] in 0..255")
    if fortran or not (len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3, 4))):
        raise FIDError(f"{path}: arr_0 has shape {shape}, expected uint8 NHWC images [N, H, W, 3] (C-ordered)")
    return shape, dtype


def _expand_shards(spec: str) -> list[str]:
    from braceexpand import braceexpand

    out: list[str] = []
    for part in braceexpand(spec):
        out.extend(sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part])
    return out


@dataclass
class MetricSource:
    """One input of the ADM metrics: its statistics where a file publishes them (FID: ``mu`` / ``sigma``,
    sFID: ``mu_s`` / ``sigma_s``), and its images where it has them (an image source, or ``arr_0`` of an
    ADM reference batch such as ``VIRTUAL_imagenet256_labeled.npz``, which holds both)."""

    spec: str
    stats: Optional[FIDStats] = None
    spatial: Optional[FIDStats] = None
    images: Optional[ImageSource] = None


def open_metric_source(spec: Union[str, Path]) -> MetricSource:
    """Like :func:`open_source`, also reading the images and spatial statistics of a statistics file."""
    spec = str(spec)
    opened = open_source(spec)
    if isinstance(opened, ImageSource):
        return MetricSource(spec, images=opened)
    images = None
    with zipfile.ZipFile(Path(spec).expanduser()) as zf:
        if "arr_0.npy" in zf.namelist():
            with zf.open("arr_0.npy") as f:
                shape, _ = _npy_header(f, spec)
            images = ImageSource(spec, "npz", [Path(spec).expanduser()], total=shape[0])
    return MetricSource(spec, opened, FIDStats.load_spatial(Path(spec).expanduser()), images)


def open_source(spec: Union[str, Path]) -> Union[ImageSource, FIDStats]:
    """Interpret a command-line source; raises FIDError when it cannot be used."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if spec.startswith(("http://", "https://", "pipe:", "s3://", "gs://")):
        raise FIDError(f"{spec}: only local files are read (no network at run time)")
    if path.is_dir():
        if (path / ".sample_spec.json").is_file():  # tools/sample.py's output: its samples, not grid/steps/edit
            files = sorted(p for p in path.glob("*.png") if re.fullmatch(r"\d{6}\.png", p.name))
            if not files:
                raise FIDError(f"{spec}: a tools/sample.py folder without samples (NNNNNN.png)")
            return ImageSource(spec, "folder", files, total=len(files))
        files = [path / rel for rel in list_images(path)]  # the training loader's listing
        if not files:
            raise FIDError(
                f"{spec}: no images ({'/'.join(IMAGE_EXTS)}) found in this folder or below; "
                "for webdataset shards pass the .tar paths or a pattern like dir/shard-{000000..000009}.tar"
            )
        return ImageSource(spec, "folder", files, total=len(files))
    if spec.endswith(".npz"):
        if not path.is_file():
            raise FIDError(f"{spec}: no such file")
        try:
            with zipfile.ZipFile(path) as zf:
                names = {n[:-4] if n.endswith(".npy") else n for n in zf.namelist()}
                shape = None
                if "arr_0" in names and not {"mu", "sigma"} & names:
                    with zf.open("arr_0.npy") as f:
                        shape, _ = _npy_header(f, spec)
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            if isinstance(e, FIDError):
                raise
            raise FIDError(f"{spec}: not a readable .npz ({e})") from None
        if {"mu", "sigma"} & names:
            return FIDStats.load(path)  # says which of the two is missing, if one is
        if shape is None:
            raise FIDError(
                f"{spec}: keys {sorted(names)}; expected 'arr_0' (uint8 NHWC images) or 'mu' and 'sigma' (statistics)"
            )
        if shape[0] == 0:
            raise FIDError(f"{spec}: arr_0 holds no images")
        return ImageSource(spec, "npz", [path], total=shape[0])
    shards = _expand_shards(spec)
    if any(s.endswith((".tar", ".tar.gz", ".tgz")) for s in shards):
        missing = [s for s in shards if not Path(s).is_file()]
        if missing or not shards:
            raise FIDError(f"{spec}: shard {missing[0] if missing else spec} not found ({len(missing)} missing)")
        return ImageSource(spec, "shards", [Path(s) for s in shards])
    if not path.exists():
        raise FIDError(f"{spec}: no such file or folder")
    raise FIDError(f"{spec}: not an image folder, webdataset .tar shard(s), or .npz")
