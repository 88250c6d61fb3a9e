"""MaskGIT prior: config, shapes, masking, loss, bad inputs, and a tiny overfit on CPU."""
from pathlib import Path

import pytest
import torch
import yaml

from movq.config import ConfigError, MaskGITConfig
from movq.models.maskgit import MaskGIT

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny(**kw) -> MaskGITConfig:
    base = dict(codebook_size=64, channels=4, grid=4, num_classes=10, width=32, depth=1, heads=2,
                dropout=0.0, attn_dropout=0.0)
    base.update(kw)
    return MaskGITConfig(**base)


@pytest.mark.parametrize("name", ["maskgit_tiny.yaml", "maskgit_base.yaml"])
def test_config_files_load(name):
    cfg = MaskGITConfig.load(yaml.safe_load((CONFIGS / name).read_text())["model"])
    if name == "maskgit_base.yaml":
        assert (cfg.depth, cfg.width, cfg.heads) == (24, 768, 16)
    else:
        assert (cfg.codebook_size, cfg.channels, cfg.width, cfg.depth) == (64, 4, 64, 2)
        MaskGIT(cfg)


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown config key"):
        MaskGITConfig.load({"widht": 64})
    with pytest.raises(ConfigError, match="mask_schedule"):
        MaskGITConfig.load({"mask_schedule": "exp"})
    with pytest.raises(ValueError, match="divisible by heads"):
        MaskGITConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="min_mask_rate"):
        MaskGITConfig(min_mask_rate=1.5)
    assert MaskGITConfig.load({"grid": [4, 6]}).grid_hw == (4, 6)
    assert MaskGITConfig.load(None, ["grid=8"]).grid_hw == (8, 8)


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(grid=(3, 5)), dict(channels=1, codebook_size=16), dict(num_classes=0), dict(depth=2, heads=4)],
)
def test_output_shape(kw):
    cfg = tiny(**kw)
    model = MaskGIT(cfg)
    h, w = cfg.grid_hw
    tokens = torch.randint(0, cfg.codebook_size + 1, (3, cfg.channels, h, w))  # includes [MASK]
    labels = torch.randint(0, cfg.num_classes + 1, (3,))
    out = model(tokens, labels)
    assert out.shape == (3, cfg.channels, h, w, cfg.codebook_size)
    assert model(tokens).shape == out.shape  # labels=None → null class
    loss, logs = model.training_loss(tokens.clamp(max=cfg.codebook_size - 1), labels.clamp(max=max(cfg.num_classes - 1, 0)))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert set(logs) == {"loss", "accuracy", "mask_rate", "class_dropped"}


def test_channel_order_matters():
    """Per-channel tables: swapping two channels' codes in a cell changes the prediction."""
    torch.manual_seed(0)
    model = MaskGIT(tiny()).eval()
    tokens = torch.randint(0, 64, (1, 4, 4, 4))
    swapped = tokens.clone()
    swapped[:, [0, 1]] = tokens[:, [1, 0]]
    assert not torch.allclose(model(tokens), model(swapped))


def test_class_in_cells_adds_the_class_to_every_cell():
    """class_in_cells: a cell's input embedding is its tokens' plus the class embedding (the class token
    stays first); off, the class enters through its token alone. Same weights, so the state dicts load
    into each other, and the flag survives a save / load."""
    torch.manual_seed(0)
    on = MaskGIT(tiny(class_in_cells=True)).eval()
    off = MaskGIT(tiny()).eval()
    off.load_state_dict(on.state_dict())
    tokens = torch.randint(0, 65, (2, 4, 4, 4))
    labels = torch.tensor([3, 10])  # a class and the null class
    seen = {}
    off.emb_norm.register_forward_hook(lambda m, args, out: seen.__setitem__("off", args[0]))
    on.emb_norm.register_forward_hook(lambda m, args, out: seen.__setitem__("on", args[0]))
    with torch.no_grad():
        a, b = off(tokens, labels), on(tokens, labels)
    cls = on.class_emb(labels)[:, None]
    assert torch.allclose(seen["on"][:, 1:], seen["off"][:, 1:] + cls)  # every cell, the null class too
    assert torch.equal(seen["on"][:, :1], seen["off"][:, :1])  # the class token itself unchanged
    assert not torch.allclose(a, b)


def test_class_in_cells_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MaskGIT(tiny(class_in_cells=True)).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = MaskGIT.from_pretrained(tmp_path / "m")
    tokens, labels = torch.randint(0, 65, (2, 4, 4, 4)), torch.tensor([1, 2])
    assert loaded.config.class_in_cells
    with torch.no_grad():
        assert torch.equal(loaded(tokens, labels), model(tokens, labels))


def test_init_and_param_groups():
    model = MaskGIT(tiny())
    w = model.blocks[0].mlp[0].weight
    assert w.abs().max() <= 0.04 + 1e-6 and 0.01 < w.std() < 0.03  # trunc normal 0.02 at ±2σ
    assert torch.all(model.head.bias == 0)
    groups = model.param_groups(0.05)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    decayed = {id(p) for p in groups[0]["params"]}
    assert id(model.head.weight) in decayed and id(model.token_emb.weight) not in decayed


