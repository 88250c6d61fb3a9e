"""Machinery shared by the tokenizer and prior trainers (DiT's train.py and Accelerate's examples).

* ``RunDir`` — ``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``images/`` of one run; only rank 0
  writes.
* ``EMA`` — an exponential moving average of a model's weights, used for evaluation and saved.
* ``Checkpointer`` — atomic checkpoints: everything is written into ``checkpoints/.tmp-NNNNNNN`` and
  renamed to ``checkpoints/NNNNNNN`` once complete, so a crash mid-write leaves the previous one
  intact; the last ``keep`` are kept. Weights are safetensors; optimizer, scheduler and RNG states are
  Accelerate's (loaded with ``weights_only``), the loop counters a JSON file.
* ``StepGuard`` — skips and counts steps whose loss or gradients are not finite, and aborts with a
  clear message after too many in a row.
* ``StopFlag`` — SIGINT / SIGTERM ask the loop to save and exit at the end of the current step, on
  every rank at once.
* ``TrainLoop`` — the loop itself (resume, gradient accumulation, logging, evaluation, checkpoints,
  stopping), with hooks that ``movq.trainer.TokenizerTrainer`` and ``movq.prior_trainer.PriorTrainer``
  fill in.
* ``parse_train_args``, ``summary_banner`` — the training tools' command line and closing summary.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from torch import nn

from movq.config import atomic_write_text, save_config, to_dict

log = logging.getLogger(__name__)

CKPT_PATTERN = re.compile(r"^\d{7}$")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def make_accelerator(train_cfg, project_dir: str) -> Accelerator:
    """CPU runs need ``cpu=True`` explicitly, or ranks under torchrun would not synchronise."""
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=train_cfg.mixed_precision,
        gradient_accumulation_steps=train_cfg.grad_accum,
        log_with=list(train_cfg.trackers) or None,
        project_dir=project_dir,
    )


def warmup_lambda(warmup_steps: int) -> Callable[[int], float]:
    """Linear LR warmup from 1/warmup to 1 over ``warmup_steps`` optimizer steps, then constant."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def save_state_dict(module_or_state: Union[nn.Module, dict], path: Union[str, os.PathLike]) -> None:
    """Safetensors save through a temp file + rename."""
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)


