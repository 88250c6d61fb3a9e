"""Atomic, rotating checkpoints of a run: ``checkpoints/NNNNNNN/`` (DiT's layout; Accelerate's
``save_state`` / ``load_state`` for everything but the weights).

A checkpoint is written into ``checkpoints/.tmp-NNNNNNN`` and renamed to ``checkpoints/NNNNNNN`` once
complete, so a crash mid-write leaves the previous one intact; the last ``keep`` are kept. Each weight is
stored once, by the trainer (``model/`` and ``ema/`` model folders, ``discriminator.safetensors``):
Accelerate's own model files are skipped through its state hooks, and on resume the trainer reads its
weights back itself. Optimizer, scheduler and RNG states are Accelerate's; the loop counters are
``trainer_state.json``.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from movq.utils import PathLike, atomic_write, list_checkpoints

STATE_NAME = "trainer_state.json"


class ResumeError(ValueError):
    """``train.resume`` names a checkpoint that this config's model cannot load."""


class Checkpointer:
    """Checkpoints under ``directory``. ``write_weights(folder)`` (rank 0) and ``read_weights(folder)``
    (every rank) are the trainer's; every rank calls ``save`` and ``load`` (Accelerate writes per-rank
    RNG states)."""

    def __init__(self, accelerator: Accelerator, directory: PathLike, keep: int,
                 write_weights: Callable[[Path], None], read_weights: Callable[[Path], None]):
        self.accelerator = accelerator
        self.dir = Path(directory)
        self.keep = max(1, keep)
        self.write_weights, self.read_weights = write_weights, read_weights

        # The trainer stores and restores the weights: Accelerate writes and reads none of its models.
        def skip_saving(models, weights, output_dir):
            weights.clear()

        def skip_loading(models, input_dir):
            models.clear()

        accelerator.register_save_state_pre_hook(skip_saving)
        accelerator.register_load_state_pre_hook(skip_loading)

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
        if not (path / STATE_NAME).is_file():
            raise FileNotFoundError(f"train.resume={resume}: no checkpoint there ({STATE_NAME} missing)")
        return path

    def save(self, step: int, state: dict) -> Path:
        """Write checkpoint ``step``: Accelerate's states, the trainer's weights and ``state`` (counters)."""
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
            self.write_weights(tmp)
            atomic_write(tmp / STATE_NAME, json.dumps(state, indent=1))
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
        """Restore Accelerate's states and the trainer's weights; returns the saved counters."""
        self.accelerator.load_state(str(path))
        self.read_weights(path)
        return json.loads((path / STATE_NAME).read_text())

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
