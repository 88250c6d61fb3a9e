#!/usr/bin/env python
"""Encode a dataset into token shards with a trained MoVQ tokenizer (for training the prior).

    accelerate launch tools/tokenize_dataset.py --tokenizer CKPT DATA OUT [--batch-size N]
        [--image-size S] [--source folder|shards|builtin|shapes] [--shard-size 1000] [--no-labels]
    python tools/tokenize_dataset.py --tokenizer runs/tiny builtin runs/tiny/tokens

CKPT is a tokenizer folder (model.safetensors + config.yaml), a checkpoint folder (its ema/ is
used, else model/) or a run folder (its newest checkpoint). DATA is an image folder (class
sub-folders give labels), webdataset shards (a folder of .tar, a .tar or a brace pattern; labels
from .cls when the manifest lists classes), or the word ``builtin``: the offline dataset's training
crops, labelled by the photograph each crop was cut from (14 classes), or the word ``shapes``: the
shapes dataset's training split (movq/shapes_data.py, 8 shape classes; its val split is the folder
``val/`` beside it, given as shards).

Images are centre-cropped to the largest square and resized to S (default: the tokenizer's
resolution), as for validation. Each output shard (OUT/tokens-NNNNNN.tar, see movq/tokens.py) is
written atomically by rank ``N % world_size``; a rerun with the same settings skips the finished
ones (other settings, e.g. a retrained tokenizer, are refused unless --overwrite), and
OUT/manifest.json is written once all are done. Unreadable images are skipped and counted per reason;
an input shard unreadable from its start (not a tar, empty, truncated) is an error, as in training.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import tarfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

from movq.data import (  # noqa: E402
    IMAGE_EXTS,
    SkipSample,
    expand_shards,
    folder_classes,
    images_from_uint8,
    iter_tar,
    _FolderSource,
    list_images,
    load_image,  # centre crop, as for validation
)
from movq.shards import manifest_classes, read_manifests  # noqa: E402
from movq.tokens import (  # noqa: E402
    MAX_CODEBOOK,
    TOKENS_FORMAT,
    TokenDataError,
    file_digest,
    finish_shard,
    prepare_output,
    resolve_tokenizer,
    sanitize_key,
    shard_done,
    write_token_manifest,
)

log = logging.getLogger("tokenize_dataset")

SOURCES = ("builtin", "shapes", "folder", "shards")


# --------------------------------------------------------------------------------------
# Inputs: what gets encoded, in chunks
# --------------------------------------------------------------------------------------
class UnreadableShard(RuntimeError):
    """An input shard that breaks off before its first sample (not a tar, empty, truncated)."""


@dataclass
class Chunk:
    """One output shard's worth of input: image files of a folder, or one input shard."""

    index: int
    files: Optional[list[tuple[str, int]]] = None  # folder: (relative path, label)
    shard: Optional[str] = None  # shards / builtin: the input tar


@dataclass
class InputPlan:
    source: str
    root: str  # the folder, the shard pattern, or the builtin dataset's train folder
    chunks: list[Chunk]
    classes: list[str]  # [] when unlabelled
    label_from: Optional[str] = None  # "folder", "cls", "builtin_photo"


def detect_source(data: str) -> str:
    """``builtin`` / ``shapes`` for the words themselves, ``shards`` for a .tar path or pattern, else ``folder``."""
    if data in ("builtin", "shapes"):
        return data
    if data.endswith(".tar") or "{" in data or "::" in data:
        return "shards"
    p = Path(data).expanduser()
    if p.is_dir() and any(p.glob("*.tar")) and not list_images(p)[:1]:
        return "shards"
    return "folder"


