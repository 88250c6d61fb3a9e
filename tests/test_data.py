"""Data: shard packing round trip, robust decoding with per-reason counts, the builtin dataset,
determinism and rank splits, clear failures on unreadable data."""
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import re
import stat
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from movq.cli import make_shards
from movq.config import DataConfig
from movq.data.builtin import BUILTIN_TRAIN_PHOTOS, BUILTIN_VAL_PHOTOS, builtin_dataset
from movq.data.decode import SkipSample, decode_image
from movq.data.shards import ShardWriter, iter_tar, read_manifest, write_manifest
from movq.data.stream import build_dataloader, build_dataset, train_batches
from movq.utils import atomic_write


def _rgb(seed, h=40, w=48):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _bytes(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _batches(cfg, split, **kw):
    return list(build_dataset(cfg, split, **kw))


def _sum(batches, field):
    total = Counter()
    for b in batches:
        total.update(b[field])
    return dict(total)


# --------------------------------------------------------------------------------------
# make_shards
# --------------------------------------------------------------------------------------
def test_make_shards_round_trip(tmp_path):
    src = tmp_path / "src"
    originals = {}
    for c, cls in enumerate(["cat", "dog"]):
        for i in range(3):
            path = src / cls / "sub" / f"{i}.png" if i == 2 else src / cls / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            img = _rgb(10 * c + i, 32, 32)
            img.save(path)
            originals[path.relative_to(src).as_posix()] = (np.asarray(img), c)
    (src / "cat" / "notes.txt").write_text("not an image")
    out = tmp_path / "shards"
    rc = make_shards.main([str(src), str(out), "--size", "32", "--shard-size", "4",
                           "--format", "png", "--labels", "folder"])
    assert rc == 0
    manifest = read_manifest(out)
    assert manifest["count"] == 6 and manifest["classes"] == ["cat", "dog"]
    assert manifest["image_size"] == 32 and manifest["skipped"] == {"not_image": 1}
    assert [s["count"] for s in manifest["shards"]] == [4, 2]
    for s in manifest["shards"]:
        assert hashlib.sha256((out / s["name"]).read_bytes()).hexdigest() == s["sha256"]
    assert make_shards.verify(out) == []
    # same input, same bytes
    rc = make_shards.main([str(src), str(tmp_path / "again"), "--size", "32", "--shard-size", "4",
                           "--format", "png", "--labels", "folder"])
    assert read_manifest(tmp_path / "again")["shards"] == manifest["shards"]

    paths = {}
    for shard in sorted(out.glob("*.tar")):
        for key, members in iter_tar(str(shard)):
            paths[key] = json.loads(members["json"])["path"]
    cfg = DataConfig(source="shards", train=str(out / "shard-{000000..000001}.tar"),
                     val=str(out / "shard-{000000..000001}.tar"), image_size=32, batch_size=4,
                     num_workers=0)
    assert build_dataset(cfg, "train").num_classes == 2
    batches = _batches(cfg, "val", labels=True)
    seen = 0
    for b in batches:
        for img, label, key in zip(b["image"], b["label"], b["key"]):
            arr, c = originals[paths[key]]
            pixels = ((img + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
            assert np.array_equal(pixels, arr) and label == c
            seen += 1
    assert seen == 6

    # --overwrite with nothing usable to pack: an error, and the existing shards stay
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    assert make_shards.main([str(tmp_path / "empty"), str(out), "--overwrite"]) != 0
    assert make_shards.verify(out) == [] and sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "shard-000000.tar", "shard-000001.tar"]

    (out / "shard-000001.tar").write_bytes(b"tampered")
    assert make_shards.main(["--verify", str(out)]) == 1


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    """Atomic writes (configs, manifests) get the permissions of a plain open(), not 0o600."""
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "sub" / "a.txt", "text")
        write_manifest(tmp_path, [{"name": "shard-000000.tar", "count": 1, "sha256": "0" * 64}])
    finally:
        os.umask(old)
    assert (tmp_path / "sub" / "a.txt").read_text() == "text"
    assert stat.S_IMODE((tmp_path / "sub" / "a.txt").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "manifest.json").stat().st_mode) == mode
    assert read_manifest(tmp_path)["count"] == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "manifest.json", "sub"]  # no temp file left


