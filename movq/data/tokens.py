"""Token shards: a dataset encoded once by a trained tokenizer, so the prior trains without it.

Reference: the webdataset layout (github.com/webdataset/webdataset: tar members sharing a key
form one sample) and the "pre-tokenize, then train the transformer on codes" recipe of
taming-transformers / MaskGIT.

Layout of a token folder (written by ``tools/tokenize_dataset.py``)::

    OUT/manifest.json          format, count, channels/height/width/codebook_size, classes,
                               tokenizer, image_size, source, skipped, shards [{name, count, sha256}]
    OUT/tokens-000000.tar      one output shard per input chunk (a folder's files in groups of
    OUT/tokens-000001.tar      ``shard_size``, or one input shard), named by the chunk, not the rank
    OUT/.parts/                spec.json (what the folder was made with) + one JSON per finished shard

A sample is ``{key}.tokens.npy`` (``np.save`` of ``uint16 [C, h, w]``, read back with
``allow_pickle=False``) and, for labelled data, ``{key}.cls`` (the class index as text). A folder made
with an image condition (``--condition``, :mod:`movq.data.conditions`) also holds ``{key}.cond.npy``
(``uint8 [channels, H', W']``, made from the same decoded image as the tokens); the manifest's
``condition`` says its kind, parameters and shape.
Chunk j is encoded by rank ``j % world_size``; a shard is written under a temporary name and renamed
when complete, so a rerun skips finished shards whatever the number of ranks.

Reading (:class:`TokenDataset`) loads one rank's shards into memory (uint16: 2 KiB per 256² image at
16×16×4) and yields endless batches that are a pure function of (seed, rank, world size, position):
a resume at step N draws exactly the batches a run from step 0 draws there.
"""
from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from movq.data.shards import MANIFEST_NAME, TarShard, iter_tar, shard_entries_problem, total_count_problem
from movq.utils import atomic_write, sha256_file

logger = logging.getLogger(__name__)

TOKENS_FORMAT = "movq-tokens/1"
PARTS_DIR = ".parts"
SHARD_PREFIX = "tokens"
TOKENS_EXT = "tokens.npy"
LABEL_EXT = "cls"
CONDITION_EXT = "cond.npy"
MAX_CODEBOOK = 2**16  # tokens are stored as uint16


class TokenDataError(ValueError):
    """A token folder, shard or sample that cannot be used; the message names it."""



# --------------------------------------------------------------------------------------
# Samples and shards
# --------------------------------------------------------------------------------------
def tokens_to_npy(tokens: np.ndarray) -> bytes:
    """``uint16 [C, h, w]`` → ``.npy`` bytes."""
    return _to_npy(tokens, np.uint16)


def _to_npy(arr: np.ndarray, dtype) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=dtype), allow_pickle=False)
    return buf.getvalue()


