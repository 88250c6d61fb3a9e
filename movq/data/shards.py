"""The shard format: webdataset-style tar shards plus a ``manifest.json`` with a sha256 per shard.

Reference: the webdataset format (github.com/webdataset/webdataset: consecutive tar members that
share a key, ``{key}.jpg`` + ``{key}.cls``, form one sample). Writing (``ShardWriter``: fixed tar
headers (``TarShard``), so equal input gives byte-identical shards and checksums; ``write_manifest``) and
reading (``read_manifest``; ``read_manifests``, ``manifest_counts`` and ``manifest_classes`` for
shards spread over several folders; ``expand_shards`` for brace patterns, ``iter_tar`` per sample, from a
file or a webdataset URL: ``pipe:CMD``, ``http(s)://``; ``sample_label`` from ``.cls`` or ``.json``;
``read_shard``: the samples of one shard checked against its manifest entry). Decoding the samples and
streaming them to ranks is ``movq.data``'s job.

Every sample a manifest promises is read or counted as skipped by reason (``ShardProblem``):

* ``shard_unreadable`` — the file cannot be opened or is not a tar (its promised samples);
* ``shard_checksum`` — its sha256 differs from the manifest's (checked before any sample is used);
* ``shard_truncated`` — it breaks off, or ends, before the samples promised: promised − read (tarfile
  takes a damaged header after the first one for the end of the archive, so "ends early" and "breaks
  off" cannot always be told apart; the warning says which);
* ``shard_missing`` — the manifest lists it but the folder does not hold it (counted by the reader).

A shard without a manifest entry counts a problem as 1 (how many samples it had is unknown).
"""
from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from movq.utils import atomic_write, sha256_file

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "movq-shards/1"


class TarShard:
    """One tar shard, written under a temporary name and renamed into place by ``close()``.

    Members get fixed headers (no time, owner or umask), so equal samples give byte-identical shards
    and checksums. ``close()`` returns the manifest entry ``{name, count, sha256}``; leaving a ``with``
    block by an exception removes the partial file instead."""

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """One sample: ``{key}.{ext}`` for every member."""
        if "." in key.rpartition("/")[2] or not key:
            raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' in its last part")
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> dict:
        self._tar.close()
        digest = sha256_file(self._tmp)
        os.replace(self._tmp, self.path)
        return {"name": self.path.name, "count": self.count, "sha256": digest}

    def abort(self) -> None:
        self._tar.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> TarShard:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.entry = self.close()
        else:
            self.abort()


