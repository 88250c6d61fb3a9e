"""Pack an image folder into webdataset tar shards with a manifest.

    python tools/make_shards.py SRC OUT [--size 256] [--shard-size 1000] [--format jpg]
                                [--labels folder] [--classes-from TRAIN/manifest.json]
    python tools/make_shards.py --verify OUT      # sha256 and sample count of every shard, as listed

SRC is walked recursively. Each sample is ``{key}.{jpg|png|webp}`` + ``{key}.json`` (its source
path) + ``{key}.cls`` (class index, with ``--labels folder``: classes are SRC's sub-folder names,
sorted, as torchvision's ImageFolder does). Images are decoded robustly (movq.data.decode_image:
L/LA/P/RGBA/CMYK/16-bit converted to RGB, EXIF rotation applied), optionally resized (shorter
side to --size, centre crop), and re-encoded; an image that needs none of that and is already in
the target format keeps its original bytes. Unusable files are skipped and counted per reason.
The file order is shuffled (seeded) so that every shard mixes classes. The manifest
(OUT/manifest.json) lists count, classes, image size/format and a sha256 per shard; movq's
readers take the class list and the epoch length from it.

The format follows webdataset (github.com/webdataset/webdataset); tars are written with fixed
headers, so the same input gives byte-identical shards.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import random
import shutil
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from PIL import Image

from movq.data.decode import SkipSample, crop_square, decode_image, is_image_file, walk_files
from movq.data.shards import MANIFEST_NAME, ShardWriter, iter_tar, read_manifest, write_manifest
from movq.data.sources import folder_classes
from movq.utils import sha256_file

FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def _encode(job: tuple) -> tuple[Optional[bytes], Optional[str], list[str]]:
    """(path, size, fmt, quality) → (encoded image or None, skip reason, conversions)."""
    path, size, fmt, quality = job
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None, "io_error", []
    try:
        img, conversion = decode_image(data)
    except SkipSample as e:
        return None, e.reason, []
    conversions = [conversion] if conversion else []
    if size:
        img, upscaled = crop_square(img, size)
        if upscaled:
            conversions.append("upscaled")
    elif not conversions and _original_format(data) == FORMATS[fmt]:
        return data, None, []  # already what we would write: no second lossy encode
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG")
    else:
        img.save(buf, FORMATS[fmt], quality=quality)
    return buf.getvalue(), None, conversions


def _original_format(data: bytes) -> Optional[str]:
    with Image.open(io.BytesIO(data)) as img:
        return img.format


def _walk(src: Path) -> tuple[list[str], int, int]:
    """Sorted relative paths of image files under src, the number of other files, and of entries that
    are not regular files (FIFOs, sockets, devices, broken links: reading them could block)."""
    images, others, odd = [], 0, []
    for f in walk_files(src, odd):
        if is_image_file(f):
            images.append(f)
        else:
            others += 1
    return sorted(images), others, len(odd)


def pack_folder(
    src, out, *, size: Optional[int] = None, shard_size: int = 1000, fmt: str = "jpg",
    quality: int = 95, labels: bool = False, classes: Optional[Sequence[str]] = None,
    shuffle_seed: Optional[int] = 0, workers: int = 1, prefix: str = "shard",
    overwrite: bool = False, log=print,
) -> dict:
    """Pack ``src`` into ``out``; returns the manifest (also written to out/manifest.json)."""
    src, out = Path(src), Path(out)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    if size is not None and size < 1:
        raise ValueError(f"size must be ≥ 1, got {size}")
    if not src.is_dir():
        raise FileNotFoundError(f"source folder {src} does not exist")
    old = sorted(out.glob(f"{prefix}-*.tar")) + ([out / MANIFEST_NAME] if (out / MANIFEST_NAME).exists() else [])
    if old and not overwrite:
        raise FileExistsError(f"{out} already holds shards ({old[0].name}, ...); pass --overwrite")

    files, n_other, n_odd = _walk(src)
    skipped: Counter = Counter({"not_image": n_other} if n_other else {})
    if n_odd:
        skipped["not_regular_file"] = n_odd
    examples: dict[str, list[str]] = {}
    label_of: dict[str, int] = {}
    if labels:
        classes = list(classes) if classes is not None else (folder_classes(src) or [])
        if not classes:
            raise ValueError(f"--labels folder: {src} has no class sub-folders")
        index = {c: i for i, c in enumerate(classes)}
        kept = []
        for f in files:
            top = f.split("/", 1)[0]
            reason = "no_class" if "/" not in f else ("unknown_class" if top not in index else None)
            if reason:
                skipped[reason] += 1
                examples.setdefault(reason, []).append(f)
            else:
                label_of[f] = index[top]
                kept.append(f)
        files = kept
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(files)  # mix classes across shards

    jobs = [(str(src / f), size, fmt, quality) for f in files]
    # New shards go to a staging folder; the old ones (--overwrite) are replaced only once packing succeeded.
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    writer = ShardWriter(stage, prefix=prefix, maxcount=shard_size)
    converted: Counter = Counter()
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_encode, jobs, chunksize=16) if pool else map(_encode, jobs)
        written = 0
        for i, (f, (data, reason, conversions)) in enumerate(zip(files, results)):
            if data is None:
                skipped[reason] += 1
                examples.setdefault(reason, []).append(f)
                continue
            converted.update(conversions)
            members = {fmt: data, "json": json.dumps({"path": f}).encode()}
            if labels:
                members["cls"] = str(label_of[f]).encode()
            writer.write(f"{written:08d}", members)
            written += 1
            if (i + 1) % 10000 == 0:
                log(f"  {i + 1}/{len(files)} files, {written} packed")
        shards = writer.close()
        if not shards:
            raise RuntimeError(f"no usable image under {src} (skipped: {dict(skipped)})")
        for p in old:
            p.unlink()
        for s in shards:
            os.replace(stage / s["name"], out / s["name"])
    finally:
        if pool:  # every result is in, or an error ends the run: either way stop, don't wait for queued files
            pool.terminate()
            pool.join()
        shutil.rmtree(stage, ignore_errors=True)
    manifest = write_manifest(
        out, shards, classes=list(classes) if labels else [], image_size=size, image_format=fmt,
        quality=quality if fmt != "png" else None, source=str(src), skipped=dict(skipped),
        converted=dict(converted),
    )
    log(f"packed {manifest['count']} images into {len(shards)} shards in {out}"
        + (f", {len(classes)} classes" if labels else ""))
    if converted:
        log(f"converted: {dict(converted)}")
    if skipped:
        log(f"skipped {sum(skipped.values())}: {dict(skipped)}")
        for reason, names in examples.items():
            log(f"  {reason}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}")
    return manifest


def verify(out) -> list[str]:
    """Problems with the shards of ``out`` against its manifest (empty when all is well): shards missing,
    not listed, with another sha256, unreadable, or holding another number of samples than listed."""
    manifest = read_manifest(out)
    if manifest is None:
        return [f"no {MANIFEST_NAME} in {out}"]
    problems = []
    listed = {s["name"] for s in manifest["shards"]}
    for path in sorted(Path(out).glob("*.tar")):
        if path.name not in listed:
            problems.append(f"{path}: not listed in the manifest")
    for s in manifest["shards"]:
        path = Path(out) / s["name"]
        if not path.is_file():
            problems.append(f"{path}: missing ({s['count']} samples)")
            continue
        if sha256_file(path) != s["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
        n = 0
        try:
            for _ in iter_tar(str(path)):
                n += 1
        except (tarfile.TarError, OSError, EOFError) as e:
            problems.append(f"{path}: unreadable after {n} samples ({type(e).__name__}: {e})")
            continue
        if n != s["count"]:
            problems.append(f"{path}: {n} samples, the manifest says {s['count']}")
    return problems


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", nargs="?", help="image folder (walked recursively)")
    ap.add_argument("out", nargs="?", help="output folder for the shards and manifest.json")
    ap.add_argument("--size", type=int, default=None,
                    help="resize the shorter side to SIZE and centre-crop SIZE×SIZE (default: keep)")
    ap.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    ap.add_argument("--format", choices=sorted(FORMATS), default="jpg")
    ap.add_argument("--quality", type=int, default=95, help="jpg/webp quality")
    ap.add_argument("--labels", choices=["none", "folder"], default="none",
                    help="folder: class = first sub-folder of SRC (e.g. ImageNet synsets)")
    ap.add_argument("--classes-from", default=None,
                    help="a manifest.json whose class list to use (pack val with train's classes)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the file-order shuffle")
    ap.add_argument("--no-shuffle", action="store_true", help="keep sorted file order")
    ap.add_argument("--workers", type=int, default=1, help="encoding processes")
    ap.add_argument("--prefix", default="shard", help="shard names: PREFIX-000000.tar")
    ap.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    ap.add_argument("--verify", metavar="DIR", help="check DIR's shards against its manifest, then exit")
    args = ap.parse_args(argv)

    if not args.verify and (not args.src or not args.out):
        ap.error("SRC and OUT are required (or use --verify DIR)")
    try:  # a manifest that is not ours (read_manifest's ValueError) is an error line, not a traceback
        if args.verify:
            problems = verify(args.verify)
            print("\n".join(problems) if problems else f"{args.verify}: all shards match the manifest")
            return 1 if problems else 0
        classes = None
        if args.classes_from:  # a manifest.json or the folder holding it; implies --labels folder
            p = Path(args.classes_from)
            manifest = read_manifest(p.parent if p.is_file() else p)
            if not manifest or not manifest.get("classes"):
                ap.error(f"--classes-from {args.classes_from}: no manifest with a class list there")
            classes = manifest["classes"]
        pack_folder(
            args.src, args.out, size=args.size, shard_size=args.shard_size, fmt=args.format,
            quality=args.quality, labels=args.labels == "folder" or classes is not None, classes=classes,
            shuffle_seed=None if args.no_shuffle else args.seed, workers=args.workers,
            prefix=args.prefix, overwrite=args.overwrite,
        )
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