def _from_npy(data: bytes, dtype, shape: Sequence[int], where: str, what: str) -> np.ndarray:
    """``.npy`` bytes (no pickles) → an array of ``dtype`` and ``shape``, or a :class:`TokenDataError` that says
    what is wrong (``what``: "the tokens are", "the condition is")."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise TokenDataError(f"{where}: {what} not a readable .npy array ({e})") from None
    if arr.dtype != dtype or arr.shape != tuple(shape):
        raise TokenDataError(f"{where}: {what} {arr.dtype} {arr.shape}, expected {np.dtype(dtype)} {tuple(shape)}")
    return arr


def tokens_from_npy(data: bytes, shape: Sequence[int], codebook_size: int, where: str) -> np.ndarray:
    """``.npy`` bytes → ``uint16 [C, h, w]``, checked against ``shape`` and ``[0, codebook_size)``."""
    arr = _from_npy(data, np.uint16, shape, where, "the tokens are")
    if arr.size and int(arr.max()) >= codebook_size:
        raise TokenDataError(f"{where}: token id {int(arr.max())} is outside the codebook [0, {codebook_size})")
    return arr


def sanitize_key(key: str) -> str:
    """A webdataset key: no '.' in the file name part (it would split the extension)."""
    head, _, base = key.rpartition("/")
    base = base.replace(".", "_") or "_"
    return f"{head}/{base}" if head else base


def condition_to_npy(condition: np.ndarray) -> bytes:
    """``uint8 [channels, H', W']`` → ``.npy`` bytes."""
    return _to_npy(condition, np.uint8)


def condition_from_npy(data: bytes, shape: Sequence[int], where: str) -> np.ndarray:
    """``.npy`` bytes → ``uint8 [channels, H', W']``, checked against ``shape``."""
    return _from_npy(data, np.uint8, shape, where, "the condition is")


def write_token_shard(path: Union[str, os.PathLike], samples: Sequence[tuple]) -> dict:
    """Write ``(key, uint16 [C, h, w], label)`` samples (label < 0: none), or ``(key, tokens, label,
    condition uint8 [ch, H', W'])``, to one tar, atomically (:class:`movq.data.shards.TarShard`: equal tokens
    give byte-identical shards). Returns the manifest entry ``{name, count, sha256}``."""
    with TarShard(path) as shard:
        for key, tokens, label, *rest in samples:
            members = {TOKENS_EXT: tokens_to_npy(tokens)}
            if label >= 0:
                members[LABEL_EXT] = str(int(label)).encode()
            if rest and rest[0] is not None:
                members[CONDITION_EXT] = condition_to_npy(rest[0])
            shard.add(key, members)
    return shard.entry


def read_token_shard(
    path: Union[str, os.PathLike], shape: Sequence[int], codebook_size: int, sha256: Optional[str] = None,
    condition_shape: Optional[Sequence[int]] = None,
) -> tuple:
    """Read a token shard: ``(keys, tokens uint16 [n, C, h, w], labels int64 [n])``, label -1 if none; with
    ``condition_shape`` also the conditions ``uint8 [n, *condition_shape]`` (every sample must have one)."""
    path = Path(path)
    if not path.is_file():
        raise TokenDataError(f"token shard {path} is missing (listed in the manifest)")
    if sha256 is not None and sha256_file(path) != sha256:
        raise TokenDataError(
            f"token shard {path} does not match the sha256 in the manifest (damaged or rewritten); "
            "delete it and its .parts/ entry, then rerun tools/tokenize_dataset.py"
        )
    keys, tokens, labels, conditions = [], [], [], []
    try:
        for key, members in iter_tar(str(path)):
            where = f"{path}:{key}"
            if TOKENS_EXT not in members:
                raise TokenDataError(f"{where}: no .{TOKENS_EXT} member (has {sorted(members)})")
            tokens.append(tokens_from_npy(members[TOKENS_EXT], shape, codebook_size, where))
            if condition_shape is not None:
                if CONDITION_EXT not in members:
                    raise TokenDataError(f"{where}: no .{CONDITION_EXT} member, but the manifest says the folder "
                                         "holds conditions")
                conditions.append(condition_from_npy(members[CONDITION_EXT], condition_shape, where))
            label = -1
            if LABEL_EXT in members:
                try:
                    label = int(members[LABEL_EXT].decode().strip())
                except (ValueError, UnicodeDecodeError):
                    raise TokenDataError(f"{where}: .{LABEL_EXT} is not an integer") from None
            keys.append(key)
            labels.append(label)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise TokenDataError(f"token shard {path} is unreadable ({type(e).__name__}: {e})") from None
    arr = np.stack(tokens) if tokens else np.zeros((0, *shape), np.uint16)
    if condition_shape is None:
        return keys, arr, np.asarray(labels, dtype=np.int64)
    cond = np.stack(conditions) if conditions else np.zeros((0, *condition_shape), np.uint8)
    return keys, arr, np.asarray(labels, dtype=np.int64), cond


# --------------------------------------------------------------------------------------
# Manifest and resumable writing
# --------------------------------------------------------------------------------------
def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}-{index:06d}.tar"


def read_token_manifest(directory: Union[str, os.PathLike]) -> dict:
    """The manifest of a token folder, validated (format, shape keys, shard list)."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        hint = " (tokenization incomplete: rerun it to finish)" if (directory / PARTS_DIR).is_dir() else ""
        raise TokenDataError(
            f"{path} not found{hint}: make a token folder with "
            "`accelerate launch tools/tokenize_dataset.py --tokenizer CKPT DATA OUT`"
        )
    try:
        m = json.loads(path.read_text())
    except ValueError as e:
        raise TokenDataError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(m, dict) or m.get("format") != TOKENS_FORMAT:
        raise TokenDataError(f"{path}: format is {m.get('format') if isinstance(m, dict) else m!r}, expected {TOKENS_FORMAT}")
    for key in ("channels", "height", "width", "codebook_size", "shards", "classes"):
        if key not in m:
            raise TokenDataError(f"{path}: key '{key}' missing")
    problem = shard_entries_problem(m["shards"]) or total_count_problem(m)
    if problem:
        raise TokenDataError(f"{path}: {problem}")
    for key in ("channels", "height", "width", "codebook_size"):
        if not isinstance(m[key], int) or isinstance(m[key], bool) or m[key] < 1:
            raise TokenDataError(f"{path}: '{key}' is {m[key]!r}, not a positive integer")
    if not isinstance(m["classes"], list):
        raise TokenDataError(f"{path}: 'classes' must be a list of class names, got {m['classes']!r}")
    cond = m.get("condition")
    if cond is not None and not (isinstance(cond, dict) and isinstance(cond.get("kind"), str)
                                 and isinstance(cond.get("shape"), list) and len(cond["shape"]) == 3):
        raise TokenDataError(f"{path}: 'condition' must be {{kind, shape [channels, H, W], ...}} or absent, got {cond!r}")
    return m