class ShardWriter:
    """Writes samples to ``out_dir/{prefix}-{i:06d}.tar``, ``maxcount`` samples per shard
    (:class:`TarShard` each)."""

    def __init__(self, out_dir: Union[str, os.PathLike], prefix: str = "shard", maxcount: int = 1000):
        if maxcount < 1:
            raise ValueError(f"maxcount must be ≥ 1, got {maxcount}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.maxcount = prefix, maxcount
        self.shards: list[dict] = []  # {"name", "count", "sha256"} per finished shard
        self._shard: Optional[TarShard] = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if "." in key:
            raise ValueError(f"sample key {key!r} must be non-empty and contain no '.'")
        if self._shard is None:
            self._shard = TarShard(self.out_dir / f"{self.prefix}-{len(self.shards):06d}.tar")
        self._shard.add(key, members)
        if self._shard.count >= self.maxcount:
            self.flush()

    def flush(self) -> None:
        """End the current shard now (the next sample starts a new one)."""
        if self._shard is not None:
            self.shards.append(self._shard.close())
            self._shard = None

    def close(self) -> list[dict]:
        self.flush()
        return self.shards


def shard_entries_problem(shards: Any) -> Optional[str]:
    """What is wrong with a manifest's ``shards`` list, or None (each entry: name, count ≥ 0, sha256)."""
    if not isinstance(shards, list):
        return "'shards' must be a list of {name, count, sha256} entries"
    for s in shards:
        if not isinstance(s, dict) or not {"name", "count", "sha256"} <= s.keys():
            return "'shards' must be a list of {name, count, sha256} entries"
        if not isinstance(s["count"], int) or isinstance(s["count"], bool) or s["count"] < 0:
            return f"shard {s['name']!r} has count {s['count']!r}, not a number of samples"
    return None


def total_count_problem(manifest: dict) -> Optional[str]:
    """What is wrong with a manifest's top-level ``count`` (optional; if given, the sum of its shards')."""
    if "count" not in manifest:
        return None
    count, total = manifest["count"], sum(s["count"] for s in manifest["shards"])
    if not isinstance(count, int) or isinstance(count, bool) or count != total:
        return f"its count {count!r} is not the sum of its shards' counts ({total})"
    return None


def write_manifest(out_dir: Union[str, os.PathLike], shards: list[dict], **info: Any) -> dict:
    """Write ``manifest.json``: format, count, shards (name, count, sha256) and ``info``
    (classes, image_size, image_format, skipped, ...). Atomic (``atomic_write``)."""
    manifest = {"format": MANIFEST_FORMAT, "count": sum(s["count"] for s in shards), **info,
                "shards": shards}
    atomic_write(Path(out_dir) / MANIFEST_NAME, json.dumps(manifest, indent=1))
    return manifest


def read_manifest(directory: Union[str, os.PathLike]) -> Optional[dict]:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format is not {MANIFEST_FORMAT}")
        problem = shard_entries_problem(manifest.get("shards"))
        if problem:
            raise ValueError(problem)
        problem = total_count_problem(manifest)
        if problem:
            raise ValueError(problem)
    except ValueError as e:
        raise ValueError(f"{path} is not a valid shard manifest: {e}") from None
    return manifest


def read_manifests(shards: Sequence[str]) -> dict[Path, dict]:
    """The manifest of each distinct folder holding ``shards``, by folder in first-seen order;
    folders without a ``manifest.json`` are left out. A pattern may span several folders, and
    each folder's manifest describes only its own shards."""
    manifests = {}
    for folder in dict.fromkeys(Path(s).parent for s in shards if not is_url(s)):  # URLs: none is read
        manifest = read_manifest(folder)
        if manifest is not None:
            manifests[folder] = manifest
    return manifests


def manifest_entries(manifests: dict[Path, dict]) -> dict[Path, dict]:
    """Each listed shard's entry ``{name, count, sha256}``, keyed by its path (folder / name)."""
    return {folder / s["name"]: s for folder, m in manifests.items() for s in m["shards"]}


def manifest_counts(manifests: dict[Path, dict]) -> dict[Path, int]:
    """Samples per shard, keyed by the shard's path (folder / name), so equal shard names in
    different folders stay apart."""
    return {folder / s["name"]: s["count"] for folder, m in manifests.items() for s in m["shards"]}


def manifest_classes(manifests: dict[Path, dict]) -> Optional[list[str]]:
    """The class names the manifests list (None if none does). Every manifest that lists classes
    must list the same ones, as a label means one class across all shards: ValueError otherwise,
    naming two folders that differ."""
    first, classes = None, None
    for folder, m in manifests.items():
        listed = m.get("classes") or None
        if listed is None:
            continue
        if classes is None:
            first, classes = folder, list(listed)
        elif list(listed) != classes:
            raise ValueError(
                f"the shard manifests of {first} and {folder} list different classes "
                f"({classes[:5]}... vs {list(listed)[:5]}...): labels would mean different classes; "
                f"use shards made with the same class list"
            )
    return classes


def is_url(shard: str) -> bool:
    """Whether a shard is read through a command (``pipe:CMD``, ``https://...``) rather than opened as a file."""
    return shard.startswith("pipe:") or "://" in shard


def shard_command(url: str) -> str:
    """The shell command whose stdout is the tar of a shard URL (webdataset's URLs): ``pipe:CMD`` runs CMD,
    ``http(s)://`` goes through curl. Object stores are read through ``pipe:`` with their own tool, so that
    credentials stay theirs: a bare ``s3://`` or ``gs://`` URL is an error that shows the pipe to write."""
    if url.startswith("pipe:"):
        return url[len("pipe:"):]
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("http", "https"):
        return f"curl --silent --show-error --fail --location {shlex.quote(url)}"
    hints = {"s3": f"'pipe:aws s3 cp {url} -'", "gs": f"'pipe:gsutil cat {url}'"}
    if scheme in hints:
        raise ValueError(f"shard {url}: read {scheme}:// through a pipe, e.g. {hints[scheme]}")
    raise ValueError(f"shard {url}: unknown URL scheme {scheme!r} (local paths, pipe:CMD, http:// and https:// are read)")


class _CommandStream:
    """The stdout of a shard's command; at its end a non-zero exit status is an ``OSError`` with the command's
    stderr (a missing object, a failed download), not a silently short shard."""

    def __init__(self, url: str, proc: subprocess.Popen, stderr):
        self.url, self.proc, self.stderr = url, proc, stderr

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n)
        if not data and self.proc.wait() != 0:
            self.stderr.seek(0)
            said = self.stderr.read().decode(errors="replace").strip().splitlines()
            raise OSError(f"{self.url!r} exited with status {self.proc.returncode}"
                          + (f": {said[-1].strip()}" if said else ""))
        return data


