"""Encoding a dataset into token shards for the priors: which images go into which output shard (a plan
of deterministic chunks), reading a chunk's samples, and encoding them with a tokenizer.

A folder's files are taken in sorted order in groups of ``shard_size``; each input shard (webdataset, or
the built-in dataset's) is one chunk. Images are decoded and centre-cropped exactly as for validation
(:func:`movq.data.decode.load_image`). ``movq.cli.tokenize`` runs this over ranks and writes the shards
(:mod:`movq.data.tokens`). With an image condition (:mod:`movq.data.conditions`) each sample's condition is
made from that same decoded image (a label map: read and cropped the same way) and stored beside its tokens;
a flipped copy gets the flipped condition.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from movq.config import ConditionConfig, DataConfig
from movq.data.builtin import BUILTIN_TRAIN_PHOTOS, builtin_dataset
from movq.data.conditions import (
    SEG_MEMBER,
    ConditionError,
    find_label_file,
    fit_label_map,
    make_condition,
    read_label_map,
)
from movq.data.decode import IMAGE_EXTS, SkipSample, images_from_uint8, list_images, load_image
from movq.data.shapes import shape_label_map, shapes_split
from movq.data.shards import (
    ShardProblem,
    expand_shards,
    is_url,
    manifest_classes,
    manifest_entries,
    read_manifests,
    read_shard,
    sample_label,
)
from movq.data.sources import _FolderSource, folder_classes
from movq.data.tokens import sanitize_key

log = logging.getLogger(__name__)


SOURCES = ("builtin", "shapes", "folder", "shards")


# --------------------------------------------------------------------------------------
# Inputs: what gets encoded, in chunks
# --------------------------------------------------------------------------------------
class UnreadableShard(RuntimeError):
    """A damaged input shard (unreadable, sha256 or sample count not as in its manifest) under
    ``on_bad_shard="error"``."""


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
    entries: dict = field(default_factory=dict)  # shards: path → manifest entry {name, count, sha256}
    missing: dict = field(default_factory=dict)  # shards a folder's manifest lists but the folder lacks
    shapes: Optional[tuple[int, int]] = None  # the shapes dataset: (image size, seed) its images were drawn with
    segmentation_dir: Optional[str] = None  # folder of label PNGs (segmentation conditions of a folder)


def detect_source(data: str) -> str:
    """``builtin`` / ``shapes`` for the words themselves, ``shards`` for a .tar path or pattern, else ``folder``."""
    if data in ("builtin", "shapes"):
        return data
    if is_url(data) or data.endswith(".tar") or "{" in data or "::" in data:
        return "shards"
    p = Path(data).expanduser()
    if p.is_dir() and any(p.glob("*.tar")) and not list_images(p)[:1]:
        return "shards"
    return "folder"


def plan_inputs(source: str, data: str, *, shard_size: int = 1000, image_size: int = 256,
                cache_dir: Optional[str] = None, labels: Optional[bool] = None,
                builtin_size: Optional[int] = None, num_classes: Optional[int] = None) -> InputPlan:
    """List the inputs of ``data`` in deterministic chunks.

    ``labels``: None = use them when the data has them (class sub-folders, a manifest's classes,
    or for ``builtin`` the photograph each crop was cut from); False = never; True = required.
    ``builtin_size``: crops in the builtin training split (default: ``DataConfig``'s). ``num_classes``: for
    shards whose labels no manifest names (made elsewhere, or read through URLs): classes "0" .. "N-1", the
    labels read from each sample's .cls or .json.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {list(SOURCES)}, got {source!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if source == "folder":
        if labels is None:  # class sub-folders give labels when there are any
            root = Path(data).expanduser()
            labels = root.is_dir() and folder_classes(root) is not None
        # The training loader's folder listing and labelling: same files, checks and messages.
        src = _FolderSource(data, labels)
        items = list(zip(src.files, src.labels.tolist()))
        chunks = [Chunk(j, files=items[s : s + shard_size]) for j, s in enumerate(range(0, len(items), shard_size))]
        return InputPlan(source, str(src.root), chunks, list(src.classes) if labels else [],
                         "folder" if labels else None)
    if source == "builtin":
        dc = DataConfig(source="builtin", image_size=image_size, cache_dir=cache_dir)
        if builtin_size is not None:
            dc.builtin_train_size = builtin_size
        root = builtin_dataset(dc) / "train"
        shards = expand_shards(str(root))
        use = labels is not False
        classes = list(BUILTIN_TRAIN_PHOTOS) if use else []
        return InputPlan(source, str(root), [Chunk(j, shard=s) for j, s in enumerate(shards)], classes,
                         "builtin_photo" if use else None, *_entries(str(root), shards))
    shapes = None
    if source == "shapes":  # shards whose manifest lists the classes: read as any such shards
        dc = DataConfig(source="shapes", image_size=image_size, cache_dir=cache_dir)
        if builtin_size is not None:
            dc.builtin_train_size = builtin_size
        data = str(shapes_split(dc, "train"))
        shapes = (image_size, dc.seed)
    shards = expand_shards(data)

    manifests = read_manifests(shards)  # one per folder: a pattern may span several
    classes = (manifest_classes(manifests) or []) if labels is not False else []
    if not classes and num_classes and labels is not False:
        classes = [str(i) for i in range(num_classes)]
    if labels and not classes:
        raise ValueError(f"labels requested but the shards of {data} have no manifest listing classes "
                         "(for shards made elsewhere give the number of classes: --num-classes N)")
    return InputPlan(source, data, [Chunk(j, shard=s) for j, s in enumerate(shards)], classes,
                     "cls" if classes else None, *_entries(data, shards), shapes=shapes)


def _entries(pattern: str, shards: list[str]) -> tuple[dict, dict]:
    """The manifest entries of ``shards``, and (a folder given) the listed shards it lacks."""
    entries = manifest_entries(read_manifests(shards))
    mine = {s: entries[Path(s)] for s in shards if Path(s) in entries}
    missing = {}
    if Path(pattern).expanduser().is_dir():
        present = {Path(s) for s in shards}
        missing = {str(p): e["count"] for p, e in entries.items() if p not in present}
    return mine, missing


def iter_chunk(plan: InputPlan, chunk: Chunk, on_bad_shard: str = "skip", segmentation: bool = False
               ) -> Iterator[tuple]:
    """``(key, image bytes, label, skip reason, samples)`` for every sample of ``chunk``, in order (samples:
    1, or for a skip record of a damaged shard how many it cost). With ``segmentation`` a sixth item: a
    function that reads the sample's label map (integer ids ``[H, W]``, before cropping) or raises a
    ``ConditionError`` naming what is missing: the label PNG of a folder's image in ``plan.segmentation_dir``
    (matched by file name), a shard sample's ``seg.png``, or the shape's mask of the shapes dataset.

    An input shard is read against its manifest entry (``movq.data.shards.read_shard``: sha256 first, then
    the count): what it cannot give is one skip record (``shard_unreadable``, ``shard_checksum``,
    ``shard_truncated``) weighing the samples lost, or with ``on_bad_shard="error"`` an
    ``UnreadableShard`` error (nothing is written for it)."""
    if chunk.files is not None:
        taken: set[str] = set()
        for rel, label in chunk.files:
            key = sanitize_key(rel.rpartition(".")[0] or rel)
            # a.jpg beside a.png (or a.b.png beside a_b.png) must not share a key: the tar reader
            # would merge their members into one sample and lose the other.
            while key in taken:
                key += "_"
            taken.add(key)
            seg = (_folder_labels(plan.segmentation_dir, rel),) if segmentation else ()
            try:
                yield key, (Path(plan.root) / rel).read_bytes(), label, None, 1, *seg
            except OSError:
                yield key, None, label, "io_error", 1, *seg
        return
    entry = plan.entries.get(chunk.shard, {})
    for item in read_shard(chunk.shard, count=entry.get("count"), sha256=entry.get("sha256")):
        if isinstance(item, ShardProblem):
            if on_bad_shard == "error":
                raise UnreadableShard(f"input shard {chunk.shard} {item.detail} (--on-bad-shard error)")
            log.warning("input shard %s %s%s", chunk.shard, item.detail,
                        f"; {item.count} sample(s) counted as {item.reason}" if item.count else "")
            if item.count:
                yield f"{chunk.index:06d}_{item.reason}", None, -1, item.reason, item.count, *((None,) if segmentation else ())
            continue
        key, members = item
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        label, skip = -1, None if ext else "not_image"
        if plan.label_from == "cls":
            try:
                label = sample_label(members)
                if not 0 <= label < len(plan.classes):
                    skip = "bad_label"
            except ValueError:
                skip = "bad_label"
        elif plan.label_from == "builtin_photo":
            try:
                label = plan.classes.index(json.loads(members["json"])["photo"])
            except (KeyError, ValueError, TypeError):
                skip = "bad_label"
        seg = (_sample_labels(plan, chunk, key, members),) if segmentation else ()
        yield sanitize_key(key), members.get(ext) if ext else None, label, skip, 1, *seg


def _folder_labels(folder: Optional[str], rel: str):
    def read() -> tuple[np.ndarray, str]:
        if folder is None:
            raise ConditionError("a segmentation condition of an image folder needs --segmentation-dir DIR")
        path = find_label_file(folder, rel)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ConditionError(f"label map {path}: {e.strerror or type(e).__name__}") from None
        return read_label_map(data, str(path)), str(path)
    return read


def _sample_labels(plan: InputPlan, chunk: Chunk, key: str, members: dict):
    def read() -> tuple[np.ndarray, str]:
        where = f"{chunk.shard}:{key}"
        if plan.shapes is not None:  # drawn with the image: the shape's mask
            try:
                index = int(key.rpartition("/")[2])
            except ValueError:
                raise ConditionError(f"{where}: not a shapes sample key (an image index)") from None
            return shape_label_map(index, plan.shapes[0], plan.shapes[1]).astype(np.int64), where
        if SEG_MEMBER not in members:
            raise ConditionError(f"{where}: no {SEG_MEMBER} member for the segmentation condition (has {sorted(members)})")
        return read_label_map(members[SEG_MEMBER], f"{where}.{SEG_MEMBER}"), f"{where}.{SEG_MEMBER}"
    return read

def _encode(model, arrays: list, device, bf16: bool) -> np.ndarray:
    """uint8 [B, S, S, 3] → uint16 tokens [B, C, h, w]."""
    x = images_from_uint8(torch.from_numpy(np.stack(arrays)).to(device))  # moved as uint8: a quarter of the bytes
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        idx = model.encode(x).indices
    return idx.to("cpu", torch.int32).numpy().astype(np.uint16)


# The key suffix of a horizontally flipped copy (``encode_chunk(flip=True)``).
FLIP_SUFFIX = "_flip"


def encode_chunk(plan: InputPlan, chunk: Chunk, model: torch.nn.Module, *, size: int, batch_size: int, device,
                 pool: Executor, bf16: bool = False, on_bad_shard: str = "skip",
                 flip: bool = False, condition: Optional[ConditionConfig] = None) -> tuple[list, Counter, Counter]:
    """All samples of one chunk, decoded by ``pool``'s threads and encoded ``batch_size`` at a time:
    ``([(key, tokens uint16 [C, h, w], label)], skipped, converted)``. ``flip``: each image is also encoded
    mirrored left to right, as the sample ``key + "_flip"`` right after it (LlamaGen's flip augmentation of
    pre-extracted codes; the prior then sees both as samples). ``condition``: each sample also carries its
    condition ``uint8 [ch, H', W']`` (a fourth item), made from the decoded image (and flipped with it); a
    label map that is missing or holds ids ≥ n raises ``ConditionError`` naming the file."""
    samples, skipped, converted = [], Counter(), Counter()
    segmentation = condition is not None and condition.kind == "segmentation"

    def decode(item):
        key, data, label, skip, n, *seg = item
        if skip is not None:
            return key, None, label, (skip, n), [], None
        try:
            arr, conv = load_image(data, size)
        except SkipSample as e:
            return key, None, label, (e.reason, 1), [], None
        cond = None
        if condition is not None:
            labels_map, where = seg[0]() if segmentation else (None, key)
            if labels_map is not None:
                labels_map = fit_label_map(labels_map, size)  # cropped and resized as the image was
            cond = make_condition(condition, arr, labels_map, where)
        return key, arr, label, None, conv, cond

    keys, arrays, labels, conds = [], [], [], []

    def flush():
        if arrays:
            tokens = _encode(model, arrays, device, bf16)
            samples.extend(zip(keys, tokens, labels, conds) if condition is not None else zip(keys, tokens, labels))
            keys.clear(), arrays.clear(), labels.clear(), conds.clear()

    for key, arr, label, reason, conv, cond in pool.map(decode, iter_chunk(plan, chunk, on_bad_shard, segmentation)):
        if reason is not None:
            skipped[reason[0]] += reason[1]
            continue
        converted.update(conv)
        keys.append(key), arrays.append(arr), labels.append(label), conds.append(cond)
        if flip:
            keys.append(key + FLIP_SUFFIX), arrays.append(arr[:, ::-1]), labels.append(label)
            conds.append(None if cond is None else np.ascontiguousarray(cond[..., ::-1]))
        if len(arrays) >= batch_size:
            flush()
    flush()
    return samples, skipped, converted
