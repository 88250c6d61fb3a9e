"""tools/ablate.py: a 2-variant × 2-seed grid of a few steps, its report, equal budgets, resume; and the
bookkeeping of movq.evaluation.ablation."""
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from movq.config import TokenizerConfig, load_config
from movq.evaluation import ablation
from movq.models.autoencoder import MoVQ
from movq.models.layers import SpatialNorm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import ablate  # noqa: E402

TINY = {
    "model": {"resolution": 16, "base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
              "attn_resolutions": [], "mid_attention": False, "norm_groups": 4},
    "quantizer": {"codebook_size": 16, "channels": 2, "dim": 4, "usage_window": 4},
    "discriminator": {"base_channels": 8, "n_layers": 1},
    "loss": {"perceptual_weight": 0.0, "disc_start": 100},
    "data": {"source": "builtin", "image_size": 16, "batch_size": 2, "num_workers": 0,
             "builtin_train_size": 16, "builtin_val_size": 4},
    "train": {"max_steps": 3, "log_every": 1, "eval_every": 100, "save_every": 2, "ema_decay": 0.9},
}


def test_variants_are_the_grid_of_norm_and_channels():
    v = ablation.parse_variant("spatial-single+init-identity", channels=4, dim=8)
    assert v.overrides == ("model.norm=spatial", "quantizer.channels=1", "quantizer.dim=32",
                           "model.spatial_norm_init=identity")
    assert ablation.parse_variant("group-multi", 4, 8).overrides == (
        "model.norm=group", "quantizer.channels=4", "quantizer.dim=8")
    for bad in ("batch-single", "spatial-double", "spatial-multi+nope", "group-multi+init-identity"):
        with pytest.raises(ValueError, match="variant"):
            ablation.parse_variant(bad, 4, 8)


def test_statistics_and_pairs():
    cells = [{"variant": v, "seed": s, "metrics": {"psnr": p}}
             for v, s, p in [("a", 0, 20.0), ("a", 1, 22.0), ("b", 0, 19.0), ("b", 1, 22.5), ("b", 2, 30.0)]]
    agg = ablation.aggregate(cells, ["a", "b"])
    assert agg["a"]["psnr"]["mean"] == 21.0 and agg["a"]["psnr"]["std"] == pytest.approx(2 ** 0.5)
    assert agg["b"]["seeds"] == [0, 1, 2]
    pair = ablation.paired(cells, "a", "b")  # only the seeds both have
    assert pair["seeds"] == [0, 1] and pair["values"] == [1.0, -0.5] and pair["wins"] == 1
    assert pair["mean"] == pytest.approx(0.25)
    # usage over training: evenly spaced steps that every seed logged (the last included), seed means
    cells[0]["usage_curve"] = [{"step": s, "usage": 1.0 - s / 100} for s in range(1, 13)]
    cells[1]["usage_curve"] = [{"step": s, "usage": 1.0 - s / 50} for s in range(2, 14)]
    curve = ablation.usage_curve(cells, "a", points=3)
    assert [s for s, _ in curve] == [5, 9, 12] and curve[-1][1]["mean"] == pytest.approx(1.0 - 0.12 * 1.5)
    assert [s for s, _ in ablation.usage_curve(cells, "a", points=20)] == list(range(2, 13))
    assert ablation.usage_curve(cells, "b") == []


def test_identity_init_starts_as_group_norm():
    cfg = load_config(TokenizerConfig, TINY, ["model.spatial_norm_init=identity"])
    torch.manual_seed(0)
    spatial = MoVQ(cfg).eval()
    norms = [m for m in spatial.decoder.modules() if isinstance(m, SpatialNorm)]
    assert norms and all(float(m.conv_y.bias.detach().min()) == 1.0 and not m.conv_y.weight.any() for m in norms)
    z = torch.randn(1, 8, 8, 8)
    with torch.no_grad():  # the modulation ignores zq at step 0: the decoder is the GroupNorm one
        assert torch.equal(spatial.decoder(z, torch.randn(1, 8, 8, 8)), spatial.decoder(z, torch.randn(1, 8, 8, 8)))


