"""Training images: decoding, and the per-rank batch stream over webdataset tar shards, plain
image folders, or the built-in offline dataset.

The shard format (writing, manifests, reading tars) lives in ``movq.shards``, the raw sample
sources (folders, shards, per-rank read order, health checks) in ``movq.sources`` and the built-in
dataset in ``movq.builtin_data``; their public names are re-exported here.

References: the webdataset format (github.com/webdataset/webdataset: consecutive tar members that
share a key, ``{key}.jpg`` + ``{key}.cls``, form one sample), the ``DistributedSampler.set_epoch``
idiom, and taming-transformers' loaders (shorter side to S, then an S×S crop).

What the trainer gets from ``build_dataloader(cfg, split, rank=, world_size=, labels=, epoch=)``:
a ``DataLoader`` yielding dicts

* ``image``: float32 [B, 3, S, S] in [-1, 1] (S = ``cfg.image_size``),
* ``label``: int64 [B], the class index, or -1 when ``labels=False`` (``labels=True`` on an
  unlabeled dataset raises),
* ``key``: list of B sample keys (file paths or shard keys),
* ``skipped`` / ``converted``: dict reason → count, for that worker since its previous batch;
  the trainer sums them over batches (and ranks) to report how much bad input it met.
  Skip reasons: corrupt, truncated, not_image, too_large, empty, unsupported_mode, bad_label,
  io_error, and for whole or partial shards (each counting the samples its manifest promised and the
  reader did not get) shard_unreadable, shard_checksum, shard_truncated, shard_missing
  (see ``movq.data.shards``). Conversions: ``mode:<PIL mode>`` (L, LA, P, RGBA, CMYK, I;16, ...)
  and ``upscaled`` (an image smaller than S).

``train`` is epoch-based: every rank yields exactly ``steps_per_epoch = epoch_length //
(batch_size * world_size)`` full batches per epoch, so ranks stay in step however many images
are skipped. Epoch ``e`` is a pure function of (seed, e, rank, world_size, num_workers); ranks
draw disjoint slices of each epoch's permutation (of files, or of shards followed by a
per-worker shuffle buffer), topped up from the next permutation when skips (of images or of whole
shards) or a long epoch need it; a bad shard is bad on every read, so the stream stays a pure
function of its position and a resume never dies where the run did. To resume at step N: build epoch
``N // steps_per_epoch`` and drop its first ``N % steps_per_epoch`` batches (``train_batches(start_step=N)`` does this; accelerate's
``skip_first_batches`` gives the same result).

``val`` is finite and deterministic (no augmentation, centre crop); each image is seen once
across ranks (folders split by file, shards by shard: make at least world_size × num_workers
val shards). Ranks may get different numbers of batches, so the trainer accumulates metric
sums locally and reduces them once after the loop (no per-batch gather).

These loaders are already per rank: do not pass them through ``accelerator.prepare`` (it would
re-split or dispatch them); move batches to the device yourself.
"""
from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from movq.config import DataConfig
from movq.data.builtin import builtin_dataset
from movq.data.decode import SkipSample, images_from_uint8, load_image
from movq.data.sources import _FolderSource, _ShardSource, folder_classes

logger = logging.getLogger(__name__)

_MAX_LOGGED = 5  # skip warnings per reason and worker; the counts themselves always go on



