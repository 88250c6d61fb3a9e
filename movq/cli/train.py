"""The training tools: ``movq-train`` / tools/train_tokenizer.py (the tokenizer) and ``movq-train-prior`` /
tools/train_prior.py (a MaskGIT or autoregressive prior), with the command line, exit codes and summary they share."""
from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Sequence
from typing import Optional

from accelerate import Accelerator

from movq.cli import setup_logging


def parse_train_args(argv: Optional[Sequence[str]], description: str, config_help: str) -> argparse.Namespace:
    """The training tools' command line, ``--config FILE [key.sub=value ...]``, and their logging:
    INFO on rank 0, WARNING on the others, Accelerate's one line per saved file kept quiet."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    setup_logging()
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


# OSErrors of the machine rather than of the code: a one-line error, not a traceback.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line. An error re-raised by a DataLoader worker carries the worker's
    whole traceback: its last line is the original message."""
    text = str(e).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split()) or type(e).__name__


def build_and_fit(config_cls, trainer_cls, args: argparse.Namespace):
    """Load the config, build the trainer and fit; returns ``(trainer, summary, exit_code)``.

    Exit codes: 2 for what the user can fix, on one ``error:`` line (a bad config value, naming its key;
    missing files; a run folder that is a file, read-only, full or locked by another run; a damaged
    checkpoint; unusable data; a checkpoint that could not be written); 3 for too many non-finite steps
    in a row; 4 when a collective timed out (``train.dist_timeout``: another rank froze or died); 128 +
    the signal (130 / 143) for a run stopped early by SIGINT / SIGTERM, its checkpoint saved. ``trainer``
    and ``summary`` are None where not built. A config error leaves no run folder behind."""
    from movq.config import load_config
    from movq.data.sources import DataError
    from movq.training.checkpoints import CheckpointSaveError, ResumeError
    from movq.training.run import NonFiniteError, check_trackers, collective_failure

    trainer = None
    try:
        try:
            cfg = load_config(config_cls, args.config, args.overrides)
            check_trackers(cfg.train.trackers)
            trainer = trainer_cls(cfg)  # missing LPIPS / token files, bad settings, a locked run folder
        except (ValueError, ImportError) as e:  # ConfigError, RunFolderError, ...; ImportError: an optional extra
            _error(trainer, e)
            return trainer, None, 2
        summary = trainer.fit()
        # stopped by SIGINT / SIGTERM (checkpoint saved): 128 + the signal, so a chained script stops too
        return trainer, summary, 128 + summary["stopped_by_signal"] if summary["stopped_by_signal"] else 0
    except NonFiniteError as e:
        _error(trainer, e)
        return trainer, None, 3
    except (ResumeError, CheckpointSaveError, DataError, FileNotFoundError) as e:
        _error(trainer, e)
        return trainer, None, 2
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS:
            raise
        newest = trainer.checkpointer.list() if trainer is not None and hasattr(trainer, "checkpointer") else []
        kept = f"; the newest checkpoint {newest[-1]} is intact" if newest else ""
        _error(trainer, f"{e.strerror}: {e.filename}{kept}" if e.filename else f"{one_line(e)}{kept}")
        return trainer, None, 2
    except RuntimeError as e:
        if not collective_failure(e):
            raise
        timeout = trainer.cfg.train.dist_timeout if trainer is not None else "?"
        _error(trainer, f"a collective operation failed, or waited longer than train.dist_timeout={timeout} s, "
                        f"for the other ranks (one froze, died or fell that far behind); this rank stops "
                        f"({one_line(e)[:200]})", every_rank=True)
        return trainer, None, 4


def _error(trainer, e, every_rank: bool = False) -> None:
    """One ``error:`` line on stderr, from rank 0 (all ranks agree on these errors) or ``every_rank``
    (a collective failed: the other ranks may be gone)."""
    from movq.utils import launcher_rank

    main = trainer.acc.is_main_process if trainer is not None and hasattr(trainer, "acc") else launcher_rank() == 0
    if main or every_rank:
        print(f"error: {one_line(e) if isinstance(e, BaseException) else e}", file=sys.stderr, flush=True)


TOKENIZER_USAGE = """Train a MoVQ tokenizer (``movq-train``, ``tools/train_tokenizer.py``).

    accelerate launch tools/train_tokenizer.py --config configs/ffhq256.yaml [key.sub=value ...]
    python tools/train_tokenizer.py --config configs/tiny.yaml train.max_steps=100
    torchrun --nproc_per_node 2 tools/train_tokenizer.py --config configs/tiny.yaml

Overrides use the config's dotted keys, e.g. ``train.run_dir=runs/x train.resume=latest``.
"""

PRIOR_USAGE = """Train a prior, MaskGIT or autoregressive (the config's ``kind``), on token shards made by
tools/tokenize_dataset.py (``movq-train-prior``, ``tools/train_prior.py``).

    accelerate launch tools/train_prior.py --config configs/maskgit_base.yaml [key.sub=value ...]
    accelerate launch tools/train_prior.py --config configs/ar_base.yaml [key.sub=value ...]
    python tools/train_prior.py --config configs/maskgit_tiny.yaml train.max_steps=100
    torchrun --nproc_per_node 2 tools/train_prior.py --config configs/ar_tiny.yaml

Overrides use the config's dotted keys, e.g. ``data.tokens=runs/x/tokens train.resume=latest``.
The run folder gets config.yaml, metrics.jsonl, images/ (sample grids; MaskGIT: inpainting examples,
autoregressive: completions of the bottom half) and checkpoints/NNNNNNN/{model,ema}/ (``load_prior``,
or tools/sample.py --checkpoint RUN).
"""


def main_tokenizer(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_train_args(argv, TOKENIZER_USAGE, "YAML config (see configs/)")

    from movq.config import TokenizerConfig
    from movq.training.tokenizer import TokenizerTrainer

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


def main_prior(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_train_args(argv, PRIOR_USAGE, "YAML config (configs/maskgit_*.yaml, configs/ar_*.yaml)")

    from movq.config import PriorConfig
    from movq.training.prior import PriorTrainer

    trainer, summary, code = build_and_fit(PriorConfig, PriorTrainer, args)
    if summary is None:
        return code
    if trainer.acc.is_main_process:
        ev, m = summary["eval"], trainer.cfg.model
        kind = f"{m.num_classes} classes" if m.num_classes else "unconditional"
        edit = ("completion", "complete") if trainer.cfg.kind == "autoregressive" else ("inpainting", "inpaint")
        body = [
            f" {trainer.cfg.kind} prior: {trainer.prior.num_params() / 1e6:.2f}M parameters, "
            f"{m.channels}×{m.grid_hw[0]}×{m.grid_hw[1]} tokens, K={m.codebook_size}, {kind}",
            f" FID {ev['fid']:.2f}" if "fid" in ev else " FID: not computed (needs train.fid_every, Inception weights, a tokenizer)",
            f" non-finite steps skipped: {summary['bad_steps']}",
            f" samples:      {ev.get('samples', '-')}",
            f" {edit[0] + ':':<13} {ev.get(edit[1], '-')}",
        ]
        print(summary_banner(summary, trainer.acc, body, f"tools/sample.py --checkpoint {summary['run_dir']}"))
    return code  # 0, or 128 + the signal that stopped the run early
