"""Image conditions: making them (Canny, lowres, label maps and their errors), token shards that carry them,
both priors with a condition (the autoregressive prefix stays visible, causal over image tokens, cache equals
no cache), a conditional training run that resumes bit-exactly, and tools/sample.py --condition-image."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from test_prior_trainer import fit, tiny_cfg, train_records
from test_tokens import run_tool, tiny_tokenizer

from movq.config import AutoregressiveConfig, ConditionConfig, ConfigError, MaskGITConfig
from movq.data.conditions import (
    ConditionError,
    condition_from_picture,
    edge_map,
    edges_from_drawing,
    find_label_file,
    is_line_drawing,
    lowres_image,
    make_condition,
    read_label_map,
)
from movq.data.shapes import render_shape, shape_label_map
from movq.data.tokens import TokenDataset, finish_shard, prepare_output, read_token_manifest, write_token_manifest
from movq.generation import autoregressive as ar_sampling
from movq.generation.maskgit import generate
from movq.models.autoregressive import AutoregressivePrior, window_mask
from movq.models.maskgit import MaskGIT


# --------------------------------------------------------------------------------------
# Making conditions
# --------------------------------------------------------------------------------------
def test_edges_lowres_and_line_drawings():
    img = np.zeros((32, 32, 3), np.uint8)
    img[8:24, 8:24] = 200  # a bright square: edges on its outline only
    e = edge_map(img)
    assert e.shape == (1, 32, 32) and e.dtype == np.uint8 and set(np.unique(e)) == {0, 1}
    assert e[0, 16, 16] == 0 and e[0, 2, 2] == 0 and e[0, 7:10, 16].any()
    lo = lowres_image(np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3), 4)
    assert lo.shape == (3, 4, 4) and lo.dtype == np.uint8
    block = np.arange(16 * 16 * 3).reshape(16, 16, 3)[:4, :4, 0] % 256
    assert lo[0, 0, 0] == np.round(block.mean())
    with pytest.raises(ConditionError, match="multiple of the factor 3"):
        lowres_image(img, 3)
    # a drawing: black lines on white is its own edge map (the rarer colour is the line)
    sketch = np.full((32, 32, 3), 255, np.uint8)
    sketch[10, 4:28] = 0
    assert is_line_drawing(sketch) and not is_line_drawing(img * 0 + np.uint8(120))
    drawn = edges_from_drawing(sketch)
    assert drawn.sum() == 24 and drawn[0, 10, 5] == 1
    cfg = ConditionConfig(kind="edges")
    got, how = condition_from_picture(cfg, np.repeat(np.repeat(sketch, 2, 0), 2, 1), (32, 32))
    assert "line drawing" in how and "resized" in how and got[0, 10, 5] == 1 and got.sum() == 24


def test_label_maps_by_name_and_their_errors(tmp_path):
    labels = np.zeros((6, 8), np.uint8)
    labels[2:4, 3:6] = 2
    pal = Image.fromarray(labels, mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    (tmp_path / "seg" / "cats").mkdir(parents=True)
    pal.save(tmp_path / "seg" / "cats" / "a.png")
    Image.fromarray(labels * 3, mode="L").save(tmp_path / "seg" / "b.png")  # grey: value = class id
    assert find_label_file(tmp_path / "seg", "cats/a.jpg") == tmp_path / "seg" / "cats" / "a.png"
    assert find_label_file(tmp_path / "seg", "dogs/b.jpeg") == tmp_path / "seg" / "b.png"  # by file stem
    got = read_label_map((tmp_path / "seg" / "cats" / "a.png").read_bytes(), "a.png")
    assert np.array_equal(got, labels)  # palette index = class id, whatever the colours
    assert read_label_map((tmp_path / "seg" / "b.png").read_bytes(), "b.png").max() == 6
    with pytest.raises(ConditionError, match="no label map for dogs/c.jpg: looked for .*seg/dogs/c.png"):
        find_label_file(tmp_path / "seg", "dogs/c.jpg")
    cfg = ConditionConfig(kind="segmentation", num_classes=3)
    img = np.zeros((6, 8, 3), np.uint8)
    assert make_condition(cfg, img, labels, "a.png").shape == (1, 6, 8)
    with pytest.raises(ConditionError, match=r"label map b.png holds class id 6, outside the 3 classes"):
        make_condition(cfg, img, labels * 3, "b.png")
    with pytest.raises(ConfigError, match="num_classes"):
        ConditionConfig.__init__(ConditionConfig.__new__(ConditionConfig), kind="segmentation", num_classes=1)


def test_shape_label_map_matches_the_pixels():
    img, label, info = render_shape(5, 32)
    seg = shape_label_map(5, 32)
    assert set(np.unique(seg)) == {0, 1 + label}
    inside = img[seg == 1 + label].astype(float)
    assert np.abs(inside.mean(0) - np.array(info["colour"])).max() < 25  # the shape's colour
    assert np.array_equal(render_shape(5, 32)[0], img)  # drawing is unchanged by asking for the mask


# --------------------------------------------------------------------------------------
# Token shards with conditions
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("ctok") / "ema")  # 16² images → 2 × 8×8, K = 16


def test_tokenize_shapes_with_edges_and_segmentation(tmp_path, tok):
    cache = tmp_path / "cache"
    out = tmp_path / "edges"
    assert run_tool("--tokenizer", tok, "shapes", out, "--builtin-size", 4, "--cache-dir", cache, "--flip",
                    "--condition", "edges") == 0
    m = read_token_manifest(out)
    assert m["condition"] == {"kind": "edges", "sigma": 1.0, "shape": [1, 16, 16]}
    data = TokenDataset(out)
    assert data.conditions.shape == (8, 1, 16, 16) and data.conditions.dtype == np.uint8
    for i in range(4):  # the same pixels the tokens came from; the flipped copy has the flipped condition
        assert np.array_equal(data.conditions[2 * i], edge_map(render_shape(i, 16)[0]))
        assert np.array_equal(data.conditions[2 * i + 1], data.conditions[2 * i][..., ::-1])
    assert data.take([0, 1])["condition"].shape == (2, 1, 16, 16)
    seg = tmp_path / "seg"
    assert run_tool("--tokenizer", tok, "shapes", seg, "--builtin-size", 4, "--cache-dir", cache,
                    "--condition", "segmentation") == 0
    assert read_token_manifest(seg)["condition"]["num_classes"] == 9
    assert np.array_equal(TokenDataset(seg).conditions[3, 0], shape_label_map(3, 16))


def test_tokenize_folder_segmentation_errors_name_the_file(tmp_path, tok, capsys):
    (tmp_path / "img").mkdir()
    (tmp_path / "seg").mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{name}.png")
    Image.fromarray(np.full((20, 24), 1, np.uint8)).save(tmp_path / "seg" / "a.png")
    args = ["--tokenizer", tok, tmp_path / "img", "--condition", "segmentation", "--condition-classes", 2,
            "--segmentation-dir", tmp_path / "seg"]
    assert run_tool(*args[:3], tmp_path / "t1", *args[3:]) == 2
    assert "no label map for b.png: looked for" in capsys.readouterr().err
    Image.fromarray(np.full((20, 24), 5, np.uint8)).save(tmp_path / "seg" / "b.png")
    assert run_tool(*args[:3], tmp_path / "t2", *args[3:]) == 2
    assert "b.png holds class id 5, outside the 2 classes" in capsys.readouterr().err
    Image.fromarray(np.full((20, 24), 0, np.uint8)).save(tmp_path / "seg" / "b.png")
    assert run_tool(*args[:3], tmp_path / "t3", *args[3:]) == 0
    cond = TokenDataset(tmp_path / "t3").conditions
    assert cond.shape == (2, 1, 16, 16) and cond[0].min() == 1 and cond[1].max() == 0


# --------------------------------------------------------------------------------------
# The models
# --------------------------------------------------------------------------------------
def _ar(factorization="depth", window=0, kind="lowres"):
    torch.manual_seed(0)
    size = (4, 4) if kind == "lowres" else (16, 16)
    cc = ConditionConfig(kind=kind, size=size, hidden=8)
    return AutoregressivePrior(AutoregressiveConfig(
        codebook_size=8, channels=2, grid=4, num_classes=3, width=32, depth=2, heads=2, factorization=factorization,
        window=window, condition=cc)).eval()


def test_window_mask_keeps_the_prefix_visible():
    m = window_mask(10, 2, sink=4)
    assert m[9, :4].all() and not m[9, 4:8].any() and m[9, 8:].all() and not m[3, 4:].any()
    assert torch.equal(window_mask(6, 2), window_mask(6, 2, sink=1))  # one sink: the class token, as before


@pytest.mark.parametrize("factorization,window", [("depth", 0), ("flat", 2), ("cell", 2)])
def test_autoregressive_prefix_causal_and_cached(factorization, window):
    m = _ar(factorization, window)
    tokens = torch.randint(0, 8, (2, 2, 4, 4), generator=torch.Generator().manual_seed(1))
    cond = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        logits = m(tokens, labels, cond)
        later = tokens.clone()
        later[:, :, 3, 3] = (later[:, :, 3, 3] + 1) % 8
        assert torch.equal(m(later, labels, cond)[:, :, :3], logits[:, :, :3])  # causal over image tokens
        changed = cond.clone()
        changed[:, :, 3, 3] = 255 - changed[:, :, 3, 3]  # the last cell's condition...
        assert (m(tokens, labels, changed)[:, :, 0, 0] - logits[:, :, 0, 0]).abs().max() > 0  # ...reaches the first
        assert torch.allclose(m(tokens, labels, None), m(tokens, labels, cond, torch.ones(2, dtype=torch.bool)))
    # the KV cache (prefilled with the prefix, the window's ring after it) gives the teacher-forced logits
    drawn, hist = ar_sampling.sample(m, labels, condition=cond, generator=torch.Generator().manual_seed(0),
                                     return_history=True)
    with torch.no_grad():
        lp = torch.log_softmax(m(drawn, labels, cond).float(), -1).gather(-1, drawn[..., None])[..., 0]
    assert torch.allclose(lp, hist.logprobs, atol=1e-5)
    guided = ar_sampling.sample(m, None, num_samples=2, condition=cond[:1], cfg_scale=2.0,
                                generator=torch.Generator().manual_seed(0))
    assert guided.shape == (2, 2, 4, 4)
    with pytest.raises(ValueError, match="training grid"):
        ar_sampling.sample_large(m, 6, num_samples=1)


def test_maskgit_adds_the_condition_per_cell():
    torch.manual_seed(0)
    cc = ConditionConfig(kind="edges", size=(16, 16), hidden=8)
    m = MaskGIT(MaskGITConfig(codebook_size=8, channels=2, grid=4, num_classes=0, width=32, depth=1, heads=2,
                              dropout=0.0, attn_dropout=0.0, condition=cc)).eval()
    tokens = torch.full((2, 2, 4, 4), 8)
    cond = torch.zeros(2, 1, 16, 16, dtype=torch.uint8)
    cond[:, :, 4:12, 4:12] = 1
    with torch.no_grad():
        a, b = m(tokens, None, cond), m(tokens, None, torch.zeros_like(cond))
        assert (a - b).abs().max() > 0 and a.shape == (2, 2, 4, 4, 8)
        assert torch.equal(m(tokens, None, None), m(tokens, None, cond, torch.tensor([True, True])))
        with pytest.raises(ValueError, match=r"values must lie in \[0, 1\]"):
            m(tokens, None, cond * 2)
        with pytest.raises(ValueError, match=r"shape \[2, 1, 16, 16\]"):
            m(tokens, None, cond[:, :, :8])
    out = generate(m, None, num_samples=2, condition=cond[:1], cfg_scale=2.0, steps=3,
                   generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 2, 4, 4) and out.max() < 8
    plain = MaskGIT(MaskGITConfig(codebook_size=8, channels=2, grid=4, num_classes=0, width=32, depth=1, heads=2))
    with pytest.raises(ValueError, match="has none"):
        plain(tokens, None, cond)


# --------------------------------------------------------------------------------------
# Training, resume, sampling
# --------------------------------------------------------------------------------------
def make_conditional_tokens(out: Path, tokenizer: Path, n_shards=2, per=8) -> Path:
    """Token maps of C=2 × 4×4 whose edge condition (8² images) says which of two patterns a sample is."""
    rng = np.random.default_rng(0)
    spec = {"channels": 2, "height": 4, "width": 4, "codebook_size": 16, "classes": ["a", "b", "c"],
            "tokenizer": str(tokenizer), "condition": {"kind": "edges", "sigma": 1.0, "shape": [1, 8, 8]}}
    prepare_output(out, spec)
    patterns = rng.integers(0, 16, (2, 2, 4, 4))
    for j in range(n_shards):
        samples = []
        for i in range(per):
            k = (j * per + i) % 2
            cond = np.zeros((1, 8, 8), np.uint8)
            cond[0, :, 2 + 3 * k] = 1  # a vertical line, left or right
            samples.append((f"{j}_{i}", patterns[k].astype(np.uint16), i % 3, cond))
        finish_shard(out, j, samples, {}, {})
    write_token_manifest(out, n_shards)
    return out


@pytest.fixture(scope="module")
def cdata(tmp_path_factory):
    root = tmp_path_factory.mktemp("cprior")
    tok = tiny_tokenizer(root / "tok", resolution=8)
    return {"tokens": make_conditional_tokens(root / "tokens", tok), "tokenizer": tok}


def _ccfg(run_dir, tokens, kind="maskgit", **train):
    cfg = tiny_cfg(run_dir, tokens, **train)
    cfg.sample.grid_images = 2
    if kind == "autoregressive":
        import dataclasses

        from movq.config import PriorConfig, load_config, to_dict

        raw = to_dict(cfg)
        raw["kind"] = "autoregressive"
        ar_keys = {f.name for f in dataclasses.fields(AutoregressiveConfig)}  # drop MaskGIT's own keys
        raw["model"] = {k: v for k, v in raw["model"].items() if k in ar_keys}
        raw["model"]["factorization"] = "cell"
        raw["sample"]["cfg_schedule"] = "constant"
        cfg = load_config(PriorConfig, raw)
    cfg.model.condition = ConditionConfig(kind="edges", hidden=8)
    return cfg


@pytest.mark.parametrize("kind", ["maskgit", "autoregressive"])
def test_conditional_training_resumes_bit_exact(tmp_path, cdata, kind):
    straight, _ = fit(_ccfg(tmp_path / "a", cdata["tokens"], kind, max_steps=4, eval_every=4, save_every=2))
    fit(_ccfg(tmp_path / "b", cdata["tokens"], kind, max_steps=2, eval_every=4, save_every=2))
    resumed, summary = fit(_ccfg(tmp_path / "b", cdata["tokens"], kind, max_steps=4, eval_every=4, save_every=2,
                                 resume="latest"))
    assert summary["steps"] == 4
    a, b = train_records(tmp_path / "a"), train_records(tmp_path / "b")
    for step in (3, 4):
        for key in ("loss", "condition_dropped", "grad_norm"):
            assert a[step][key] == b[step][key], (step, key)
    sa, sb = straight.prior.state_dict(), resumed.prior.state_dict()
    assert any(k.startswith("condition.") for k in sa) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert straight.prior.config.condition.size == (8, 8)  # taken from the token folder
    # the grid shows each condition above its sample: 2 rows of 8² pictures
    assert Image.open(tmp_path / "a" / "images" / "samples_0000004.png").size == (2 * 10 + 2, 2 * 10 + 2)


def test_trainer_refuses_another_condition(tmp_path, cdata):
    cfg = _ccfg(tmp_path / "a", cdata["tokens"])
    cfg.model.condition = ConditionConfig(kind="lowres", factor=2)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    from movq.training.prior import PriorTrainer

    with pytest.raises(ValueError, match=r"model.condition \{'kind': 'lowres', 'factor': 2\} differs from the "
                                         r"condition of the tokens in .*\{'kind': 'edges', 'sigma': 1.0\}"):
        PriorTrainer(cfg)


@pytest.mark.parametrize("kind", ["maskgit", "autoregressive"])
def test_sample_script_with_a_condition_image(tmp_path, cdata, kind, capsys):
    from test_sample_script import run as run_sample

    fit(_ccfg(tmp_path / "run", cdata["tokens"], kind, max_steps=1, grad_accum=1, eval_every=100, save_every=1))
    line = np.zeros((16, 16, 3), np.uint8)  # a line drawing at twice the training size: taken as the edges
    line[:, 4:6] = 255
    Image.fromarray(line).save(tmp_path / "sketch.png")
    out = tmp_path / "out"
    code = run_sample("--checkpoint", tmp_path / "run", "--num-samples", 3, "--out", out, "--condition", "edges",
                      "--condition-image", tmp_path / "sketch.png", "--cfg-scale", 2, "--cpu")
    assert code == 0, capsys.readouterr().err
    assert Image.open(out / "condition.png").size == (8, 8)
    assert np.asarray(Image.open(out / "condition.png").convert("L"))[:, 2].min() == 255  # the line, resized
    assert Image.open(out / "strip.png").size == (4 * 10 + 2, 12)  # condition | 3 samples
    info = json.loads((out / "sampling.json").read_text())
    assert "line drawing" in info["condition_made"] and info["cfg_scale"] == 2.0
    code = run_sample("--checkpoint", tmp_path / "run", "--num-samples", 1, "--out", tmp_path / "o2", "--cpu")
    assert code == 2 and "conditioned on edges: pass --condition edges" in capsys.readouterr().err
    code = run_sample("--checkpoint", tmp_path / "run", "--num-samples", 1, "--out", tmp_path / "o3", "--cpu",
                      "--condition", "lowres", "--condition-image", tmp_path / "sketch.png")
    assert code == 2 and "the prior is conditioned on edges" in capsys.readouterr().err


def test_condition_scores():
    from movq.evaluation.conditions import PriorCheck, edge_f1, held_out, lowres_psnr, mask_iou, report

    cfg = ConditionConfig(kind="edges")
    real, conds = held_out(cfg, 4, 32)
    assert np.allclose(edge_f1(real, conds, cfg.sigma), 1.0)  # a real image follows its own condition
    img = np.zeros((1, 32, 32, 3), np.uint8)
    img[0, 8:24, 8:24] = 255
    e = edge_map(img[0])[None]
    e1 = np.zeros_like(e)
    e1[..., 1:] = e[..., :-1]  # one pixel off: within the tolerance
    assert edge_f1(img, e1, 1.0)[0] == 1.0 and edge_f1(img, np.zeros_like(e), 1.0)[0] == 0.0
    small = lowres_image(real[0], 4)[None]
    assert lowres_psnr(real[:1], small, 4)[0] > 60 and lowres_psnr(real[:1], 255 - small, 4)[0] < 15
    seg_cfg = ConditionConfig(kind="segmentation", num_classes=9)
    real, seg = held_out(seg_cfg, 8, 32)
    assert mask_iou(real, seg).mean() > 0.8 and mask_iou(real[::-1], seg).mean() < 0.5  # a wrong shape scores low
    figures = report(PriorCheck({"conditional_cfg1": np.array([2.0, 3.0]), "unconditional": np.array([1.0, 1.0])}, {}))
    assert figures["difference"]["conditional_cfg1"]["mean"] == 1.5 and figures["unconditional"]["sem"] == 0.0


def test_edges_without_scikit_image_name_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "skimage.feature", None)
    with pytest.raises(ImportError, match=r"pip install 'movq\[conditions\]'"):
        edge_map(np.zeros((8, 8, 3), np.uint8))


def test_tokenize_shards_with_seg_png(tmp_path, tok, capsys):
    """Shards made elsewhere carry each sample's label map as seg.png; one without it is an error naming it."""
    import io

    from movq.data.shards import TarShard

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        return buf.getvalue()

    rng = np.random.default_rng(0)
    labels = np.zeros((16, 16), np.uint8)
    labels[4:12, 4:12] = 2
    (tmp_path / "shards").mkdir()
    with TarShard(tmp_path / "shards" / "a.tar") as shard:
        for key in ("x", "y"):
            shard.add(key, {"png": png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)), "seg.png": png(labels)})
    args = ["--source", "shards", "--condition", "segmentation", "--condition-classes", 3]
    assert run_tool("--tokenizer", tok, tmp_path / "shards" / "a.tar", tmp_path / "t", *args) == 0
    assert np.array_equal(TokenDataset(tmp_path / "t").conditions[1, 0], labels)
    with TarShard(tmp_path / "shards" / "b.tar") as shard:
        shard.add("z", {"png": png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))})
    assert run_tool("--tokenizer", tok, tmp_path / "shards" / "b.tar", tmp_path / "t2", *args) == 2
    assert "b.tar:z: no seg.png member" in capsys.readouterr().err


