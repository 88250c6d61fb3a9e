"""FID: the distance (closed forms, two backends), statistics files, image sources and their bad
inputs, the CLI end to end (single and 2-process), FIDTracker, and the tokenizer mode.
Inception runs at 299² on CPU, so every image set here holds at most 4 images."""
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from movq.cli import fid as cli
from movq.data.decode import decode_image, images_to_uint8, to_rgb
from movq.evaluation import fid
from movq.evaluation.fid import FeatureAccumulator, FIDTracker, frechet_distance
from movq.evaluation.fid_sources import FIDError, FIDStats, open_source
from movq.evaluation.inception import standin_state_dict

ROOT = Path(__file__).resolve().parents[1]


def _stats_from_samples(x: np.ndarray) -> FIDStats:
    acc = FeatureAccumulator(x.shape[1])
    acc.update(torch.from_numpy(x))
    return acc.stats()


def _rng_images(seed, n, h, w, c=3):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """The CLI builds an Accelerator in-process; leave no singleton state to other tests."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "standin-inception.pth"
    torch.save(standin_state_dict(seed=0), path)
    return path


# --------------------------------------------------------------------------------------
# The distance
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", fid.BACKENDS)
def test_identical_sets_give_zero(backend):
    x = np.random.default_rng(0).normal(size=(200, 16)) @ np.random.default_rng(1).normal(size=(16, 16))
    s = _stats_from_samples(x)
    assert abs(frechet_distance(s, s, backend=backend)) <= 1e-6


@pytest.mark.parametrize("backend", fid.BACKENDS)
def test_two_gaussians_closed_form(backend):
    # N(mu1, c·I) vs N(mu2, Q diag(l) Qᵀ): (S1 S2)^½ = √c · Q diag(√l) Qᵀ, so
    # FID = |mu1 - mu2|² + D·c + Σl - 2√c·Σ√l.
    rng = np.random.default_rng(0)
    d, c = 24, 0.7
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    lam = rng.uniform(0.1, 3.0, size=d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a = FIDStats.from_arrays(mu1, c * np.eye(d))
    b = FIDStats.from_arrays(mu2, q @ np.diag(lam) @ q.T)
    expected = ((mu1 - mu2) ** 2).sum() + d * c + lam.sum() - 2 * np.sqrt(c) * np.sqrt(lam).sum()
    assert frechet_distance(a, b, backend=backend) == pytest.approx(expected, rel=1e-9)
    # Diagonal pair: Σ (√a - √b)² per dimension.
    va, vb = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
    a, b = FIDStats.from_arrays(mu1, np.diag(va)), FIDStats.from_arrays(mu1, np.diag(vb))
    expected = ((np.sqrt(va) - np.sqrt(vb)) ** 2).sum()
    assert frechet_distance(a, b, backend=backend) == pytest.approx(expected, rel=1e-9)


def test_torchmetrics_and_scipy_agree():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32))
    y = rng.normal(size=(250, 32)) @ rng.normal(size=(32, 32)) * 0.5 + 0.3
    a, b = _stats_from_samples(x), _stats_from_samples(y)
    tm, sp = frechet_distance(a, b, "torchmetrics"), frechet_distance(a, b, "scipy")
    assert tm > 1 and tm == pytest.approx(sp, rel=1e-8)
    with pytest.raises(ValueError, match="backend"):
        frechet_distance(a, b, backend="numpy")
    with pytest.raises(FIDError, match="feature sizes"):
        frechet_distance(a, _stats_from_samples(y[:, :8]))


def test_accumulator_matches_numpy_in_parts():
    x = np.random.default_rng(0).normal(loc=2.0, size=(50, 8))
    whole = FeatureAccumulator(8)
    whole.update(torch.from_numpy(x))
    s = whole.stats()
    np.testing.assert_allclose(s.mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    assert s.num_images == 50
    parts = FeatureAccumulator(8)
    parts.update(torch.from_numpy(x[:17]))
    parts.update(torch.from_numpy(x[17:]))
    merged = parts.all_reduce_().stats()  # all_reduce_: no-op without a group
    np.testing.assert_allclose(merged.sigma, s.sigma, rtol=1e-12)
    one = FeatureAccumulator(8)
    one.update(torch.from_numpy(x[:1]))
    with pytest.raises(FIDError, match="1 image.*at least 2"):
        one.stats()


def test_stats_file_roundtrip_and_validation(tmp_path):
    s = _stats_from_samples(np.random.default_rng(0).normal(size=(20, 4)))
    s.save(tmp_path / "s.npz")
    back = FIDStats.load(tmp_path / "s.npz")
    assert np.array_equal(back.mu, s.mu) and np.array_equal(back.sigma, s.sigma) and back.num_images == 20
    bad = {
        "keys": (dict(mean=s.mu, cov=s.sigma), r"keys \['cov', 'mean'\].*'mu' and 'sigma'"),
        "shape": (dict(mu=s.mu, sigma=s.sigma[:3]), r"'sigma' has shape \(3, 4\), expected \(4, 4\)"),
        "vector": (dict(mu=s.sigma, sigma=s.sigma), r"'mu' has shape \(4, 4\)"),
        "nan": (dict(mu=s.mu * np.nan, sigma=s.sigma), "NaN"),
    }
    for name, (arrays, match) in bad.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(FIDError, match=match):
            FIDStats.load(path)
        with pytest.raises(FIDError, match=match):
            open_source(path)


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------
def _all(source, world=1, max_images=None):
    """Images of every rank of a `world`-rank run, and the merged report."""
    images, report = [], source.new_report()
    for rank in range(world):
        r = source.new_report()
        images += list(source.iterate(r, rank, world, max_images))
        report.merge(r)
    return images, report


def test_folder_source_converts_and_skips(tmp_path, caplog):
    (tmp_path / "d" / "nested").mkdir(parents=True)
    rgb = _rng_images(0, 1, 12, 10)[0]
    Image.fromarray(rgb).save(tmp_path / "d" / "a.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "d" / "nested" / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((12, 10), 7, np.uint8)])).save(tmp_path / "d" / "rgba.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "d" / "palette.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(tmp_path / "d" / "deep.png")  # I;16
    (tmp_path / "d" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    source = open_source(tmp_path / "d")
    assert source.kind == "folder" and source.total == 6
    with caplog.at_level(logging.WARNING):
        images, report = _all(source)
    assert len(images) == 5 and all(i.shape == (12, 10, 3) and i.dtype == np.uint8 for i in images)
    assert report.skipped == 1 and "broken.jpg" in caplog.text
    assert report.converted == {"L": 1, "RGBA": 1, "P": 1, "I;16": 1}
    by_name = dict(zip([p.name for p in source.paths if p.name != "broken.jpg"], images))
    # the training decoder's pixels: alpha over white, as the tokenizer was trained on them
    assert np.array_equal(by_name["rgba.png"], np.asarray(decode_image((tmp_path / "d" / "rgba.png").read_bytes())[0]))
    assert by_name["rgba.png"].min() > 240  # nearly transparent: almost white
    assert np.array_equal(by_name["gray.png"], np.repeat(rgb[..., :1], 3, axis=2))
    assert np.array_equal(by_name["deep.png"], by_name["gray.png"])  # 16-bit scaled, not clipped
    split, _ = _all(source, world=2)  # two ranks: each image once
    assert sorted(i.tobytes() for i in split) == sorted(i.tobytes() for i in images)
    # max_images counts entries (a.png, broken.jpg, deep.png): ranks split positions before decoding.
    assert len(_all(source, max_images=3)[0]) == 2


def test_npz_source(tmp_path):
    imgs = _rng_images(1, 5, 6, 7)
    np.savez(tmp_path / "rgb.npz", arr_0=imgs)
    np.savez_compressed(tmp_path / "gray.npz", arr_0=imgs[..., 0])
    np.savez(tmp_path / "rgba.npz", arr_0=np.concatenate([imgs, imgs[..., :1]], axis=3))
    for name, converted in (("rgb", {}), ("gray", {"L": 5}), ("rgba", {"RGBA": 5})):
        source = open_source(tmp_path / f"{name}.npz")
        assert source.kind == "npz" and source.total == 5
        out, report = _all(source, world=2)
        assert len(out) == 5 and report.converted == converted
        if name == "rgb":
            assert sorted(o.tobytes() for o in out) == sorted(i.tobytes() for i in imgs)
        if name == "rgba":  # as an RGBA file of these pixels would decode: over white
            over_white = [np.asarray(to_rgb(Image.fromarray(i, "RGBA"))[0]).tobytes()
                          for i in np.concatenate([imgs, imgs[..., :1]], axis=3)]
            assert sorted(o.tobytes() for o in out) == sorted(over_white)
    assert len(_all(open_source(tmp_path / "rgb.npz"), world=2, max_images=3)[0]) == 3


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _encode(arr, fmt):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_shard_source(tmp_path, caplog):
    imgs = _rng_images(2, 6, 8, 9)
    _tar(tmp_path / "shard-000000.tar", [
        ("s/000.jpg", _encode(imgs[0], "JPEG")), ("s/000.cls", b"3"),
        ("s/001.png", _encode(imgs[1], "PNG")),
        ("s/002.webp", _encode(imgs[2], "WEBP")),
        ("s/003.txt", b"caption only"),
        ("s/004.png", _encode(imgs[4], "PNG")), ("s/004.jpg", _encode(imgs[4], "JPEG")),  # one sample
    ])
    _tar(tmp_path / "shard-000001.tar", [
        ("s/005.png", _encode(imgs[5][..., 0], "PNG")),
        ("s/006.jpg", b"garbage"),
    ])
    source = open_source(str(tmp_path / "shard-{000000..000001}.tar"))
    assert source.kind == "shards" and len(source.paths) == 2
    with caplog.at_level(logging.WARNING):
        out, report = _all(source)
    assert len(out) == 5 and report.skipped == 1 and report.converted == {"L": 1} and "006.jpg" in caplog.text
    assert np.array_equal(out[1], imgs[1]) and np.array_equal(out[3], imgs[4])
    for world in (2, 3):  # 2: ranks split whole shards; 3 (more ranks than shards): positions
        split, _ = _all(source, world=world)
        assert sorted(i.tobytes() for i in split) == sorted(i.tobytes() for i in out)
    assert len(_all(source, world=2, max_images=4)[0]) == 4
    assert len(list(open_source(str(tmp_path / "shard-*.tar")).iterate(source.new_report()))) == 5
    # A shard cut short: what was read counts, the rest is one counted skip, no traceback.
    data = (tmp_path / "shard-000000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    out, report = _all(open_source(tmp_path / "cut.tar"))
    assert 1 <= len(out) < 4 and report.skipped == 1


@pytest.mark.parametrize("case, match", [
    ("missing", "no such file or folder"),
    ("empty", "no images"),
    ("npz_keys", r"keys \['images'\].*'arr_0'"),
    ("npz_float", "dtype float32, expected uint8"),
    ("npz_nchw", r"shape \(2, 3, 8, 8\), expected uint8 NHWC"),
    ("npz_empty", "holds no images"),
    ("npz_corrupt", "not a readable .npz"),
    ("stats_half", r"keys \['mu'\].*'mu' and 'sigma'"),
    ("text", "not an image folder"),
    ("url", "only local files"),
    ("shard_missing", "shard .*shard-000001.tar not found"),
])
def test_open_source_errors(tmp_path, case, match):
    target = tmp_path / case
    if case == "empty":
        target.mkdir()
        (target / "readme.md").write_text("no images here")
    elif case.startswith("npz") or case == "stats_half":
        target = tmp_path / f"{case}.npz"
        arrays = {
            "npz_keys": dict(images=_rng_images(0, 2, 4, 4)),
            "npz_float": dict(arr_0=np.zeros((2, 4, 4, 3), np.float32)),
            "npz_nchw": dict(arr_0=np.zeros((2, 3, 8, 8), np.uint8)),
            "npz_empty": dict(arr_0=np.zeros((0, 4, 4, 3), np.uint8)),
            "stats_half": dict(mu=np.zeros(4)),
        }.get(case)
        if arrays is None:
            target.write_bytes(b"PK\x03\x04 truncated")
        else:
            np.savez(target, **arrays)
    elif case == "text":
        target = tmp_path / "list.txt"
        target.write_text("a.png")
    elif case == "url":
        target = "https://example.com/shard-000000.tar"
    elif case == "shard_missing":
        _tar(tmp_path / "shard-000000.tar", [])
        target = str(tmp_path / "shard-{000000..000001}.tar")
    with pytest.raises(FIDError, match=match) as err:
        open_source(target)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Folder A: 3 images of two sizes, one grayscale. B: an .npz of 3 images."""
    root = tmp_path_factory.mktemp("fid_data")
    (root / "a" / "sub").mkdir(parents=True)
    imgs = _rng_images(5, 3, 40, 48)
    Image.fromarray(imgs[0]).save(root / "a" / "0.png")
    Image.fromarray(imgs[1]).save(root / "a" / "sub" / "1.jpg", quality=95)
    Image.fromarray(imgs[2][:30, :30, 0]).save(root / "a" / "2.png")
    np.savez(root / "b.npz", arr_0=(_rng_images(6, 3, 32, 32) // 2))
    return root


@pytest.fixture(scope="module")
def single_run(data, weights):
    out = data / "single.json"
    rc = cli.main([str(data / "a"), str(data / "b.npz"), "--inception-weights", str(weights), "--skip-checksum",
                   "--json", str(out), "--save-stats", str(data / "a_stats.npz"), "--batch-size", "2",
                   "--no-progress"])
    assert rc == 0
    return json.loads(out.read_text())


def test_cli_end_to_end(data, weights, single_run, tmp_path, monkeypatch, capsys):
    res = single_run
    assert np.isfinite(res["fid"]) and res["fid"] > 0 and res["backend"] == "torchmetrics"
    a, b = res["sources"]
    assert (a["kind"], a["images"], a["converted"], a["sizes"]) == ("folder", 3, {"L": 1}, {"48x40": 2, "30x30": 1})
    assert (b["kind"], b["images"]) == ("npz", 3)
    assert res["checksum_verified"] is False and res["inception_weights"] == str(weights)
    saved = FIDStats.load(data / "a_stats.npz")
    assert saved.mu.shape == (2048,) and saved.num_images == 3
    # The saved statistics stand in for the folder.
    out = tmp_path / "again.json"
    assert cli.main([str(data / "a_stats.npz"), str(data / "b.npz"), "--inception-weights", str(weights),
                     "--skip-checksum", "--json", str(out), "--no-progress"]) == 0
    again = json.loads(out.read_text())
    assert again["fid"] == pytest.approx(res["fid"], rel=1e-5)
    assert again["sources"][0] == {"source": str(data / "a_stats.npz"), "kind": "stats", "images": 3}
    # Two statistics files need no Inception weights at all (small D: the 2048-d distance is slow on CPU).
    monkeypatch.setenv("MOVQ_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    x = np.random.default_rng(0).normal(size=(30, 8))
    _stats_from_samples(x).save(tmp_path / "x.npz")
    _stats_from_samples(x + 1).save(tmp_path / "y.npz")
    capsys.readouterr()
    assert cli.main([str(tmp_path / "x.npz"), str(tmp_path / "x.npz"), "--backend", "scipy"]) == 0
    assert abs(float(capsys.readouterr().out.split("FID:")[-1])) < 1e-6
    assert cli.main([str(tmp_path / "x.npz"), str(tmp_path / "y.npz")]) == 0
    assert float(capsys.readouterr().out.split("FID:")[-1]) == pytest.approx(8.0, abs=1e-4)  # |Δmu|² = 8


@pytest.mark.slow
def test_cli_two_processes_count_each_image_once(data, weights, single_run, tmp_path, free_port):
    port = free_port
    out = tmp_path / "dist.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(ROOT / "tools" / "fid.py"), str(data / "a"), str(data / "b.npz"), "--cpu", "--no-progress",
         "--inception-weights", str(weights), "--skip-checksum", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["num_processes"] == 2
    assert [s["images"] for s in res["sources"]] == [3, 3]
    assert res["sources"][0]["converted"] == {"L": 1}
    assert res["fid"] == pytest.approx(single_run["fid"], rel=1e-4)
    assert proc.stdout.count("FID:") == 1  # only rank 0 prints


def test_cli_bad_inputs(data, weights, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MOVQ_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("MOVQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    (tmp_path / "one").mkdir()
    Image.fromarray(_rng_images(0, 1, 8, 8)[0]).save(tmp_path / "one" / "x.png")
    cases = [
        ([str(data / "a"), str(tmp_path / "nope")], "nope: no such file or folder"),
        ([str(data / "a"), str(data / "b.npz")], "weights-inception-2015-12-05-6726825d.pth"),  # no weights
        ([str(tmp_path / "one"), str(data / "b.npz"), "--inception-weights", str(weights), "--skip-checksum"],
         "1 readable image"),
        ([str(data / "a"), str(data / "b.npz"), "--inception-weights", str(weights)], "expected 6726825d"),
    ]
    for argv, match in cases:
        assert cli.main(argv + ["--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and match in err[-1], err
    with pytest.raises(SystemExit):
        cli.main([str(data / "a")])  # one source needs --save-stats


# --------------------------------------------------------------------------------------
# In training
# --------------------------------------------------------------------------------------
def test_tracker_without_weights_logs_once(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("MOVQ_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("MOVQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    stats = _stats_from_samples(np.random.default_rng(0).normal(size=(10, 2048)))
    tracker = FIDTracker(None, stats)
    with caplog.at_level(logging.WARNING):
        assert tracker.compute(_rng_images(0, 2, 16, 16)) is None
        assert tracker.compute(_rng_images(1, 2, 16, 16)) is None
    assert caplog.text.count("FID disabled") == 1 and "6726825d" in caplog.text
    caplog.clear()
    no_ref = FIDTracker(None, tmp_path / "missing.npz")
    with caplog.at_level(logging.WARNING):
        assert no_ref.compute(_rng_images(0, 2, 16, 16)) is None
    assert "missing.npz not found" in caplog.text


def test_tracker_input_forms():
    fake = torch.rand(2, 3, 5, 6) * 2 - 1
    u8 = images_to_uint8(fake).permute(0, 3, 1, 2)  # [2, 3, 5, 6]
    assert u8.dtype == torch.uint8 and images_to_uint8(torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)).tolist() == [[[[0, 128, 255]]]]
    nhwc = u8.permute(0, 2, 3, 1)
    for form in (fake, nhwc, nhwc.numpy(), torch.cat([nhwc, nhwc[..., :1]], dim=3)):  # float, uint8 (+alpha)
        assert torch.equal(fid._as_nchw_uint8(form), u8)
    gray = nhwc[..., :1]
    assert torch.equal(fid._as_nchw_uint8(gray), gray.permute(0, 3, 1, 2).expand(-1, 3, -1, -1))
    with pytest.raises(FIDError, match="NHWC"):
        fid._as_nchw_uint8(u8)  # uint8 NCHW is ambiguous with NHWC: rejected, not guessed
    with pytest.raises(FIDError, match="4-D"):
        fid._as_nchw_uint8(fake[0])


def test_tracker_with_weights(weights, tmp_path):
    ref_path = tmp_path / "ref.npz"
    tracker = FIDTracker(weights, ref_path, verify=False, device="cpu", batch_size=2)
    assert tracker.compute(_rng_images(0, 2, 24, 24)) is None  # no reference yet
    ref = tracker.ensure_reference(_rng_images(0, 2, 24, 24))  # uint8 NHWC numpy
    assert ref_path.is_file() and ref.num_images == 2
    fake = torch.rand(2, 3, 24, 24) * 2 - 1  # float NCHW in [-1, 1], as a decoder returns
    value = tracker.compute([fake[:1], fake[1:]])  # an iterable of batches
    assert np.isfinite(value) and value > 0
    fresh = FIDTracker(weights, ref_path, verify=False, device="cpu")  # reads the cached file
    assert np.array_equal(fresh.reference().mu, ref.mu)
    with pytest.raises(FIDError, match="uint8 NHWC or float NCHW"):
        tracker.compute(torch.zeros(2, 24, 24, 3, dtype=torch.int32))


def test_tokenizer_mode(data, weights, tmp_path, monkeypatch):
    autoencoder = pytest.importorskip("movq.models.autoencoder")
    from movq.config import TokenizerConfig, load_config

    cfg = load_config(TokenizerConfig, {
        "model": {"resolution": 32, "base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                  "attn_resolutions": [], "norm_groups": 4},
        "quantizer": {"codebook_size": 32, "channels": 2, "dim": 4},
    })
    torch.manual_seed(0)
    autoencoder.MoVQ(cfg).save_pretrained(tmp_path / "ckpt")
    monkeypatch.setenv("MOVQ_CACHE_DIR", str(tmp_path / "no-lpips"))  # LPIPS weights absent
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-lpips"))
    out = tmp_path / "tok.json"
    rc = cli.main(["--tokenizer", str(tmp_path / "ckpt"), str(data / "a"), "--inception-weights", str(weights),
                   "--skip-checksum", "--json", str(out), "--no-progress", "--batch-size", "2"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert np.isfinite(res["rfid"]) and res["rfid"] >= 0
    assert 0 < res["psnr"] < 100 and -1 <= res["ssim"] <= 1 and res["lpips"] is None
    assert 0 < res["codebook_usage"] <= 1 and 1 <= res["perplexity"] <= 32
    assert res["num_images"] == 3 and res["resolution"] == 32 and res["source"]["converted"] == {"L": 1}
    assert cli.main(["--tokenizer", str(tmp_path / "nothing"), str(data / "a")]) == 2
    # without the Inception weights: no rFID, the other metrics all the same; a checkpoint folder works too
    (tmp_path / "ckpt_folder").mkdir()
    (tmp_path / "ckpt").rename(tmp_path / "ckpt_folder" / "ema")
    rc = cli.main(["--tokenizer", str(tmp_path / "ckpt_folder"), str(data / "a"), "--inception-weights",
                   str(tmp_path / "missing.pth"), "--json", str(out), "--no-progress", "--batch-size", "2"])
    assert rc == 0
    again = json.loads(out.read_text())
    assert again["rfid"] is None and again["psnr"] == res["psnr"] and again["codebook_usage"] == res["codebook_usage"]


def test_a_sample_folder_gives_its_samples_only(tmp_path):
    rgb = _rng_images(0, 1, 8, 8)[0]
    (tmp_path / ".sample_spec.json").write_text("{}")  # what tools/sample.py writes beside its samples
    for name in ("000000.png", "000001.png", "grid.png", "steps.png", "edit.png"):
        Image.fromarray(rgb).save(tmp_path / name)
    assert [p.name for p in open_source(tmp_path).paths] == ["000000.png", "000001.png"]
    for p in tmp_path.glob("0*.png"):
        p.unlink()
    with pytest.raises(FIDError, match="without samples"):
        open_source(tmp_path)
