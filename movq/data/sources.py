"""Raw training samples: where they come from (image folders, webdataset tar shards), the order
each rank and worker reads them in, and when bad input must become an error instead of a skip.

A source yields ``_Raw`` records (key, undecoded bytes, label, origin) and knows nothing of
decoding; ``movq.data.ImageStream`` decodes them, reports each outcome back to the source's health
check and batches them. A shard is read against its manifest entry (``movq.data.shards.read_shard``):
what it cannot give of the samples promised is one ``_Raw`` skip weighing that many (``shard_*`` reasons),
and a shard with no usable image is passed over, until none of the shards a reader has is usable
(``DataError``) or, with ``data.on_bad_shard=error``, at the first bad shard (``BadShardError``).
Train streams are a pure function of (seed, epoch, consumer, consumers): consumer k of C reads positions
k, k+C, ... of a seeded permutation of the files (or shards), pass after pass; shards additionally go
through a webdataset-style shuffle buffer.

References: the webdataset format and its shuffle buffer (github.com/webdataset/webdataset), the
``DistributedSampler`` idiom of disjoint per-rank slices, and torchvision's ImageFolder convention
(one sub-folder per class, sorted names → class indices).
"""
from __future__ import annotations

import itertools
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from movq.data.decode import IMAGE_EXTS, list_images
from movq.data.shards import (
    ShardProblem,
    expand_shards,
    manifest_classes,
    manifest_entries,
    read_manifests,
    read_shard,
    sample_label,
)

logger = logging.getLogger(__name__)


class DataError(RuntimeError):
    """The data gives nothing to train on: every file or shard a reader has is unusable."""


class BadShardError(DataError):
    """A damaged shard under ``data.on_bad_shard=error``."""


_warned: set = set()  # (shard, reason) already reported by this process


def _warn_once(path: str, problem: ShardProblem) -> None:
    if (path, problem.reason) not in _warned:
        _warned.add((path, problem.reason))
        counted = f"; {problem.count} sample(s) counted as {problem.reason}" if problem.count else ""
        logger.warning("shard %s %s%s", path, problem.detail, counted)


@dataclass
class _Raw:
    key: str
    data: Optional[bytes]
    label: int
    origin: int  # folder: file index; shards: id of this read of a shard
    skip: Optional[str] = None  # known unusable before decoding
    n: int = 1  # samples this record stands for (a shard problem: all it cost)


class _FolderHealth:
    """Skipping some files is fine; every file of the folder failing (since the last success)
    is an error, raised instead of looping forever."""

    def __init__(self, n_files: int, where: str):
        self.n_files, self.where = n_files, where
        self.failed: Optional[np.ndarray] = None  # files failed since the last success
        self.n_failed, self.reasons = 0, Counter()

    def result(self, raw: _Raw, reason: Optional[str]) -> None:
        if reason is None:
            self.failed, self.n_failed, self.reasons = None, 0, Counter()
            return
        if self.failed is None:
            self.failed = np.zeros(self.n_files, dtype=bool)
        self.reasons[reason] += raw.n
        if not self.failed[raw.origin]:
            self.failed[raw.origin] = True
            self.n_failed += 1
        if self.n_failed == self.n_files:
            raise DataError(
                f"none of the {self.n_files} image files under {self.where} could be used "
                f"(reasons: {dict(self.reasons)})"
            )


@dataclass
class _ShardRead:
    index: int
    path: str
    n: int = 0  # samples read so far
    pending: int = 0  # read but not yet decoded (they wait in the shuffle buffer)
    good: int = 0
    done: bool = False
    partial: bool = False  # every m-th sample only: see _ShardHealth
    whole: Optional[str] = None  # the shard as a whole could not be used: why
    reasons: Counter = field(default_factory=Counter)


# A partial read (every m-th sample of a shard) without a usable image marks its shard as failed only
# from this many unusable samples on: a few samples of a healthy shard may all be bad, that many hardly.
_PARTIAL_MIN = 16