@contextmanager
def open_shard(shard: str) -> Iterator:
    """A readable binary stream of a shard: a local file, or a URL's command output (``shard_command``)."""
    if not is_url(shard):
        with open(shard, "rb") as f:
            yield f
        return
    command = shard_command(shard)
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=stderr)
        try:
            yield _CommandStream(shard, proc, stderr)
        finally:  # also when the reader stops early: end the command, never wait on a full pipe
            proc.stdout.close()
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def sample_label(members: dict[str, bytes]) -> int:
    """The class index of a webdataset sample: its ``.cls`` member (an integer as text), else the ``"label"``
    or ``"cls"`` key of its ``.json`` (an integer). ``ValueError`` when it has neither."""
    if "cls" in members:
        return int(members["cls"].decode().strip())
    if "json" in members:
        meta = json.loads(members["json"])
        for key in ("label", "cls"):
            value = meta.get(key) if isinstance(meta, dict) else None
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    raise ValueError('no class label (a .cls member, or "label" / "cls" in the .json)')


def expand_shards(pattern: Union[str, Sequence[str]]) -> list[str]:
    """Brace patterns (``data/train-{000000..000127}.tar``, several joined by ``::``) → paths or URLs
    (``pipe:curl -s https://host/train-{000000..000127}.tar``, ``https://...``; see ``shard_command``); a
    folder stands for its ``*.tar`` files (as tools/tokenize_dataset.py takes it). Every local shard must
    exist: a missing one fails here, naming it (a URL fails when it is read)."""
    from webdataset.shardlists import expand_urls

    if isinstance(pattern, str) and Path(pattern).expanduser().is_dir():
        urls = sorted(str(p) for p in Path(pattern).expanduser().glob("*.tar"))
        if not urls:
            raise ValueError(f"shard folder {pattern} holds no .tar files")
        return urls
    urls = list(pattern) if not isinstance(pattern, str) else expand_urls(pattern)
    if not urls:
        raise ValueError(f"shard pattern {pattern!r} matches no shards")
    for u in urls:
        if is_url(u):
            shard_command(u)  # an unknown scheme fails now, not in a loader worker
    missing = [u for u in urls if not is_url(u) and not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(urls)} shards of {pattern!r} do not exist, e.g. {missing[:3]}"
        )
    return urls


