"""Shards beyond local tars with a movq manifest: webdataset URLs (``pipe:``, ``https://``; ``s3://`` through
``pipe:``), labels from ``.cls`` or ``.json``, shards made elsewhere (no manifest: ``data.epoch_length``), and
tokenizing them for the prior, with horizontally flipped copies on request."""
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_tokens import run_tool, tiny_tokenizer

from movq.config import DataConfig
from movq.data.decode import load_image
from movq.data.shards import TarShard, expand_shards, iter_tar, sample_label, shard_command
from movq.data.stream import build_dataset
from movq.data.tokens import read_token_manifest, read_token_shard
from movq.models.autoencoder import MoVQ

pytestmark = pytest.mark.skipif(shutil.which("cat") is None, reason="needs cat for pipe: URLs")


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """Two shards made elsewhere (no manifest.json), 4 samples each; labels in .cls (first shard) or in the
    .json's "label" / "cls" (second), label = index % 3."""
    root = tmp_path_factory.mktemp("foreign")
    for j in range(2):
        with TarShard(root / f"part-{j:06d}.tar") as shard:
            for i in range(4):
                n = 4 * j + i
                meta = {"cls": n % 3, "caption": "x"} if i % 2 else {"label": n % 3, "width": 24}
                label = {"cls": str(n % 3).encode()} if j == 0 else {"json": json.dumps(meta).encode()}
                shard.add(f"s{n:03d}", {"png": _png(n), **label})
    return root


def _cfg(root, **kw) -> DataConfig:
    pattern = f"pipe:cat {root}/part-{{000000..000001}}.tar"
    return DataConfig(**{"source": "shards", "train": pattern, "val": pattern, "image_size": 16, "batch_size": 2,
                         "num_workers": 0, "epoch_length": 8, "random_flip": False, **kw})


def test_sample_labels_from_cls_or_json():
    assert sample_label({"cls": b" 7\n"}) == 7
    assert sample_label({"json": b'{"label": 3}'}) == 3 and sample_label({"json": b'{"cls": 2}'}) == 2
    assert sample_label({"cls": b"1", "json": b'{"label": 5}'}) == 1  # .cls first, as webdataset's "cls" key
    for bad in ({}, {"json": b'{"caption": "a cat"}'}, {"json": b'{"label": true}'}, {"json": b"[1]"},
                {"json": b"not json"}, {"cls": b"cat"}):
        with pytest.raises(ValueError):
            sample_label(bad)


def test_urls_expand_without_a_local_file_and_name_their_command(tmp_path):
    urls = expand_shards("pipe:curl -s https://host/train-{000..002}.tar")
    assert urls == [f"pipe:curl -s https://host/train-{i:03d}.tar" for i in range(3)]
    assert shard_command(urls[0]) == "curl -s https://host/train-000.tar"
    assert shard_command("https://host/a b.tar") == "curl --silent --show-error --fail --location 'https://host/a b.tar'"
    with pytest.raises(ValueError, match=r"read s3:// through a pipe, e.g. 'pipe:aws s3 cp s3://bucket/x-000.tar -'"):
        expand_shards("s3://bucket/x-{000..001}.tar")
    with pytest.raises(ValueError, match="unknown URL scheme 'ftp'"):
        expand_shards("ftp://host/x.tar")
    with pytest.raises(FileNotFoundError, match="do not exist"):  # local shards are still checked up front
        expand_shards(str(tmp_path / "missing-{0..1}.tar"))


def test_training_and_val_read_foreign_shards_through_pipe_cat(foreign):
    train = build_dataset(_cfg(foreign), "train", labels=True)
    assert train.steps_per_epoch == 4 and train.num_classes is None
    batches = list(train)
    keys = sorted(k for b in batches for k in b["key"])
    assert keys == [f"s{n:03d}" for n in range(8)]  # every sample once per epoch
    for b in batches:
        assert b["image"].shape == (2, 3, 16, 16)
        assert [int(k[1:]) % 3 for k in b["key"]] == b["label"].tolist()  # .cls and .json labels
    val = list(build_dataset(_cfg(foreign), "val", labels=True))
    assert sorted(k for b in val for k in b["key"]) == keys
    # the same shards as local files: the same samples
    local = build_dataset(_cfg(foreign, val=str(foreign)), "val", labels=True)
    assert sorted(k for b in local for k in b["key"]) == keys


def test_foreign_shards_need_an_epoch_length(foreign):
    for data in (f"pipe:cat {foreign}/part-000000.tar", str(foreign)):
        with pytest.raises(ValueError, match=r"data.epoch_length must be set: .* has no manifest.json"):
            build_dataset(_cfg(foreign, train=data, epoch_length=None), "train")


def test_a_failing_command_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.tar"
    with pytest.raises(OSError, match=r"exited with status 1: .*nope.tar"):
        list(iter_tar(f"pipe:cat {missing}"))
    cfg = _cfg(tmp_path, train=f"pipe:cat {missing}", val=f"pipe:cat {missing}")
    with pytest.raises(RuntimeError, match=r"shard pipe:cat .*nope.tar is unreadable \(OSError: .*exited with status 1"):
        list(build_dataset(cfg, "val"))


def test_a_reader_that_stops_early_ends_the_command(foreign):
    reader = iter_tar(f"pipe:cat {foreign}/part-000000.tar")
    assert next(reader)[0] == "s000"
    reader.close()  # no error, no process left waiting on a full pipe


def test_tokenize_pipe_shards_with_labels_and_flips(tmp_path, foreign):
    tok = tiny_tokenizer(tmp_path / "tok")
    data = f"pipe:cat {foreign}/part-{{000000..000001}}.tar"
    out = tmp_path / "tokens"
    assert run_tool("--tokenizer", tok, data, out, "--num-classes", "3", "--flip", "--batch-size", "3") == 0
    m = read_token_manifest(out)
    assert m["count"] == 16 and m["classes"] == ["0", "1", "2"] and m["source"] == "shards"
    keys, tokens, labels = read_token_shard(out / m["shards"][0]["name"], (2, 8, 8), 16, m["shards"][0]["sha256"])
    assert keys == [k for n in range(4) for k in (f"s{n:03d}", f"s{n:03d}_flip")]
    assert labels.tolist() == [n % 3 for n in range(4) for _ in range(2)]
    model = MoVQ.from_pretrained(tok).eval()
    arr, _ = load_image(_png(1), 16)
    x = torch.from_numpy(np.stack([arr, arr[:, ::-1]])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        want = model.encode(x).indices.numpy()
    assert np.array_equal(tokens[2], want[0]) and np.array_equal(tokens[3], want[1])  # s001 and its mirror image
    # labels of shards without a manifest need --num-classes (or --no-labels)
    assert run_tool("--tokenizer", tok, data, tmp_path / "t2", "--num-classes", "3") == 0
    assert read_token_manifest(tmp_path / "t2")["count"] == 8
    assert read_token_manifest(tmp_path / "t2")["classes"] == ["0", "1", "2"]