class _ShardHealth:
    """Skipping some samples, or whole shards, is fine. A shard read to its end without one usable image
    is passed over; when every one of the reader's ``n_shards`` shards has failed since its last usable
    image, that is an error (``DataError``: wrong content, a broken writer, a damaged copy) instead of
    looping forever. With ``strict`` (``data.on_bad_shard=error``) the first such shard is."""

    def __init__(self, n_shards: int, where: str, strict: bool = False):
        self.n_shards, self.where, self.strict = n_shards, where, strict
        self.reads: dict[int, _ShardRead] = {}
        self._ids = itertools.count()
        self.failed: dict[int, str] = {}  # shard index → why, since the last usable image
        self.unusable = Counter()  # partial reads: unusable samples per shard since the last usable image

    def open(self, index: int, path: str, partial: bool = False) -> int:
        read_id = next(self._ids)
        self.reads[read_id] = _ShardRead(index, path, partial=partial)
        return read_id

    def sample(self, read_id: int) -> None:
        self.reads[read_id].n += 1
        self.reads[read_id].pending += 1

    def whole(self, read_id: int, detail: str) -> None:
        """The shard of this read could not be used at all (unreadable, checksum)."""
        self.reads[read_id].whole = detail

    def close(self, read_id: int) -> None:
        self.reads[read_id].done = True
        self._check(read_id)

    def result(self, raw: _Raw, reason: Optional[str]) -> None:
        state = self.reads[raw.origin]
        state.pending -= 1
        if reason is None:
            state.good += 1
        else:
            state.reasons[reason] += raw.n
        self._check(raw.origin)

    def _check(self, read_id: int) -> None:
        state = self.reads[read_id]
        if not state.done or state.pending:
            return
        del self.reads[read_id]
        if state.good:
            self.failed.clear()
            self.unusable.clear()
            return
        if state.whole is not None:
            why = state.whole
        else:
            self.unusable[state.index] += state.n
            if state.partial and self.unusable[state.index] < _PARTIAL_MIN:
                return
            why = (f"is unusable: none of its {state.n} samples holds a usable image"
                   + (f" (reasons: {dict(state.reasons)})" if state.reasons else ""))
        if self.strict:
            raise BadShardError(f"shard {state.path} {why} (data.on_bad_shard=error)")
        self.failed[state.index] = f"shard {state.path} {why}"
        if len(self.failed) >= self.n_shards:
            raise DataError(f"no usable image in any of the {self.n_shards} shard(s) of {self.where} "
                            f"this reader has; e.g. {self.failed[state.index]}")


def _pass_shares(consumer: int, consumers: int, n: int, perm) -> Iterator[list[int]]:
    """The share of consumer k in each pass p = 0, 1, ... over n items: the items of permutation
    ``perm(p)`` at positions k, k+C, k+2C... of the concatenation of all passes. Shares are
    disjoint within a pass, and a consumer gets items even when n < C (in some passes)."""
    for p in itertools.count():
        order = perm(p)
        first = (consumer - p * n) % consumers  # first j with (p*n + j) ≡ k (mod C)
        yield [int(order[j]) for j in range(first, n, consumers)]


