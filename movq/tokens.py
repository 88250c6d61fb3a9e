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
``allow_pickle=False``) and, for labelled data, ``{key}.cls`` (the class index as text).
Chunk j is encoded by rank ``j % world_size``; a shard is written under a temporary name and renamed
when complete, so a rerun skips finished shards whatever the number of ranks.

Reading (:class:`TokenDataset`) loads one rank's shards into memory (uint16: 2 KiB per 256² image at
16×16×4) and yields endless batches that are a pure function of (seed, rank, world size, position):
a resume at step N draws exactly the batches a run from step 0 draws there.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence, Union

import numpy as np
import torch

from movq.config import atomic_write_text
from movq.data import (
    IMAGE_EXTS,
    SkipSample,
    crop_square,
    decode_image,
    expand_shards,
    folder_classes,
    iter_tar,
    list_images,
)

logger = logging.getLogger(__name__)

TOKENS_FORMAT = "movq-tokens/1"
MANIFEST_NAME = "manifest.json"
PARTS_DIR = ".parts"
SHARD_PREFIX = "tokens"
TOKENS_EXT = "tokens.npy"
LABEL_EXT = "cls"
MAX_CODEBOOK = 2**16  # tokens are stored as uint16
SOURCES = ("builtin", "folder", "shards")


class TokenDataError(ValueError):
    """A token folder, shard or sample that cannot be used; the message names it."""


@dataclass
class TokenDataConfig:
    """Where the prior's tokens come from (a folder written by ``tools/tokenize_dataset.py``)."""

    tokens: Optional[str] = None  # the token folder (manifest.json + tokens-*.tar)
    batch_size: int = 64  # per process
    seed: int = 0  # data order (a resume continues the same order)
    verify: bool = True  # check every shard's sha256 against the manifest when loading
    # Tokenizer that decodes samples to images (grids, FID). None: the one named in the manifest, if
    # that folder exists; without any, grids are written as token maps.
    tokenizer: Optional[str] = None
    # "check": model.codebook_size / channels / grid must equal the tokens' (else an error saying
    # which override to set). "from_tokens": take them from the manifest, and num_classes too (an
    # unconditional model, num_classes 0, stays unconditional).
    model_shape: Literal["check", "from_tokens"] = "check"


# --------------------------------------------------------------------------------------
# Samples and shards
# --------------------------------------------------------------------------------------
def encode_tokens(tokens: np.ndarray) -> bytes:
    """``uint16 [C, h, w]`` → ``.npy`` bytes."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(tokens, dtype=np.uint16), allow_pickle=False)
    return buf.getvalue()


def decode_tokens(data: bytes, shape: Sequence[int], codebook_size: int, where: str) -> np.ndarray:
    """``.npy`` bytes → ``uint16 [C, h, w]``, checked against ``shape`` and ``[0, codebook_size)``."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise TokenDataError(f"{where}: not a readable .npy array ({e})") from None
    if arr.dtype != np.uint16 or arr.shape != tuple(shape):
        raise TokenDataError(f"{where}: tokens are {arr.dtype} {arr.shape}, expected uint16 {tuple(shape)}")
    if arr.size and int(arr.max()) >= codebook_size:
        raise TokenDataError(f"{where}: token id {int(arr.max())} is outside the codebook [0, {codebook_size})")
    return arr


def sanitize_key(key: str) -> str:
    """A webdataset key: no '.' in the file name part (it would split the extension)."""
    head, _, base = key.rpartition("/")
    base = base.replace(".", "_") or "_"
    return f"{head}/{base}" if head else base