def plan_inputs(source: str, data: str, *, shard_size: int = 1000, image_size: int = 256,
                cache_dir: Optional[str] = None, labels: Optional[bool] = None,
                builtin_size: Optional[int] = None) -> InputPlan:
    """List the inputs of ``data`` in deterministic chunks.

    ``labels``: None = use them when the data has them (class sub-folders, a manifest's classes,
    or for ``builtin`` the photograph each crop was cut from); False = never; True = required.
    ``builtin_size``: crops in the builtin training split (default: ``DataConfig``'s).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {list(SOURCES)}, got {source!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if source == "folder":
        if labels is None:  # class sub-folders give labels when there are any
            root = Path(data).expanduser()
            labels = root.is_dir() and folder_classes(root) is not None
        # The training loader's folder listing and labelling: same files, checks and messages.
        src = _FolderSource(data, labels)
        items = list(zip(src.files, src.labels.tolist()))
        chunks = [Chunk(j, files=items[s : s + shard_size]) for j, s in enumerate(range(0, len(items), shard_size))]
        return InputPlan(source, str(src.root), chunks, list(src.classes) if labels else [],
                         "folder" if labels else None)
    if source == "builtin":
        from movq.config import DataConfig
        from movq.data import BUILTIN_TRAIN_PHOTOS, builtin_dataset

        dc = DataConfig(source="builtin", image_size=image_size, cache_dir=cache_dir)
        if builtin_size is not None:
            dc.builtin_train_size = builtin_size
        root = builtin_dataset(dc) / "train"
        shards = expand_shards(str(root))
        use = labels is not False
        classes = list(BUILTIN_TRAIN_PHOTOS) if use else []
        return InputPlan(source, str(root), [Chunk(j, shard=s) for j, s in enumerate(shards)], classes,
                         "builtin_photo" if use else None)
    if source == "shapes":  # shards whose manifest lists the classes: read as any such shards
        from movq.config import DataConfig
        from movq.shapes_data import shapes_split

        dc = DataConfig(source="shapes", image_size=image_size, cache_dir=cache_dir)
        if builtin_size is not None:
            dc.builtin_train_size = builtin_size
        data = str(shapes_split(dc, "train"))
    shards = expand_shards(data)

    manifests = read_manifests(shards)  # one per folder: a pattern may span several
    classes = (manifest_classes(manifests) or []) if labels is not False else []
    if labels and not classes:
        raise ValueError(f"labels requested but the shards of {data} have no manifest listing classes")
    return InputPlan(source, data, [Chunk(j, shard=s) for j, s in enumerate(shards)], classes,
                     "cls" if classes else None)


def iter_chunk(plan: InputPlan, chunk: Chunk) -> Iterator[tuple[str, Optional[bytes], int, Optional[str]]]:
    """``(key, image bytes, label, skip reason)`` for every sample of ``chunk``, in order.

    A shard that breaks off after some samples gives those plus one ``truncated_shard`` skip; one
    that yields no sample at all raises ``UnreadableShard`` (nothing is written for it)."""
    if chunk.files is not None:
        taken: set[str] = set()
        for rel, label in chunk.files:
            key = sanitize_key(rel.rpartition(".")[0] or rel)
            # a.jpg beside a.png (or a.b.png beside a_b.png) must not share a key: the tar reader
            # would merge their members into one sample and lose the other.
            while key in taken:
                key += "_"
            taken.add(key)
            try:
                yield key, (Path(plan.root) / rel).read_bytes(), label, None
            except OSError:
                yield key, None, label, "io_error"
        return
    n = 0
    try:
        for key, members in iter_tar(chunk.shard):
            n += 1
            ext = next((e for e in IMAGE_EXTS if e in members), None)
            label, skip = -1, None if ext else "not_image"
            if plan.label_from == "cls":
                try:
                    label = int(members["cls"].decode().strip())
                    if not 0 <= label < len(plan.classes):
                        skip = "bad_label"
                except (KeyError, ValueError, UnicodeDecodeError):
                    skip = "bad_label"
            elif plan.label_from == "builtin_photo":
                try:
                    label = plan.classes.index(json.loads(members["json"])["photo"])
                except (KeyError, ValueError, TypeError):
                    skip = "bad_label"
            yield sanitize_key(key), members.get(ext) if ext else None, label, skip
    except (tarfile.TarError, OSError, EOFError) as e:
        if n == 0:  # as in the training loader: an error, not an empty token shard
            raise UnreadableShard(f"input shard {chunk.shard} is unreadable: {type(e).__name__}: {e}") from None
        log.warning("input shard %s breaks off (%s); using the samples before it", chunk.shard, e)
        yield f"{chunk.index:06d}_tail", None, -1, "truncated_shard"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, metavar="CKPT", help="tokenizer, checkpoint or run folder")
    p.add_argument("data", metavar="DATA", help="image folder, shards, 'builtin' or 'shapes'")
    p.add_argument("out", metavar="OUT", help="output folder for the token shards")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call (per process)")
    p.add_argument("--image-size", type=int, help="crop size (default: the tokenizer's model.resolution)")
    p.add_argument("--source", choices=SOURCES, help="how to read DATA (default: guessed)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per output shard (folders)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the tokens in OUT if they were made with other settings (else refused)")
    p.add_argument("--no-labels", action="store_true", help="ignore class labels (unconditional prior)")
    p.add_argument("--cache-dir", help="builtin dataset cache (default $MOVQ_CACHE_DIR or ~/.cache/movq)")
    p.add_argument("--builtin-size", type=int,
                   help="images in the builtin or shapes training split (default 2048)")
    p.add_argument("--workers", type=int, default=4, help="threads decoding images")
    p.add_argument("--bf16", action="store_true", help="run the encoder under bf16 autocast (CUDA)")
    p.add_argument("--cpu", action="store_true", help="force CPU (needed for a multi-process CPU run)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.shard_size < 1 or args.workers < 1:
        p.error("--batch-size, --shard-size and --workers must be >= 1")
    if args.image_size is not None and args.image_size < 1:
        p.error("--image-size must be >= 1")
    return args


def _encode(model, arrays: list, device, bf16: bool) -> np.ndarray:
    """uint8 [B, S, S, 3] → uint16 tokens [B, C, h, w]."""
    x = images_from_uint8(torch.from_numpy(np.stack(arrays)).to(device))  # moved as uint8: a quarter of the bytes
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        idx = model.encode(x).indices
    return idx.to("cpu", torch.int32).numpy().astype(np.uint16)


def encode_chunk(plan, chunk, model, args, size: int, device, pool) -> tuple[list, Counter, Counter]:
    """All samples of one chunk: ([(key, tokens, label)], skipped, converted)."""
    samples, skipped, converted = [], Counter(), Counter()

    def decode(item):
        key, data, label, skip = item
        if skip is not None:
            return key, None, label, skip, []
        try:
            arr, conv = load_image(data, size)
        except SkipSample as e:
            return key, None, label, e.reason, []
        return key, arr, label, None, conv

    keys, arrays, labels = [], [], []

    def flush():
        if arrays:
            tokens = _encode(model, arrays, device, args.bf16)
            samples.extend(zip(keys, tokens, labels))
            keys.clear(), arrays.clear(), labels.clear()

    for key, arr, label, reason, conv in pool.map(decode, iter_chunk(plan, chunk)):
        if reason is not None:
            skipped[reason] += 1
            continue
        converted.update(conv)
        keys.append(key), arrays.append(arr), labels.append(label)
        if len(arrays) == args.batch_size:
            flush()
    flush()
    return samples, skipped, converted


def _message(e: Exception) -> str:
    """Our own errors already name the file; others get their type prepended."""
    if isinstance(e, (FileNotFoundError, TokenDataError, SkipSample, UnreadableShard)):
        return str(e)
    return f"{type(e).__name__}: {e}"


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from movq.autoencoder import MoVQ

    acc = Accelerator(cpu=args.cpu or not torch.cuda.is_available())
    rank, world = acc.process_index, acc.num_processes
    plan_kw = dict(shard_size=args.shard_size, cache_dir=args.cache_dir, labels=False if args.no_labels else None,
                   builtin_size=args.builtin_size)
    error, plan = None, None
    try:
        tok_dir = resolve_tokenizer(args.tokenizer)
        model = MoVQ.from_pretrained(tok_dir).eval().to(acc.device)
        q = model.config.quantizer
        if q.codebook_size > MAX_CODEBOOK:
            raise TokenDataError(f"codebook of {q.codebook_size} codes does not fit uint16 tokens (max {MAX_CODEBOOK})")
        size = args.image_size or model.config.model.resolution
        source = args.source or detect_source(args.data)
        if acc.is_main_process:  # the builtin dataset is built once, before the other ranks look
            plan = plan_inputs(source, args.data, image_size=size, **plan_kw)
    except (OSError, ValueError) as e:
        error = _message(e)
    acc.wait_for_everyone()
    if error is None and plan is None:
        try:
            plan = plan_inputs(source, args.data, image_size=size, **plan_kw)
        except (OSError, ValueError) as e:
            error = _message(e)
    if error is None and acc.is_main_process:
        h, w = (math.ceil(size / model.downsample_factor),) * 2
        spec = {
            "channels": q.channels, "height": h, "width": w, "codebook_size": q.codebook_size,
            "classes": plan.classes, "tokenizer": str(tok_dir.resolve()),
            "tokenizer_sha256": file_digest(tok_dir / "model.safetensors"), "image_size": size,
            "source": source, "data": plan.root, "shard_size": args.shard_size, "num_shards": len(plan.chunks),
            # which files (and labels) make each shard: a rerun after the input changed is refused
            # rather than mixing old shards with shards cut on new boundaries
            "inputs_sha256": hashlib.sha256(json.dumps([[c.files, c.shard] for c in plan.chunks]).encode()).hexdigest(),
        }
        try:
            prepare_output(args.out, spec, overwrite=args.overwrite)
        except (OSError, TokenDataError) as e:
            error = _message(e)
    errors = [e for e in (gather_object([error]) if world > 1 else [error]) if e]
    if errors:
        print(f"error: {errors[0]}", file=sys.stderr)
        return 2

    mine = [c for c in plan.chunks[rank::world] if not shard_done(args.out, c.index)]
    done_before = len(plan.chunks[rank::world]) - len(mine)
    if done_before:
        log.info("rank %d: %d shard(s) already finished, skipped", rank, done_before)
    progress = None
    if acc.is_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(mine), unit="shard", desc=f"tokenize (rank 0 of {world})", dynamic_ncols=True)
    t0, n_images = time.time(), 0
    with ThreadPoolExecutor(args.workers) as pool:
        for chunk in mine:
            try:
                samples, skipped, converted = encode_chunk(plan, chunk, model, args, size, acc.device, pool)
            except UnreadableShard as e:  # the shards finished so far stay: a rerun resumes after a fix
                if progress is not None:
                    progress.close()
                print(f"error: {_message(e)}", file=sys.stderr)
                return 2
            finish_shard(args.out, chunk.index, samples, skipped, converted)
            n_images += len(samples)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(img_s=f"{n_images / max(time.time() - t0, 1e-9):.1f}")
    if progress is not None:
        progress.close()
    acc.wait_for_everyone()
    error = None
    if acc.is_main_process:
        try:
            manifest = write_token_manifest(args.out, len(plan.chunks))
            if manifest["count"] == 0:
                raise TokenDataError(f"no usable image in {args.data} (skipped: {manifest['skipped'] or 'none'})")
        except TokenDataError as e:
            error = str(e)
            print(f"error: {error}", file=sys.stderr)
        else:
            print(
                f"{manifest['count']} images → {len(manifest['shards'])} token shard(s) in {args.out} "
                f"({TOKENS_FORMAT}: {manifest['channels']}×{manifest['height']}×{manifest['width']} tokens, "
                f"K={manifest['codebook_size']}, {len(manifest['classes'])} classes); "
                f"skipped: {manifest['skipped'] or 'none'}; {time.time() - t0:.1f} s"
            )
    # Every rank returns after the manifest exists (a caller may read the tokens next) and with rank 0's status.
    return 2 if any(gather_object([error]) if world > 1 else [error]) else 0


if __name__ == "__main__":
    sys.exit(main())
