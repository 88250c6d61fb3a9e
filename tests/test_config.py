import pytest

from movq.config import ConfigError, TokenizerConfig, load_config, save_config


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  base_channels: 16\n  channel_mult: [1, 2]\nquantizer:\n  channels: 2\n")
    cfg = load_config(TokenizerConfig, p, ["quantizer.dim=4", "train.resume=latest", "model.attn_resolutions=8"])
    assert cfg.model.base_channels == 16 and cfg.model.channel_mult == (1, 2)
    assert cfg.quantizer.channels == 2 and cfg.quantizer.dim == 4
    assert cfg.train.resume == "latest" and cfg.model.attn_resolutions == (8,)


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  base_chanels: 16\n")
    with pytest.raises(ConfigError, match=r"model\.base_chanels.*bad\.yaml"):
        load_config(TokenizerConfig, p)
    with pytest.raises(ConfigError, match=r"trian"):
        load_config(TokenizerConfig, None, ["trian.max_steps=3"])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("model.base_channels=abc", "expected an integer"),
        ("model.norm=batch", "not one of"),
        ("quantizer.cosine=3", "true/false"),
        ("train.betas=[0.5]", "expected 2 items"),
        ("model.base_channels", "key.sub=value"),
    ],
)
def test_wrong_types_fail_clearly(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(TokenizerConfig, None, [override])


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(TokenizerConfig, "nope.yaml")


def test_round_trip(tmp_path):
    cfg = load_config(TokenizerConfig, "configs/tiny.yaml")
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(TokenizerConfig, tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("name", ["tiny", "ffhq256", "imagenet256", "vqgan_ffhq256", "vqgan_imagenet256"])
def test_shipped_configs_load(name):
    cfg = load_config(TokenizerConfig, f"configs/{name}.yaml")
    if name != "tiny":  # the paper's setting: 256² → 16×16 cells, one codebook of 1024 codes
        assert cfg.model.resolution // 2 ** (len(cfg.model.channel_mult) - 1) == 16
        assert cfg.quantizer.codebook_size == 1024
        assert cfg.quantizer.channels * cfg.quantizer.dim == 256
        assert (cfg.model.norm, cfg.quantizer.channels) == (("group", 1) if "vqgan" in name else ("spatial", 4))


def test_output_problem(tmp_path):
    from movq.utils import output_problem

    (tmp_path / "f").write_text("x")
    assert output_problem(tmp_path / "new" / "deeper" / "out.json") is None  # folders are made
    assert output_problem(tmp_path / "out", folder=True) is None
    assert "is a file" in output_problem(tmp_path / "f", folder=True)
    assert "is a folder" in output_problem(tmp_path / "out")
    assert "cannot create" in output_problem(tmp_path / "f" / "below" / "x.json")  # a file in the way


def test_main_job_configs_fit_together():
    """tools/main_job.sh: the shapes tokenizer's latent is what both priors are built for, and the
    files the script names exist."""
    from pathlib import Path

    from movq.config import PriorConfig
    from movq.data.shapes import SHAPE_CLASSES

    tok = load_config(TokenizerConfig, "configs/shapes.yaml")
    assert tok.data.source == "shapes" and tok.data.image_size == tok.model.resolution
    grid = tok.model.resolution // 2 ** (len(tok.model.channel_mult) - 1)
    script = Path("tools/main_job.sh").read_text()
    for name, kind in [("maskgit_shapes", "maskgit"), ("ar_shapes", "autoregressive")]:
        assert f"configs/{name}.yaml" in script
        prior = load_config(PriorConfig, f"configs/{name}.yaml")
        m = prior.model
        assert prior.kind == kind and prior.data.model_shape == "from_tokens"
        assert (m.codebook_size, m.channels, m.grid_hw, m.num_classes) == (
            tok.quantizer.codebook_size, tok.quantizer.channels, (grid, grid), len(SHAPE_CLASSES))
        assert prior.data.tokens.startswith(tok.train.run_dir) and prior.train.run_dir.startswith(tok.train.run_dir)
    assert "configs/shapes.yaml" in script and "tools/judge_samples.py" in script