# --------------------------------------------------------------------------------------
# The per-rank batch stream
# --------------------------------------------------------------------------------------
class ImageStream(IterableDataset):
    """Batches of one rank (see the module docstring). ``num_classes``: from the manifest or
    the class folders, else None. ``steps_per_epoch``: batches per rank per train epoch."""

    def __init__(self, source, *, train: bool, image_size: int, batch_size: int, rank: int,
                 world_size: int, num_workers: int, seed: int, epoch: int, labels: bool,
                 random_flip: bool, epoch_length: Optional[int], shuffle_buffer: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1 or image_size < 1:
            raise ValueError(f"batch_size and image_size must be ≥ 1, got {batch_size}, {image_size}")
        self.source, self.train = source, train
        self.image_size, self.batch_size = image_size, batch_size
        self.rank, self.world_size = rank, world_size
        self.num_workers = max(1, num_workers)  # 0 workers: one in-process "worker"
        self.seed = seed % 2**32  # SeedSequence wants a non-negative entropy
        self.epoch, self.labels, self.random_flip = epoch, labels, random_flip
        self.shuffle_buffer = shuffle_buffer
        self.num_classes = len(source.classes) if source.classes else None
        self.steps_per_epoch = 0
        if train:
            length = epoch_length or source.count
            if not length:
                raise ValueError(
                    f"data.epoch_length must be set: {source.describe()} has no manifest.json "
                    "to count its samples (tools/make_shards.py writes one; shards made elsewhere, and shards "
                    "read through URLs, need data.epoch_length=<samples per epoch>)"
                )
            self.steps_per_epoch = max(1, length // (batch_size * world_size))
        elif isinstance(source, _ShardSource) and len(source.shards) < world_size * self.num_workers:
            logger.warning(
                "%d val shards for %d ranks × %d workers: some readers get none (each image is "
                "still seen once)", len(source.shards), world_size, self.num_workers,
            )

    def set_epoch(self, epoch: int) -> None:
        """Takes effect at the next ``iter`` (workers are not persistent)."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.train:
            return self.steps_per_epoch
        if isinstance(self.source, _FolderSource):  # val: exact unless images are skipped
            C = self.world_size * self.num_workers
            ks = [self.rank + self.world_size * w for w in range(self.num_workers)]
            return sum(-(-len(range(k, self.source.count, C)) // self.batch_size) for k in ks)
        raise TypeError("the number of val batches of a shard dataset is not known in advance")

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None:
            if info.num_workers != self.num_workers:
                raise RuntimeError(
                    f"dataset built for {self.num_workers} workers but the DataLoader has "
                    f"{info.num_workers}: use build_dataloader, or the same data.num_workers"
                )
            _worker_signals()
            yield from self._worker(info.id)
            return
        # Iterated in-process: interleave the workers' streams exactly as DataLoader would
        # (round robin, exhausted workers dropped), so the batches do not depend on how many
        # processes actually run them.
        active = [self._worker(w) for w in range(self.num_workers)]
        while active:
            for gen in list(active):
                batch = next(gen, None)
                if batch is None:
                    active.remove(gen)
                else:
                    yield batch

    def _worker(self, w: int) -> Iterator[dict]:
        consumer = self.rank + self.world_size * w
        consumers = self.world_size * self.num_workers
        base = [self.seed, self.epoch, self.rank, self.world_size, self.num_workers, w]
        shuffle_rng = np.random.default_rng(base + [3])
        aug_rng = np.random.default_rng(base + [4])
        health = self.source.health(consumer, consumers, self.train)
        if self.train:
            quota = len(range(w, self.steps_per_epoch, self.num_workers))
            if quota == 0:
                return
            raws = self.source.train_stream(self.epoch, self.seed, consumer, consumers, shuffle_rng,
                                            self.shuffle_buffer, health, batch=self.batch_size,
                                            workers=self.num_workers)
        else:
            quota = None
            raws = self.source.val_stream(consumer, consumers, health)
        images, labels, keys = [], [], []
        skipped, converted, logged = Counter(), Counter(), Counter()
        missing = getattr(self.source, "missing", None)
        if self.train and missing and self.rank == 0 and w == 0:  # once per epoch, in its first batch
            skipped["shard_missing"] += sum(missing.values())
        done, held = 0, None  # val: the last full batch, held back to carry trailing skips
        for raw in raws:
            reason = raw.skip
            if reason is None:
                try:
                    arr, conversions = self._load(raw.data, aug_rng)
                except SkipSample as e:
                    reason = e.reason
                    if logged[reason] < _MAX_LOGGED:
                        logger.warning("skipping %s (%s)", raw.key, e)
            health.result(raw, reason)
            if reason is not None:
                skipped[reason] += raw.n
                logged[reason] += 1
                continue
            converted.update(conversions)
            images.append(arr)
            labels.append(raw.label)
            keys.append(raw.key)
            if len(images) < self.batch_size:
                continue
            batch = _collate(images, labels, keys, skipped, converted)
            images, labels, keys = [], [], []
            skipped, converted = Counter(), Counter()
            if quota is not None:
                yield batch
                done += 1
                if done == quota:
                    return
            else:
                if held is not None:
                    yield held
                held = batch
        if images:
            if held is not None:
                yield held
            held = _collate(images, labels, keys, skipped, converted)
        elif held is not None:
            held["skipped"] = dict(Counter(held["skipped"]) + skipped)
        elif skipped:
            logger.warning("val: this reader got no usable image; skipped %s", dict(skipped))
        if held is not None:
            yield held

    def _load(self, data: bytes, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
        arr, conversions = load_image(data, self.image_size, rng if self.train else None)  # [S, S, 3]
        if self.train and self.random_flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        return arr, conversions



def _worker_signals() -> None:
    """A loader worker leaves the signals of a stopping run to its main process. SIGINT (Ctrl-C), SIGTERM
    (``timeout``, ``kill -TERM -PGID``, scancel, container stops: the whole process group) and SIGUSR1
    (SLURM's warning) reach the workers too; dying of them would take the batches from under the main
    process before it has saved. So workers ignore them and keep serving until the main process ends
    them: its loader shuts them down, or at exit ``_kill_loader_workers`` does; a worker whose main
    process died exits by itself (torch's watchdog)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _kill_loader_workers() -> None:
    """At exit, before multiprocessing terminates (SIGTERM, which workers ignore) and joins its daemonic
    children, which would then wait for them forever: kill them outright. DataLoader workers are daemonic;
    any daemonic child would be terminated at exit anyway."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


_kill_registered = False


def _register_worker_cleanup() -> None:
    global _kill_registered
    if not _kill_registered:  # after multiprocessing's own exit hook, so it runs before it
        atexit.register(_kill_loader_workers)
        _kill_registered = True


def _collate(images, labels, keys, skipped: Counter, converted: Counter) -> dict:
    x = images_from_uint8(torch.from_numpy(np.stack(images))).contiguous()  # [B, 3, S, S] in [-1, 1]
    return {"image": x, "label": torch.tensor(labels, dtype=torch.int64), "key": keys,
            "skipped": dict(skipped), "converted": dict(converted)}


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------
def _source(cfg: DataConfig, split: str, labels: bool):
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if cfg.source == "builtin":
        if labels:
            raise ValueError("the builtin dataset has no class labels; use data.source=folder or shards")
        root = builtin_dataset(cfg) / split
        return _ShardSource(str(root), labels, verify=cfg.verify, on_bad_shard=cfg.on_bad_shard)  # its .tar files
    if cfg.source == "shapes":  # labelled: the manifests list the shape classes
        from movq.data.shapes import shapes_split

        return _ShardSource(str(shapes_split(cfg, split)), labels, verify=cfg.verify, on_bad_shard=cfg.on_bad_shard)
    if cfg.source not in ("folder", "shards"):
        raise ValueError(f"data.source must be builtin, shapes, folder or shards, got {cfg.source!r}")
    path = getattr(cfg, split)
    if not path:
        raise ValueError(f"data.{split} must be set for data.source={cfg.source}")
    if cfg.source == "shards":
        return _ShardSource(path, labels, verify=cfg.verify, on_bad_shard=cfg.on_bad_shard)
    classes = None
    if labels and split == "val" and cfg.train:
        classes = folder_classes(Path(cfg.train).expanduser())  # indices as in training
    return _FolderSource(path, labels, classes)


def build_dataset(cfg: DataConfig, split: str, *, rank: int = 0, world_size: int = 1,
                  labels: bool = False, epoch: int = 0) -> ImageStream:
    """The ``ImageStream`` of one rank; ``build_dataloader`` wraps it in a DataLoader."""
    return ImageStream(
        _source(cfg, split, labels), train=split == "train", image_size=cfg.image_size,
        batch_size=cfg.batch_size, rank=rank, world_size=world_size,
        num_workers=cfg.num_workers, seed=cfg.seed, epoch=epoch, labels=labels,
        random_flip=cfg.random_flip, epoch_length=cfg.epoch_length,
        shuffle_buffer=cfg.shuffle_buffer,
    )


def build_dataloader(cfg: DataConfig, split: str, *, rank: int = 0, world_size: int = 1,
                     labels: bool = False, epoch: int = 0) -> DataLoader:
    """Per-rank loader of dict batches (see the module docstring). ``dl.dataset`` is the
    ``ImageStream`` (``num_classes``, ``steps_per_epoch``, ``set_epoch``)."""
    ds = build_dataset(cfg, split, rank=rank, world_size=world_size, labels=labels, epoch=epoch)
    if cfg.num_workers > 0:
        _register_worker_cleanup()
    # Its own generator: creating an iterator draws a base seed (unused: workers seed themselves),
    # which would otherwise shift the global torch RNG (dropout, ...) of a resumed run by one draw.
    return DataLoader(ds, batch_size=None, num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator(), worker_init_fn=_worker_init if cfg.num_workers > 0 else None)


def _worker_init(worker_id: int) -> None:
    _worker_signals()  # at once: ImageStream.__iter__ runs only when the first batch is asked for


def train_batches(cfg: DataConfig, *, rank: int = 0, world_size: int = 1, labels: bool = False,
                  start_step: int = 0) -> Iterator[dict]:
    """Endless training batches from step ``start_step`` on: epoch after epoch, the same
    batches a run started at step 0 would see at those steps."""
    dl = build_dataloader(cfg, "train", rank=rank, world_size=world_size, labels=labels)
    spe = dl.dataset.steps_per_epoch
    epoch, skip = divmod(start_step, spe)
    while True:
        dl.dataset.set_epoch(epoch)
        yield from itertools.islice(dl, skip, None)
        epoch, skip = epoch + 1, 0


