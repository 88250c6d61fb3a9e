"""Command-line pieces shared by tools/train_tokenizer.py and tools/train_prior.py (kept out of
the library, which parses no command lines)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from accelerate import Accelerator


def parse_train_args(argv: Optional[Sequence[str]], description: str, config_help: str) -> argparse.Namespace:
    """The training tools' command line, ``--config FILE [key.sub=value ...]``, and their logging:
    INFO on rank 0, WARNING on the others, Accelerate's one line per saved file kept quiet."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("accelerate.checkpointing", "accelerate.accelerator"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return args


def summary_banner(summary: dict, accelerator: Accelerator, body: Sequence[str], checkpoint_hint: str) -> str:
    """The block the training tools print at the end of ``fit()``: steps and time, the ``body`` lines,
    the run folder and the newest checkpoint (``checkpoint_hint`` says how to load it)."""
    rule = "=" * 64
    return "\n".join([
        "",
        rule,
        f" trained {summary['steps']} steps in {summary['seconds'] / 60:.1f} min"
        f" ({accelerator.num_processes} process(es), {accelerator.device})",
        *body,
        f" run folder:   {summary['run_dir']}  (config.yaml, metrics.jsonl, images/)",
        f" checkpoint:   {summary['checkpoint']}  ({checkpoint_hint})",
        rule,
    ])


def build_and_fit(config_cls, trainer_cls, args: argparse.Namespace):
    """Load the config, build the trainer and fit; returns ``(trainer, summary, exit_code)``.

    Bad configs, missing files and bad settings are one ``error:`` line and exit code 2 (``trainer``
    and ``summary`` are then None where not built); too many non-finite steps in a row give 3; a run
    stopped early by SIGINT / SIGTERM (checkpoint saved) gives 128 + the signal (130 / 143)."""
    from movq.config import ConfigError, load_config
    from movq.training import NonFiniteError, ResumeError

    try:
        cfg = load_config(config_cls, args.config, args.overrides)
        trainer = trainer_cls(cfg)  # missing LPIPS / token files, bad loop settings: one-line errors
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None, None, 2
    try:
        summary = trainer.fit()
        # stopped by SIGINT / SIGTERM (checkpoint saved): 128 + the signal, so a chained script stops too
        return trainer, summary, 128 + summary["stopped_by_signal"] if summary["stopped_by_signal"] else 0
    except ResumeError as e:
        print(f"error: {e}", file=sys.stderr)
        return trainer, None, 2
    except NonFiniteError as e:
        trainer.acc.print(f"error: {e}")
        return trainer, None, 3
    except FileNotFoundError as e:  # train.resume naming a folder that is not a checkpoint
        print(f"error: {e}", file=sys.stderr)
        return trainer, None, 2
