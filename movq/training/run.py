"""What a training run is made of besides its models: the run folder and its lock, the Accelerator, the
guard that skips non-finite steps, the flags that signals raise, and a context for evaluating in eval mode.

* ``RunDir`` — ``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``images/`` of one run; only rank 0
  writes, and rank 0 holds ``run.lock`` (``RunLock``) for the whole run, so a second run on the same
  folder is refused instead of mixing its checkpoints and metrics with the first's.
* ``StepGuard`` — skips and counts steps whose loss or gradients are not finite, and aborts with a
  clear message after too many in a row.
* ``StopFlag`` — SIGINT / SIGTERM ask the loop to save and exit at the end of the current step, SIGUSR1
  to save and go on (SLURM's ``--signal=USR1@120``), on every rank at once.
* ``eval_mode`` — evaluate a model in eval mode and give every submodule its own mode back, even when
  the evaluation raises.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from torch import nn

from movq.config import save_config
from movq.utils import PathLike, atomic_write, is_distributed, output_problem

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


def check_trackers(trackers) -> None:
    """Accelerate silently drops a tracker whose package is missing; say so instead, naming movq's extra."""
    import importlib.util

    missing = [t for t in trackers if t in ("wandb", "tensorboard") and importlib.util.find_spec(t) is None]
    if missing:
        raise ModuleNotFoundError(f"train.trackers names {', '.join(missing)}, which is not installed: pip install "
                                  f"'movq[{','.join(missing)}]'", name=missing[0])


def resolve_mixed_precision(train_cfg) -> str:
    """``train.mixed_precision``, or when it is unset (None) the launcher's choice: ``accelerate launch
    --mixed_precision bf16`` and ``accelerate config`` reach the process as ACCELERATE_MIXED_PRECISION; else no."""
    if train_cfg.mixed_precision is not None:
        return train_cfg.mixed_precision
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()


def make_accelerator(train_cfg, project_dir: str) -> Accelerator:
    """The trainers' Accelerator. CPU runs need ``cpu=True`` explicitly, or ranks under torchrun would
    not synchronise. The schedulers step once per optimizer step (Accelerate would otherwise step them
    once per process, making ``train.warmup_steps`` N times shorter on N GPUs). A tracker whose package is
    missing is an error here (Accelerate would drop it without a word)."""
    check_trackers(train_cfg.trackers)
    precision = resolve_mixed_precision(train_cfg)
    if precision == "fp16":
        where = ("train.mixed_precision=fp16" if train_cfg.mixed_precision else
                 "fp16 (from the launcher: ACCELERATE_MIXED_PRECISION=fp16; set train.mixed_precision to override)")
        raise ValueError(
            f"{where} is not supported: fp16 needs a loss scaler, which skips overflowing "
            "steps itself, while these trainers skip and count non-finite steps (train.max_bad_steps) and the "
            "tokenizer steps two optimizers per scaler update. Use bf16 (Ampere or newer GPUs) or no")
    if precision not in ("no", "bf16"):
        raise ValueError(f"mixed precision {precision!r} (ACCELERATE_MIXED_PRECISION) is not one of no, bf16")
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        gradient_accumulation_steps=train_cfg.grad_accum,
        step_scheduler_with_optimizer=False,
        log_with=list(train_cfg.trackers) or None,
        project_dir=project_dir,
        # A frozen or dead rank ends the collectives of the others after this long (gloo raises; NCCL's
        # watchdog aborts the process) instead of blocking them forever.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=train_cfg.dist_timeout))],
    )


