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
* ``eval_mode`` — evaluate a model in eval mode and give every submodule its own mode back, even when
  the evaluation raises.

The loop built from them is ``movq.train_loop.TrainLoop``.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file, save_file
from torch import nn

from movq.config import atomic_write_text, save_config

log = logging.getLogger(__name__)

CKPT_PATTERN = re.compile(r"^\d{7}$")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def list_checkpoints(directory: Union[str, os.PathLike]) -> list[Path]:
    """The finished checkpoint folders ``NNNNNNN`` under ``directory``, oldest first ([] if none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and CKPT_PATTERN.match(p.name))


def make_accelerator(train_cfg, project_dir: str) -> Accelerator:
    """The trainers' Accelerator. CPU runs need ``cpu=True`` explicitly, or ranks under torchrun would
    not synchronise. The schedulers step once per optimizer step (Accelerate would otherwise step them
    once per process, making ``train.warmup_steps`` N times shorter on N GPUs)."""
    if train_cfg.mixed_precision == "fp16":
        raise ValueError(
            "train.mixed_precision=fp16 is not supported: fp16 needs a loss scaler, which skips overflowing "
            "steps itself, while these trainers skip and count non-finite steps (train.max_bad_steps) and the "
            "tokenizer steps two optimizers per scaler update. Use bf16 (Ampere or newer GPUs) or no")
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=train_cfg.mixed_precision,
        gradient_accumulation_steps=train_cfg.grad_accum,
        step_scheduler_with_optimizer=False,
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
            atomic_write_text(path, "".join(line + "\n" for line in keep))
        return len(later)


class EMA:
    """Exponential moving average of a model's trained parameters.

    Copied instead of averaged: buffers, parameters that gradients do not train (an EMA codebook,
    which follows its own moving average), and the parameters of a module whose ``initted`` buffer
    turned True since the last update (the quantizer's k-means init: averaging it with the random
    init it replaced would leave the EMA model's codes wrong for ~1 / (1 - decay) steps).
    The shadow is a full copy of the model, so evaluation simply runs ``ema.model``.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._settled: set[str] = set()  # initted buffers True in both models: never looked at again (no sync)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_state = self.model.state_dict()
        fresh = set()  # modules just initialised from data, by prefix ("" for the model itself)
        for name, buf in model.named_buffers():
            if name.split(".")[-1] == "initted" and name not in self._settled and bool(buf):
                if not bool(ema_state[name]):
                    fresh.add(name[: -len("initted")])
                self._settled.add(name)
        averaged = {name for name, p in model.named_parameters()  # once: a per-entry dict is O(n²) per step
                    if p.requires_grad and p.dtype.is_floating_point and not any(name.startswith(f) for f in fresh)}
        for name, value in model.state_dict().items():
            target = ema_state[name]
            if name in averaged:
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
        return list_checkpoints(self.dir)

    def resolve(self, resume: Optional[str]) -> Optional[Path]:
        """``None`` → None; ``"latest"`` → the newest complete checkpoint or None (chosen by rank 0 and
        broadcast, so every rank loads the same one); else that folder."""
        if not resume:
            return None
        if resume == "latest":
            found = self.list() if self.accelerator.is_main_process else []
            choice = [str(found[-1]) if found else None]
            if self.accelerator.num_processes > 1:
                broadcast_object_list(choice, from_process=0)
            return Path(choice[0]) if choice[0] else None
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

    def set_aside_later(self, step: int) -> list[Path]:
        """Rank 0: rename this run's checkpoints of steps after ``step`` to ``abandoned-NNNNNNN[-i]``, so
        that after resuming an older checkpoint ``latest`` and rotation never pick the abandoned
        timeline (the folders stay on disk). Every rank calls it; returns the new paths."""
        moved = []
        if self.accelerator.is_main_process:
            for path in self.list():
                if int(path.name) > step:
                    target = self.dir / f"abandoned-{path.name}"
                    i = 1
                    while target.exists():
                        target, i = self.dir / f"abandoned-{path.name}-{i}", i + 1
                    os.replace(path, target)
                    moved.append(target)
        self.accelerator.wait_for_everyone()
        return moved

    def load(self, path: Path) -> dict:
        """Restore Accelerate's state; returns the loop counters written by the trainer."""
        self.accelerator.load_state(str(path))
        return json.loads((path / "trainer_state.json").read_text())


def write_trainer_state(folder: Path, state: dict) -> None:
    atomic_write_text(folder / "trainer_state.json", json.dumps(state, indent=1))


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row."""


class ResumeError(ValueError):
    """``train.resume`` names a checkpoint that this config's model cannot load."""


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


class StopFlag:
    """Set by SIGINT/SIGTERM; ``should_stop()`` agrees across ranks (any rank's signal stops all)."""

    def __init__(self):
        self.requested = False
        self.signum: Optional[int] = None  # the signal this process got, if any
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
        self.requested, self.signum = True, signum

    def should_stop(self, device: torch.device) -> bool:
        if not is_distributed():
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag)
        return bool(flag.item() > 0)

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
