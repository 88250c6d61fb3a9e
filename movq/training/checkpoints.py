"""Atomic, rotating checkpoints of a run: ``checkpoints/NNNNNNN/`` (DiT's layout; Accelerate's
``save_state`` / ``load_state`` for everything but the weights).

A checkpoint is written into ``checkpoints/.tmp-NNNNNNN`` and renamed to ``checkpoints/NNNNNNN`` once
complete, so a crash mid-write leaves the previous one intact; the last ``keep`` are kept. Each weight is
stored once, by the trainer (``model/`` and ``ema/`` model folders, ``discriminator.safetensors``):
Accelerate's own model files are skipped through its state hooks, and on resume the trainer reads its
weights back itself. Optimizer, scheduler and RNG states are Accelerate's; the loop counters are
``trainer_state.json``.

What survives what:

* A failed write (full disk, quota, I/O error) on any rank is a ``CheckpointSaveError`` on every rank,
  naming the previous checkpoint, which is untouched.
* Rotation renames a checkpoint to a hidden ``.trash-*`` name before deleting it, so an interruption (even
  ``kill -9``) never leaves a half-deleted folder under a checkpoint's name; the next save clears the trash.
* While a streak of skipped (non-finite) steps lasts, the newest checkpoint from before it is kept besides
  the last ``keep``.
* Resuming a damaged checkpoint is a ``CheckpointDamaged`` error naming the file and the earlier
  checkpoint that can be resumed; a missing or unreadable RNG state file is a warning (the run goes on,
  not bit-exactly).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from movq.training.run import critical_section
from movq.utils import PathLike, atomic_write, list_checkpoints, read_state_dict

log = logging.getLogger(__name__)

STATE_NAME = "trainer_state.json"
RNG_STATE = "random_states_{}.pkl"  # Accelerate's per-rank RNG file


class ResumeError(ValueError):
    """``train.resume`` names a checkpoint that this config's model cannot load."""


class CheckpointDamaged(ResumeError):
    """A file of the checkpoint to resume cannot be read."""


class CheckpointSaveError(OSError):
    """A checkpoint could not be written; the earlier ones are intact."""


def _trash(path: Path) -> None:
    """Delete a folder by renaming it to a hidden name first (atomic), then removing that."""
    trash = path.with_name(f".trash-{path.name}")
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e) or type(e).__name__


def find_damage(folder: Path) -> Optional[tuple[str, str]]:
    """The first file of checkpoint ``folder`` that cannot be read, as ``(relative path, why)``, or None.
    JSON must parse, safetensors must load, Accelerate's pickles (zip archives, read as ``torch.load``
    does) must pass their CRC check; nothing is unpickled."""
    state = folder / STATE_NAME
    if not state.is_file():
        return STATE_NAME, "is missing"
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if path.suffix in (".bin", ".pkl"):
            problem = _zip_problem(path)
            if problem:
                return rel, problem
            continue
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".safetensors":
                read_state_dict(path)
        except (OSError, ValueError) as e:
            return rel, f"cannot be read ({_reason(e).splitlines()[0]})"
    return None


