"""The training loop both trainers share (DiT's train.py, Accelerate's ``complete_cv_example.py``).

``TrainLoop.fit()`` owns the schedule: resume, accumulation, logging, evaluation, FID, checkpoints and
stopping on a signal. A trainer (:class:`movq.training.tokenizer.TokenizerTrainer`,
:class:`movq.training.prior.PriorTrainer`) subclasses it and writes what one run of its model is:

* ``build()`` — the models, optimizers and schedulers, through ``self.acc.prepare``; it sets
  ``self.optimizer`` (whose learning rate is logged) and ``self.ema`` (``self.make_ema(model)``, or
  None). It runs under the same seed on every rank, so all ranks start from the same weights.
* ``batches(start)`` — this rank's endless stream of micro-batches from micro-batch ``start`` on, a pure
  function of seed and position (so a resume continues where the run stopped). A batch is a dict with
  ``"label"`` (one per row) and may carry ``"skipped"``: counts of unusable input by reason, which the
  loop sums and logs.
* ``train_step(micro_batches)`` — one optimizer step, top to bottom: forward and backward of the
  ``train.grad_accum`` micro-batches, clipping, the finiteness check (``self.finite``), the update and
  the EMA; returns the step's logs (``loss`` required), or None when the step was skipped. A skipped
  step changes no weight and no buffer: ``keep = self.forward_state(model, ...)`` before the first
  forward pass, ``keep.restore()`` when skipping (BatchNorm statistics, the quantizer's EMA, usage and
  codebook updates happen in the forward pass).
* ``evaluate()`` — every ``train.eval_every`` steps and at the last, on every rank: the ``eval``
  record (strings, e.g. paths of pictures, go to metrics.jsonl but not to the trackers).
* ``write_weights(folder)`` (rank 0) and ``read_weights(folder)`` (every rank) — the weights of a
  checkpoint.
* ``compute_fid()`` — optional: the FID of the model every ``train.fid_every`` steps, or None.

Helpers a trainer calls: ``make_ema``, ``finite``, and ``log_images`` (rank 0: its pictures to the trackers,
beside the PNG files). ``lr_schedules()`` says what each optimizer's LR curve depends on (checked on resume).
"""
from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch import nn