def manifest_condition(manifest: dict) -> Optional[dict]:
    """The condition a token folder holds (``{kind, shape, and its parameters}``), or None."""
    return manifest.get("condition")


def write_token_manifest(directory: Union[str, os.PathLike], num_chunks: int) -> dict:
    """Gather the ``.parts/`` records of all ``num_chunks`` shards into ``manifest.json``.

    Raises if a shard is missing (some rank did not finish); the spec (shape, classes, tokenizer)
    comes from ``.parts/spec.json``.
    """
    directory = Path(directory)
    spec = json.loads((directory / PARTS_DIR / "spec.json").read_text())
    shards, skipped, converted, missing = [], Counter(), Counter(), []
    for j in range(num_chunks):
        part = _load_part(directory, j)
        if part is None:
            missing.append(shard_name(j))
            continue
        shards.append({k: part[k] for k in ("name", "count", "sha256")})
        skipped.update(part.get("skipped", {}))
        converted.update(part.get("converted", {}))
    if missing:
        raise TokenDataError(f"{directory}: {len(missing)} shard(s) not finished, e.g. {missing[:3]}; rerun to finish")
    manifest = {"format": TOKENS_FORMAT, "count": sum(s["count"] for s in shards), **spec,
                "skipped": dict(skipped), "converted": dict(converted), "shards": shards}
    atomic_write(directory / MANIFEST_NAME, json.dumps(manifest, indent=1))
    return manifest


def prepare_output(directory: Union[str, os.PathLike], spec: dict, overwrite: bool = False) -> None:
    """Create the folder and its ``spec.json``. A folder made with other settings is refused, or
    with ``overwrite`` emptied of its tokens first; one made with the same settings is resumed."""
    directory = Path(directory)
    parts = directory / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    path = parts / "spec.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
        if not diff:
            return
        if not overwrite:
            raise TokenDataError(
                f"{directory} holds tokens made with other settings ({', '.join(diff)} differ, e.g. "
                f"{diff[0]}: {old.get(diff[0])!r} vs now {spec.get(diff[0])!r}); use a new folder or --overwrite"
            )
        logger.info("%s: replacing tokens made with other settings (%s)", directory, ", ".join(diff))
        for stale in [directory / MANIFEST_NAME, *directory.glob(f"{SHARD_PREFIX}-*.tar"), *parts.iterdir()]:
            stale.unlink(missing_ok=True)
    atomic_write(path, json.dumps(spec, indent=1))


def _part_path(directory: Path, index: int) -> Path:
    """The ``.parts/`` record of shard ``index``."""
    return directory / PARTS_DIR / f"{SHARD_PREFIX}-{index:06d}.json"


def _load_part(directory: Path, index: int) -> Optional[dict]:
    """The record of a finished shard, or None if it is not complete (no record or no tar)."""
    part = _part_path(directory, index)
    if not part.is_file() or not (directory / shard_name(index)).is_file():
        return None
    return json.loads(part.read_text())


def shard_done(directory: Union[str, os.PathLike], index: int) -> bool:
    return _load_part(Path(directory), index) is not None


def finish_shard(directory: Union[str, os.PathLike], index: int, samples, skipped: Counter, converted: Counter) -> dict:
    """Write shard ``index`` and its record. The record goes first: a shard counts as done only
    once its tar exists, and the tar is renamed into place last."""
    directory, name = Path(directory), shard_name(index)
    staged = directory / f".{name}.staged"
    (directory / name).unlink(missing_ok=True)
    info = {**write_token_shard(staged, samples), "name": name, "skipped": dict(skipped), "converted": dict(converted)}
    atomic_write(_part_path(directory, index), json.dumps(info))
    os.replace(staged, directory / name)
    return info


