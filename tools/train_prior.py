#!/usr/bin/env python
"""Train a MaskGIT prior on token shards (made by tools/tokenize_dataset.py).

    accelerate launch tools/train_prior.py --config configs/maskgit_base.yaml [key.sub=value ...]
    python tools/train_prior.py --config configs/maskgit_tiny.yaml train.max_steps=100
    torchrun --nproc_per_node 2 tools/train_prior.py --config configs/maskgit_tiny.yaml

Overrides use the config's dotted keys, e.g. ``data.tokens=runs/x/tokens train.resume=latest``.
The run folder gets config.yaml, metrics.jsonl, images/ (sample grids and inpainting examples) and
checkpoints/NNNNNNN/{model,ema}/ (load with movq.prior_trainer.load_prior or tools/sample.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _train_cli import build_and_fit, parse_train_args, summary_banner  # noqa: E402 (tools/ is on sys.path)


def main(argv=None) -> int:
    args = parse_train_args(argv, __doc__, "YAML config (configs/maskgit_*.yaml)")

    from movq.prior_trainer import PriorConfig, PriorTrainer

    trainer, summary, code = build_and_fit(PriorConfig, PriorTrainer, args)
    if summary is None:
        return code
    if trainer.acc.is_main_process:
        ev, m = summary["eval"], trainer.cfg.model
        kind = f"{m.num_classes} classes" if m.num_classes else "unconditional"
        body = [
            f" prior: {trainer.prior.num_params() / 1e6:.2f}M parameters, {m.channels}×{m.grid_hw[0]}×{m.grid_hw[1]}"
            f" tokens, K={m.codebook_size}, {kind}",
            f" FID {ev['fid']:.2f}" if "fid" in ev else " FID: not computed (needs train.fid_every, Inception weights, a tokenizer)",
            f" non-finite steps skipped: {summary['bad_steps']}",
            f" samples:      {ev.get('samples', '-')}",
            f" inpainting:   {ev.get('inpaint', '-')}",
        ]
        print(summary_banner(summary, trainer.acc, body, f"tools/sample.py --checkpoint {summary['run_dir']}"))
    return code  # 0, or 128 + the signal that stopped the run early


if __name__ == "__main__":
    sys.exit(main())