def write_token_shard(path: Union[str, os.PathLike], samples: Sequence[tuple[str, np.ndarray, int]]) -> dict:
    """Write ``(key, uint16 [C, h, w], label)`` samples (label < 0: none) to one tar, atomically.

    Headers carry no time or owner, so equal tokens give byte-identical shards. Returns the
    manifest entry ``{name, count, sha256}``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, tokens, label in samples:
            members = {TOKENS_EXT: encode_tokens(tokens)}
            if label >= 0:
                members[LABEL_EXT] = str(int(label)).encode()
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    os.replace(tmp, path)
    return {"name": path.name, "count": len(samples), "sha256": digest}


def read_token_shard(
    path: Union[str, os.PathLike], shape: Sequence[int], codebook_size: int, sha256: Optional[str] = None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Read a token shard: ``(keys, tokens uint16 [n, C, h, w], labels int64 [n])``, label -1 if none."""
    path = Path(path)
    if not path.is_file():
        raise TokenDataError(f"token shard {path} is missing (listed in the manifest)")
    if sha256 is not None and hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
        raise TokenDataError(
            f"token shard {path} does not match the sha256 in the manifest (damaged or rewritten); "
            "delete it and its .parts/ entry, then rerun tools/tokenize_dataset.py"
        )
    keys, tokens, labels = [], [], []
    try:
        for key, members in iter_tar(str(path)):
            where = f"{path}:{key}"
            if TOKENS_EXT not in members:
                raise TokenDataError(f"{where}: no .{TOKENS_EXT} member (has {sorted(members)})")
            tokens.append(decode_tokens(members[TOKENS_EXT], shape, codebook_size, where))
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
    return keys, arr, np.asarray(labels, dtype=np.int64)


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
    return m


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
    atomic_write_text(directory / MANIFEST_NAME, json.dumps(manifest, indent=1))
    return manifest


def prepare_output(directory: Union[str, os.PathLike], spec: dict) -> None:
    """Create the folder and its ``spec.json``; refuse a folder made with different settings."""
    parts = Path(directory) / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    path = parts / "spec.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
        if diff:
            raise TokenDataError(
                f"{directory} holds tokens made with other settings ({', '.join(diff)} differ, e.g. "
                f"{diff[0]}: {old.get(diff[0])!r} vs now {spec.get(diff[0])!r}); use a new folder or delete it"
            )
        return
    atomic_write_text(path, json.dumps(spec, indent=1))


def _load_part(directory: Path, index: int) -> Optional[dict]:
    """The record of a finished shard, or None if it is not complete (no record or no tar)."""
    part = directory / PARTS_DIR / f"{SHARD_PREFIX}-{index:06d}.json"
    if not part.is_file() or not (directory / shard_name(index)).is_file():
        return None
    return json.loads(part.read_text())


def shard_done(directory: Union[str, os.PathLike], index: int) -> bool:
    return _load_part(Path(directory), index) is not None


def finish_shard(directory: Union[str, os.PathLike], index: int, samples, skipped: Counter, converted: Counter) -> dict:
    """Write shard ``index`` and its record. The record goes first: a shard counts as done only
    once its tar exists, and the tar is renamed into place last."""
    directory = Path(directory)
    (directory / shard_name(index)).unlink(missing_ok=True)
    tmp_info = write_token_shard(directory / f".{shard_name(index)}.staged", samples)
    info = {**tmp_info, "name": shard_name(index), "skipped": dict(skipped), "converted": dict(converted)}
    atomic_write_text(directory / PARTS_DIR / f"{SHARD_PREFIX}-{index:06d}.json", json.dumps(info))
    os.replace(directory / f".{shard_name(index)}.staged", directory / shard_name(index))
    return info


# --------------------------------------------------------------------------------------
# Inputs: what gets encoded, in chunks
# --------------------------------------------------------------------------------------
@dataclass
class Chunk:
    """One output shard's worth of input: image files of a folder, or one input shard."""

    index: int
    files: Optional[list[tuple[str, int]]] = None  # folder: (relative path, label)
    shard: Optional[str] = None  # shards / builtin: the input tar


@dataclass
class InputPlan:
    source: str
    root: str  # the folder, the shard pattern, or the builtin dataset's train folder
    chunks: list[Chunk]
    classes: list[str]  # [] when unlabelled
    label_from: Optional[str] = None  # "folder", "cls", "builtin_photo"


def detect_source(data: str) -> str:
    """``builtin`` for the word itself, ``shards`` for a .tar path or pattern, else ``folder``."""
    if data == "builtin":
        return "builtin"
    if data.endswith(".tar") or "{" in data or "::" in data:
        return "shards"
    p = Path(data).expanduser()
    if p.is_dir() and any(p.glob("*.tar")) and not list_images(p)[:1]:
        return "shards"
    return "folder"