def test_random_mask_counts_and_min_rate():
    tokens = torch.zeros(256, 4, 4, 4, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    m = MaskGIT(tiny()).random_mask(tokens, g)
    counts = m.flatten(1).sum(1)
    assert counts.min() >= 1 and counts.max() <= 64
    # cosine schedule of r ~ U(0,1): mean masked fraction is 2/π ≈ 0.64
    assert abs(m.float().mean().item() - 2 / torch.pi) < 0.05
    m = MaskGIT(tiny(min_mask_rate=0.5)).random_mask(tokens, g)
    assert m.flatten(1).sum(1).min() >= 32
    # masking is per token: some cells are partly masked
    per_cell = m.sum(1)
    assert ((per_cell > 0) & (per_cell < 4)).any()


def test_loss_deterministic_with_generator_and_only_masked():
    torch.manual_seed(0)
    model = MaskGIT(tiny())
    tokens = torch.randint(0, 64, (4, 4, 4, 4))
    labels = torch.arange(4)
    a = model.training_loss(tokens, labels, torch.Generator().manual_seed(3))[0]
    b = model.training_loss(tokens, labels, torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, b)


def test_loss_is_on_masked_tokens_only():
    torch.manual_seed(0)
    model = MaskGIT(tiny(label_smoothing=0.0, class_dropout=0.0))
    tokens = torch.randint(0, 64, (4, 4, 4, 4))
    labels = torch.arange(4)
    loss, logs = model.training_loss(tokens, labels, torch.Generator().manual_seed(1))
    masked = model.random_mask(tokens, torch.Generator().manual_seed(1))  # the same draws
    logits = model(torch.where(masked, torch.full_like(tokens, model.mask_id), tokens), labels)
    expected = torch.nn.functional.cross_entropy(logits[masked], tokens[masked])
    torch.testing.assert_close(loss, expected)
    assert logs["mask_rate"] == masked.float().mean()


def test_class_dropout_uses_null_class():
    model = MaskGIT(tiny(class_dropout=1.0))
    tokens = torch.randint(0, 64, (4, 4, 4, 4))
    _, logs = model.training_loss(tokens, torch.arange(4), torch.Generator().manual_seed(0))
    assert logs["class_dropped"] == 1.0
    uncond = MaskGIT(tiny(num_classes=0))
    assert uncond.null_class == 0 and uncond.class_emb.num_embeddings == 1
    uncond.training_loss(tokens)  # no labels needed


def test_bad_inputs():
    model = MaskGIT(tiny())
    ok = torch.randint(0, 64, (2, 4, 4, 4))
    labels = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"shape \[B, 4, 4, 4\]"):
        model(ok[:, :3], labels)
    with pytest.raises(ValueError, match="shape"):
        model(ok[..., :3], labels)
    with pytest.raises(ValueError, match="integer"):
        model(ok.float(), labels)
    with pytest.raises(ValueError, match="token ids"):
        model(ok + 10, labels)  # ids above K
    with pytest.raises(ValueError, match="no \\[MASK\\] in targets"):
        model.training_loss(torch.full_like(ok, 64), labels)
    with pytest.raises(ValueError, match="labels must lie"):
        model(ok, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="labels must be integers of shape"):
        model(ok, torch.tensor([0]))
    with pytest.raises(ValueError, match="needs labels"):
        model.training_loss(ok, None)
    with pytest.raises(ValueError, match="empty batch"):
        model.training_loss(ok[:0], labels[:0])


def test_tiny_prior_overfits():
    """A handful of token maps, one per class: the masked-token loss collapses within 150 steps."""
    torch.manual_seed(0)
    cfg = MaskGITConfig.load(yaml.safe_load((CONFIGS / "maskgit_tiny.yaml").read_text())["model"])
    cfg.label_smoothing, cfg.class_dropout = 0.0, 0.0
    model = MaskGIT(cfg)
    tokens = torch.randint(0, cfg.codebook_size, (4, cfg.channels, *cfg.grid_hw))
    labels = torch.arange(4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        loss, _ = model.training_loss(tokens.repeat(4, 1, 1, 1), labels.repeat(4), g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert end < 0.3 * start, (start, end)


def test_save_pretrained_round_trip_and_old_prior_folders(tmp_path):
    from movq.config import PriorConfig, load_config, save_config
    from movq.generation.sampler import load_prior
    from movq.utils import save_state_dict

    cfg = MaskGITConfig(codebook_size=16, channels=2, grid=4, num_classes=3, width=32, depth=1, heads=2)
    torch.manual_seed(0)
    model = MaskGIT(cfg).eval()
    model.save_pretrained(tmp_path / "new")
    loaded = MaskGIT.from_pretrained(tmp_path / "new")
    tokens = torch.randint(0, 17, (2, 2, 4, 4))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens)) and loaded.config == cfg
    # a prior folder as written before format 1: model.safetensors + the whole PriorConfig as config.yaml
    old = load_config(PriorConfig, {"model": vars(cfg), "data": {"tokenizer": "runs/tok"}, "sample": {"steps": 3}})
    (tmp_path / "old").mkdir()
    save_state_dict(model.state_dict(), tmp_path / "old" / "model.safetensors")
    save_config(old, tmp_path / "old" / "config.yaml")
    legacy, defaults = load_prior(tmp_path / "old")
    with torch.no_grad():
        assert torch.equal(legacy(tokens), model(tokens))
    assert defaults.sample.steps == 3 and defaults.tokenizer == "runs/tok"