LR_SCHEDULES = ("constant", "cosine", "linear")


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """The LR multiplier of optimizer step ``k`` (0-based, as ``LambdaLR`` counts): a linear warmup from
    1/warmup to 1 over ``warmup_steps`` steps, then 1 (``constant``) or a ``cosine`` / ``linear`` decay from
    1 at the end of the warmup towards ``min_ratio`` at ``total_steps`` (and ``min_ratio`` after it)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"train.lr_schedule must be one of {list(LR_SCHEDULES)}, got {schedule!r}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"train.min_lr_ratio must lie in [0, 1], got {min_ratio}")
    span = max(1, total_steps - warmup_steps)

    def factor(k: int) -> float:
        if k < warmup_steps:
            return (k + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        p = min(1.0, (k - warmup_steps) / span)  # 0 at the first step after the warmup
        shape = 0.5 * (1.0 + math.cos(math.pi * p)) if schedule == "cosine" else 1.0 - p
        return min_ratio + (1.0 - min_ratio) * shape

    return factor


def schedule_settings(train_cfg, total_steps: Optional[int] = None) -> dict:
    """What the LR curve of a run depends on (stored in trainer_state.json; a resume compares it)."""
    return {"lr_schedule": train_cfg.lr_schedule, "warmup_steps": train_cfg.warmup_steps,
            "total_steps": train_cfg.max_steps if total_steps is None else total_steps,
            "min_lr_ratio": train_cfg.min_lr_ratio}


def schedule_lambda(train_cfg, total_steps: Optional[int] = None) -> Callable[[int], float]:
    """``lr_lambda`` of a ``TrainConfig`` (``total_steps``: default ``train.max_steps``)."""
    s = schedule_settings(train_cfg, total_steps)
    return lr_lambda(s["lr_schedule"], s["warmup_steps"], s["total_steps"], s["min_lr_ratio"])


def warmup_lambda(warmup_steps: int) -> Callable[[int], float]:
    """Linear LR warmup from 1/warmup to 1 over ``warmup_steps`` optimizer steps, then constant."""
    return lr_lambda("constant", warmup_steps, warmup_steps)


class RunFolderError(ValueError):
    """The run folder cannot be used: it is a file, cannot be written, or another run holds its lock."""


class RunLock:
    """An exclusive ``fcntl.flock`` on ``folder/run.lock``, which also says who holds it (host, PID, start).

    The kernel drops the lock when its holder exits, however it dies (``kill -9`` included), so a stale
    file never blocks a new run; a file system without locks (some network mounts) gets a warning and no
    lock. On NFS the kernel maps ``flock`` to byte-range locks, hence a file opened for writing."""

    def __init__(self, folder: PathLike):
        self.path = Path(folder) / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock or raise ``RunFolderError`` naming the host and PID that hold it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = os.read(fd, 4096).decode(errors="replace")
                os.close(fd)
                raise RunFolderError(f"{self.path.parent} is in use by another run ({_describe_holder(holder)}); "
                                     "wait for it to end, or pass another train.run_dir") from None
            log.warning("%s: this file system does not support locks (%s): the run folder is not locked "
                        "against a second run", self.path, e.strerror)
            self._fd = fd
            return
        os.ftruncate(fd, 0)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"PID {info['pid']} on host {info['host']}, running since {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "its holder did not say who it is"


class RunDir:
    """The folder of one run. ``open()`` creates and locks it; every method is a no-op on ranks other
    than 0. Nothing touches the disk before ``open()``, so a run refused before it leaves no folder."""

    def __init__(self, root: PathLike, is_main: bool):
        self.root = Path(root)
        self.is_main = is_main
        self.checkpoints = self.root / "checkpoints"
        self.images = self.root / "images"
        self.lock = RunLock(self.root)

    def open(self) -> None:
        """Rank 0: create the folder (and ``checkpoints/``, ``images/``) and take its lock, or raise
        ``RunFolderError`` (a file in the way, a read-only or full file system, another run's lock)."""
        if not self.is_main:
            return
        problem = output_problem(self.root, folder=True)
        if problem:
            raise RunFolderError(f"train.run_dir: {problem}")
        self.lock.acquire()
        try:
            self.checkpoints.mkdir(exist_ok=True)
            self.images.mkdir(exist_ok=True)
        except OSError as e:
            self.lock.release()
            raise RunFolderError(f"train.run_dir: cannot create {e.filename} ({e.strerror})") from None

    def close(self) -> None:
        self.lock.release()

    def save_config(self, cfg: Any) -> None:
        if self.is_main:
            save_config(cfg, self.root / "config.yaml")

    def wandb_id(self, new: bool) -> Optional[str]:
        """Rank 0: the id of this run's wandb run, kept in ``wandb_id`` so that a resumed run continues it
        (``new``: start another, as a fresh run in this folder does). None on other ranks."""
        if not self.is_main:
            return None
        path = self.root / "wandb_id"
        if not new and path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        run_id = secrets.token_hex(4)  # 8 characters, as wandb's own ids
        atomic_write(path, run_id + "\n")
        return run_id

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

    def rewind_metrics(self, step: int) -> int:
        """After a resume at ``step``: move the records of later steps (logged by the run that was
        interrupted or abandoned) from metrics.jsonl to metrics.abandoned.jsonl. Returns how many."""
        path = self.root / "metrics.jsonl"
        if not self.is_main or not path.is_file():
            return 0
        keep, later = [], []
        for line in path.read_text().splitlines():
            try:
                record_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):  # a torn last line: keep it where it is
                record_step = -1
            (later if record_step > step else keep).append(line)
        if later:
            with open(self.root / "metrics.abandoned.jsonl", "a") as f:
                f.write("".join(line + "\n" for line in later))
            atomic_write(path, "".join(line + "\n" for line in keep))
        return len(later)