def _pack(tmp_path, name, per_class, classes=("cat", "dog")):
    """``per_class`` PNGs in each class sub-folder, packed (one shard) into tmp_path/name."""
    src = tmp_path / f"{name}_src"
    for c, cls in enumerate(classes):
        (src / cls).mkdir(parents=True)
        for i in range(per_class):
            _rgb(100 * c + i, 32, 32).save(src / cls / f"{name}{i}.png")
    make_shards.pack_folder(src, tmp_path / name, size=32, fmt="png", labels=True, log=lambda *a: None)
    return str(tmp_path / name / "shard-000000.tar")


def test_shards_in_several_folders(tmp_path):
    """Each folder's manifest counts its own shards (the same shard name in both folders stays
    apart) and gives the classes; manifests listing other classes are refused."""
    a, b = _pack(tmp_path, "a", 2), _pack(tmp_path, "b", 1)  # 4 and 2 samples, both shard-000000.tar
    cfg = DataConfig(source="shards", train=f"{a}::{b}", val=f"{b}::{a}", image_size=32, batch_size=1,
                     num_workers=0)
    assert build_dataset(cfg, "train").steps_per_epoch == 6
    assert build_dataset(cfg, "train").num_classes == 2
    val = _batches(cfg, "val", labels=True)
    assert sorted(int(v) for x in val for v in x["label"]) == [0, 0, 0, 1, 1, 1]
    # a folder without a manifest: no count, the other folder's classes
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "shard-000000.tar").write_bytes(Path(b).read_bytes())
    cfg.train = cfg.val = f"{a}::{tmp_path / 'c' / 'shard-000000.tar'}"
    assert build_dataset(cfg, "val", labels=True).num_classes == 2
    with pytest.raises(ValueError, match="epoch_length must be set"):
        build_dataset(cfg, "train")
    cfg.train = f"{a}::{_pack(tmp_path, 'd', 1, classes=('ant', 'dog'))}"
    differ = f"manifests of {tmp_path / 'a'} and {tmp_path / 'd'} list different classes"
    with pytest.raises(ValueError, match=re.escape(differ)):
        build_dataset(cfg, "train")


def test_make_shards_skips_bad_files(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    _rgb(0).save(src / "good.jpg")
    (src / "broken.jpg").write_bytes(_bytes(_rgb(1), "JPEG")[:200])
    (src / "fake.png").write_bytes(b"hello")
    Image.fromarray(np.full((20, 20), 65535, np.uint16)).save(src / "deep.png")
    manifest = make_shards.pack_folder(src, tmp_path / "out", size=32)
    assert manifest["count"] == 2
    assert manifest["skipped"] == {"truncated": 1, "corrupt": 1}
    assert manifest["converted"] == {"mode:I;16": 1, "upscaled": 1}
    assert "skipped 2" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match="--overwrite"):
        make_shards.pack_folder(src, tmp_path / "out", size=32)


# --------------------------------------------------------------------------------------
# Robust decoding
# --------------------------------------------------------------------------------------
def test_decode_modes():
    img, conv = decode_image(_bytes(Image.fromarray(np.full((8, 8), 65535, np.uint16))))
    assert conv == "mode:I;16" and img.mode == "RGB" and np.asarray(img).min() == 255
    la = Image.new("LA", (8, 8), (0, 0))  # fully transparent black → white background
    img, conv = decode_image(_bytes(la))
    assert conv == "mode:LA" and np.asarray(img).min() == 255
    p = _rgb(0, 8, 8).convert("P")
    assert decode_image(_bytes(p))[1] == "mode:P"
    assert decode_image(_bytes(_rgb(0, 8, 8).convert("CMYK"), "JPEG"))[1] == "mode:CMYK"
    assert decode_image(_bytes(_rgb(0, 8, 8)))[1] is None
    with pytest.raises(SkipSample) as e:
        decode_image(b"\x89PNG not really")
    assert e.value.reason == "corrupt"


