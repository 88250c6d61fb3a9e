#!/usr/bin/env python
"""Encode a dataset into token shards with a trained MoVQ tokenizer (for training the prior).

    accelerate launch tools/tokenize_dataset.py --tokenizer CKPT DATA OUT [--batch-size N]
        [--image-size S] [--source folder|shards|builtin] [--shard-size 1000] [--no-labels]
    python tools/tokenize_dataset.py --tokenizer runs/tiny builtin runs/tiny/tokens

CKPT is a tokenizer folder (model.safetensors + config.yaml), a checkpoint folder (its ema/ is
used, else model/) or a run folder (its newest checkpoint). DATA is an image folder (class
sub-folders give labels), webdataset shards (a folder of .tar, a .tar or a brace pattern; labels
from .cls when the manifest lists classes), or the word ``builtin``: the offline dataset's training
crops, labelled by the photograph each crop was cut from (14 classes).

Images are centre-cropped to the largest square and resized to S (default: the tokenizer's
resolution), as for validation. Each output shard (OUT/tokens-NNNNNN.tar, see movq/tokens.py) is
written atomically by rank ``N % world_size``; a rerun skips the finished ones, and OUT/manifest.json
is written once all are done. Unreadable images are skipped and counted per reason.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

from movq.data import SkipSample  # noqa: E402
from movq.tokens import (  # noqa: E402
    MAX_CODEBOOK,
    SOURCES,
    TOKENS_FORMAT,
    TokenDataError,
    detect_source,
    file_digest,
    finish_shard,
    iter_chunk,
    load_image,
    plan_inputs,
    prepare_output,
    resolve_tokenizer,
    shard_done,
    write_token_manifest,
)

log = logging.getLogger("tokenize_dataset")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, metavar="CKPT", help="tokenizer, checkpoint or run folder")
    p.add_argument("data", metavar="DATA", help="image folder, shards, or 'builtin'")
    p.add_argument("out", metavar="OUT", help="output folder for the token shards")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call (per process)")
    p.add_argument("--image-size", type=int, help="crop size (default: the tokenizer's model.resolution)")
    p.add_argument("--source", choices=SOURCES, help="how to read DATA (default: guessed)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per output shard (folders)")
    p.add_argument("--no-labels", action="store_true", help="ignore class labels (unconditional prior)")
    p.add_argument("--cache-dir", help="builtin dataset cache (default $MOVQ_CACHE_DIR or ~/.cache/movq)")
    p.add_argument("--builtin-size", type=int, help="crops in the builtin training split (default 2048)")
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
    x = torch.from_numpy(np.stack(arrays)).to(device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
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
    if isinstance(e, (FileNotFoundError, TokenDataError, SkipSample)):
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
        }
        try:
            prepare_output(args.out, spec)
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
            samples, skipped, converted = encode_chunk(plan, chunk, model, args, size, acc.device, pool)
            finish_shard(args.out, chunk.index, samples, skipped, converted)
            n_images += len(samples)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(img_s=f"{n_images / max(time.time() - t0, 1e-9):.1f}")
    if progress is not None:
        progress.close()
    acc.wait_for_everyone()
    if acc.is_main_process:
        try:
            manifest = write_token_manifest(args.out, len(plan.chunks))
        except TokenDataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(
            f"{manifest['count']} images → {len(manifest['shards'])} token shard(s) in {args.out} "
            f"({TOKENS_FORMAT}: {manifest['channels']}×{manifest['height']}×{manifest['width']} tokens, "
            f"K={manifest['codebook_size']}, {len(manifest['classes'])} classes); "
            f"skipped: {manifest['skipped'] or 'none'}; {time.time() - t0:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
