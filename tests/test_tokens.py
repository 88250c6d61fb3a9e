"""Token shards: tokenize a tiny dataset with a tiny random tokenizer and read it back; resumable
reruns; the builtin pseudo-labels; deterministic, disjoint per-rank batches; clear errors."""
import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from movq.cli import tokenize as tokenize_dataset
from movq.config import TokenizerConfig, load_config
from movq.data.builtin import BUILTIN_TRAIN_PHOTOS
from movq.data.decode import load_image
from movq.data.tokens import (
    TokenDataError,
    TokenDataset,
    read_token_manifest,
    read_token_shard,
    write_token_shard,
)
from movq.models.autoencoder import MoVQ
from movq.models.pretrained import resolve_model_dir

ROOT = Path(__file__).resolve().parents[1]


def tiny_tokenizer(path: Path, resolution: int = 16) -> Path:
    """A random MoVQ: 16² images → 2 channels on an 8×8 grid, K = 16."""
    cfg = load_config(TokenizerConfig, {
        "model": {"resolution": resolution, "base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                  "attn_resolutions": [], "mid_attention": False, "norm_groups": 4},
        "quantizer": {"codebook_size": 16, "channels": 2, "dim": 4},
    })
    torch.manual_seed(0)
    MoVQ(cfg).save_pretrained(path)
    return path


def run_tool(*args) -> int:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return tokenize_dataset.main([str(a) for a in args])


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok") / "ema")


@pytest.fixture()
def folder(tmp_path):
    """Two classes of 3 images each (sizes differ, one grey), plus one corrupt file."""
    rng = np.random.default_rng(0)
    for cls in ["cat", "dog"]:
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(3):
            a = rng.integers(0, 256, (20 + 4 * i, 24, 3), dtype=np.uint8)
            img = Image.fromarray(a).convert("L") if i == 1 else Image.fromarray(a)
            img.save(tmp_path / "img" / cls / f"{i}.v1.png")
    (tmp_path / "img" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return tmp_path / "img"


def test_tokenize_folder_round_trip(tmp_path, tok, folder):
    out = tmp_path / "tokens"
    assert run_tool("--tokenizer", tok, folder, out, "--batch-size", "4", "--shard-size", "4") == 0
    m = read_token_manifest(out)
    assert (m["channels"], m["height"], m["width"], m["codebook_size"]) == (2, 8, 8, 16)
    assert m["classes"] == ["cat", "dog"] and m["count"] == 6 and m["skipped"] == {"corrupt": 1}
    assert m["tokenizer"] == str(tok.resolve()) and m["image_size"] == 16
    assert [s["name"] for s in m["shards"]] == ["tokens-000000.tar", "tokens-000001.tar"]

    model = MoVQ.from_pretrained(tok).eval()
    keys, tokens, labels = [], [], []
    for s in m["shards"]:
        k, t, lab = read_token_shard(out / s["name"], (2, 8, 8), 16, s["sha256"])
        keys += k
        tokens.append(t)
        labels.append(lab)
    tokens, labels = np.concatenate(tokens), np.concatenate(labels)
    assert tokens.dtype == np.uint16 and keys[0] == "cat/0_v1"  # '.' in a file name is made safe
    for key, t, lab in zip(keys, tokens, labels):
        cls, name = key.split("/")
        assert lab == ["cat", "dog"].index(cls)
        arr, _ = load_image((folder / cls / f"{name.replace('_', '.')}.png").read_bytes(), 16)
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            assert np.array_equal(model.encode(x).indices[0].numpy(), t)

    ds = TokenDataset(out)
    every = ds.take(slice(None))["tokens"]
    assert every.shape == (6, 2, 8, 8) and every.dtype == torch.int64 and sorted(ds.labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_rerun_skips_finished_shards_and_refuses_other_settings(tmp_path, tok, folder, capsys):
    out = tmp_path / "tokens"
    assert run_tool("--tokenizer", tok.parent, folder, out, "--shard-size", "2") == 0  # the run folder's ema/
    manifest = (out / "manifest.json").read_text()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    first = (out / "tokens-000001.tar").read_bytes()
    (out / "tokens-000001.tar").unlink()  # as if the run died while writing it
    (out / "manifest.json").unlink()
    with pytest.raises(TokenDataError, match="incomplete"):
        TokenDataset(out)
    assert run_tool("--tokenizer", tok, folder, out, "--shard-size", "2") == 0
    assert (out / "manifest.json").read_text() == manifest
    assert (out / "tokens-000001.tar").read_bytes() == first  # same bytes when redone
    for p in out.glob("*.tar"):
        if p.name != "tokens-000001.tar":
            assert p.stat().st_mtime_ns == stamps[p.name]  # the others were not rewritten
    capsys.readouterr()
    # an input file renamed: still 4 shards of 2, but other inputs in them: refused, not mixed
    (folder / "cat" / "0.v1.png").rename(folder / "cat" / "0.v0.png")
    assert run_tool("--tokenizer", tok, folder, out, "--shard-size", "2") == 2
    assert "inputs_sha256" in capsys.readouterr().err
    assert run_tool("--tokenizer", tok, folder, out, "--shard-size", "3") == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "shard_size" in err
    assert run_tool("--tokenizer", tok, folder, out, "--shard-size", "3", "--overwrite") == 0
    assert sorted(p.name for p in out.glob("*.tar")) == [f"tokens-{j:06d}.tar" for j in range(3)]  # 7 files / 3
    assert read_token_manifest(out)["count"] == 6


def test_builtin_pseudo_labels(tmp_path, tok):
    out = tmp_path / "tokens"
    assert run_tool("--tokenizer", tok, "builtin", out, "--builtin-size", "12", "--cache-dir", tmp_path / "cache") == 0
    m = read_token_manifest(out)
    assert m["classes"] == list(BUILTIN_TRAIN_PHOTOS) and m["count"] == 12 and m["source"] == "builtin"
    ds = TokenDataset(out)
    assert ((ds.labels >= 0) & (ds.labels < len(BUILTIN_TRAIN_PHOTOS))).all()
    assert run_tool("--tokenizer", tok, "builtin", tmp_path / "u", "--builtin-size", "12",
                    "--cache-dir", tmp_path / "cache", "--no-labels") == 0
    assert read_token_manifest(tmp_path / "u")["classes"] == []
    assert (TokenDataset(tmp_path / "u").labels == -1).all()


def test_shapes_labels(tmp_path, tok):
    from movq.data.shapes import SHAPE_CLASSES

    out = tmp_path / "tokens"
    assert run_tool("--tokenizer", tok, "shapes", out, "--builtin-size", "16", "--cache-dir", tmp_path / "cache") == 0
    m = read_token_manifest(out)
    assert m["classes"] == list(SHAPE_CLASSES) and m["count"] == 16 and m["source"] == "shapes"
    ds = TokenDataset(out)
    assert sorted(ds.labels.tolist()) == sorted(i % len(SHAPE_CLASSES) for i in range(16))  # .cls of each image


def test_plan_shards_in_several_folders(tmp_path):
    """Classes come from every folder's manifest, not only the first shard's folder."""
    from movq.data.shards import ShardWriter, write_manifest

    for name, classes in (("a", None), ("b", ["cat", "dog"]), ("c", ["ant", "bee"])):
        w = ShardWriter(tmp_path / name)
        w.write("k", {"png": b"", "cls": b"0"})
        if classes is None:
            w.close()  # no manifest
        else:
            write_manifest(tmp_path / name, w.close(), classes=classes)
    a, b, c = (tmp_path / n / "shard-000000.tar" for n in "abc")
    plan = tokenize_dataset.plan_inputs("shards", f"{a}::{b}")
    assert plan.classes == ["cat", "dog"] and plan.label_from == "cls"
    assert [ch.shard for ch in plan.chunks] == [str(a), str(b)]
    with pytest.raises(ValueError, match="list different classes"):
        tokenize_dataset.plan_inputs("shards", f"{a}::{b}::{c}")
    assert tokenize_dataset.plan_inputs("shards", f"{b}::{c}", labels=False).classes == []


def test_unreadable_input_shard_is_counted_or_fails_clearly(tmp_path, tok, capsys):
    """A shard unreadable from its start is skipped and counted, as the training loader does, or with
    --on-bad-shard error an error naming it, with no token shard for it; bad images inside a readable
    shard are skipped and counted."""
    from movq.data.shards import ShardWriter

    png = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(png, "PNG")
    w = ShardWriter(tmp_path / "in", maxcount=3)
    for i in range(3):
        w.write(f"s{i}", {"png": png.getvalue() if i else b"\x89PNG broken"})
    w.close()
    good = (tmp_path / "in" / "shard-000000.tar").read_bytes()
    bad = tmp_path / "in" / "shard-000001.tar"
    out = tmp_path / "tokens"
    for content in (b"", b"not a tar file" * 100, good[:300]):  # empty, junk, truncated in the first header
        bad.write_bytes(content)
        assert run_tool("--tokenizer", tok, tmp_path / "in", out, "--on-bad-shard", "error") == 2
        assert f"error: input shard {bad} is unreadable" in capsys.readouterr().err
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [  # nothing for the bad one
            ".parts", ".parts/spec.json", ".parts/tokens-000000.json", "tokens-000000.tar"]
        assert run_tool("--tokenizer", tok, tmp_path / "in", tmp_path / f"skip{len(content)}") == 0
        m = read_token_manifest(tmp_path / f"skip{len(content)}")
        assert m["count"] == 2 and m["skipped"] == {"corrupt": 1, "shard_unreadable": 1}
    # Breaking off inside the third member (a header and one data block each: the PNG is < 512
    # bytes) keeps the two samples before it.
    bad.write_bytes(good[: 5 * 512 + 50])
    assert run_tool("--tokenizer", tok, tmp_path / "in", out) == 0
    m = read_token_manifest(out)
    assert m["count"] == 3 and m["skipped"] == {"corrupt": 2, "shard_truncated": 1}


def _synthetic(out: Path, n_shards: int = 3, per: int = 5, shape=(2, 4, 4), k: int = 16) -> np.ndarray:
    """Token shards + manifest written directly; every sample unique (its index in token 0)."""
    from movq.data.tokens import finish_shard, prepare_output, write_token_manifest

    rng = np.random.default_rng(0)
    prepare_output(out, {"channels": shape[0], "height": shape[1], "width": shape[2], "codebook_size": k,
                         "classes": ["a", "b", "c"]})
    all_tokens = []
    for j in range(n_shards):
        samples = []
        for i in range(per):
            t = rng.integers(0, k, shape).astype(np.uint16)
            t.flat[0], t.flat[1] = (j * per + i) % k, (j * per + i) // k
            samples.append((f"{j}_{i}", t, (j * per + i) % 3))
            all_tokens.append(t)
        finish_shard(out, j, samples, {}, {})
    write_token_manifest(out, n_shards)
    return np.stack(all_tokens)


def _ids(tokens: torch.Tensor) -> list[int]:
    return (tokens[:, 0, 0, 0] + 16 * tokens[:, 0, 0, 1]).tolist()


def test_batches_resume_and_rank_split(tmp_path):
    _synthetic(tmp_path / "t")
    ds = TokenDataset(tmp_path / "t")
    full = list(itertools.islice(ds.batches(4, seed=1), 10))  # 40 draws: crosses epochs of 15
    later = list(itertools.islice(ds.batches(4, seed=1, start_step=6), 4))
    for a, b in zip(full[6:], later):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["label"], b["label"])
    first_epoch = [i for b in full for i in _ids(b["tokens"])][:15]
    assert sorted(first_epoch) == list(range(15))  # each sample once per epoch
    assert _ids(full[0]["tokens"]) != _ids(list(itertools.islice(ds.batches(4, seed=2), 1))[0]["tokens"])

    for world in (2, 4, 15):  # 3 shards of 5: ranks split shards, whatever their number
        parts = [set(_ids(TokenDataset(tmp_path / "t", rank=r, world_size=world).take(slice(None))["tokens"]))
                 for r in range(world)]
        assert sum(map(len, parts)) == 15 and set().union(*parts) == set(range(15))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced: 8/7, not 10/5 by whole shards
    tiny = list(itertools.islice(TokenDataset(tmp_path / "t", rank=0, world_size=4).batches(8), 2))
    assert tiny[0]["tokens"].shape == (8, 2, 4, 4)  # a rank with fewer samples than a batch still works


def test_bad_token_data_fails_clearly(tmp_path):
    with pytest.raises(TokenDataError, match="manifest.json not found"):
        TokenDataset(tmp_path)
    _synthetic(tmp_path / "t")
    shard = tmp_path / "t" / "tokens-000001.tar"
    with pytest.raises(TokenDataError, match=r"the tokens are uint16 \(2, 4, 4\), expected uint16 \(4, 4, 4\)"):
        read_token_shard(shard, (4, 4, 4), 16)
    with pytest.raises(TokenDataError, match="outside the codebook"):
        read_token_shard(shard, (2, 4, 4), 2)
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(TokenDataError, match="tokens-000001.tar does not match the sha256"):
        TokenDataset(tmp_path / "t")
    bad = tmp_path / "bad.tar"
    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 4, 4), np.float32))
    write_token_shard(bad, [("k", np.zeros((2, 4, 4), np.uint16), 0)])
    import tarfile

    with tarfile.open(bad, "a") as tar:
        info = tarfile.TarInfo("x.tokens.npy")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    with pytest.raises(TokenDataError, match=r"bad.tar:x: the tokens are float32"):
        read_token_shard(bad, (2, 4, 4), 16)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text(json.dumps({"format": "movq-shards/1"}))
    with pytest.raises(TokenDataError, match="expected movq-tokens/1"):
        read_token_manifest(tmp_path / "m")


def test_tool_errors(tmp_path, tok, folder, capsys):
    assert run_tool("--tokenizer", tmp_path / "nope", folder, tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "tokenizer" in err and "does not exist" in err
    assert run_tool("--tokenizer", tok, tmp_path / "empty", tmp_path / "o") == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "w").mkdir()
    assert run_tool("--tokenizer", tmp_path / "w", folder, tmp_path / "o") == 2
    assert "is not a model folder" in capsys.readouterr().err
    (tmp_path / "only_bad").mkdir()
    (tmp_path / "only_bad" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    assert run_tool("--tokenizer", tok, tmp_path / "only_bad", tmp_path / "o") == 2  # not a folder of 0 tokens
    assert "no usable image" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        (tmp_path / "run" / "checkpoints").mkdir(parents=True)
        resolve_model_dir(tmp_path / "run")