@pytest.fixture
def planted(tmp_path):
    """One shard: 3 good RGB images, 5 convertible ones, 3 unusable members."""
    w = ShardWriter(tmp_path, prefix="bad", maxcount=100)
    w.write("good0", {"jpg": _bytes(_rgb(0), "JPEG"), "cls": b"0"})
    w.write("good1", {"png": _bytes(_rgb(1)), "cls": b"1"})
    w.write("good2", {"webp": _bytes(_rgb(2), "WEBP"), "cls": b"1"})
    w.write("cmyk", {"jpg": _bytes(_rgb(3).convert("CMYK"), "JPEG"), "cls": b"0"})
    w.write("deep", {"png": _bytes(Image.fromarray(np.full((40, 40), 30000, np.uint16))), "cls": b"0"})
    w.write("tiny", {"png": _bytes(_rgb(4, 8, 8)), "cls": b"0"})
    w.write("rgba", {"png": _bytes(_rgb(5).convert("RGBA")), "cls": b"0"})
    w.write("gray", {"jpg": _bytes(_rgb(6).convert("L"), "JPEG"), "cls": b"0"})
    w.write("truncated", {"jpg": _bytes(_rgb(7), "JPEG")[:300], "cls": b"0"})
    w.write("note", {"txt": b"a text member", "cls": b"0"})
    w.write("garbage", {"jpg": b"\xff\xd8 this is no jpeg", "cls": b"0"})
    w.close()
    return tmp_path / "bad-000000.tar"


_EXPECTED_SKIPS = {"truncated": 1, "not_image": 1, "corrupt": 1}
_EXPECTED_CONVERSIONS = {"mode:CMYK": 1, "mode:I;16": 1, "mode:RGBA": 1, "mode:L": 1, "upscaled": 1}


def test_planted_members_counted(planted):
    cfg = DataConfig(source="shards", train=str(planted), val=str(planted), image_size=32,
                     batch_size=3, num_workers=0, epoch_length=8)
    val = _batches(cfg, "val", labels=True)
    assert sum(len(b["key"]) for b in val) == 8
    assert _sum(val, "skipped") == _EXPECTED_SKIPS
    assert _sum(val, "converted") == _EXPECTED_CONVERSIONS
    deep = [img for b in val for img, k in zip(b["image"], b["key"]) if k == "deep"][0]
    assert torch.allclose(deep, torch.full_like(deep, round(30000 / 257) / 127.5 - 1))
    # training draws full batches whatever it skips, every image in [-1, 1]
    train = _batches(cfg, "train")
    assert len(train) == 2 and all(b["image"].shape == (3, 3, 32, 32) for b in train)
    assert all(b["image"].abs().max() <= 1 for b in train)
    assert set(_sum(train, "skipped")) <= set(_EXPECTED_SKIPS)


def test_planted_counts_reach_main_process(planted):
    """Counts travel inside the batches, so DataLoader worker processes do not lose them."""
    cfg = DataConfig(source="shards", train=str(planted), val=str(planted) + "::" + str(planted),
                     image_size=32, batch_size=4, num_workers=2)
    val = list(build_dataloader(cfg, "val"))
    assert _sum(val, "skipped") == {k: 2 * v for k, v in _EXPECTED_SKIPS.items()}
    assert _sum(val, "converted") == {k: 2 * v for k, v in _EXPECTED_CONVERSIONS.items()}


def test_folder_source_counts(tmp_path):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    _rgb(0).save(root / "a" / "x.png")
    _rgb(1).convert("P").save(root / "b" / "y.png")
    (root / "b" / "z.jpg").write_bytes(b"not a jpeg")
    cfg = DataConfig(source="folder", train=str(root), val=str(root), image_size=32,
                     batch_size=2, num_workers=0)
    val = _batches(cfg, "val", labels=True)
    assert _sum(val, "skipped") == {"corrupt": 1} and _sum(val, "converted") == {"mode:P": 1}
    assert sorted(k for b in val for k in b["key"]) == ["a/x.png", "b/y.png"]
    assert sorted(int(v) for b in val for v in b["label"]) == [0, 1]
    train = _batches(cfg, "train")
    assert len(train) == 1 and train[0]["label"].tolist() == [-1, -1]


