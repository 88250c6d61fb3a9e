"""The ADM evaluator's metrics (movq.evaluation.adm): Inception Score, sFID and precision / recall against
numpy transcriptions of their definitions, the Inception outputs they read, ADM's reference-batch
layout, and tools/fid.py --metrics end to end. Inception runs at 299² on CPU: every set is 4-5 images."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from movq.cli import fid as cli
from movq.evaluation.adm import inception_score, manifold_radii, pairwise_sq_distances, precision_recall
from movq.evaluation.fid import FeatureAccumulator, frechet_distance
from movq.evaluation.fid_sources import FIDStats, ImageSource, open_metric_source
from movq.evaluation.inception import NUM_SPATIAL_FEATURES, FIDInceptionV3, standin_state_dict

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# numpy transcriptions of the definitions (Salimans et al. 2016; Kynkäänniemi et al. 2019 as ADM runs it)
# --------------------------------------------------------------------------------------
def np_inception_score(logits: np.ndarray, split_size: int) -> float:
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def np_precision_recall(ref: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Brute force in float64: radius = squared distance to the k-th neighbour, self excluded."""
    def d2(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    r_ref = np.sort(d2(ref, ref), axis=1)[:, k]
    r_fake = np.sort(d2(fake, fake), axis=1)[:, k]
    cross = d2(ref, fake)  # [N_ref, N_fake]
    precision = (cross <= r_ref[:, None]).any(0).mean()
    recall = (cross <= r_fake[None, :]).any(1).mean()
    return float(precision), float(recall)


# --------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------
def test_inception_score_matches_its_definition():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(12, 1008)).astype(np.float32)
    for split in (5, 12, 5000):  # 5: splits of 5, 5 and 2, averaged
        assert inception_score(logits, split) == pytest.approx(np_inception_score(logits, split), rel=1e-9)
    assert inception_score(np.zeros((7, 1008)), 5000) == pytest.approx(1.0)  # the same p(y|x) everywhere
    confident = np.full((40, 1008), -50.0)
    confident[np.arange(40), np.arange(40) % 4] = 50.0  # 4 classes, equally often, with certainty
    assert inception_score(confident, 5000) == pytest.approx(4.0, rel=1e-6)
    # order matters across splits: the sorted order puts one class per split (IS 1 each)
    assert inception_score(confident[np.argsort(np.arange(40) % 4, kind="stable")], 10) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------
# precision / recall
# --------------------------------------------------------------------------------------
def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(60, 16)).astype(np.float32)
    fake = (rng.normal(size=(45, 16)) * 1.3 + 0.4).astype(np.float32)
    expected = np_precision_recall(ref.astype(np.float64), fake.astype(np.float64))
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # neither trivially 0 nor 1
    for batch in (7, 10000):  # blocks change nothing
        assert precision_recall(ref, fake, batch_size=batch, fp16=False) == pytest.approx(expected, abs=1e-12)
    # ADM's float16 distances move only points within float16 rounding of a radius
    p16, r16 = precision_recall(ref, fake)
    assert abs(p16 - expected[0]) <= 2 / 45 and abs(r16 - expected[1]) <= 2 / 60


def test_precision_recall_limits():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 8)).astype(np.float32)
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 100) == (0.0, 0.0)
    # reference at 0..39 on a line, samples at 0.01..19.01: every sample lies in a reference ball; the
    # samples' radius is 3 (their 3rd neighbour), so they cover the reference points 0..22
    line = np.stack([np.arange(40.0), np.zeros(40)], 1).astype(np.float32)
    assert precision_recall(line, line[:20] + 0.01, fp16=False) == (1.0, 23 / 40)
    with pytest.raises(ValueError, match="more than 3 images"):
        manifold_radii(x[:3])


def test_radii_and_the_float32_fallback():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(size=(20, 8)).astype(np.float32))
    d = torch.cdist(x.double(), x.double()) ** 2
    assert torch.allclose(manifold_radii(x, fp16=False).double(), d.sort(1).values[:, 3], rtol=1e-5)
    big = x * 1000  # squared norms ~1e7 overflow float16: the block is computed in float32 instead
    assert torch.equal(pairwise_sq_distances(big, big, fp16=True), pairwise_sq_distances(big, big, fp16=False))
    assert not torch.equal(pairwise_sq_distances(x, x, fp16=True), pairwise_sq_distances(x, x, fp16=False))


# --------------------------------------------------------------------------------------
# The Inception outputs
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "standin-inception.pth"
    torch.save(standin_state_dict(seed=0), path)
    return path


@pytest.fixture(scope="module")
def extractor(weights):
    return FIDInceptionV3.from_pretrained(weights, verify=False)