def test_zq_after_post_quant_conv():
    cfg = load_config(TokenizerConfig, TINY, ["model.spatial_norm_zq=post_quant", "model.z_channels=6"])
    model = MoVQ(cfg)
    assert model.decoder.norm_out.inner.conv_y.in_channels == 6  # z_channels wide, not C·d = 8
    assert model(torch.rand(1, 3, 16, 16) * 2 - 1)[0].shape == (1, 3, 16, 16)


@pytest.mark.slow
def test_grid_trains_reports_and_resumes(tmp_path, capsys):
    cfg = tmp_path / "base.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "data": {**TINY["data"], "cache_dir": str(tmp_path / "cache")}}))
    out = tmp_path / "report"
    argv = ["--config", str(cfg), "--variants", "group-single", "spatial-multi", "--seeds", "0", "1",
            "--work-dir", str(tmp_path / "work"), "--out", str(out), "--jobs", "2", "--threads", "1"]
    assert ablate.main(argv) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    cells = report["cells"]
    assert sorted((c["variant"], c["seed"]) for c in cells) == [
        ("group-single", 0), ("group-single", 1), ("spatial-multi", 0), ("spatial-multi", 1)]
    assert report["missing"] == [] and report["failed"] == []
    assert all(c["steps"] == 3 for c in cells) and report["budget"]["max_steps"] == 3
    # equal budgets and data; the seed is the only difference besides the variant's keys
    for c in cells:
        trained = load_config(TokenizerConfig, Path(c["run_dir"]) / "config.yaml")
        assert trained.train.seed == c["seed"] and ablation.budget(trained) == report["budget"]
        assert trained.quantizer.channels * trained.quantizer.dim == 8
        assert trained.quantizer.channels == (1 if c["variant"] == "group-single" else 2)
        m = c["metrics"]
        assert 0 < m["val_usage"] <= 1 and m["psnr"] > 0 and m["images_per_s"] > 0 and m["peak_memory_mib"] > 0
        assert m["lpips"] is None  # no LPIPS weights given
    agg = report["aggregate"]["spatial-multi"]["psnr"]
    vals = sorted(c["metrics"]["psnr"] for c in cells if c["variant"] == "spatial-multi")
    assert agg["n"] == 2 and agg["mean"] == pytest.approx(sum(vals) / 2)
    assert [c["title"] for c in report["comparisons"]] == ["full MoVQ vs VQGAN twin"]
    md = out.with_suffix(".md").read_text()
    assert "| `spatial-multi` (SpatialNorm, 2 × 4) |" in md and f"{agg['mean']:.2f} ± {agg['std']:.2f}" in md
    # a rerun trains nothing; a changed budget is refused, not mixed into the table
    capsys.readouterr()
    assert ablate.main(argv) == 0
    assert "4 cell(s) done, 0 to train" in capsys.readouterr().out
    # --no-train reports what is there and lists the rest as missing, without training it
    partial = tmp_path / "partial"
    more = ["--config", str(cfg), "--variants", "group-single", "spatial-multi", "group-multi", "--seeds", "0", "1",
            "--work-dir", str(tmp_path / "work"), "--out", str(partial), "--no-train"]
    assert ablate.main(more) == 0
    assert json.loads(partial.with_suffix(".json").read_text())["missing"] == ["group-multi/seed0", "group-multi/seed1"]
    assert not (tmp_path / "work" / "group-multi").exists()
    # the same config under another name (init-default is the default) counts for that name
    (tmp_path / "work" / "spatial-multi+init-default").symlink_to(tmp_path / "work" / "spatial-multi")
    alias = tmp_path / "alias"
    assert ablate.main(["--config", str(cfg), "--variants", "spatial-multi+init-default", "--seeds", "0", "1",
                        "--work-dir", str(tmp_path / "work"), "--out", str(alias), "--no-train"]) == 0
    aliased = json.loads(alias.with_suffix(".json").read_text())
    assert aliased["missing"] == [] and aliased["aggregate"]["spatial-multi+init-default"]["psnr"]["n"] == 2
    with pytest.raises(SystemExit):
        ablate.main([*argv, "--steps", "4"])
    assert "trained with another config" in capsys.readouterr().err