def plan_inputs(source: str, data: str, *, shard_size: int = 1000, image_size: int = 256,
                cache_dir: Optional[str] = None, labels: Optional[bool] = None,
                builtin_size: Optional[int] = None) -> InputPlan:
    """List the inputs of ``data`` in deterministic chunks.

    ``labels``: None = use them when the data has them (class sub-folders, a manifest's classes,
    or for ``builtin`` the photograph each crop was cut from); False = never; True = required.
    ``builtin_size``: crops in the builtin training split (default: ``DataConfig``'s).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {list(SOURCES)}, got {source!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if source == "folder":
        root = Path(data).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        files = list_images(root)
        if not files:
            raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTS)}) under {root}")
        classes = folder_classes(root) if labels is not False else None
        if labels and not classes:
            raise ValueError(f"labels requested but {root} has no class sub-folders")
        index = {c: i for i, c in enumerate(classes or [])}
        items = []
        for f in files:
            top = f.split("/", 1)[0]
            if classes and ("/" not in f or top not in index):
                raise ValueError(f"{root / f}: not in a class sub-folder of {classes[:5]}...")
            items.append((f, index[top] if classes else -1))
        chunks = [Chunk(j, files=items[s : s + shard_size]) for j, s in enumerate(range(0, len(items), shard_size))]
        return InputPlan(source, str(root), chunks, list(classes or []), "folder" if classes else None)
    if source == "builtin":
        from movq.config import DataConfig
        from movq.data import BUILTIN_TRAIN_PHOTOS, builtin_dataset

        dc = DataConfig(source="builtin", image_size=image_size, cache_dir=cache_dir)
        if builtin_size is not None:
            dc.builtin_train_size = builtin_size
        root = builtin_dataset(dc) / "train"
        shards = sorted(str(p) for p in root.glob("*.tar"))
        use = labels is not False
        classes = list(BUILTIN_TRAIN_PHOTOS) if use else []
        return InputPlan(source, str(root), [Chunk(j, shard=s) for j, s in enumerate(shards)], classes,
                         "builtin_photo" if use else None)
    from movq.data import read_manifest

    folder = Path(data).expanduser()
    shards = sorted(str(p) for p in folder.glob("*.tar")) if folder.is_dir() else expand_shards(data)
    if not shards:
        raise FileNotFoundError(f"no .tar shards in {folder}")

    manifest = read_manifest(Path(shards[0]).parent)
    classes = list((manifest or {}).get("classes") or []) if labels is not False else []
    if labels and not classes:
        raise ValueError(f"labels requested but the shards of {data} have no manifest listing classes")
    return InputPlan(source, data, [Chunk(j, shard=s) for j, s in enumerate(shards)], classes,
                     "cls" if classes else None)


def iter_chunk(plan: InputPlan, chunk: Chunk) -> Iterator[tuple[str, Optional[bytes], int, Optional[str]]]:
    """``(key, image bytes, label, skip reason)`` for every sample of ``chunk``, in order."""
    if chunk.files is not None:
        for rel, label in chunk.files:
            key = sanitize_key(rel.rpartition(".")[0] or rel)
            try:
                yield key, (Path(plan.root) / rel).read_bytes(), label, None
            except OSError:
                yield key, None, label, "io_error"
        return
    try:
        for key, members in iter_tar(chunk.shard):
            ext = next((e for e in IMAGE_EXTS if e in members), None)
            label, skip = -1, None if ext else "not_image"
            if plan.label_from == "cls":
                try:
                    label = int(members["cls"].decode().strip())
                    if not 0 <= label < len(plan.classes):
                        skip = "bad_label"
                except (KeyError, ValueError, UnicodeDecodeError):
                    skip = "bad_label"
            elif plan.label_from == "builtin_photo":
                try:
                    label = plan.classes.index(json.loads(members["json"])["photo"])
                except (KeyError, ValueError, TypeError):
                    skip = "bad_label"
            yield sanitize_key(key), members.get(ext) if ext else None, label, skip
    except (tarfile.TarError, OSError, EOFError) as e:
        logger.warning("input shard %s breaks off (%s); using the samples before it", chunk.shard, e)
        yield f"{chunk.index:06d}_tail", None, -1, "truncated_shard"


def load_image(data: bytes, size: int) -> tuple[np.ndarray, list[str]]:
    """Decode, centre-crop the largest square and resize to ``size``: ``uint8 [S, S, 3]``.

    Raises :class:`movq.data.SkipSample` for unusable bytes; returns the conversions applied.
    """
    img, conversion = decode_image(data, min_size=size)
    img, upscaled = crop_square(img, size)
    return np.asarray(img, dtype=np.uint8), [c for c in (conversion, "upscaled" if upscaled else None) if c]


# --------------------------------------------------------------------------------------
# Reading for training
# --------------------------------------------------------------------------------------
class TokenDataset:
    """One rank's share of a token folder, in memory.

    With at least ``world_size`` shards a rank takes shards ``rank, rank + W, ...``; with fewer,
    every rank reads all of them and keeps samples ``rank, rank + W, ...``. Either way the ranks'
    samples are disjoint.
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
        entries = [s for s in m["shards"] if s["count"] > 0]
        by_shard = len(entries) >= world_size
        mine = entries[rank::world_size] if by_shard else entries
        tokens, labels = [], []
        for s in mine:
            _, t, lab = read_token_shard(self.directory / s["name"], self.shape, self.codebook_size,
                                         s["sha256"] if verify else None)
            tokens.append(t)
            labels.append(lab)
        tok = np.concatenate(tokens) if tokens else np.zeros((0, *self.shape), np.uint16)
        lab = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        if not by_shard:
            tok, lab = tok[rank::world_size], lab[rank::world_size]
        if len(tok) == 0:
            raise TokenDataError(f"{directory}: rank {rank} of {world_size} got no token samples ({m['count']} in all)")
        if self.classes and ((lab < 0) | (lab >= len(self.classes))).any():
            raise TokenDataError(f"{directory}: labels outside [0, {len(self.classes)}) or missing in a labelled folder")
        self.tokens = torch.from_numpy(tok.astype(np.int64))  # [N, C, h, w]
        self.labels = torch.from_numpy(lab)  # [N], -1 = unlabelled

    def __len__(self) -> int:
        return len(self.tokens)

    def batches(self, batch_size: int, seed: int = 0, start_step: int = 0) -> Iterator[dict]:
        """Endless ``{"tokens": int64 [B, C, h, w], "label": int64 [B]}`` from batch ``start_step``.

        The index stream is the concatenation of per-epoch permutations (seeded by seed, epoch,
        rank, world size); batch k is its items ``[k·B, (k+1)·B)``, so batches may straddle epochs
        and a dataset smaller than a batch still works.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self.tokens)
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
                idx = torch.from_numpy(pending[:batch_size])
                pending = pending[batch_size:]
                yield {"tokens": self.tokens[idx], "label": self.labels[idx]}


def resolve_tokenizer(path: Union[str, os.PathLike]) -> Path:
    """A ``MoVQ.from_pretrained`` folder from a model folder, a checkpoint folder (its ``ema/``,
    else ``model/``) or a run folder (its newest checkpoint)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"tokenizer {p} does not exist")
    if (p / "checkpoints").is_dir():
        from movq.training import CKPT_PATTERN

        found = sorted(c for c in (p / "checkpoints").iterdir() if c.is_dir() and CKPT_PATTERN.match(c.name))
        if not found:
            raise FileNotFoundError(f"run folder {p} has no finished checkpoint under checkpoints/")
        p = found[-1]
    for sub in ("", "ema", "model"):
        cand = p / sub if sub else p
        if (cand / "model.safetensors").is_file() and (cand / "config.yaml").is_file():
            return cand
    raise FileNotFoundError(
        f"{p} is not a tokenizer checkpoint: expected model.safetensors + config.yaml in it or in its ema/ or model/"
    )


def file_digest(path: Union[str, os.PathLike]) -> str:
    """sha256 of a file, read in blocks (tokenizer weights can be hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


__all__ = [
    "TokenDataConfig", "TokenDataset", "TokenDataError", "InputPlan", "Chunk", "plan_inputs", "iter_chunk",
    "load_image", "detect_source", "write_token_shard", "read_token_shard", "read_token_manifest",
    "write_token_manifest", "prepare_output", "shard_done", "finish_shard", "shard_name", "resolve_tokenizer",
    "encode_tokens", "decode_tokens", "sanitize_key", "file_digest", "MAX_CODEBOOK", "SOURCES",
]