def test_conditional_fid_samples_with_the_token_folders_conditions(tmp_path, cdata, monkeypatch):
    """FID of a conditional prior: its samples are drawn with conditions from the token folder (sample i:
    training sample i mod N's), as the sample grids are, and the figure is finite."""
    from movq.evaluation import fid
    from movq.evaluation.inception import standin_state_dict
    from movq.training import prior as prior_mod

    weights = tmp_path / "standin-inception.pth"
    torch.save(standin_state_dict(seed=0), weights)
    original = fid.FIDTracker.__init__
    monkeypatch.setattr(fid.FIDTracker, "__init__", lambda self, *a, **kw: original(self, *a, **{**kw, "verify": False}))
    seen = []
    sample = prior_mod.sample_prior

    def recording(model, labels, settings, **kw):
        seen.append(kw.get("condition"))
        return sample(model, labels, settings, **kw)

    monkeypatch.setattr(prior_mod, "sample_prior", recording)
    cfg = _ccfg(tmp_path / "a", cdata["tokens"], max_steps=1, grad_accum=1, eval_every=100, fid_every=1,
                fid_num_images=4, inception_weights=str(weights))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer, summary = fit(cfg)
    finally:
        torch.set_num_threads(threads)
    assert np.isfinite(summary["eval"]["fid"]) and summary["eval"]["fid"] >= 0
    used = [c for c in seen if c is not None]
    assert used and sum(len(c) for c in used) >= 4, seen
    expected = trainer._conditions_of(np.arange(4)).cpu()
    assert torch.equal(torch.cat([c.cpu() for c in used])[:4], expected)


def test_model_cards_name_the_condition():
    ar = _ar(kind="lowres").config
    card = str(AutoregressivePrior.model_card(ar))
    assert "3 classes and an image condition (lowres: downsampled 4×)" in card and "autoregressive prior" in card
    mg = MaskGITConfig(codebook_size=16, channels=2, grid=4, num_classes=3, width=16, depth=1, heads=2,
                       condition=ConditionConfig(kind="edges"))
    assert "3 classes and an image condition (edges: Canny sigma 1.0)" in MaskGIT.card_summary(mg)
    assert "; 3 classes;" in MaskGIT.card_summary(MaskGITConfig(codebook_size=16, channels=2, grid=4, num_classes=3,
                                                                width=16, depth=1, heads=2))
