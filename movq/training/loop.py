"""The training loop both trainers share (DiT's train.py, Accelerate's ``complete_cv_example.py``).

``TrainLoop.fit()`` owns the schedule (accumulation, logging, evaluation, checkpoints, resume,
stopping); ``movq.trainer.TokenizerTrainer`` and ``movq.prior_trainer.PriorTrainer`` fill in its
hooks. The pieces it is built from (run folder, EMA, checkpoints, NaN guard, signal flag) are in
``movq.training``.
"""
from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from movq.config import to_dict
from movq.training.checkpoints import (
    EMA,
    Checkpointer,
    ResumeError,
    RunDir,
    StepGuard,
    StopFlag,
    list_checkpoints,
    load_state_dict,
    make_accelerator,
    mean_logs,
    write_trainer_state,
)


def mean_micro_logs(micro: list[dict]) -> dict:
    """One optimizer step's logs: each value averaged over the micro-batches that logged it (tensors stay
    tensors on their device, so a non-finite value in any micro-batch makes the mean non-finite)."""
    out: dict = {}
    for key in micro[-1]:
        vals = [m[key] for m in micro if key in m]
        if len(vals) == 1:
            out[key] = vals[0]
        elif all(isinstance(v, torch.Tensor) for v in vals):
            out[key] = torch.stack([v.detach().float() for v in vals]).mean()
        else:
            out[key] = sum(float(v) for v in vals) / len(vals)
    return out


