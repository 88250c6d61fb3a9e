#!/usr/bin/env python
"""Steady-state throughput and peak memory of the tokenizer's full training step.

    python tools/bench_train.py --config configs/tiny.yaml --out benchmarks/results/train_tiny_cpu.json
    python tools/bench_train.py --config configs/ffhq256.yaml --batch-size 8 --out benchmarks/results/train_ffhq256_h100.json

One step = generator forward/backward (with LPIPS if configured, the adaptive GAN weight and the
discriminator's GAN term) + discriminator forward/backward + both optimizer steps + EMA update: the
exact code path of ``movq.trainer.TokenizerTrainer``, fed synthetic images so that data loading is
not measured. Prints and writes JSON with the device named.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from _bench_report import check_out, device_name, versions, write_report  # noqa: E402 (tools/ is on sys.path)

from movq.config import ConfigError, TokenizerConfig, load_config  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--batch-size", type=int, default=None, help="per-process batch (default: data.batch_size)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-gan", action="store_true", help="measure a step before disc_start (no discriminator)")
    p.add_argument("--out", default=None, help="JSON file to write")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    check_out(p, args)
    if args.steps < 1 or args.warmup < 0:  # the median needs one timed step
        p.error("--steps must be >= 1 and --warmup >= 0")

    from movq.training.tokenizer import TokenizerTrainer

    with tempfile.TemporaryDirectory() as tmp:
        try:
            cfg = load_config(TokenizerConfig, args.config, [*args.overrides, f"train.run_dir={tmp}", "train.trackers=[]"])
        except (ConfigError, FileNotFoundError) as e:
            p.error(str(e))
        if args.batch_size:
            cfg.data.batch_size = args.batch_size
        trainer = TokenizerTrainer(cfg)
        acc = trainer.acc
        trainer.step = 0 if args.no_gan else cfg.loss.disc_start
        B, S = cfg.data.batch_size, cfg.data.image_size
        gen = torch.Generator().manual_seed(0)
        batch = {"image": (torch.rand(B, 3, S, S, generator=gen) * 2 - 1).to(acc.device), "label": torch.zeros(B)}
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        times = []
        for i in range(args.warmup + args.steps):
            if i == args.warmup and torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            # One optimizer step on a fixed batch: fit() would add data loading, logging, eval and checkpoints.
            trainer.train_step([batch] * cfg.train.grad_accum)
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated() / 2**20
            peak_kind = "cuda max_memory_allocated"
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB → MiB on Linux
            peak_kind = "process peak RSS"
    med = statistics.median(times)
    images = B * cfg.train.grad_accum
    result = {
        "benchmark": "tokenizer training step (G + D + optimizers + EMA)",
        "config": args.config,
        "overrides": args.overrides,
        "device": device_name(acc.device),
        "mixed_precision": cfg.train.mixed_precision,
        "image_size": S,
        "batch_per_step": images,
        "gan": not args.no_gan,
        "lpips": cfg.loss.perceptual_weight > 0,
        "steps_timed": len(times),
        "median_step_s": med,
        "step_s_quantiles": [float(q) for q in torch.tensor(times).quantile(torch.tensor([0.2, 0.5, 0.8])).tolist()],
        "images_per_s": images / med,
        "peak_memory_mib": peak,
        "peak_memory_kind": peak_kind,
        "versions": versions("accelerate"),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        write_report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