def _zip_problem(path: Path) -> Optional[str]:
    """Why a torch.save file (a zip archive) is damaged, or None: its CRCs are checked (torch.load itself
    does not notice flipped bytes)."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (OSError, zipfile.BadZipFile) as e:
        return f"cannot be read ({_reason(e).splitlines()[0]})"
    return f"is damaged (CRC mismatch in {bad})" if bad is not None else None


class Checkpointer:
    """Checkpoints under ``directory``. ``write_weights(folder)`` (rank 0) and ``read_weights(folder)``
    (every rank) are the trainer's; every rank calls ``save`` and ``load`` (Accelerate writes per-rank
    RNG states)."""

    def __init__(self, accelerator: Accelerator, directory: PathLike, keep: int,
                 write_weights: Callable[[Path], None], read_weights: Callable[[Path], None]):
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints must be ≥ 1, got {keep}")
        self.accelerator = accelerator
        self.dir = Path(directory)
        self.keep = keep
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

    # ------------------------------------------------------------------ writing
    def _agree(self, error: Optional[str]) -> Optional[str]:
        """Every rank's error (or None) → the first one, on every rank."""
        if self.accelerator.num_processes == 1:
            return error
        return next((e for e in gather_object([error]) if e), None)

    def _failed(self, step: int, reason: str) -> CheckpointSaveError:
        found = self.list()
        intact = (f"the previous checkpoint {found[-1]} is intact" if found else "no earlier checkpoint exists")
        return CheckpointSaveError(f"could not write checkpoint {step:07d} in {self.dir} ({reason}); {intact}: "
                                   "free space (or fix the folder) and continue with train.resume=latest")

    def save(self, step: int, state: dict, good: bool = True) -> Path:
        """Write checkpoint ``step``: Accelerate's states, the trainer's weights and ``state`` (counters).
        ``good``: the last step was not skipped (see the module docstring on streaks of skipped steps)."""
        acc = self.accelerator
        final = self.dir / f"{step:07d}"
        tmp = self.dir / f".tmp-{step:07d}"
        error = None
        if acc.is_main_process:
            try:
                for stale in [*self.dir.glob(".tmp-*"), *self.dir.glob(".trash-*")]:  # an interrupted save's
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir(parents=True)
            except OSError as e:
                error = _reason(e)
        error = self._agree(error)
        if error is None:
            try:
                acc.save_state(str(tmp), safe_serialization=True)
            except OSError as e:
                error = _reason(e)
            error = self._agree(error)
        if error is None and acc.is_main_process:
            try:
                self.write_weights(tmp)
                atomic_write(tmp / STATE_NAME, json.dumps({**state, "good": good}, indent=1))
                with critical_section():  # a second Ctrl-C waits until the folders are in place
                    if final.exists():
                        _trash(final)
                    os.replace(tmp, final)
                    self._rotate(good)
            except OSError as e:
                error = _reason(e)
        if error is not None and acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        error = self._agree(error)
        if error is not None:
            raise self._failed(step, error)
        acc.wait_for_everyone()
        return final

    def _rotate(self, good: bool) -> None:
        found = self.list()
        drop = found[: -self.keep]
        if not good:  # a streak of skipped steps: the newest checkpoint from before it stays
            last_good = next((p for p in reversed(found) if _saved_good(p)), None)
            drop = [p for p in drop if p != last_good]
        for old in drop:
            _trash(old)

    # ------------------------------------------------------------------ reading
    def load(self, path: Path) -> dict:
        """Restore Accelerate's states and the trainer's weights; returns the saved counters. A damaged
        file is a ``CheckpointDamaged`` error naming it and the checkpoint to resume instead."""
        acc = self.accelerator
        rng = path / RNG_STATE.format(acc.process_index)
        rng_problem = None
        if not rng.is_file():
            rng_problem = f"{rng.name} is missing"
        else:
            damage = find_damage_in(path, [rng])
            if damage:
                rng_problem = f"{damage[0]} {damage[1]}"
        if rng_problem:
            log.warning("resuming %s: %s, so the random numbers of rank %d start afresh (the run goes on, "
                        "but not bit-exactly as an uninterrupted one)", path, rng_problem, acc.process_index)
        damage = find_damage_in(path, [p for p in path.glob("*") if p.suffix in (".bin", ".pkl") and p != rng])
        if damage is None:
            try:
                state = json.loads((path / STATE_NAME).read_text())
                acc.load_state(str(path))
                self.read_weights(path)
                return state
            except Exception:
                damage = find_damage(path)
                if damage is None or damage[0] == rng.name:
                    raise
        raise self.damaged(path, damage)

    def damaged(self, path: Path, damage: tuple[str, str]) -> CheckpointDamaged:
        file, why = damage
        try:
            step = int(path.name)
            earlier = [p for p in list_checkpoints(path.parent) if int(p.name) < step]
        except ValueError:
            earlier = []
        hint = (f"the earlier checkpoint {earlier[-1]} can be resumed instead: train.resume={earlier[-1]}"
                if earlier else "there is no earlier checkpoint to resume instead")
        return CheckpointDamaged(f"checkpoint {path} is damaged: {file} {why}; {hint}")

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


def find_damage_in(folder: Path, files: list[Path]) -> Optional[tuple[str, str]]:
    """The first of Accelerate's zip ``files`` (optimizer, scheduler, RNG states) that is damaged."""
    for path in files:
        problem = _zip_problem(path)
        if problem:
            return path.relative_to(folder).as_posix(), problem
    return None


def _saved_good(path: Path) -> bool:
    """Whether checkpoint ``path`` was saved after a good (not skipped) step; older ones did not say."""
    try:
        return bool(json.loads((path / STATE_NAME).read_text()).get("good", True))
    except (OSError, ValueError, AttributeError):
        return False
