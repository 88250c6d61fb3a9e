#!/usr/bin/env python
"""Train a MoVQ tokenizer.

    accelerate launch tools/train_tokenizer.py --config configs/ffhq256.yaml [key.sub=value ...]
    python tools/train_tokenizer.py --config configs/tiny.yaml train.max_steps=100
    torchrun --nproc_per_node 2 tools/train_tokenizer.py --config configs/tiny.yaml

Overrides use the config's dotted keys, e.g. ``train.run_dir=runs/x train.resume=latest``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from movq.config import ConfigError, TokenizerConfig, load_config  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("accelerate.checkpointing", "accelerate.accelerator"):  # one line per saved file
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_config(TokenizerConfig, args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from movq.trainer import TokenizerTrainer
    from movq.training import NonFiniteError

    trainer = TokenizerTrainer(cfg)
    try:
        summary = trainer.fit()
    except NonFiniteError as e:
        trainer.acc.print(f"error: {e}")
        return 3
    if trainer.acc.is_main_process:
        ev = summary["eval"]
        lines = [
            "",
            "=" * 64,
            f" trained {summary['steps']} steps in {summary['seconds'] / 60:.1f} min"
            f" ({trainer.acc.num_processes} process(es), {trainer.acc.device})",
            f" held-out PSNR {ev.get('val/psnr', float('nan')):.2f} dB   SSIM {ev.get('val/ssim', float('nan')):.3f}"
            + (f"   LPIPS {ev['val/lpips']:.3f}" if "val/lpips" in ev else ""),
            f" codebook usage {100 * ev.get('val/codebook_usage', float('nan')):.1f}%   perplexity {ev.get('val/perplexity', float('nan')):.1f}",
            f" non-finite steps skipped: {summary['bad_steps']}   data skipped: {summary['data_skipped'] or 'none'}",
            f" run folder:   {summary['run_dir']}  (config.yaml, metrics.jsonl, images/)",
            f" checkpoint:   {summary['checkpoint']}  (model/, ema/ load with MoVQ.from_pretrained)",
            "=" * 64,
        ]
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