def load_state_dict(module: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Strict safetensors load with a message that names the file."""
    try:
        state = load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


class RunDir:
    """The folder of one run. Every method is a no-op on ranks other than 0."""

    def __init__(self, root: Union[str, os.PathLike], is_main: bool):
        self.root = Path(root)
        self.is_main = is_main
        self.checkpoints = self.root / "checkpoints"
        self.images = self.root / "images"
        if is_main:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            self.images.mkdir(parents=True, exist_ok=True)

    def save_config(self, cfg: Any) -> None:
        if self.is_main:
            save_config(cfg, self.root / "config.yaml")

    def log_metrics(self, step: int, kind: str, values: dict) -> None:
        """Append one JSON object per event to metrics.jsonl (``step``, ``kind`` and every term)."""
        if not self.is_main:
            return
        record = {"step": step, "kind": kind}
        for k, v in values.items():
            if isinstance(v, torch.Tensor):
                v = v.item() if v.numel() == 1 else v.tolist()
            record[k] = v
        with open(self.root / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied).

    The shadow is a full copy of the model, so evaluation simply runs ``ema.model``.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_state = self.model.state_dict()
        for name, value in model.state_dict().items():
            target = ema_state[name]
            if value.dtype.is_floating_point and name in dict(model.named_parameters()):
                target.lerp_(value.to(target.dtype), 1.0 - self.decay)
            else:
                target.copy_(value)


class Checkpointer:
    """Atomic, rotating checkpoints under ``run_dir/checkpoints``.

    ``save(step, write_extra)``: every rank calls it (Accelerate writes per-rank RNG states); rank 0
    then calls ``write_extra(folder)`` to add weights and counters, and renames the folder into place.
    """

    def __init__(self, accelerator, directory: Union[str, os.PathLike], keep: int):
        self.accelerator = accelerator
        self.dir = Path(directory)
        self.keep = max(1, keep)

    def list(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.is_dir() and CKPT_PATTERN.match(p.name))

    def resolve(self, resume: Optional[str]) -> Optional[Path]:
        """``None`` → None; ``"latest"`` → the newest complete checkpoint or None; else that folder."""
        if not resume:
            return None
        if resume == "latest":
            found = self.list()
            return found[-1] if found else None
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"train.resume={resume}: no checkpoint there (trainer_state.json missing)")
        return path

    def save(self, step: int, write_extra: Callable[[Path], None]) -> Path:
        acc = self.accelerator
        final = self.dir / f"{step:07d}"
        tmp = self.dir / f".tmp-{step:07d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            write_extra(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.list()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            for stale in self.dir.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path) -> dict:
        """Restore Accelerate's state; returns the loop counters written by the trainer."""
        self.accelerator.load_state(str(path))
        return json.loads((path / "trainer_state.json").read_text())


def write_trainer_state(folder: Path, state: dict) -> None:
    atomic_write_text(folder / "trainer_state.json", json.dumps(state, indent=1))


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row."""


class StepGuard:
    """Decides whether a step's loss and gradient norms are finite; counts and bounds the skips."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total = 0

    def check(self, *values: torch.Tensor) -> bool:
        """True if every value is finite (the step may proceed); else count a skip."""
        ok = all(bool(torch.isfinite(v).all()) for v in values if v is not None)
        if ok:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row > self.max_in_a_row:
            raise NonFiniteError(
                f"{self.in_a_row} non-finite steps in a row (train.max_bad_steps={self.max_in_a_row}); "
                "aborting. The last good checkpoint is untouched; lower the LR or check the data."
            )
        return False

    def state_dict(self) -> dict:
        return {"in_a_row": self.in_a_row, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.in_a_row, self.total = int(state["in_a_row"]), int(state["total"])


class StopFlag:
    """Set by SIGINT/SIGTERM; ``should_stop()`` agrees across ranks (any rank's signal stops all)."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. some test runners): no signal handling
                pass

    def _handler(self, signum, frame) -> None:
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        log.warning("signal %d: saving a checkpoint and stopping after this step", signum)
        self.requested = True

    def should_stop(self, device: torch.device) -> bool:
        if not is_distributed():
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def mean_logs(history: list[dict]) -> dict:
    """Average each logged scalar over the steps since the last log."""
    out: dict = {}
    for key in {k for h in history for k in h}:
        vals = [float(h[key]) for h in history if key in h]
        out[key] = sum(vals) / len(vals) if vals else math.nan
    return out


class TrainLoop:
    """The training loop both trainers share (DiT's train.py, Accelerate's ``complete_cv_example.py``).

    A subclass's constructor calls ``_setup`` first, builds its models and optimizers (``set_seed(
    train.seed)`` before, so every rank starts from the same weights), calls ``_setup_loop`` right
    after ``accelerator.prepare`` and ``_setup_outputs`` last; it then implements the hooks below.

    ``fit()`` resumes from ``train.resume``, then per optimizer step runs ``train.grad_accum`` calls of
    ``_train_batch`` and one ``_optimizer_step``. Every ``train.log_every`` steps it writes a ``train``
    record (the logs averaged over steps and ranks), every ``train.eval_every`` steps an ``eval``
    record (``evaluate()``), then calls ``_after_step``, and every ``train.save_every`` steps saves a
    checkpoint; the last step logs, evaluates and saves. SIGINT / SIGTERM save and stop after the
    current step.
    """

    # What one row of a batch is ("images", "samples"): it names the ``<unit>_seen`` counter of
    # trainer_state.json and the ``<unit>_per_s`` rate of the train records.
    unit = "samples"

    # ------------------------------------------------------------------ construction
    def _setup(self, cfg: Any, accelerator: Optional[Accelerator]) -> None:
        """Check the loop settings, make the Accelerator and the run folder (writes config.yaml)."""
        t = cfg.train
        if t.grad_accum < 1 or t.max_steps < 0:
            raise ValueError("train.grad_accum must be ≥ 1 and train.max_steps ≥ 0")
        self.cfg = cfg
        self.acc = accelerator or make_accelerator(t, t.run_dir)
        self.run = RunDir(t.run_dir, self.acc.is_main_process)
        self.run.save_config(cfg)

    def _make_ema(self, model: nn.Module) -> Optional[EMA]:
        """An EMA of ``model`` on the accelerator's device, or None when ``train.ema_decay`` is 0."""
        if self.cfg.train.ema_decay <= 0:
            return None
        ema = EMA(model, self.cfg.train.ema_decay)
        ema.model.to(self.acc.device)
        return ema

    def _setup_loop(self) -> None:
        """After ``accelerator.prepare``: per-rank randomness, the step guard, checkpoints, counters."""
        acc, t = self.acc, self.cfg.train
        # Per-rank runtime randomness (DiT): seed · world_size + rank.
        set_seed(t.seed * acc.num_processes + acc.process_index)
        self.guard = StepGuard(t.max_bad_steps)
        self.checkpointer = Checkpointer(acc, self.run.checkpoints, t.keep_checkpoints)
        self.step = 0
        self.seen = 0  # rows of batches trained on, over all ranks

    def _setup_outputs(self) -> None:
        """Last: the FID tracker (when ``train.fid_every`` > 0) and the experiment trackers."""
        acc, t = self.acc, self.cfg.train
        self.fid = None
        if t.fid_every > 0:
            from movq.fid import FIDTracker

            # The reference statistics are cached in the run folder unless train.fid_reference names a file.
            ref = t.fid_reference or str(self.run.root / "fid_reference.npz")
            self.fid = FIDTracker(t.inception_weights, ref, device=acc.device)
        if t.trackers:
            flat = {f"{s}.{k}": v for s, sec in to_dict(self.cfg).items() for k, v in sec.items()}
            acc.init_trackers(t.project, config={k: str(v) if isinstance(v, (list, dict)) else v for k, v in flat.items()})

    # ------------------------------------------------------------------ hooks
    def _batches(self, start_step: int) -> Iterator[dict]:
        """This rank's endless stream of micro-batches from micro-batch ``start_step`` on. It must be a
        pure function of seed and position, so that a resume continues where the run stopped."""
        raise NotImplementedError

    def _train_batch(self, batch: dict) -> dict:
        """Forward and backward of one micro-batch inside ``accelerator.accumulate``; returns its logs
        (scalars or one-element tensors; ``loss`` is required)."""
        raise NotImplementedError

    def _batch_size(self, batch: dict) -> int:
        """Rows in this rank's micro-batch (for the ``<unit>_seen`` counter and the throughput)."""
        raise NotImplementedError

    def _optimizer_step(self, logs: dict) -> bool:
        """Clip the gradients, check ``logs["loss"]`` and the norms with ``self.guard``, step the
        optimizers, schedulers and EMA when finite, zero the gradients; adds the gradient norms to
        ``logs``. Returns False when the step was skipped."""
        raise NotImplementedError

    def _lr(self) -> float:
        """The current learning rate (of the generator, where there are two optimizers)."""
        raise NotImplementedError

    def evaluate(self) -> dict:
        """Every ``train.eval_every`` steps and at the last, on every rank: the ``eval`` record's
        values (strings, e.g. paths of pictures, go to metrics.jsonl but not to the trackers)."""
        raise NotImplementedError

    def _write_weights(self, folder: Path) -> None:
        """Rank 0: write the model (and EMA, discriminator, ...) weights into a checkpoint folder."""
        raise NotImplementedError

    def _set_train_mode(self) -> None:
        """Put every trained module in training mode before the loop."""
        self.model.train()

    def _after_step(self, last_eval: dict) -> None:
        """Called on every rank after each step's evaluation; may add values to ``last_eval``."""

    def _state_extra(self) -> dict:
        """More loop counters for trainer_state.json."""
        return {}

    def _load_state_extra(self, state: dict) -> None:
        """Restore what ``_state_extra`` wrote, from a resumed trainer_state.json."""

    def _train_log_extra(self) -> dict:
        """More values for each train record, before ``lr``; called on every rank (may be collective)."""
        return {}

    def _progress_postfix(self, out: dict) -> dict:
        """What the progress bar shows after each train record ``out``."""
        return {"loss": f"{out.get('loss', math.nan):.4f}"}

    def _summary_extra(self) -> dict:
        """More entries for ``fit()``'s summary, after ``bad_steps``; called on every rank."""
        return {}

    # ------------------------------------------------------------------ checkpoints
    def _write_extra(self, folder: Path) -> None:
        self._write_weights(folder)
        state = {"step": self.step, "guard": self.guard.state_dict(), **self._state_extra(), f"{self.unit}_seen": self.seen}
        write_trainer_state(folder, state)

    def save(self) -> Path:
        path = self.checkpointer.save(self.step, self._write_extra)
        self.acc.print(f"saved checkpoint {path}")
        return path

    def resume(self) -> None:
        """Restore the checkpoint ``train.resume`` names (or the newest, for ``latest``), if any."""
        path = self.checkpointer.resolve(self.cfg.train.resume)
        if path is None:
            return
        state = self.checkpointer.load(path)
        if self.ema is not None:
            load_state_dict(self.ema.model, path / "ema" / "model.safetensors")
        self.step = int(state["step"])
        self.guard.load_state_dict(state["guard"])
        self._load_state_extra(state)
        self.seen = int(state.get(f"{self.unit}_seen", 0))
        self.acc.print(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ the loop
    def _log(self, history: list[dict], t0: float, rows: int) -> dict:
        """Average the logs since the last record over steps and ranks; write the train record."""
        acc = self.acc
        means = mean_logs(history)
        keys = sorted(means)
        vec = torch.tensor([means[k] for k in keys], device=acc.device, dtype=torch.float64)
        vec = acc.reduce(vec, reduction="mean")
        out = {k: float(v) for k, v in zip(keys, vec.tolist())}
        out.update(self._train_log_extra())
        out["lr"] = self._lr()
        out["bad_steps"] = self.guard.total
        out[f"{self.unit}_per_s"] = rows * acc.num_processes / max(time.time() - t0, 1e-9)
        self.run.log_metrics(self.step, "train", out)
        acc.log(out, step=self.step)
        return out

    def fit(self) -> dict:
        """Train to ``train.max_steps``; returns a summary (steps, seconds, last eval, bad steps, the
        ``_summary_extra`` entries, run folder, newest checkpoint)."""
        acc, t = self.acc, self.cfg.train
        self.resume()
        batches = self._batches(self.step * t.grad_accum)
        stop = StopFlag()
        history: list[dict] = []
        last_eval: dict = {}
        t_start = t_log = time.time()
        rows_since_log = 0
        progress = None
        if acc.is_main_process:
            from tqdm.auto import tqdm

            progress = tqdm(total=t.max_steps, initial=self.step, unit="step", dynamic_ncols=True)
        self._set_train_mode()
        try:
            while self.step < t.max_steps:
                logs = {}
                for _ in range(t.grad_accum):
                    batch = next(batches)
                    logs = self._train_batch(batch)
                    rows = self._batch_size(batch)
                    rows_since_log += rows
                    self.seen += rows * acc.num_processes
                if self._optimizer_step(logs):
                    history.append({k: float(v) for k, v in logs.items()})
                self.step += 1
                if progress is not None:
                    progress.update(1)
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    out = self._log(history or [{}], t_log, rows_since_log)
                    if progress is not None:
                        progress.set_postfix(**self._progress_postfix(out))
                    history, t_log, rows_since_log = [], time.time(), 0
                if self.step % t.eval_every == 0 or self.step == t.max_steps:
                    last_eval = self.evaluate()
                    self.run.log_metrics(self.step, "eval", last_eval)
                    acc.log({k: v for k, v in last_eval.items() if not isinstance(v, str)}, step=self.step)
                self._after_step(last_eval)
                if self.step % t.save_every == 0 or self.step == t.max_steps:
                    self.save()
                if stop.should_stop(acc.device):
                    acc.print(f"stopping at step {self.step} on request")
                    if self.step % t.save_every != 0 and self.step != t.max_steps:
                        self.save()
                    break
            # Inside the try: the summary may gather over ranks, before end_training ends the group.
            found = self.checkpointer.list()
            summary = {
                "steps": self.step,
                "seconds": time.time() - t_start,
                "eval": last_eval,
                "bad_steps": self.guard.total,
                **self._summary_extra(),
                "run_dir": str(self.run.root),
                "checkpoint": str(found[-1]) if found else None,
            }
        finally:
            stop.restore()
            if progress is not None:
                progress.close()
            acc.end_training()  # closes trackers (and the process group)
        return summary


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
