"""What every layer of movq uses: atomic file writes, file hashes, the cache folder, this process's rank,
and reading a state dict of tensors without running pickled code.

Atomic writes go through a temporary file in the target's folder and ``os.replace``, so a crash (or a
full disk) never leaves half a file under the final name: readers see the old file or the new one.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist

PathLike = Union[str, os.PathLike]

CACHE_ENV = "MOVQ_CACHE_DIR"


def cache_dir(explicit: Optional[PathLike] = None) -> Path:
    """Where weights and built-in datasets are looked for: ``explicit``, else ``$MOVQ_CACHE_DIR``, else
    ``~/.cache/movq``."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "movq"


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------
@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """``with atomic_path(p) as tmp:`` write ``tmp`` (any writer that takes a file name); on success it
    is synced and renamed to ``p``, on an exception removed. The file gets the permissions a plain
    ``open(p, "w")`` would give it (0o666 less the umask), unlike ``tempfile.mkstemp``'s 0o600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keeps the suffix: np.savez and PIL choose the format by it.
    tmp = path.with_name(f".{path.stem}.{os.urandom(6).hex()}.tmp{path.suffix}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: PathLike, data: Union[str, bytes]) -> None:
    """Write text or bytes to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


@contextmanager
def atomic_folder(path: PathLike, marker: str = "spec.json") -> Iterator[Path]:
    """``with atomic_folder(p) as tmp:`` build a folder in ``tmp`` (beside ``p``), ending with the file
    ``marker`` that says it is complete; on success it is renamed to ``p``. When another process published
    ``p`` first (its ``marker`` exists), its copy is kept. ``tmp`` is removed in every case."""
    import logging
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=path.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / marker).is_file():
                raise
            logging.getLogger(__name__).info("another process built %s first; using it", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file, read in blocks (weights and shards can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def output_problem(path: PathLike, folder: bool = False) -> Optional[str]:
    """Why ``path`` (a file, or a ``folder``) cannot be written, or None: checked before long work, so that
    an unwritable output is an error at the start rather than after the results were computed."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        return f"{path} is {'a file' if folder else 'a folder'}"
    where = path if folder else path.parent
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create {where} ({e.strerror or type(e).__name__})"
    try:  # really try: permissions alone say nothing for root or special file systems
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        return f"cannot write in {where} ({e.strerror or type(e).__name__})"
    return None


# A finished checkpoint folder of a run: checkpoints/NNNNNNN (the step); partial ones are named otherwise.
CKPT_PATTERN = re.compile(r"^\d{7}$")


def list_checkpoints(directory: PathLike) -> list[Path]:
    """The finished checkpoint folders ``NNNNNNN`` under ``directory``, oldest first ([] if none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and CKPT_PATTERN.match(p.name))


# --------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------
def save_state_dict(state: dict[str, torch.Tensor], path: PathLike, metadata: Optional[dict[str, str]] = None) -> None:
    """A state dict as ``.safetensors`` (contiguous CPU copies), written atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def read_state_dict(path: PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A state dict of tensors from ``.safetensors`` or a torch file (``torch.load(weights_only=True)``:
    no pickled code runs). A missing, unreadable or non-tensor file is a ``ValueError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device=device)
        else:
            state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # safetensors' and torch's own error types for bad headers, short files, pickles
        raise ValueError(f"could not read weights from {path}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (got {type(state).__name__})")
    return state


def load_weights(module: torch.nn.Module, path: PathLike) -> None:
    """Load a state dict file into ``module`` strictly; a mismatch is a ``ValueError`` naming the file."""
    missing, unexpected = module.load_state_dict(read_state_dict(path), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


# --------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------
def is_distributed() -> bool:
    """A torch.distributed group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process in the torch.distributed group; (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launcher_rank() -> int:
    """This process's rank as the launcher (torchrun, accelerate launch) set it, before any process group
    exists: for choosing the log level at start-up."""
    return int(os.environ.get("RANK", "0"))