class _FolderSource:
    def __init__(self, root: str, labels: bool, classes: Optional[list[str]] = None):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.files = list_images(self.root)
        if not self.files:
            raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTS)}) under {self.root}")
        self.count = len(self.files)
        self.classes = classes if classes is not None else folder_classes(self.root)
        self.labels = np.full(self.count, -1, dtype=np.int64)
        if labels:
            if not self.classes:
                raise ValueError(f"labels requested but {self.root} has no class sub-folders")
            index = {c: i for i, c in enumerate(self.classes)}
            for i, f in enumerate(self.files):
                top = f.split("/", 1)[0]
                if "/" not in f or top not in index:
                    raise ValueError(f"{self.root / f}: not in a class sub-folder of {self.classes[:5]}...")
                self.labels[i] = index[top]

    def describe(self) -> str:
        return str(self.root)

    def _sample(self, i: int) -> _Raw:
        try:
            data = (self.root / self.files[i]).read_bytes()
        except OSError:
            return _Raw(self.files[i], None, int(self.labels[i]), i, skip="io_error")
        return _Raw(self.files[i], data, int(self.labels[i]), i)

    def train_stream(self, epoch, seed, consumer, consumers, rng, buffer, health, *, batch=1,
                     workers=1) -> Iterator[_Raw]:
        """Rank r's files are positions r, r + W, ... of the passes' permutations; its worker w takes the
        batches j = w, w + workers, ... of B consecutive ones, which is the order in which the DataLoader
        hands them out. So every file of a rank's share is used once per epoch, whatever the number of
        workers (consumer = rank + W * worker, as for shards)."""
        world = consumers // workers
        rank, worker = consumer % world, consumer // world
        perm = lambda p: np.random.default_rng([seed, epoch, p, 1]).permutation(self.count)  # noqa: E731
        rank_files = itertools.chain.from_iterable(_pass_shares(rank, world, self.count, perm))
        for j, i in enumerate(rank_files):
            if (j // batch) % workers == worker:
                yield self._sample(i)

    def val_stream(self, consumer, consumers, health) -> Iterator[_Raw]:
        for i in range(consumer, self.count, consumers):
            yield self._sample(i)

    def health(self, consumer: int = 0, consumers: int = 1, train: bool = True) -> _FolderHealth:
        return _FolderHealth(self.count, str(self.root))


class _ShardSource:
    def __init__(self, pattern: Union[str, Sequence[str]], labels: bool, *, verify: bool = True,
                 on_bad_shard: str = "skip"):
        self.pattern = pattern
        self.shards = expand_shards(pattern)
        self.want_labels = labels
        self.verify, self.strict = verify, on_bad_shard == "error"
        # Shards may lie in several folders, each with its own manifest (or none).
        manifests = read_manifests(self.shards)
        entries = manifest_entries(manifests)
        self.entries = {u: entries[Path(u)] for u in self.shards if Path(u) in entries}
        self.count = None  # known only when a manifest lists every shard
        if len(self.entries) == len(self.shards):
            self.count = sum(e["count"] for e in self.entries.values())
        self.classes = manifest_classes(manifests)
        if labels and manifests and not self.classes:
            raise ValueError(f"labels requested but no manifest of {pattern} lists classes")
        # A folder stands for its .tar files: shards its manifest lists but it lacks were deleted or lost.
        present = {Path(u) for u in self.shards}
        self.missing = {str(p): e["count"] for p, e in entries.items() if p not in present} \
            if isinstance(pattern, str) and Path(pattern).expanduser().is_dir() else {}
        if self.missing:
            names = ", ".join(Path(p).name for p in list(self.missing)[:3])
            message = (f"{len(self.missing)} shard(s) listed in the manifest of {pattern} do not exist ({names}"
                       f"{', ...' if len(self.missing) > 3 else ''}): {sum(self.missing.values())} samples")
            if self.strict:
                raise FileNotFoundError(f"{message} (data.on_bad_shard=error)")
            logger.warning("%s, counted as shard_missing in every epoch", message)

    def describe(self) -> str:
        return str(self.pattern)

    def _read(self, index: int, health: _ShardHealth, offset: int = 0, stride: int = 1) -> Iterator[_Raw]:
        """The samples of shard ``index`` at positions offset, offset + stride, ... (others are not decoded),
        checked against its manifest entry: what it cannot give is one skip record weighing that much."""
        path = self.shards[index]
        entry = self.entries.get(path, {})
        read_id = health.open(index, path, partial=stride > 1)
        for item in read_shard(path, count=entry.get("count"), sha256=entry.get("sha256") if self.verify else None,
                               offset=offset, stride=stride):
            if isinstance(item, ShardProblem):
                if self.strict:
                    raise BadShardError(f"shard {path} {item.detail} (data.on_bad_shard=error)")
                _warn_once(path, item)
                if item.reason in ("shard_unreadable", "shard_checksum"):
                    health.whole(read_id, item.detail)
                if item.count:
                    health.sample(read_id)
                    yield _Raw(f"{path}:<{item.reason}>", None, -1, read_id, skip=item.reason, n=item.count)
            else:
                health.sample(read_id)
                yield self._raw(*item, read_id)
        health.close(read_id)

    def _raw(self, key: str, members: dict[str, bytes], read_id: int) -> _Raw:
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        label, skip = -1, None
        if self.want_labels:
            try:
                label = sample_label(members)
            except ValueError:
                skip = "bad_label"
            if self.classes and not 0 <= label < len(self.classes):
                skip = "bad_label"
        if ext is None:
            skip = "not_image"
        return _Raw(key, members.get(ext) if ext else None, label, read_id, skip)

    def train_stream(self, epoch, seed, consumer, consumers, rng, buffer, health, **_) -> Iterator[_Raw]:
        n = len(self.shards)
        perm = lambda p: np.random.default_rng([seed, epoch, p, 2]).permutation(n)  # noqa: E731
        # The buffer drains at the end of each pass's share, so that ranks never read ahead
        # into the next pass: within a pass, ranks see disjoint samples.
        if n >= consumers:  # whole shards per consumer
            for share in _pass_shares(consumer, consumers, n, perm):
                stream = itertools.chain.from_iterable(self._read(i, health) for i in share)
                yield from _shuffled(stream, rng, buffer)
            return
        # Fewer shards than ranks x workers: the consumers k, k + n, k + 2n, ... share shard
        # perm(p)[k mod n] of each pass, each taking every m-th sample of it (m of them share it),
        # so every sample is read once per pass instead of every consumer reading a shard's head.
        group = len(range(consumer % n, consumers, n))
        for p in itertools.count():
            shard = int(perm(p)[consumer % n])
            yield from _shuffled(self._read(shard, health, consumer // n, group), rng, buffer)

    def val_stream(self, consumer, consumers, health) -> Iterator[_Raw]:
        for i in range(consumer, len(self.shards), consumers):
            yield from self._read(i, health)

    def health(self, consumer: int = 0, consumers: int = 1, train: bool = True) -> _ShardHealth:
        """A train reader may come to every shard; a val reader reads its share once."""
        n = len(self.shards) if train else len(range(consumer, len(self.shards), consumers))
        return _ShardHealth(n, str(self.pattern), self.strict)


def _shuffled(stream: Iterator[_Raw], rng: np.random.Generator, size: int) -> Iterator[_Raw]:
    """webdataset-style shuffle buffer: grows to ``size`` (two in per one out), starts yielding
    after a few items so an epoch does not wait for a full buffer, drains at the end."""
    buf: list[_Raw] = []
    initial = min(size, 64)
    stream = iter(stream)
    for item in stream:
        buf.append(item)
        if len(buf) < size:
            nxt = next(stream, None)
            if nxt is not None:
                buf.append(nxt)
        if len(buf) >= initial:
            j = int(rng.integers(len(buf)))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    while buf:
        j = int(rng.integers(len(buf)))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()



def folder_classes(root: Path) -> Optional[list[str]]:
    """Sorted sub-folder names of ``root`` (the ImageFolder convention), or None if none."""
    names = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    return names or None