# --------------------------------------------------------------------------------------
# Reading for training
# --------------------------------------------------------------------------------------
class TokenDataset:
    """One rank's share of a token folder, in memory.

    The folder's N samples (shards in manifest order) are split into W contiguous ranges of
    ⌊N/W⌋ or ⌈N/W⌉: rank r keeps samples ``[⌊rN/W⌋, ⌊(r+1)N/W⌋)`` and reads only the shards that
    overlap them. The ranks' samples are disjoint, cover the folder, and are as many on every rank
    (up to one), so every sample is trained on equally often whatever the shard sizes.
    """

    def __init__(self, directory: Union[str, os.PathLike], *, rank: int = 0, world_size: int = 1, verify: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.directory = Path(directory)
        self.manifest = m = read_token_manifest(directory)
        self.shape = (int(m["channels"]), int(m["height"]), int(m["width"]))
        self.codebook_size = int(m["codebook_size"])
        self.classes: list[str] = list(m["classes"])
        self.rank, self.world_size = rank, world_size
        total = sum(int(s["count"]) for s in m["shards"])
        lo, hi = rank * total // world_size, (rank + 1) * total // world_size
        cond_info = manifest_condition(m)
        self.condition_shape = tuple(cond_info["shape"]) if cond_info else None
        tokens, labels, conds, start = [], [], [], 0
        for s in m["shards"]:
            first, start = start, start + int(s["count"])
            if start <= lo or first >= hi or start == first:  # not in this rank's range, or empty
                continue
            got = read_token_shard(self.directory / s["name"], self.shape, self.codebook_size,
                                   s["sha256"] if verify else None, self.condition_shape)
            t, lab = got[1], got[2]
            if len(t) != int(s["count"]):
                raise TokenDataError(f"{self.directory / s['name']}: {len(t)} samples, the manifest says {s['count']}")
            a, b = max(lo, first) - first, min(hi, start) - first
            tokens.append(t[a:b])
            labels.append(lab[a:b])
            if self.condition_shape is not None:
                conds.append(got[3][a:b])
        tok = np.concatenate(tokens) if tokens else np.zeros((0, *self.shape), np.uint16)
        lab = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        if len(tok) == 0:
            raise TokenDataError(f"{directory}: rank {rank} of {world_size} got no token samples ({m['count']} in all)")
        if self.classes and ((lab < 0) | (lab >= len(self.classes))).any():
            raise TokenDataError(f"{directory}: labels outside [0, {len(self.classes)}) or missing in a labelled folder")
        self.array = np.ascontiguousarray(tok)  # uint16 [N, C, h, w]: a quarter of int64's memory
        self.labels = torch.from_numpy(lab)  # [N], -1 = unlabelled
        # uint8 [N, ch, H', W'] or None: the image condition of each sample
        self.conditions = np.ascontiguousarray(np.concatenate(conds)) if self.condition_shape is not None else None

    def __len__(self) -> int:
        return len(self.array)

    def take(self, index) -> dict:
        """``{"tokens": int64 [B, C, h, w], "label": int64 [B]}`` for an index array or slice, and
        ``"condition": uint8 [B, ch, H', W']`` for a folder with conditions."""
        index = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index)
        batch = {"tokens": torch.from_numpy(self.array[index].astype(np.int64)),
                 "label": self.labels[torch.from_numpy(index)]}
        if self.conditions is not None:
            batch["condition"] = torch.from_numpy(np.ascontiguousarray(self.conditions[index]))
        return batch


    def batches(self, batch_size: int, seed: int = 0, start_step: int = 0) -> Iterator[dict]:
        """Endless ``{"tokens": int64 [B, C, h, w], "label": int64 [B]}`` from batch ``start_step``.

        The index stream is the concatenation of per-epoch permutations (seeded by seed, epoch,
        rank, world size); batch k is its items ``[k·B, (k+1)·B)``, so batches may straddle epochs
        and a dataset smaller than a batch still works.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        epoch, offset = divmod(start_step * batch_size, n)

        def indices() -> Iterator[np.ndarray]:
            e, o = epoch, offset
            while True:
                perm = np.random.default_rng([seed % 2**32, e, self.rank, self.world_size]).permutation(n)
                yield perm[o:]
                e, o = e + 1, 0

        pending = np.zeros(0, dtype=np.int64)
        for part in indices():
            pending = np.concatenate([pending, part])
            while len(pending) >= batch_size:
                batch, pending = pending[:batch_size], pending[batch_size:]
                yield self.take(batch)
