"""Fréchet Inception Distance between two image sets, or a tokenizer's reconstruction metrics.

    python tools/fid.py A B [--inception-weights PATH] [--json OUT]
    python tools/fid.py REF --save-stats ref_stats.npz          # reference statistics, once
    python tools/fid.py --tokenizer CKPT DATA [--json OUT]      # rFID, PSNR, SSIM, LPIPS, usage
    accelerate launch tools/fid.py A B                          # split over processes / GPUs

A and B are each an image folder (recursive), webdataset shards (``data/shard-{000000..000009}.tar``),
an ``.npz`` of uint8 NHWC images under ``arr_0``, or an ``.npz`` of statistics (``mu``, ``sigma``).
The Inception weights (``weights-inception-2015-12-05-6726825d.pth``, as used by torch-fidelity
and torchmetrics) are read from --inception-weights, $MOVQ_INCEPTION_WEIGHTS, or $MOVQ_CACHE_DIR
(default ~/.cache/movq); nothing is downloaded. For a multi-process run on CPU add --cpu.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from movq.config import atomic_write_text, output_problem
from movq.evaluation.fid import (
    BACKENDS,
    FeatureAccumulator,
    compute_source_stats,
    frechet_distance,
    gather_report,
    to_uint8,
)
from movq.evaluation.fid_sources import FIDError, FIDStats, ImageSource, open_source
from movq.evaluation.inception import FIDInceptionV3, InceptionWeightsError, resolve_weights_path

logger = logging.getLogger("fid")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", help="A [B]: folders, shards, .npz images or .npz statistics")
    p.add_argument("--tokenizer", metavar="CKPT", help="MoVQ checkpoint folder: reconstruct DATA and report metrics")
    p.add_argument("--inception-weights", metavar="PATH", help="weights-inception-2015-12-05-6726825d.pth")
    p.add_argument("--skip-checksum", action="store_true",
                   help="do not check the weights' sha256 (stand-in weights; the FID is not comparable)")
    p.add_argument("--save-stats", metavar="OUT.npz", help="write the statistics of the first source")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--max-images", type=int,
                   help="use the first N entries of each image source (unreadable ones are skipped and counted)")
    p.add_argument("--backend", choices=BACKENDS, default="torchmetrics", help="Fréchet distance implementation")
    p.add_argument("--resolution", type=int, help="tokenizer mode: center-crop and resize to this (default: model's)")
    p.add_argument("--lpips-vgg", metavar="PATH", help="tokenizer mode: vgg16-397923af.pth (else the cache dir)")
    p.add_argument("--lpips-lin", metavar="PATH", help="tokenizer mode: LPIPS v0.1 vgg.pth (else the cache dir)")
    p.add_argument("--cpu", action="store_true", help="run on CPU (needed for multi-process CPU runs)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.batch_size < 1 or (args.max_images is not None and args.max_images < 2):
        p.error("--batch-size must be >= 1 and --max-images >= 2")
    if args.tokenizer and len(args.sources) != 1:
        p.error("--tokenizer takes exactly one DATA source")
    if not args.tokenizer and len(args.sources) == 1 and not args.save_stats:
        p.error("give two sources to compare, or one with --save-stats")
    if len(args.sources) > 2:
        p.error("at most two sources")
    for flag, path in (("--save-stats", args.save_stats), ("--json", args.json)):
        problem = output_problem(path) if path else None
        if problem:
            p.error(f"{flag}: {problem}")
    return args


def _accelerator(args):
    from accelerate import Accelerator

    return Accelerator(cpu=args.cpu)


def _extractor(args, device) -> FIDInceptionV3:
    return FIDInceptionV3.from_pretrained(args.inception_weights, verify=not args.skip_checksum, device=device)


def _write_json(path: str, results: dict) -> None:
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")


def run_fid(args) -> int:
    opened = [open_source(s) for s in args.sources]  # fail on a bad source before loading anything
    results: dict = {"backend": args.backend, "sources": []}
    is_main, extractor = True, None
    if any(isinstance(o, ImageSource) for o in opened):
        accelerator = _accelerator(args)
        is_main = accelerator.is_main_process
        extractor = _extractor(args, accelerator.device)
        results.update(num_processes=accelerator.num_processes, checksum_verified=not args.skip_checksum,
                       inception_weights=str(resolve_weights_path(args.inception_weights)))
    stats = []
    for spec, o in zip(args.sources, opened):
        if isinstance(o, FIDStats):
            stats.append(o)
            results["sources"].append({"source": spec, "kind": "stats", "images": o.num_images})
            continue
        s, report = compute_source_stats(o, extractor, batch_size=args.batch_size, max_images=args.max_images,
                                         progress=not args.no_progress)
        stats.append(s)
        results["sources"].append(report.as_dict())
        if report.skipped or report.converted:
            logger.info("%s: %d images, %d skipped, converted %s", spec, report.images, report.skipped,
                        dict(report.converted))
    if args.save_stats and is_main:
        stats[0].save(args.save_stats)
        logger.info("statistics of %s (%d images) written to %s", args.sources[0], stats[0].num_images, args.save_stats)
    if not is_main:
        return 0  # the statistics are global; rank 0 alone computes the distance and writes
    if len(stats) == 2:
        results["fid"] = frechet_distance(stats[0], stats[1], backend=args.backend)
        print(f"FID: {results['fid']:.4f}")
    if args.json:
        _write_json(args.json, results)
    return 0


def _center_square(img, size: int):
    """uint8 [H, W, 3] -> [size, size, 3]: central square crop, then bicubic (antialiased) resize."""
    import numpy as np
    from PIL import Image

    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    pil = Image.fromarray(img[top: top + s, left: left + s])
    if s != size:
        pil = pil.resize((size, size), Image.BICUBIC)
    return np.asarray(pil)


def run_tokenizer(args) -> int:
    import numpy as np
    import torch

    from movq.evaluation.metrics import TokenizerMetrics

    source = open_source(args.sources[0])
    if not isinstance(source, ImageSource):
        raise FIDError(f"{args.sources[0]}: tokenizer mode needs images, not statistics")
    try:
        from movq.data.tokens import resolve_tokenizer
        from movq.models.autoencoder import MoVQ

        model = MoVQ.from_pretrained(resolve_tokenizer(args.tokenizer))  # a model, checkpoint or run folder
    except (FileNotFoundError, ValueError) as e:
        raise FIDError(f"tokenizer {args.tokenizer}: {e}") from None
    accelerator = _accelerator(args)
    device = accelerator.device
    model = model.to(device).eval()
    try:  # without the Inception weights the other metrics are still worth having, as without LPIPS
        extractor = _extractor(args, device)
    except InceptionWeightsError as e:
        extractor = None
        if accelerator.is_main_process:
            logger.warning("rFID left out: %s", str(e).splitlines()[0])
    lpips = None
    try:
        from movq.evaluation.lpips import LPIPS

        lpips = LPIPS.from_pretrained(args.lpips_vgg, args.lpips_lin).to(device)
    except FileNotFoundError as e:
        if accelerator.is_main_process:
            logger.warning("LPIPS left out: %s", str(e).splitlines()[0])
    size = args.resolution or model.config.model.resolution
    metrics = TokenizerMetrics(model.quantizer.codebook_size, lpips=lpips, device=device)
    if extractor is not None:
        real = FeatureAccumulator(extractor.num_features, device=device)
        fake = FeatureAccumulator(extractor.num_features, device=device)
    report = source.new_report()

    @torch.no_grad()
    def step(batch: list) -> None:
        x8 = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).to(device)  # uint8 [B, 3, S, S]
        x = x8.float() / 127.5 - 1
        x_rec, enc = model(x)
        if extractor is not None:
            real.update(extractor(x8))
            fake.update(extractor(to_uint8(x_rec)))
        metrics.update(x, x_rec, enc.indices)

    bar = None
    if accelerator.is_main_process and not args.no_progress:
        from tqdm.auto import tqdm

        total = source.expected(args.max_images)
        bar = tqdm(total=None if total is None else -(-total // accelerator.num_processes), unit="img",
                   desc=f"reconstruct {args.sources[0]}", dynamic_ncols=True)
    batch: list = []
    for img in source.iterate(report, accelerator.process_index, accelerator.num_processes, args.max_images):
        batch.append(_center_square(img, size))
        if len(batch) == args.batch_size:
            step(batch)
            batch = []
        if bar is not None:
            bar.update(1)
    if batch:
        step(batch)
    if bar is not None:
        bar.close()
    if extractor is not None:
        real.all_reduce_()
        fake.all_reduce_()
    metrics.all_reduce_()
    report = gather_report(report)
    if not accelerator.is_main_process:
        return 0  # everything is reduced; rank 0 alone computes the distance and writes
    rfid = None
    if extractor is not None:
        rfid = frechet_distance(real.stats(args.sources[0]), fake.stats("reconstructions"), backend=args.backend)
    results = {
        "rfid": rfid,
        **metrics.compute(),
        "resolution": size,
        "tokenizer": args.tokenizer,
        "source": report.as_dict(),
        "backend": args.backend,
        "num_processes": accelerator.num_processes,
        "checksum_verified": not args.skip_checksum if extractor is not None else None,
        "inception_weights": str(resolve_weights_path(args.inception_weights)) if extractor is not None else None,
    }
    shown = ("rfid", "psnr", "ssim", "lpips", "codebook_usage", "perplexity", "num_images")
    print(" ".join(f"{k}: {results[k]:.4f}" if isinstance(results[k], float) else f"{k}: {results[k]}"
                   for k in shown))
    if args.json:
        _write_json(args.json, results)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_tokenizer(args) if args.tokenizer else run_fid(args)
    except (FIDError, InceptionWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