# --------------------------------------------------------------------------------------
# Unreadable data fails clearly
# --------------------------------------------------------------------------------------
def test_unreadable_shard_fails_clearly(tmp_path):
    w = ShardWriter(tmp_path, prefix="text", maxcount=100)
    for i in range(3):
        w.write(f"s{i}", {"txt": b"no image here"})
    w.close()
    cfg = DataConfig(source="shards", train=str(tmp_path / "text-000000.tar"),
                     val=str(tmp_path / "text-000000.tar"), image_size=32, batch_size=2,
                     num_workers=0, epoch_length=4)
    with pytest.raises(RuntimeError, match=r"text-000000.tar is unusable.*not_image"):
        _batches(cfg, "train")
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file at all" * 40)
    cfg.val = str(tmp_path / "junk.tar")
    with pytest.raises(RuntimeError, match="junk.tar is unreadable"):
        _batches(cfg, "val")
    cfg.val = str(tmp_path / "missing-{0..2}.tar")
    with pytest.raises(FileNotFoundError, match="3 of 3 shards"):
        _batches(cfg, "val")


def test_unreadable_folder_fails(tmp_path):
    # (in-process: a DataLoader worker re-raises the same message, but torch then spends 5 s
    # shutting the failed worker down)
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(b"corrupt")
    cfg = DataConfig(source="folder", train=str(tmp_path), image_size=32, batch_size=2,
                     num_workers=0)
    with pytest.raises(RuntimeError, match="none of the 3 image files"):
        next(iter(build_dataloader(cfg, "train")))


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="data.val must be set"):
        build_dataset(DataConfig(source="folder", train=str(tmp_path)), "val")
    with pytest.raises(ValueError, match="split must be"):
        build_dataset(DataConfig(), "test")
    with pytest.raises(ValueError, match="no class labels"):
        build_dataset(DataConfig(), "train", labels=True)


# --------------------------------------------------------------------------------------
# The builtin dataset, determinism and ranks
# --------------------------------------------------------------------------------------
def _builtin_cfg(cache, **kw):
    base = dict(image_size=32, batch_size=4, num_workers=0, cache_dir=str(cache),
                builtin_train_size=48, builtin_val_size=16)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def builtin_cfg(tmp_path_factory):
    cfg = _builtin_cfg(tmp_path_factory.mktemp("cache"))
    builtin_dataset(cfg)
    return cfg


def _photos(root):
    return {json.loads(m["json"])["photo"] for t in sorted(root.glob("*.tar"))
            for _, m in iter_tar(str(t))}


def test_builtin_offline_split_and_seed(builtin_cfg, tmp_path):
    root = builtin_dataset(builtin_cfg)
    train, val = read_manifest(root / "train"), read_manifest(root / "val")
    assert (train["count"], len(train["shards"])) == (48, 8)
    assert (val["count"], len(val["shards"])) == (16, 4)
    assert _photos(root / "train") <= set(BUILTIN_TRAIN_PHOTOS)
    assert _photos(root / "val") <= set(BUILTIN_VAL_PHOTOS)
    assert not set(BUILTIN_TRAIN_PHOTOS) & set(BUILTIN_VAL_PHOTOS)
    # same seed, another cache: byte-identical; another seed: other crops
    again = read_manifest(builtin_dataset(_builtin_cfg(tmp_path / "a")) / "train")
    assert again["shards"] == train["shards"]
    other = read_manifest(builtin_dataset(_builtin_cfg(tmp_path / "b", seed=1)) / "train")
    assert other["shards"][0]["sha256"] != train["shards"][0]["sha256"]


def _build_in_child(cfg, queue):
    queue.put(str(builtin_dataset(cfg)))


