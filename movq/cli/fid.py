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
import sys

from movq.cli import setup_logging
from movq.evaluation.fid import BACKENDS, compute_source_stats, frechet_distance
from movq.evaluation.fid_sources import FIDError, FIDStats, ImageSource, open_source
from movq.evaluation.inception import FIDInceptionV3, InceptionWeightsError, resolve_weights_path
from movq.utils import atomic_write, output_problem

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
    atomic_write(path, json.dumps(results, indent=2) + "\n")


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


def run_tokenizer(args) -> int:
    from movq.evaluation.reconstruction import evaluate_tokenizer
    from movq.models.autoencoder import MoVQ

    source = open_source(args.sources[0])
    if not isinstance(source, ImageSource):
        raise FIDError(f"{args.sources[0]}: tokenizer mode needs images, not statistics")
    try:
        model = MoVQ.from_pretrained(args.tokenizer)  # a model, checkpoint or run folder
    except (FileNotFoundError, ValueError) as e:
        raise FIDError(f"tokenizer {args.tokenizer}: {e}") from None
    accelerator = _accelerator(args)
    device = accelerator.device
    model = model.to(device)
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
    bar = None
    if accelerator.is_main_process and not args.no_progress:
        from tqdm.auto import tqdm

        total = source.expected(args.max_images)
        bar = tqdm(total=None if total is None else -(-total // accelerator.num_processes), unit="img",
                   desc=f"reconstruct {args.sources[0]}", dynamic_ncols=True)
    metrics, report = evaluate_tokenizer(
        model, source, size=size, batch_size=args.batch_size, max_images=args.max_images, extractor=extractor,
        lpips=lpips, device=device, rank=accelerator.process_index, world=accelerator.num_processes,
        backend=args.backend, progress=(lambda n: bar.update(1)) if bar is not None else None)
    if bar is not None:
        bar.close()
    if not accelerator.is_main_process:
        return 0  # everything is reduced; rank 0 alone writes
    results = {
        **metrics,
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
    setup_logging()
    try:
        return run_tokenizer(args) if args.tokenizer else run_fid(args)
    except (FIDError, InceptionWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