def collective_failure(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed: timed out (``train.dist_timeout``) or lost its peer. gloo
    raises plain RuntimeErrors naming itself; NCCL and newer torch raise ``DistError``s."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("gloo", "Timed out waiting", "Application timeout", "pair closure", "Connection closed by peer",
                            "Connection reset by peer", "NCCL"))


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row."""


class StepGuard:
    """Decides whether a step's loss and gradient norms are finite; counts and bounds the skips."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total = 0

    def check(self, *values: torch.Tensor) -> bool:
        """True if every value is finite on every rank (the step may proceed); else count a skip.

        The verdict is agreed across ranks: a loss that is non-finite on one rank only must not let
        that rank skip an update the others take, or their weights would drift apart."""
        ok = all(bool(torch.isfinite(v).all()) for v in values if v is not None)
        if is_distributed():
            device = next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))
            flag = torch.tensor([1.0 if ok else 0.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ok = bool(flag.item() > 0)
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


_critical = {"depth": 0, "interrupted": False}


@contextmanager
def critical_section() -> Iterator[None]:
    """A block that a second Ctrl-C does not cut in half (committing and rotating checkpoints): the
    ``KeyboardInterrupt`` it asks for is raised when the outermost such block ends. (Signals cannot simply
    be blocked: another thread would take them and the handler would still run in this one.)"""
    _critical["depth"] += 1
    try:
        yield
    finally:
        _critical["depth"] -= 1
        if _critical["depth"] == 0 and _critical["interrupted"]:
            _critical["interrupted"] = False
            raise KeyboardInterrupt


def interrupt_now() -> None:
    """Raise ``KeyboardInterrupt``, or at the end of the current ``critical_section``."""
    if _critical["depth"]:
        _critical["interrupted"] = True
    else:
        raise KeyboardInterrupt


class StopFlag:
    """Set by SIGINT / SIGTERM (save, then stop) and SIGUSR1 (save, then go on); ``poll()`` agrees across
    ranks (any rank's signal acts on all).

    A repeated SIGTERM changes nothing: ``timeout`` and cluster managers send it to the main process and
    again to its whole process group, and they follow up with SIGKILL themselves. A second Ctrl-C (SIGINT
    at least a second after the first) stops at once, without the checkpoint."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self.save_requested = False
        self.signum: Optional[int] = None  # the signal this process got, if any
        self._first_sigint: Optional[float] = None
        self._previous = {}
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. some test runners): no signal handling
                pass

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGUSR1:
            log.warning("signal %d: saving a checkpoint after this step, then training on", signum)
            self.save_requested = True
            return
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_sigint is not None and now - self._first_sigint > 1.0:
                interrupt_now()  # Ctrl-C again: stop now
                return
            self._first_sigint = self._first_sigint or now
        if self.requested:
            return
        log.warning("signal %d: saving a checkpoint and stopping after this step", signum)
        self.requested, self.signum = True, signum

    def poll(self, device: torch.device) -> tuple[bool, bool]:
        """``(stop, save)``: whether any rank was asked to stop, or to save a checkpoint; clears the save
        request (it is served by the caller). Collective under torch.distributed."""
        save, self.save_requested = self.save_requested, False
        stop = self.requested
        if is_distributed():
            flags = torch.tensor([float(stop), float(save)], device=device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stop, save = bool(flags[0].item() > 0), bool(flags[1].item() > 0)
        return stop, save

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``with eval_mode(model):`` runs the body with ``model.eval()`` and then restores each submodule's
    own ``training`` flag (a frozen LPIPS inside a training model stays in eval mode), also on error."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def mean_logs(history: list[dict]) -> dict:
    """Average each logged scalar over the steps since the last log."""
    out: dict = {}
    for key in {k for h in history for k in h}:
        vals = [float(h[key]) for h in history if key in h]  # never empty: the key came from history
        out[key] = sum(vals) / len(vals)
    return out