def test_builtin_concurrent_build(tmp_path):
    cfg = _builtin_cfg(tmp_path, builtin_train_size=8, builtin_val_size=4)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(cfg, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    roots = {queue.get(timeout=5) for _ in procs}
    assert len(roots) == 1
    assert [p.name for p in (tmp_path / "builtin").iterdir()] == [Path(roots.pop()).name]


def _keys(batches):
    return [k for b in batches for k in b["key"]]


def test_ranks_distinct_and_val_once(builtin_cfg):
    r0 = _batches(builtin_cfg, "train", rank=0, world_size=2)
    r1 = _batches(builtin_cfg, "train", rank=1, world_size=2)
    assert len(r0) == len(r1) == 48 // (4 * 2)
    assert not set(_keys(r0)) & set(_keys(r1))
    v0 = _batches(builtin_cfg, "val", rank=0, world_size=2)
    v1 = _batches(builtin_cfg, "val", rank=1, world_size=2)
    assert sorted(_keys(v0) + _keys(v1)) == [f"{i:06d}" for i in range(16)]


def test_determinism_and_resume(builtin_cfg):
    cfg = DataConfig(**{**builtin_cfg.__dict__, "num_workers": 2})
    spe = build_dataset(cfg, "train").steps_per_epoch
    a = list(itertools.islice(train_batches(cfg), spe + 3))  # crosses an epoch boundary
    b = list(itertools.islice(train_batches(cfg, start_step=spe - 2), 5))
    for x, y in zip(a[spe - 2:], b):
        assert x["key"] == y["key"] and torch.equal(x["image"], y["image"])
    # the same batches in-process and from two DataLoader worker processes
    in_process = _batches(cfg, "train", epoch=1)
    assert len(in_process) == spe
    for x, y in zip(in_process, a[spe:]):
        assert x["key"] == y["key"] and torch.equal(x["image"], y["image"])
    assert _keys(a[:spe]) != _keys(a[spe:2 * spe])  # epochs are reshuffled
    flips = DataConfig(**{**cfg.__dict__, "random_flip": False})
    assert any(not torch.equal(x["image"], y["image"])
               for x, y in zip(_batches(flips, "train"), a[:spe]))


def test_fewer_shards_than_readers_still_cover_every_sample(tmp_path):
    """One shard, 2 ranks x 2 workers: the four readers split its samples instead of all reading
    its head (an epoch then sees every sample once)."""
    for i in range(32):
        (tmp_path / "src").mkdir(exist_ok=True)
        _rgb(i, 16, 16).save(tmp_path / "src" / f"{i:02d}.png")
    make_shards.pack_folder(tmp_path / "src", tmp_path / "sh", size=16, fmt="png", labels=False, log=lambda *a: None)
    cfg = DataConfig(source="shards", train=str(tmp_path / "sh" / "shard-000000.tar"), image_size=16,
                     batch_size=2, num_workers=2, shuffle_buffer=8)
    keys = [k for r in range(2) for b in _batches(cfg, "train", rank=r, world_size=2) for k in b["key"]]
    assert len(keys) == 32 and len(set(keys)) == 32, sorted(keys)


@pytest.mark.parametrize("workers", [1, 3, 4])
def test_folder_epoch_uses_every_file_once_whatever_the_workers(tmp_path, workers):
    """10 batches of 10 from 100 files: each worker takes whole batches of its rank's share in the
    order the DataLoader hands them out, so no worker runs short or reads into the next pass."""
    for i in range(100):
        (tmp_path / "img").mkdir(exist_ok=True)
        _rgb(i, 8, 8).save(tmp_path / "img" / f"{i:03d}.png")
    cfg = DataConfig(source="folder", train=str(tmp_path / "img"), image_size=8, batch_size=10,
                     num_workers=workers)
    keys = _keys(_batches(cfg, "train"))
    assert len(keys) == 100 and len(set(keys)) == 100


def test_a_shard_folder_stands_for_its_shards(tmp_path):
    tar = _pack(tmp_path, "a", 2)
    cfg = DataConfig(source="shards", train=str(Path(tar).parent), val=str(Path(tar).parent), image_size=32,
                     batch_size=2, num_workers=0)
    assert len(_keys(_batches(cfg, "val"))) == 4
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="holds no .tar files"):
        build_dataset(DataConfig(source="shards", train=str(tmp_path / "none")), "train")


def test_atomic_folder_publishes_once_and_keeps_a_copy_published_first(tmp_path):
    from movq.utils import atomic_folder

    root = tmp_path / "cache" / "ds"
    with atomic_folder(root) as tmp:
        (tmp / "a.txt").write_text("first")
        (tmp / "spec.json").write_text("{}")
    assert (root / "a.txt").read_text() == "first"
    with atomic_folder(root) as tmp:  # another builder finishing second: the first copy stays
        (tmp / "a.txt").write_text("second")
        (tmp / "spec.json").write_text("{}")
    assert (root / "a.txt").read_text() == "first"
    assert [p.name for p in root.parent.iterdir()] == ["ds"]  # no build folder left behind
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "failed") as tmp:
            raise RuntimeError("build failed")
    assert not (tmp_path / "failed").exists() and [p.name for p in tmp_path.iterdir()] == ["cache"]