from movq.config import check_config, to_dict
from movq.models.hub import write_checkpoint_cards
from movq.training.checkpoints import CheckpointDamaged, Checkpointer, ResumeError
from movq.training.ema import EMA
from movq.training.run import (
    RunDir,
    RunFolderError,
    StepGuard,
    StopFlag,
    make_accelerator,
    mean_logs,
    schedule_settings,
)
from movq.utils import list_checkpoints


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
    """See the module docstring. ``fit()`` trains to ``train.max_steps`` and returns a summary."""

    # What one row of a batch is ("images", "samples"): it names the ``<unit>_seen`` counter of
    # trainer_state.json and the ``<unit>_per_s`` rate of the train records.
    unit = "samples"
    # The key of ``compute_fid()``'s value in the ``fid`` records, ``last_eval`` and the trackers.
    fid_key = "fid"

    optimizer: Any
    ema: Optional[EMA]

    def __init__(self, cfg: Any, accelerator: Optional[Accelerator] = None):
        check_config(cfg)  # before anything is built or written: a bad value names its key
        t = cfg.train
        self.cfg = cfg
        self.acc = acc = accelerator or make_accelerator(t, t.run_dir)
        self.run = RunDir(t.run_dir, acc.is_main_process)
        set_seed(t.seed)  # identical initial weights on every rank
        self.ema = None
        self.build()
        self._open_run_folder()
        try:
            self._init_after_lock(cfg)
        except BaseException:
            self.run.close()
            raise

    def _open_run_folder(self) -> None:
        """Rank 0 creates and locks the run folder; every rank gets its verdict (a RunFolderError)."""
        error = None
        try:
            self.run.open()
        except RunFolderError as e:
            error = str(e)
        if self.acc.num_processes > 1:
            error = next((e for e in gather_object([error]) if e), None)
        if error:
            self.run.close()
            raise RunFolderError(error)

    def _init_after_lock(self, cfg: Any) -> None:
        acc, t = self.acc, cfg.train
        found = list_checkpoints(Path(t.run_dir) / "checkpoints")
        if found and not t.resume:
            raise ValueError(f"{t.run_dir} already holds checkpoints (newest: {found[-1].name}): pass "
                             "train.resume=latest to continue that run, or another train.run_dir")
        set_seed(t.seed * acc.num_processes + acc.process_index)  # per-rank runtime randomness (DiT)
        self.guard = StepGuard(t.max_bad_steps)
        self.checkpointer = Checkpointer(acc, self.run.checkpoints, t.keep_checkpoints, self._write_weights_and_cards,
                                         self.read_weights)
        self.step = 0
        self.seen = 0  # rows of batches trained on, over all ranks
        self.skipped: Counter = Counter()  # input skipped on this rank, by reason
        self.fid = None
        if t.fid_every > 0:
            from movq.evaluation.fid import FIDTracker

            # The reference statistics are cached in the run folder unless train.fid_reference names a file.
            ref = t.fid_reference or str(self.run.root / "fid_reference.npz")
            self.fid = FIDTracker(t.inception_weights, ref, device=acc.device)
        t.mixed_precision = acc.mixed_precision  # the launcher's choice when unset: in config.yaml and the trackers
        if t.trackers:
            # the resolved config, logged once as the trackers start
            flat = {}
            for s, sec in to_dict(cfg).items():  # sections, and top-level keys such as the prior's kind
                flat.update({f"{s}.{k}": v for k, v in sec.items()} if isinstance(sec, dict) else {s: sec})
            init_kwargs = {}
            if "wandb" in t.trackers:
                # wandb would otherwise write ./wandb in the working directory: keep it in the run folder. A resume
                # continues the same wandb run (its id is kept in run_dir/wandb_id); a fresh run starts a new one.
                wandb_id = self.run.wandb_id(new=not (found and t.resume))
                init_kwargs["wandb"] = {"dir": str(self.run.root), "id": wandb_id, "resume": "allow"}
            acc.init_trackers(t.project, config={k: str(v) if isinstance(v, (list, dict)) else v for k, v in flat.items()},
                              init_kwargs=init_kwargs)

    # ------------------------------------------------------------------ what a trainer writes
    def build(self) -> None:
        raise NotImplementedError

    def batches(self, start: int) -> Iterator[dict]:
        raise NotImplementedError

    def train_step(self, micro_batches: list[dict]) -> Optional[dict]:
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    def write_weights(self, folder: Path) -> None:
        raise NotImplementedError

    def read_weights(self, folder: Path) -> None:
        raise NotImplementedError

    def compute_fid(self) -> Optional[float]:
        return None

    def lr_schedules(self) -> dict:
        """What each optimizer's LR curve depends on (``schedule_settings``), by optimizer."""
        return {"lr": schedule_settings(self.cfg.train)}

    def _write_weights_and_cards(self, folder: Path) -> None:
        """``write_weights``, then each model folder's card gets this run's data, settings and metrics."""
        self.write_weights(folder)
        write_checkpoint_cards(folder, self.cfg, self.run.root, self.step, processes=self.acc.num_processes)

    # ------------------------------------------------------------------ helpers for trainers
    def make_ema(self, model: nn.Module) -> Optional[EMA]:
        """An EMA of ``model`` on the accelerator's device, or None when ``train.ema_decay`` is 0."""
        if self.cfg.train.ema_decay <= 0:
            return None
        ema = EMA(model, self.cfg.train.ema_decay)
        ema.model.to(self.acc.device)
        return ema

    def forward_state(self, *modules: nn.Module) -> ForwardState:
        """What the forward passes of ``modules`` may write (see ``ForwardState``), to restore when the
        step is skipped."""
        return ForwardState(modules)

    def finite(self, *values: Optional[torch.Tensor]) -> bool:
        """Whether a step's loss and gradient norms are finite on every rank (``StepGuard``); a skipped
        step is said on the console and counted."""
        if self.guard.check(*values):
            return True
        self.acc.print(f"step {self.step}: non-finite loss or gradient, step skipped ({self.guard.in_a_row} in a row)")
        return False

    def log_images(self, images: dict[str, np.ndarray]) -> None:
        """Rank 0: pictures (uint8 [H, W, 3], e.g. what ``save_grid`` wrote) to the trackers at this step, as
        ``wandb.Image`` and TensorBoard ``add_image`` under their names (other trackers get none)."""
        if not images or not self.cfg.train.trackers or not self.acc.is_main_process:
            return
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                for name, image in images.items():
                    tracker.writer.add_image(name, image, self.step, dataformats="HWC")
                tracker.writer.flush()
            elif tracker.name == "wandb":
                import wandb

                tracker.run.log({name: wandb.Image(image) for name, image in images.items()}, step=self.step)

    # ------------------------------------------------------------------ checkpoints
    def _data_layout(self) -> dict:
        """What the data position of a resume (step × grad_accum batches per rank) depends on."""
        return {"world_size": self.acc.num_processes, "grad_accum": self.cfg.train.grad_accum,
                "batch_size": self.cfg.data.batch_size, "seed": self.cfg.data.seed}

    def save(self) -> Path:
        state = {"step": self.step, "guard": self.guard.state_dict(), "skipped": dict(self.skipped),
                 f"{self.unit}_seen": self.seen, "data_layout": self._data_layout(), "lr_schedules": self.lr_schedules()}
        path = self.checkpointer.save(self.step, state, good=self.guard.in_a_row == 0)
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
        error, state = None, None
        try:
            state = self.checkpointer.load(path)
        except CheckpointDamaged as e:
            error = str(e)
        except (RuntimeError, ValueError) as e:  # load_state_dict: missing / unexpected keys, size mismatches
            error = (f"train.resume: {path} does not fit this config's model "
                     f"({str(e).strip().splitlines()[-1].strip()}); {path.parent.parent / 'config.yaml'} "
                     "says how that run was configured")
        if self.acc.num_processes > 1:  # a file only one rank reads (its RNG state) may fail on that rank
            error = next((e for e in gather_object([error]) if e), None)
        if error:
            raise ResumeError(error)
        self.step = int(state["step"])
        self.guard.load_state_dict(state["guard"])
        self.skipped = Counter({k: int(v) for k, v in state.get("skipped", {}).items()})
        self.seen = int(state.get(f"{self.unit}_seen", 0))
        saved, now = state.get("data_layout"), self._data_layout()
        if saved is not None and saved != now:
            changed = ", ".join(f"{k} {saved.get(k)} → {now[k]}" for k in now if saved.get(k) != now[k])
            self.acc.print(f"warning: resuming with another data layout ({changed}): the data stream goes on at "
                           f"step {self.step} of the new layout, so samples of this epoch may repeat or be missed")
        saved, now = state.get("lr_schedules"), self.lr_schedules()
        if saved is not None and saved != now:
            self.acc.print(f"warning: resuming with another LR schedule ({saved} → {now}): the learning rate follows "
                           f"the new one from step {self.step} on")
        # Resuming an older checkpoint abandons what came after it: set its checkpoints and records aside.
        for moved in self.checkpointer.set_aside_later(self.step):
            self.acc.print(f"set aside {moved} (after the resumed step {self.step})")
        dropped = self.run.rewind_metrics(self.step)
        if dropped:
            self.acc.print(f"moved {dropped} metrics record(s) after step {self.step} to metrics.abandoned.jsonl")
        self.acc.print(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ the loop
    def _skipped_all_ranks(self) -> dict:
        """Input skip counts summed over ranks (reasons may differ between ranks); collective."""
        total: Counter = Counter()
        for part in gather_object([dict(self.skipped)]):
            total.update(part)
        return dict(total)

    def _log(self, history: list[dict], t0: float, rows: int) -> dict:
        """Average the logs since the last record over steps and ranks; write the train record."""
        acc = self.acc
        means = mean_logs(history)
        keys = sorted(means)
        vec = torch.tensor([means[k] for k in keys], device=acc.device, dtype=torch.float64)
        vec = acc.reduce(vec, reduction="mean")
        out = {k: float(v) for k, v in zip(keys, vec.tolist())}
        out.update({f"data_skipped/{k}": v for k, v in self._skipped_all_ranks().items()})
        out["lr"] = self.optimizer.param_groups[0]["lr"]
        out["bad_steps"] = self.guard.total
        out[f"{self.unit}_per_s"] = rows * acc.num_processes / max(time.time() - t0, 1e-9)
        self.run.log_metrics(self.step, "train", out)
        acc.log(out, step=self.step)
        return out

    def _fid_record(self, last_eval: dict) -> None:
        """Every ``train.fid_every`` steps, on every rank: ``compute_fid()`` as its own ``fid`` record and
        tracker value under ``fid_key``, added to ``last_eval``."""
        t = self.cfg.train
        if t.fid_every > 0 and self.step % t.fid_every == 0:
            fid = self.compute_fid()
            if fid is not None:
                last_eval[self.fid_key] = fid
                self.run.log_metrics(self.step, "fid", {self.fid_key: fid})
                self.acc.log({self.fid_key: fid}, step=self.step)

    def fit(self) -> dict:
        """Train to ``train.max_steps``; returns a summary (steps, seconds, last eval, bad steps, input
        skipped, run folder, newest checkpoint, the stopping signal).

        SIGINT / SIGTERM (on any rank) save a checkpoint at the end of the current step and stop, without
        the evaluation that step may be due for; SIGUSR1 saves one and goes on."""
        acc, t = self.acc, self.cfg.train
        stop = StopFlag()  # first: a signal during the resume stops the run before its first step
        batches = None
        progress = None
        try:
            self.resume()
            self.run.save_config(self.cfg)  # after the resume: a config its checkpoint does not fit is not written
            batches = self.batches(self.step * t.grad_accum)
            history: list[dict] = []
            last_eval: dict = {}
            t_start = t_log = time.time()
            stopped = None
            rows_since_log = 0
            if acc.is_main_process:
                from tqdm.auto import tqdm

                progress = tqdm(total=t.max_steps, initial=self.step, unit="step", dynamic_ncols=True)
            stopping = stop.poll(acc.device)[0]
            while self.step < t.max_steps and not stopping:
                micro = [next(batches) for _ in range(t.grad_accum)]
                for batch in micro:
                    rows = len(batch["label"])  # image and token batches both label every row
                    rows_since_log += rows
                    self.seen += rows * acc.num_processes
                    self.skipped.update({k: int(v) for k, v in batch.get("skipped", {}).items()})
                logs = self.train_step(micro)
                if logs is not None:
                    history.append({k: float(v) for k, v in logs.items()})
                self.step += 1
                if progress is not None:
                    progress.update(1)
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    out = self._log(history or [{}], t_log, rows_since_log)
                    if progress is not None:
                        shown = {k: f"{out[k]:.4f}" for k in ("loss", "accuracy") if k in out}
                        progress.set_postfix(**shown, **{f"{self.unit}_s": f"{out[f'{self.unit}_per_s']:.1f}"})
                    history, t_log, rows_since_log = [], time.time(), 0
                stopping, save_now = stop.poll(acc.device)
                if not stopping:  # a stop is quick: the evaluation waits for the next run
                    if self.step % t.eval_every == 0 or self.step == t.max_steps:
                        last_eval = self.evaluate()
                        self.run.log_metrics(self.step, "eval", last_eval)
                        acc.log({k: v for k, v in last_eval.items() if not isinstance(v, str)}, step=self.step)
                    self._fid_record(last_eval)
                if stopping or save_now or self.step % t.save_every == 0 or self.step == t.max_steps:
                    self.save()
            if stopping:
                acc.print(f"stopping at step {self.step} on request")
                stopped = stop.signum or signal.SIGTERM  # another rank's signal: report SIGTERM
            # Inside the try: the summary gathers over ranks, before end_training ends the group.
            found = self.checkpointer.list()
            summary = {
                "steps": self.step,
                "seconds": time.time() - t_start,
                "eval": last_eval,
                "bad_steps": self.guard.total,
                "data_skipped": self._skipped_all_ranks(),
                "run_dir": str(self.run.root),
                "checkpoint": str(found[-1]) if found else None,
                "stopped_by_signal": int(stopped) if stopped else None,  # SIGINT / SIGTERM before max_steps
            }
        finally:
            stop.restore()
            if batches is not None:
                batches.close()  # shut the loader's workers down now, also after an error
            if progress is not None:
                progress.close()
            self.run.close()  # the run folder's lock
            acc.end_training()  # closes trackers (and the process group)
        return summary


class ForwardState:
    """Copies of what a training forward pass writes besides activations, to undo a skipped step: every
    buffer of ``modules`` (BatchNorm statistics, the quantizer's EMA and usage counters) and the
    parameters a module names in ``forward_updates`` (the quantizer's codebook, which k-means init, the
    EMA and dead-code restarts set in its forward pass). Small next to the weights: no parameter that only
    the optimizer changes is copied."""

    def __init__(self, modules):
        self.saved = []
        for module in modules:
            for m in module.modules():
                tensors = list(m.buffers(recurse=False)) + [getattr(m, n) for n in getattr(m, "forward_updates", ())]
                self.saved += [(t, t.detach().clone()) for t in tensors if t is not None]

    @torch.no_grad()
    def restore(self) -> None:
        for live, copy in self.saved:
            live.copy_(copy)