class TrainLoop:
    """The training loop both trainers share (DiT's train.py, Accelerate's ``complete_cv_example.py``).

    A subclass's constructor calls ``_setup`` first, builds its models and optimizers (``set_seed(
    train.seed)`` before, so every rank starts from the same weights), calls ``_setup_loop`` right
    after ``accelerator.prepare`` and ``_setup_outputs`` last; it then implements the hooks below.

    ``fit()`` resumes from ``train.resume``, then per optimizer step runs ``train.grad_accum`` calls of
    ``_train_batch`` and one ``_optimizer_step``. Every ``train.log_every`` steps it writes a ``train``
    record (the logs averaged over steps and ranks), every ``train.eval_every`` steps an ``eval``
    record (``evaluate()``), then ``_after_step`` (a ``fid`` record every ``train.fid_every`` steps),
    and every ``train.save_every`` steps saves a checkpoint; the last step logs, evaluates and saves.
    SIGINT / SIGTERM save and stop after the current step (the summary's ``stopped_by_signal``).
    """

    # What one row of a batch is ("images", "samples"): it names the ``<unit>_seen`` counter of
    # trainer_state.json and the ``<unit>_per_s`` rate of the train records.
    unit = "samples"
    # The key of ``compute_fid()``'s value in the ``fid`` records, ``last_eval`` and the trackers.
    fid_key = "fid"

    # ------------------------------------------------------------------ construction
    def _setup(self, cfg: Any, accelerator: Optional[Accelerator]) -> None:
        """Check the loop settings, make the Accelerator and the run folder (``fit`` writes config.yaml)."""
        t = cfg.train
        if t.grad_accum < 1 or t.max_steps < 0:
            raise ValueError("train.grad_accum must be ≥ 1 and train.max_steps ≥ 0")
        if min(t.log_every, t.eval_every, t.save_every) < 1:  # fit() takes the step modulo each
            raise ValueError(f"train.log_every, train.eval_every and train.save_every must be ≥ 1, "
                             f"got {t.log_every}, {t.eval_every}, {t.save_every}")
        found = list_checkpoints(Path(t.run_dir) / "checkpoints") if (Path(t.run_dir) / "checkpoints").is_dir() else []
        if found and not t.resume:
            raise ValueError(f"{t.run_dir} already holds checkpoints (newest: {found[-1].name}): pass "
                             "train.resume=latest to continue that run, or another train.run_dir")
        self.cfg = cfg
        self.acc = accelerator or make_accelerator(t, t.run_dir)
        self.run = RunDir(t.run_dir, self.acc.is_main_process)

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
            from movq.evaluation.fid import FIDTracker

            # The reference statistics are cached in the run folder unless train.fid_reference names a file.
            ref = t.fid_reference or str(self.run.root / "fid_reference.npz")
            self.fid = FIDTracker(t.inception_weights, ref, device=acc.device)
        if t.trackers:
            flat = {f"{s}.{k}": v for s, sec in to_dict(self.cfg).items() for k, v in sec.items()}
            # wandb would otherwise write ./wandb in the working directory; keep it in the run folder
            init_kwargs = {"wandb": {"dir": str(self.run.root)}} if "wandb" in t.trackers else {}
            acc.init_trackers(t.project, config={k: str(v) if isinstance(v, (list, dict)) else v for k, v in flat.items()},
                              init_kwargs=init_kwargs)

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
        ``logs``. Returns False when the step was skipped (``_step_ok`` checks and reports)."""
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

    def compute_fid(self) -> Optional[float]:
        """FID of the model's outputs on every rank (None when it cannot be computed, e.g. no weights)."""
        raise NotImplementedError

    def _after_step(self, last_eval: dict) -> None:
        """On every rank after each step's evaluation: every ``train.fid_every`` steps ``compute_fid()``,
        logged as its own ``fid`` record and to the trackers under ``fid_key``, and added to ``last_eval``."""
        t = self.cfg.train
        if t.fid_every > 0 and self.step % t.fid_every == 0:
            fid = self.compute_fid()
            if fid is not None:
                last_eval[self.fid_key] = fid
                self.run.log_metrics(self.step, "fid", {self.fid_key: fid})
                self.acc.log({self.fid_key: fid}, step=self.step)

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

    def _step_ok(self, *values) -> bool:
        """``self.guard.check(*values)`` for ``_optimizer_step``, saying so when the step is skipped."""
        if self.guard.check(*values):
            return True
        self.acc.print(f"step {self.step}: non-finite loss or gradient, step skipped ({self.guard.in_a_row} in a row)")
        return False

    # ------------------------------------------------------------------ checkpoints
    def _write_extra(self, folder: Path) -> None:
        self._write_weights(folder)
        state = {"step": self.step, "guard": self.guard.state_dict(), **self._state_extra(),
                 f"{self.unit}_seen": self.seen, "data_layout": self._data_layout()}
        write_trainer_state(folder, state)

    def _data_layout(self) -> dict:
        """What the data position of a resume (step × grad_accum batches per rank) depends on."""
        t = self.cfg.train
        return {"world_size": self.acc.num_processes, "grad_accum": t.grad_accum,
                "batch_size": self.cfg.data.batch_size, "seed": self.cfg.data.seed}

    def save(self) -> Path:
        path = self.checkpointer.save(self.step, self._write_extra)
        self.acc.print(f"saved checkpoint {path}")
        return path

    def resume(self) -> None:
        """Restore the checkpoint ``train.resume`` names (or the newest, for ``latest``), if any."""
        path = self.checkpointer.resolve(self.cfg.train.resume)
        if path is None:
            if self.cfg.train.resume:
                self.acc.print(f"train.resume={self.cfg.train.resume}: no checkpoint in {self.checkpointer.dir} "
                               "yet, starting from step 0")
            return
        try:
            state = self.checkpointer.load(path)
        except RuntimeError as e:  # load_state_dict: missing / unexpected keys, size mismatches
            raise ResumeError(f"train.resume: {path} does not fit this config's model "
                              f"({str(e).strip().splitlines()[-1].strip()}); {path.parent.parent / 'config.yaml'} "
                              "says how that run was configured") from None
        if self.ema is not None:
            load_state_dict(self.ema.model, path / "ema" / "model.safetensors")
        self.step = int(state["step"])
        self.guard.load_state_dict(state["guard"])
        self._load_state_extra(state)
        self.seen = int(state.get(f"{self.unit}_seen", 0))
        saved, now = state.get("data_layout"), self._data_layout()
        if saved is not None and saved != now:
            changed = ", ".join(f"{k} {saved.get(k)} → {now[k]}" for k in now if saved.get(k) != now[k])
            self.acc.print(f"warning: resuming with another data layout ({changed}): the data stream goes on at "
                           f"step {self.step} of the new layout, so samples of this epoch may repeat or be missed")
        # Resuming an older checkpoint abandons what came after it: set its checkpoints and records aside.
        for moved in self.checkpointer.set_aside_later(self.step):
            self.acc.print(f"set aside {moved} (after the resumed step {self.step})")
        dropped = self.run.rewind_metrics(self.step)
        if dropped:
            self.acc.print(f"moved {dropped} metrics record(s) after step {self.step} to metrics.abandoned.jsonl")
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
        self.run.save_config(self.cfg)  # after the resume: a config its checkpoint does not fit is not written
        batches = self._batches(self.step * t.grad_accum)
        stop = StopFlag()
        history: list[dict] = []
        last_eval: dict = {}
        t_start = t_log = time.time()
        stopped = None
        rows_since_log = 0
        progress = None
        if acc.is_main_process:
            from tqdm.auto import tqdm

            progress = tqdm(total=t.max_steps, initial=self.step, unit="step", dynamic_ncols=True)
        self._set_train_mode()
        try:
            while self.step < t.max_steps:
                micro = []
                for _ in range(t.grad_accum):
                    batch = next(batches)
                    micro.append(self._train_batch(batch))
                    rows = self._batch_size(batch)
                    rows_since_log += rows
                    self.seen += rows * acc.num_processes
                logs = mean_micro_logs(micro)  # the step's loss (and its finiteness check) covers every micro-batch
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
                saved = self.step % t.save_every == 0 or self.step == t.max_steps
                if saved:
                    self.save()
                if stop.should_stop(acc.device):
                    acc.print(f"stopping at step {self.step} on request")
                    if not saved:
                        self.save()
                    stopped = stop.signum or signal.SIGTERM  # another rank's signal: report SIGTERM
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
                "stopped_by_signal": int(stopped) if stopped else None,  # SIGINT / SIGTERM before max_steps
            }
        finally:
            stop.restore()
            batches.close()  # shut the loader's workers down now, also after an error
            if progress is not None:
                progress.close()
            acc.end_training()  # closes trackers (and the process group)
        return summary
