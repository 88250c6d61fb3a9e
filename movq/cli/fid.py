"""Fréchet Inception Distance between two image sets, or a tokenizer's reconstruction metrics.

    python tools/fid.py A B [--inception-weights PATH] [--json OUT]
    python tools/fid.py REF --save-stats ref_stats.npz          # reference statistics, once
    python tools/fid.py --tokenizer CKPT DATA [--json OUT]      # rFID, PSNR, SSIM, LPIPS, usage
    accelerate launch tools/fid.py A B                          # split over processes / GPUs

    python tools/fid.py REF SAMPLES --metrics all [--json OUT]  # + sFID, IS, precision / recall (ADM)

A and B are each an image folder (recursive), webdataset shards (``data/shard-{000000..000009}.tar``),
an ``.npz`` of uint8 NHWC images under ``arr_0``, or an ``.npz`` of statistics (``mu``, ``sigma``, and
``mu_s``, ``sigma_s`` for sFID), or both (ADM's reference batches, e.g. VIRTUAL_imagenet256_labeled.npz:
their published statistics give FID / sFID, their images precision / recall).
--metrics fid,sfid,is,pr (or all) computes ADM's evaluator's metrics from the same Inception pass; then
the first source is the reference and the second the samples, as in ADM's ``evaluator.py REF SAMPLE``
(IS is of the samples; one source alone is enough for --metrics is).
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
from movq.evaluation.fid import BACKENDS, compute_source_features, frechet_distance
from movq.evaluation.fid_sources import FIDError, ImageSource, open_metric_source, open_source
from movq.evaluation.inception import FIDInceptionV3, InceptionWeightsError, resolve_weights_path
from movq.utils import atomic_write, output_problem

logger = logging.getLogger("fid")

METRICS = ("fid", "sfid", "is", "pr")
# Which published protocol each number matches (the README's FID section says the same).
PROTOCOLS = {
    "fid": "torch-fidelity and ADM's evaluator: TF Inception 2015-12-05 pool_3, TF1 bilinear resize to 299",
    "sfid": "ADM's evaluator: first 7 channels of mixed_6/conv (2023 features)",
    "inception_score": "ADM's evaluator: unbiased logits, consecutive splits of 5000 (torch-fidelity: 10 shuffled)",
    "precision_recall": "ADM's evaluator: k=3 nearest-neighbour manifolds of pool_3 features, float16 distances",
}


def _metrics(value: str) -> tuple[str, ...]:
    names = METRICS if value == "all" else tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)} or all")
    return names


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
    p.add_argument("--metrics", type=_metrics, default=("fid",), metavar="LIST",
                   help="comma list of fid, sfid, is (Inception Score), pr (precision / recall), or all "
                        "(default: fid); beyond fid the first source is the reference")
    p.add_argument("--is-split-size", type=int, default=5000, metavar="N",
                   help="Inception Score over consecutive splits of N samples (ADM: 5000, i.e. 10 splits of 50k)")
    p.add_argument("--pr-float32", action="store_true",
                   help="precision / recall distances in float32 (ADM's evaluator uses float16)")
    p.add_argument("--resolution", type=int, help="tokenizer mode: center-crop and resize to this (default: model's)")
    p.add_argument("--lpips-vgg", metavar="PATH", help="tokenizer mode: vgg16-397923af.pth (else the cache dir)")
    p.add_argument("--lpips-lin", metavar="PATH", help="tokenizer mode: LPIPS v0.1 vgg.pth (else the cache dir)")
    p.add_argument("--cpu", action="store_true", help="run on CPU (needed for multi-process CPU runs)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.batch_size < 1 or (args.max_images is not None and args.max_images < 2) or args.is_split_size < 1:
        p.error("--batch-size and --is-split-size must be >= 1 and --max-images >= 2")
    if args.tokenizer and len(args.sources) != 1:
        p.error("--tokenizer takes exactly one DATA source")
    if args.tokenizer and args.metrics != ("fid",):
        p.error("--metrics is for comparing image sets; --tokenizer reports its own metrics")
    one_ok = args.save_stats or set(args.metrics) == {"is"}
    if not args.tokenizer and len(args.sources) == 1 and not one_ok:
        p.error("give two sources to compare, or one with --save-stats (or with --metrics is)")
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
    metrics = set(args.metrics)
    sources = [open_metric_source(s) for s in args.sources]  # fail on a bad source before loading anything
    last = len(sources) - 1
    pair = len(sources) == 2
    want_sfid = "sfid" in metrics and (pair or bool(args.save_stats))
    plans = []
    for i, src in enumerate(sources):
        why = [reason for reason, needed in (
            ("its statistics", src.stats is None),
            ("sFID", want_sfid and src.spatial is None),
            ("precision / recall", "pr" in metrics and pair),
            ("the Inception Score", "is" in metrics and i == last)) if needed]
        if why and src.images is None:
            raise FIDError(f"{src.spec} holds statistics only (no arr_0 images); {' and '.join(why)} need images")
        plans.append(why)
    results: dict = {"backend": args.backend, "sources": []}
    is_main = True
    if any(plans):
        accelerator = _accelerator(args)
        is_main = accelerator.is_main_process
        extractor = _extractor(args, accelerator.device)
        results.update(num_processes=accelerator.num_processes, checksum_verified=not args.skip_checksum,
                       inception_weights=str(resolve_weights_path(args.inception_weights)))
    stats, spatial, pools, logits = [], [], [], []
    for i, (src, why) in enumerate(zip(sources, plans)):
        if not why:  # a statistics file: its published numbers
            stats.append(src.stats)
            spatial.append(src.spatial)
            pools.append(None)
            logits.append(None)
            results["sources"].append({"source": src.spec, "kind": "stats", "images": src.stats.num_images})
            continue
        out = compute_source_features(
            src.images, extractor, batch_size=args.batch_size, max_images=args.max_images,
            progress=not args.no_progress, spatial=want_sfid and src.spatial is None,
            keep_pool="pr" in metrics and pair, keep_logits="is" in metrics and i == last)
        stats.append(src.stats or out.stats)  # published statistics win, as in ADM's evaluator
        spatial.append(src.spatial or out.spatial)
        pools.append(out.pool)
        logits.append(out.logits)
        entry = out.report.as_dict()
        if src.stats is not None:
            entry["statistics"] = "published"  # FID / sFID from the file's mu / sigma (mu_s / sigma_s)
        results["sources"].append(entry)
        if out.report.skipped or out.report.converted:
            logger.info("%s: %d images, %d skipped, converted %s", src.spec, out.report.images, out.report.skipped,
                        dict(out.report.converted))
    if args.save_stats and is_main:
        stats[0].save(args.save_stats, spatial=spatial[0] if want_sfid else None)
        logger.info("statistics of %s (%d images) written to %s", args.sources[0], stats[0].num_images, args.save_stats)
    if not is_main:
        return 0  # the statistics and features are global; rank 0 alone computes the metrics and writes
    lines = []
    if "is" in metrics:
        from movq.evaluation.adm import inception_score

        results["inception_score"] = inception_score(logits[last], split_size=args.is_split_size)
        lines.append(f"Inception Score: {results['inception_score']:.4f}")
    if pair:
        results["fid"] = frechet_distance(stats[0], stats[1], backend=args.backend)
        lines.append(f"FID: {results['fid']:.4f}")
        if "sfid" in metrics:
            results["sfid"] = frechet_distance(spatial[0], spatial[1], backend=args.backend)
            lines.append(f"sFID: {results['sfid']:.4f}")
        if "pr" in metrics:
            from movq.evaluation.adm import precision_recall

            try:
                results["precision"], results["recall"] = precision_recall(
                    pools[0].to(extractor.fc.weight.device), pools[1], fp16=not args.pr_float32)
            except ValueError as e:  # too few images for the k-nearest-neighbour radii
                raise FIDError(f"precision / recall: {e}") from None
            lines += [f"Precision: {results['precision']:.4f}", f"Recall: {results['recall']:.4f}"]
    if args.metrics != ("fid",):
        results["metrics"] = list(args.metrics)
        results["reference"], results["samples"] = args.sources[0], args.sources[last]
        names = {"fid": "fid", "sfid": "sfid", "is": "inception_score", "pr": "precision_recall"}
        results["protocol"] = {names[m]: PROTOCOLS[names[m]] for m in args.metrics}
    for line in lines:
        print(line)
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
