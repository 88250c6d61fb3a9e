#!/usr/bin/env python
"""Train a MoVQ tokenizer.

    accelerate launch tools/train_tokenizer.py --config configs/ffhq256.yaml [key.sub=value ...]
    python tools/train_tokenizer.py --config configs/tiny.yaml train.max_steps=100
    torchrun --nproc_per_node 2 tools/train_tokenizer.py --config configs/tiny.yaml

Overrides use the config's dotted keys, e.g. ``train.run_dir=runs/x train.resume=latest``.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from movq.config import TokenizerConfig  # noqa: E402
from _train_cli import build_and_fit, parse_train_args, summary_banner  # noqa: E402 (tools/ is on sys.path)


def main(argv=None) -> int:
    args = parse_train_args(argv, __doc__, "YAML config (see configs/)")

    from movq.trainer import TokenizerTrainer

    trainer, summary, code = build_and_fit(TokenizerConfig, TokenizerTrainer, args)
    if summary is None:
        return code
    if trainer.acc.is_main_process:
        ev = summary["eval"]
        body = [
            f" held-out PSNR {ev['val/psnr']:.2f} dB   SSIM {ev['val/ssim']:.3f}"
            + (f"   LPIPS {ev['val/lpips']:.3f}" if "val/lpips" in ev else "")
            + f"\n codebook usage {100 * ev['val/codebook_usage']:.1f}%   perplexity {ev['val/perplexity']:.1f}"
            if "val/psnr" in ev else " no evaluation yet (stopped before the first one)",
            f" non-finite steps skipped: {summary['bad_steps']}   data skipped: {summary['data_skipped'] or 'none'}",
        ]
        print(summary_banner(summary, trainer.acc, body, "model/, ema/ load with MoVQ.from_pretrained"))
    return code  # 0, or 128 + the signal that stopped the run early


if __name__ == "__main__":
    sys.exit(main())
