#!/usr/bin/env python
"""Images/s of MaskGIT sampling (prior + MoVQ decoder) against the autoregressive prior at equal parameter
count (movq.models.autoregressive, KV-cached sampling of movq.generation.autoregressive).

    python tools/bench_sampling.py --out benchmarks/results/sampling_h100.json        # GPU, bf16
    python tools/bench_sampling.py --quick --out benchmarks/results/sampling_cpu_quick.json

Full run (issues 6 and 16): the base prior of configs/maskgit_base.yaml (24 layers, width 768, 16 heads,
177.4M parameters) on 16×16×4 tokens, K = 1024, decoded to 256² by the MoVQ of configs/imagenet256.yaml,
against configs/ar_base.yaml (the same width and heads, 22 spatial + 2 depth-transformer layers:
175.0M parameters, 98.7%), random weights (speed does not depend on them), class-conditional, T ∈ {8, 12},
several batch sizes, bf16 autocast.

The autoregressive prior samples token by token as it would in use: 256 spatial steps with the KV
cache, each followed by C = 4 steps of the depth transformer over the cell's tokens (its factorization,
chosen by tools/compare_ar.py: benchmarks/results/ar_factorization_cpu.json), with the same
guidance scale. Both sides include the same image decoding.

Reported per case: median / min seconds of one batch over ``--repeats`` timed runs after a warm-up,
images/s, and the prior's share (decoding timed separately). The JSON names the device and the
versions. Targets (issue 6, on an H100/H200): ≥ 300 images/s for the base config at T = 8 in bf16,
decoding included, and ≥ 10× the autoregressive rate at equal size and batch. ``--quick``: tiny
shapes on CPU in seconds, to check the harness only (its numbers say nothing about speed).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from _bench_report import check_out, device_name, versions, write_report  # noqa: E402 (tools/ is on sys.path)
from torch import Tensor  # noqa: E402

from movq.config import AutoregressiveConfig, MaskGITConfig  # noqa: E402
from movq.generation.autoregressive import sample as ar_sample  # noqa: E402
from movq.generation.maskgit import generate  # noqa: E402
from movq.models.autoregressive import AutoregressivePrior  # noqa: E402
from movq.models.maskgit import MaskGIT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET_IMAGES_PER_S = 300.0  # base config, T = 8, bf16, decoding included (issue 6)
TARGET_RATIO = 10.0  # over the autoregressive decode at equal size


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


# --------------------------------------------------------------------------------------
# Models of the run
# --------------------------------------------------------------------------------------
def build(quick: bool, device: torch.device, ar_config: Optional[str] = None):
    """MaskGIT, the autoregressive prior (architecture of ``ar_config``, token shape and classes of the
    MaskGIT config) and the tokenizer, with random weights."""
    from movq.config import PriorConfig, TokenizerConfig, load_config
    from movq.models.autoencoder import MoVQ

    if quick:
        prior_cfg = MaskGITConfig(codebook_size=32, channels=2, grid=4, num_classes=10, width=64, depth=2,
                                  heads=4, dropout=0.0, attn_dropout=0.0)
        ar_cfg = AutoregressiveConfig(width=64, heads=4, depth=1, depth_layers=1)  # 108k vs MaskGIT's 110k
        tok_cfg = load_config(TokenizerConfig, {
            "model": {"resolution": 16, "base_channels": 8, "channel_mult": [1, 2, 2], "num_res_blocks": 1,
                      "attn_resolutions": [], "mid_attention": False, "norm_groups": 4},
            "quantizer": {"codebook_size": 32, "channels": 2, "dim": 4}})
    else:
        prior_cfg = load_config(PriorConfig, ROOT / "configs" / "maskgit_base.yaml").model
        ar_cfg = None
        tok_cfg = load_config(TokenizerConfig, ROOT / "configs" / "imagenet256.yaml")
    if ar_config or ar_cfg is None:
        ar_cfg = load_config(PriorConfig, ar_config or ROOT / "configs" / "ar_base.yaml").model
        if not isinstance(ar_cfg, AutoregressiveConfig):
            raise SystemExit(f"error: {ar_config} is not an autoregressive prior config (kind: autoregressive)")
    # the same tokens and classes as the MaskGIT prior: only the architecture comes from the AR config
    ar_cfg = dataclasses.replace(ar_cfg, codebook_size=prior_cfg.codebook_size, channels=prior_cfg.channels,
                                 grid=prior_cfg.grid, num_classes=prior_cfg.num_classes, dropout=0.0, attn_dropout=0.0)
    torch.manual_seed(0)
    prior = MaskGIT(prior_cfg).to(device).eval()
    ar = AutoregressivePrior(ar_cfg).to(device).eval()
    tokenizer = MoVQ(tok_cfg).to(device).eval()
    return prior, ar, tokenizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes on CPU: harness check only")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="default: 32 64 128 256 (quick: 2 4)")
    p.add_argument("--steps", type=int, nargs="+", default=[8, 12], help="MaskGIT decoding steps T")
    p.add_argument("--ar-batch-sizes", type=int, nargs="+", help="autoregressive batch sizes (default: the same)")
    p.add_argument("--ar-config", help="prior config of the autoregressive side (default configs/ar_base.yaml; "
                   "its token shape and classes are MaskGIT's)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="autocast dtype (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="guidance scale (≠ 1 doubles the prior's batch)")
    p.add_argument("--decode-batch", type=int, default=64, help="images per decoder call (bounds memory)")
    p.add_argument("--warmup", type=int, help="untimed runs per case (default 2, quick 1)")
    p.add_argument("--repeats", type=int, help="timed runs per case (default 5, quick 2)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even with a GPU")
    args = p.parse_args(argv)
    check_out(p, args)
    device = torch.device("cuda" if torch.cuda.is_available() and not (args.cpu or args.quick) else "cpu")
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    batches = args.batch_sizes or ([2, 4] if args.quick else [32, 64, 128, 256])
    ar_batches = args.ar_batch_sizes or batches
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    if min(batches + ar_batches + args.steps) < 1 or repeats < 1 or args.decode_batch < 1 or warmup < 0:
        p.error("batch sizes, steps, repeats and --decode-batch must be >= 1, --warmup >= 0")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    t_start = time.time()
    prior, ar, tokenizer = build(args.quick, device, args.ar_config)
    cfg = prior.config
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def labels(b: int) -> Tensor:
        return torch.arange(b, device=device) % cfg.num_classes

    def decode(tokens: Tensor) -> Tensor:
        with torch.no_grad(), torch.autocast(**autocast):
            return torch.cat([tokenizer.decode_indices(t) for t in tokens.split(args.decode_batch)])

    def maskgit(b: int, steps: int) -> Tensor:
        g = torch.Generator(device).manual_seed(0)
        with torch.autocast(**autocast):
            return generate(prior, labels(b), generator=g, steps=steps, cfg_scale=args.cfg_scale)

    def autoregressive(b: int) -> Tensor:
        g = torch.Generator(device).manual_seed(0)
        with torch.autocast(**autocast):
            return ar_sample(ar, labels(b), generator=g, cfg_scale=args.cfg_scale)

    def case(method: str, b: int, sample: Callable[[], Tensor], steps: Optional[int] = None) -> dict:
        tokens = sample()
        total = time_fn(lambda: decode(sample()), device, warmup, repeats)
        prior_only = time_fn(sample, device, 0, repeats)
        dec_only = time_fn(lambda: decode(tokens), device, 0, repeats)
        med = statistics.median(total)
        row = {"method": method, "steps": steps, "batch": b, "median_s": med, "min_s": min(total),
               "images_per_s": b / med, "prior_median_s": statistics.median(prior_only),
               "decode_median_s": statistics.median(dec_only)}
        print(f"{method:>15} T={steps or '-':>4} B={b:>4}: {row['images_per_s']:9.2f} images/s "
              f"(prior {row['prior_median_s']:.4f} s, decode {row['decode_median_s']:.4f} s per batch)", flush=True)
        return row

    results = []
    for steps in args.steps:
        for b in batches:
            results.append(case("maskgit", b, functools.partial(maskgit, b, steps), steps))
    for b in ar_batches:
        results.append(case("autoregressive", b, functools.partial(autoregressive, b), ar.config.seq_len))
    ar_rate = {r["batch"]: r["images_per_s"] for r in results if r["method"] == "autoregressive"}
    for r in results:
        if r["method"] == "maskgit" and r["batch"] in ar_rate:
            r["ratio_to_autoregressive"] = r["images_per_s"] / ar_rate[r["batch"]]

    t8 = [r for r in results if r["method"] == "maskgit" and r["steps"] == 8]
    best8 = max(t8, key=lambda r: r["images_per_s"]) if t8 else None
    h, w = cfg.grid_hw
    report = {
        "benchmark": "MaskGIT sampling vs the autoregressive prior with a KV cache (tools/bench_sampling.py, issues 6, 16)",
        "device": device_name(device),
        "versions": versions(),
        "settings": {"quick": args.quick, "dtype": dtype, "cfg_scale": args.cfg_scale, "warmup": warmup,
                     "repeats": repeats, "decode_batch": args.decode_batch, "weights": "random (speed only)"},
        "prior": {"width": cfg.width, "depth": cfg.depth, "heads": cfg.heads, "tokens": [cfg.channels, h, w],
                  "codebook_size": cfg.codebook_size, "num_classes": cfg.num_classes,
                  "parameters": prior.num_params(), "autoregressive_parameters": ar.num_params(),
                  "autoregressive": {k: getattr(ar.config, k) for k in ("factorization", "width", "depth", "depth_layers",
                                                                        "heads", "window")},
                  "parameter_ratio": ar.num_params() / prior.num_params()},
        "image_size": h * tokenizer.downsample_factor,
        "results": results,
        "summary": {
            "best_images_per_s_T8": best8["images_per_s"] if best8 else None,
            "best_batch_T8": best8["batch"] if best8 else None,
            "ratio_to_autoregressive_T8": best8.get("ratio_to_autoregressive") if best8 else None,
            "targets": {"images_per_s_T8_bf16": TARGET_IMAGES_PER_S, "ratio_to_autoregressive": TARGET_RATIO},
        },
        "notes": [
            "images/s = batch / median seconds of one batch: prior sampling + MoVQ decoding to images.",
            "Autoregressive: movq's AutoregressivePrior at about equal parameter count (prior.parameter_ratio), "
            "KV-cached, one spatial step per sequence position (steps) and, for factorization depth, C depth-"
            "transformer steps per cell; the same guidance scale.",
            "Both run eagerly (no torch.compile, no CUDA graphs).",
        ] + (["--quick: tiny shapes on CPU; the numbers check the harness, not the speed."] if args.quick else []),
        "wall_s": time.time() - t_start,
    }
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
