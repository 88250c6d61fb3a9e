"""Encode a dataset into token shards with a trained MoVQ tokenizer (for training the prior).

    accelerate launch tools/tokenize_dataset.py --tokenizer CKPT DATA OUT [--batch-size N]
        [--image-size S] [--source folder|shards|builtin|shapes] [--shard-size 1000] [--no-labels] [--flip]
        [--condition edges|segmentation|lowres [--segmentation-dir DIR] [--condition-classes N]
         [--condition-factor 4] [--condition-sigma 1]]
    python tools/tokenize_dataset.py --tokenizer runs/tiny builtin runs/tiny/tokens

CKPT is a tokenizer model folder (model.safetensors + config.json), a checkpoint folder (its ema/ is
used, else model/) or a run folder (its newest checkpoint). DATA is an image folder (class
sub-folders give labels), webdataset shards (a folder of .tar, a .tar, a brace pattern or a URL such as
``pipe:curl -s https://host/train-{000000..000099}.tar``; labels from .cls or .json when the manifest
lists classes, or with --num-classes), or the word ``builtin``: the offline dataset's training
crops, labelled by the photograph each crop was cut from (14 classes), or the word ``shapes``: the
shapes dataset's training split (movq/data/shapes.py, 8 shape classes; its val split is the folder
``val/`` beside it, given as shards).

Images are centre-cropped to the largest square and resized to S (default: the tokenizer's
resolution), as for validation; --flip adds each image's mirror image as a second sample. Each output
shard (OUT/tokens-NNNNNN.tar, see movq/data/tokens.py) is written atomically by rank ``N % world_size``;
a rerun with the same settings skips the finished ones (other settings, e.g. a retrained tokenizer, are
refused unless --overwrite), and
OUT/manifest.json is written once all are done. Unreadable images are skipped and counted per reason.
Input shards are read against their manifest (sha256 first, then the sample count), as in training: what
a damaged shard cannot give counts as skipped by reason (``shard_checksum``, ``shard_unreadable``,
``shard_truncated``; shards the manifest lists but the folder lacks as ``shard_missing``),
or with ``--on-bad-shard error`` stops the run with the shard named (the shards finished so far stay).

``--condition`` stores an image condition beside each sample's tokens (``KEY.cond.npy``, uint8; kind,
parameters and shape in the manifest), made from the same decoded image (movq/data/conditions.py): ``edges``
(Canny, ``--condition-sigma``), ``lowres`` (box downsample by ``--condition-factor``) or ``segmentation``
(a label map of ``--condition-classes`` classes: for an image folder the PNG of the same name in
``--segmentation-dir``, for shards each sample's ``seg.png``, for ``shapes`` the shape's mask, 1 + 8 classes).
A missing label map, or one with ids ≥ N, stops the run with the file named.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from movq.cli import setup_logging
from movq.config import CONDITION_KINDS, ConditionConfig
from movq.data.conditions import ConditionError, condition_size
from movq.data.decode import SkipSample
from movq.data.tokenize import SOURCES, UnreadableShard, detect_source, encode_chunk, plan_inputs
from movq.data.tokens import (
    MAX_CODEBOOK,
    TOKENS_FORMAT,
    TokenDataError,
    finish_shard,
    prepare_output,
    shard_done,
    write_token_manifest,
)
from movq.models.pretrained import WEIGHTS_NAME, resolve_pretrained
from movq.utils import sha256_file

log = logging.getLogger(__name__)


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
    p.add_argument("--num-classes", type=int, metavar="N",
                   help="shards without a manifest listing classes (made elsewhere, or URLs): labels 0..N-1 from "
                        "each sample's .cls or .json")
    p.add_argument("--flip", action="store_true",
                   help="also encode each image mirrored left to right (KEY_flip; doubles the token samples)")
    p.add_argument("--condition", choices=CONDITION_KINDS, help="also store this image condition of each sample")
    p.add_argument("--segmentation-dir", metavar="DIR",
                   help="--condition segmentation of an image folder: label PNGs named as the images")
    p.add_argument("--condition-classes", type=int, metavar="N",
                   help="--condition segmentation: classes of the label maps (default for shapes: 9, background + 8)")
    p.add_argument("--condition-factor", type=int, default=4, help="--condition lowres: the downsampling factor")
    p.add_argument("--condition-sigma", type=float, default=1.0, help="--condition edges: Canny's Gaussian, pixels")
    p.add_argument("--cache-dir", help="builtin dataset cache (default $MOVQ_CACHE_DIR or ~/.cache/movq)")
    p.add_argument("--builtin-size", type=int,
                   help="images in the builtin or shapes training split (default 2048)")
    p.add_argument("--workers", type=int, default=4, help="threads decoding images")
    p.add_argument("--bf16", action="store_true", help="run the encoder under bf16 autocast (CUDA)")
    p.add_argument("--cpu", action="store_true", help="force CPU (needed for a multi-process CPU run)")
    p.add_argument("--on-bad-shard", choices=("skip", "error"), default="skip",
                   help="a damaged input shard: count its samples as skipped (default) or stop")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.shard_size < 1 or args.workers < 1:
        p.error("--batch-size, --shard-size and --workers must be >= 1")
    if args.image_size is not None and args.image_size < 1:
        p.error("--image-size must be >= 1")
    if args.num_classes is not None and args.num_classes < 1:
        p.error("--num-classes must be >= 1")
    cond_flags = [f for f in ("segmentation_dir", "condition_classes") if getattr(args, f) is not None]
    if cond_flags and args.condition != "segmentation":
        p.error(f"--{cond_flags[0].replace('_', '-')} goes with --condition segmentation")
    if args.condition == "segmentation" and args.condition_classes is None:
        if args.data != "shapes":
            p.error("--condition segmentation needs --condition-classes N (the label maps' classes)")
        args.condition_classes = 9  # background + the 8 shapes
    if args.condition_factor < 1 or args.condition_sigma <= 0:
        p.error("--condition-factor must be >= 1 and --condition-sigma > 0")
    return args


def condition_config(args) -> ConditionConfig:
    """The ``ConditionConfig`` the flags describe (raises ``ValueError`` for bad values)."""
    return ConditionConfig(kind=args.condition, num_classes=args.condition_classes or 0,
                           factor=args.condition_factor, sigma=args.condition_sigma)



def _message(e: Exception) -> str:
    """Our own errors already name the file; others get their type prepended."""
    if isinstance(e, (FileNotFoundError, TokenDataError, SkipSample, UnreadableShard, ConditionError)):
        return str(e)
    return f"{type(e).__name__}: {e}"


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from movq.models.autoencoder import MoVQ

    acc = Accelerator(cpu=args.cpu or not torch.cuda.is_available())
    rank, world = acc.process_index, acc.num_processes
    plan_kw = dict(shard_size=args.shard_size, cache_dir=args.cache_dir, labels=False if args.no_labels else None,
                   builtin_size=args.builtin_size, num_classes=args.num_classes)
    error, plan, condition = None, None, None
    try:
        try:
            tok_dir = resolve_pretrained(args.tokenizer, kind="MoVQ")  # a local folder or a Hub repo id
        except (OSError, ValueError) as e:
            raise type(e)(f"--tokenizer: {e}") from None
        model = MoVQ.from_pretrained(tok_dir).to(acc.device)
        q = model.config.quantizer
        if q.codebook_size > MAX_CODEBOOK:
            raise TokenDataError(f"codebook of {q.codebook_size} codes does not fit uint16 tokens (max {MAX_CODEBOOK})")
        size = args.image_size or model.config.model.resolution
        source = args.source or detect_source(args.data)
        condition = condition_config(args) if args.condition else None
        if condition is not None and condition.kind == "lowres" and size % condition.factor:
            raise ConditionError(f"--condition-factor {condition.factor} does not divide the image size {size}")
        if condition is not None and condition.kind == "segmentation" and source == "builtin":
            raise ConditionError("the builtin photo crops have no label maps: use shapes, a folder with "
                                 "--segmentation-dir, or shards with seg.png")
        if condition is not None and condition.kind == "segmentation" and source == "folder" and not args.segmentation_dir:
            raise ConditionError("--condition segmentation of an image folder needs --segmentation-dir DIR")
        if acc.is_main_process:  # the builtin dataset is built once, before the other ranks look
            plan = plan_inputs(source, args.data, image_size=size, **plan_kw)
        if plan is not None and plan.missing and args.on_bad_shard == "error":
            raise FileNotFoundError(f"{len(plan.missing)} shard(s) listed in the manifest of {args.data} do not "
                                    f"exist, e.g. {next(iter(plan.missing))} (--on-bad-shard error)")
    except (OSError, ValueError, ImportError) as e:  # ImportError: the builtin dataset's optional packages
        error = _message(e)
    acc.wait_for_everyone()
    if error is None and plan is None:
        try:
            plan = plan_inputs(source, args.data, image_size=size, **plan_kw)
        except (OSError, ValueError, ImportError) as e:
            error = _message(e)
    if plan is not None:
        plan.segmentation_dir = args.segmentation_dir
    if error is None and acc.is_main_process:
        h, w = (math.ceil(size / model.downsample_factor),) * 2
        spec = {
            "channels": q.channels, "height": h, "width": w, "codebook_size": q.codebook_size,
            "classes": plan.classes, "tokenizer": str(tok_dir.resolve()),
            "tokenizer_sha256": sha256_file(tok_dir / WEIGHTS_NAME), "image_size": size,
            "source": source, "data": plan.root, "shard_size": args.shard_size, "num_shards": len(plan.chunks),
            # which files (and labels) make each shard: a rerun after the input changed is refused
            # rather than mixing old shards with shards cut on new boundaries
            "inputs_sha256": hashlib.sha256(json.dumps([[c.files, c.shard] for c in plan.chunks]).encode()).hexdigest(),
        }
        if args.flip:  # only when set: folders made before the option still resume
            spec["augment"] = "flip"
        if condition is not None:  # only when set, as --flip
            spec["condition"] = {**condition.params(), "shape": [condition.channels, *condition_size(condition, size)]}
            if condition.kind == "segmentation":
                spec["condition"]["labels_from"] = ("shapes mask" if source == "shapes" else
                                                    str(args.segmentation_dir) if source == "folder" else "seg.png")
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
    if plan.missing and acc.is_main_process:
        log.warning("%d shard(s) listed in the manifest of %s do not exist (%s...): their %d samples are counted "
                    "as shard_missing", len(plan.missing), args.data, next(iter(plan.missing)), sum(plan.missing.values()))
    t0, n_images = time.time(), 0
    with ThreadPoolExecutor(args.workers) as pool:
        for chunk in mine:
            try:
                samples, skipped, converted = encode_chunk(plan, chunk, model, size=size, batch_size=args.batch_size,
                                                           device=acc.device, pool=pool, bf16=args.bf16,
                                                           on_bad_shard=args.on_bad_shard, flip=args.flip,
                                                           condition=condition)
                if chunk.index == 0 and plan.missing:  # counted once, with the first shard
                    skipped["shard_missing"] += sum(plan.missing.values())
            except (UnreadableShard, ConditionError, ImportError) as e:  # the shards finished so far stay: a rerun resumes after a fix
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