def test_one_pass_gives_pool_spatial_and_logits(extractor):
    imgs = torch.randint(0, 256, (2, 3, 24, 30), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    captured = []
    hook = extractor.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        pool = extractor(imgs)  # the FID path, unchanged
    finally:
        hook.remove()
    out = extractor.all_features(imgs)
    assert torch.equal(out.pool, pool)
    assert out.spatial.shape == (2, NUM_SPATIAL_FEATURES) == (2, 2023)
    mixed_6_conv = captured[0]  # [B, 192, 17, 17] inside Mixed_6d's forward
    assert torch.equal(out.spatial, mixed_6_conv[:, :7].permute(0, 2, 3, 1).reshape(2, -1))  # TF's NHWC order
    assert torch.allclose(out.logits, pool @ extractor.fc.weight.T, rtol=1e-5, atol=1e-6)
    assert out.logits.shape == (2, 1008) and not torch.allclose(out.logits, extractor.fc(pool))  # no bias


# --------------------------------------------------------------------------------------
# ADM's reference batches and tools/fid.py --metrics
# --------------------------------------------------------------------------------------
def _images(seed, n, size=32):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _stats(x: torch.Tensor) -> FIDStats:
    acc = FeatureAccumulator(x.shape[1])
    acc.update(x)
    return acc.stats()


@pytest.fixture(scope="module")
def adm(tmp_path_factory, extractor):
    """A reference batch in the layout of ADM's VIRTUAL_imagenet256_labeled.npz (arr_0 images, arr_1 labels,
    mu / sigma, mu_s / sigma_s; here the statistics are of *other* images, to see which ones are used) and
    a sample batch (arr_0), with the features computed here directly."""
    root = tmp_path_factory.mktemp("adm")
    ref_imgs, stats_imgs, samples = _images(1, 4), _images(2, 2) // 2, _images(3, 4)
    feats = {name: extractor.all_features(torch.from_numpy(a).permute(0, 3, 1, 2))
             for name, a in (("ref", ref_imgs), ("published", stats_imgs), ("samples", samples))}
    published, published_s = _stats(feats["published"].pool), _stats(feats["published"].spatial)
    np.savez(root / "VIRTUAL_ref.npz", arr_0=ref_imgs, arr_1=np.arange(4), mu=published.mu.astype(np.float32),
             sigma=published.sigma, mu_s=published_s.mu, sigma_s=published_s.sigma)
    np.savez(root / "samples.npz", arr_0=samples)
    return root, feats


@pytest.fixture(scope="module")
def all_metrics(adm, weights):
    root, _ = adm
    out = root / "all.json"
    assert cli.main([str(root / "VIRTUAL_ref.npz"), str(root / "samples.npz"), "--metrics", "all",
                     "--is-split-size", "2", "--batch-size", "3", "--pr-float32", "--inception-weights",
                     str(weights), "--skip-checksum", "--no-progress", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_reference_batches_are_read_as_published(adm, all_metrics):
    root, f = adm
    res = all_metrics
    ref_file = open_metric_source(root / "VIRTUAL_ref.npz")
    assert ref_file.stats is not None and ref_file.spatial is not None and ref_file.images.total == 4
    # FID and sFID use the file's statistics; precision / recall its images; IS is of the samples
    assert res["fid"] == pytest.approx(frechet_distance(_stats(f["published"].pool), _stats(f["samples"].pool)),
                                       rel=1e-5)
    assert res["sfid"] == pytest.approx(
        frechet_distance(_stats(f["published"].spatial), _stats(f["samples"].spatial)), rel=1e-5)
    assert res["inception_score"] == pytest.approx(np_inception_score(f["samples"].logits.numpy(), 2), rel=1e-5)
    expected_pr = np_precision_recall(f["ref"].pool.double().numpy(), f["samples"].pool.double().numpy())
    assert (res["precision"], res["recall"]) == pytest.approx(expected_pr)
    assert res["sources"][0]["statistics"] == "published" and res["sources"][0]["images"] == 4
    assert res["sources"][1]["images"] == 4 and "statistics" not in res["sources"][1]
    assert res["metrics"] == ["fid", "sfid", "is", "pr"] and set(res["protocol"]) == {
        "fid", "sfid", "inception_score", "precision_recall"}


def test_fid_alone_is_unchanged(adm, all_metrics, weights, capsys):
    """The default run gives the same FID (same pool features, same statistics) and only the FID line."""
    root, _ = adm
    out = root / "fid.json"
    assert cli.main([str(root / "VIRTUAL_ref.npz"), str(root / "samples.npz"), "--batch-size", "3",
                     "--inception-weights", str(weights), "--skip-checksum", "--no-progress",
                     "--json", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [f"FID: {all_metrics['fid']:.4f}"]
    res = json.loads(out.read_text())
    assert res["fid"] == all_metrics["fid"]
    assert not {"sfid", "inception_score", "precision", "metrics"} & set(res)
    assert res["sources"][0] == {"source": str(root / "VIRTUAL_ref.npz"), "kind": "stats", "images": 0}


def test_one_source_saves_sfid_statistics_and_gives_is(adm, all_metrics, weights, tmp_path, capsys):
    root, _ = adm
    assert cli.main([str(root / "samples.npz"), "--save-stats", str(tmp_path / "s.npz"), "--metrics", "sfid,is",
                     "--is-split-size", "2", "--inception-weights", str(weights), "--skip-checksum",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out.split()
    assert float(out[out.index("Score:") + 1]) == pytest.approx(all_metrics["inception_score"], abs=1e-4)
    assert FIDStats.load_spatial(tmp_path / "s.npz").mu.shape == (2023,)
    # the saved file as the sample side: the same sFID as from the images, no Inception pass
    assert cli.main([str(root / "VIRTUAL_ref.npz"), str(tmp_path / "s.npz"), "--metrics", "fid,sfid"]) == 0
    lines = capsys.readouterr().out.split()
    assert float(lines[lines.index("sFID:") + 1]) == pytest.approx(all_metrics["sfid"], abs=1e-3)


def test_metric_inputs_that_cannot_work(adm, weights, tmp_path, capsys):
    root, _ = adm
    FIDStats.from_arrays(np.zeros(2048), np.eye(2048)).save(tmp_path / "stats_only.npz")
    common = ["--inception-weights", str(weights), "--skip-checksum", "--no-progress"]
    cases = [([str(tmp_path / "stats_only.npz"), str(root / "samples.npz"), "--metrics", "pr"],
              "holds statistics only (no arr_0 images); precision / recall need images"),
             ([str(tmp_path / "stats_only.npz"), str(root / "samples.npz"), "--metrics", "sfid"],
              "sFID need images"),
             ([str(root / "samples.npz"), str(tmp_path / "stats_only.npz"), "--metrics", "is"],
              "the Inception Score need images")]
    for argv, message in cases:
        assert cli.main(argv + common) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([str(root / "samples.npz"), str(root / "samples.npz"), "--metrics", "fid,kid"])
    assert "unknown metric(s) ['kid']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([str(root / "samples.npz"), "--metrics", "fid,sfid"])  # one source: only IS, or --save-stats


def _png_shard(path: Path, images: np.ndarray, first: int) -> None:
    import io
    import tarfile

    from PIL import Image

    with tarfile.open(path, "w") as tar:
        for i, a in enumerate(images, first):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            info = tarfile.TarInfo(f"{i:03d}.png")
            info.size = buf.tell()
            tar.addfile(info, io.BytesIO(buf.getvalue()))


def test_keyed_iteration_restores_the_source_order(tmp_path):
    from PIL import Image

    imgs = _images(4, 7, size=8)
    (tmp_path / "f").mkdir()
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(tmp_path / "f" / f"{i}.png")
    np.savez(tmp_path / "x.npz", arr_0=imgs)
    _png_shard(tmp_path / "s0.tar", imgs[:4], 0)
    _png_shard(tmp_path / "s1.tar", imgs[4:], 4)
    sources = [ImageSource("f", "folder", sorted((tmp_path / "f").glob("*.png"), key=lambda p: int(p.stem))),
               ImageSource("x", "npz", [tmp_path / "x.npz"], total=7),
               ImageSource("s", "shards", [tmp_path / "s0.tar", tmp_path / "s1.tar"])]
    for source in sources:
        for world in (2, 3):  # 3 ranks > 2 shards: every rank walks both shards
            keyed = [kv for r in range(world) for kv in source.iterate_keyed(source.new_report(), r, world)]
            ordered = [img for _, img in sorted(keyed, key=lambda kv: kv[0])]
            assert len(ordered) == 7 and all(np.array_equal(a, b) for a, b in zip(ordered, imgs)), source.kind


@pytest.mark.slow
def test_two_processes_give_the_single_process_metrics(adm, all_metrics, weights, tmp_path, free_port):
    """Features gathered from 2 ranks in source order: IS over splits of 2 (order-sensitive) and P/R agree."""
    root, _ = adm
    out = tmp_path / "dist.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port),
         str(ROOT / "tools" / "fid.py"), str(root / "VIRTUAL_ref.npz"), str(root / "samples.npz"), "--cpu",
         "--metrics", "all", "--is-split-size", "2", "--pr-float32", "--no-progress", "--inception-weights",
         str(weights), "--skip-checksum", "--json", str(out)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["num_processes"] == 2
    for key in ("fid", "sfid", "inception_score"):
        assert res[key] == pytest.approx(all_metrics[key], rel=1e-4), key
    assert (res["precision"], res["recall"]) == (all_metrics["precision"], all_metrics["recall"])
    assert proc.stdout.count("Inception Score:") == 1