def iter_tar(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of a shard file or URL; key = member path up to the first '.' of its name.
    A tar that breaks off raises ``tarfile.TarError``/``OSError`` after the samples before it."""
    key, members = None, {}
    with open_shard(path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for m in tar:
            if not m.isfile():
                continue
            head, _, base = m.name.rpartition("/")
            stem, _, ext = base.partition(".")
            this = f"{head}/{stem}" if head else stem
            if key is not None and this != key:
                yield key, members
                members = {}
            key = this
            members[ext.lower()] = tar.extractfile(m).read()
    if key is not None:
        yield key, members


# --------------------------------------------------------------------------------------
# Reading one shard against its manifest entry
# --------------------------------------------------------------------------------------
@dataclass
class ShardProblem:
    """Samples of a shard that could not be read: ``reason`` (see the module docstring), how many
    (``count``; 0 for a warning only: more samples than promised) and what happened (``detail``, a
    phrase that follows the shard's path: "is unreadable (empty file)")."""

    reason: str
    count: int
    detail: str


# sha256 verdicts of this process: (path, size, mtime) → None (matches) or a ShardProblem template
_verified: dict[tuple, Optional[tuple[str, str]]] = {}


def _check(path: str, sha256: Optional[str]) -> Optional[tuple[str, str]]:
    """``(reason, detail)`` when the file cannot be used as a whole, else None. The sha256 is computed
    once per process and file version (the verdict is remembered by size and modification time). A URL
    has no manifest entry and nothing to check before it is read."""
    if is_url(path):
        return None
    try:
        st = os.stat(path)
    except OSError as e:
        return "shard_unreadable", f"is unreadable ({e.strerror})"
    if st.st_size == 0:
        return "shard_unreadable", "is unreadable (empty file)"
    if sha256 is None:
        return None
    key = (path, st.st_size, st.st_mtime_ns, sha256)
    if key not in _verified:
        from movq.utils import sha256_file

        try:
            digest = sha256_file(path)
        except OSError as e:
            return "shard_unreadable", f"is unreadable ({e.strerror})"
        _verified[key] = None if digest == sha256 else (
            "shard_checksum", f"is damaged: its sha256 {digest[:16]}… is not the manifest's {sha256[:16]}…")
    return _verified[key]


def read_shard(path: str, *, count: Optional[int] = None, sha256: Optional[str] = None, offset: int = 0,
               stride: int = 1) -> Iterator[Union[tuple[str, dict[str, bytes]], ShardProblem]]:
    """The samples ``(key, members)`` of shard ``path`` at positions offset, offset + stride, ..., then at
    most one ``ShardProblem`` for what could not be read of them. ``count`` and ``sha256`` are its
    manifest entry's (None: unknown): with ``sha256`` the whole file is checked before any sample is
    yielded, and a mismatch yields only the problem (all of this reader's promised samples)."""
    def mine(total: int) -> int:  # positions of this reader among the first ``total``
        return len(range(offset, total, stride))

    whole = _check(path, sha256)
    if whole is not None:
        yield ShardProblem(whole[0], mine(count) if count is not None else 1, whole[1])
        return
    total = read = 0
    try:
        for i, sample in enumerate(iter_tar(path)):
            total = i + 1
            if i >= offset and (i - offset) % stride == 0:
                read += 1
                yield sample
    except (tarfile.TarError, OSError, EOFError) as e:
        promised = mine(count) if count is not None else None
        lost = max(promised - read, 0) if promised is not None else 1
        cause = f"{type(e).__name__}: {e}"
        if total == 0:
            yield ShardProblem("shard_unreadable", max(lost, 1), f"is unreadable ({cause})")
        elif lost:
            of = f" of {count}" if count is not None else ""
            yield ShardProblem("shard_truncated", lost, f"breaks off after {total}{of} samples ({cause})")
        return
    if count is not None and total != count:
        lost = max(mine(count) - read, 0)
        yield ShardProblem("shard_truncated" if total < count else "shard_long", lost,
                           f"ends after {total} samples, its manifest says {count}")
