"""Text guidance with CLIP (tools/clip_guide.py): a tiny random transformers CLIP saved in the layout the tool
reads, a tiny random tokenizer; the loss falls and the image changes, a seed fixes a run, a missing file or a bad
prompt or flag is one clear line."""
import json
import math
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_tokens import tiny_tokenizer

from movq.cli import clip_guide
from movq.config import ClipGuidanceConfig, PriorConfig, load_config
from movq.generation import clip_guidance as cg
from movq.generation.sampler import SamplingDefaults, save_sampling_defaults
from movq.models.autoencoder import MoVQ
from movq.models.clip import EXAMPLE_REPO, ClipFilesError, clip_files, load_clip
from movq.models.maskgit import MaskGIT

LETTERS = "abcdefghijklmnopqrstuvwxyz"
MERGES = ["c a", "ca t</w>", "d o", "do g</w>"]
CONTEXT = 16  # the tiny CLIP's max_position_embeddings (77 in every released CLIP)


def write_tiny_clip(folder, seed: int = 0):
    """A random CLIPModel (2 layers of width 32 per tower, 32² images in 8² patches) saved as transformers
    does (config.json + model.safetensors), with a BPE vocabulary of letters and two words (vocab.json, merges.txt)."""
    from transformers import CLIPConfig, CLIPModel

    vocab = {c: i for i, c in enumerate(LETTERS)}
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(LETTERS)})
    for m in MERGES:
        vocab[m.replace(" ", "")] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=CONTEXT, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], **tower),
        vision_config=dict(image_size=32, patch_size=8, **tower),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(folder, safe_serialization=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    return folder, vocab


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second thread costs more in synchronisation than it computes (on a busy 2-core
    machine, ten times more)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    clip_dir, vocab = write_tiny_clip(root / "clip")
    tok_dir = tiny_tokenizer(root / "tok", resolution=16)  # 16² images ↔ 2 × 8×8 tokens, K = 16
    # A random MoVQ's codebook is uniform in ±1/K; a trained one spreads out. Spread it so that Adam's default
    # step moves z between codes as it does on a trained tokenizer.
    tok = MoVQ.from_pretrained(tok_dir)
    with torch.no_grad():
        tok.quantizer.codebook.copy_(torch.randn(tok.quantizer.codebook.shape, generator=torch.Generator().manual_seed(1)))
    tok.save_pretrained(tok_dir)
    return {"clip": clip_dir, "tok": tok_dir, "vocab": vocab, "root": root}


@pytest.fixture(scope="module")
def models(files):
    return load_clip(files["clip"]), MoVQ.from_pretrained(files["tok"]).eval()


def run(capsys, *args):
    """(exit code, stderr lines) of tools/clip_guide.py."""
    capsys.readouterr()
    try:
        code = clip_guide.main([str(a) for a in args])
    except SystemExit as e:  # argparse
        code = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "CLIP guidance:" not in line]
    return code, [line for line in err if " INFO " not in line]


# --------------------------------------------------------------------------------------
# The pieces
# --------------------------------------------------------------------------------------
def test_parse_prompt():
    assert cg.parse_prompt("a cat") == ("a cat", 1.0)
    assert cg.parse_prompt("a cat:-0.5") == ("a cat", -0.5)
    assert cg.parse_prompt("ratio 16:9 frame") == ("ratio 16:9 frame", 1.0)
    assert cg.parse_prompt("time: noon") == ("time: noon", 1.0)  # a last part that is no number is text
    for bad in ("", "   ", ":2", "a cat:nan", "a cat:inf"):
        with pytest.raises(ValueError):
            cg.parse_prompt(bad)


def test_spherical_distance_is_half_the_squared_angle():
    theta = torch.tensor([0.0, 0.3, 1.2, math.pi / 2, 2.5])
    x = torch.stack([torch.ones_like(theta), torch.zeros_like(theta)], 1)
    y = torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    d = cg.spherical_distance(x, y)  # [5, 5]: row i against every y
    assert torch.allclose(d[0], theta**2 / 2, atol=1e-6)
    assert math.isclose(float(cg.spherical_distance(x[:1], -x[:1])), math.pi**2 / 2, rel_tol=1e-5)


def test_clamp_with_grad_passes_gradients_that_point_back_into_range():
    x = torch.tensor([-0.5, 0.5, 1.5, 1.5], requires_grad=True)
    y = cg.clamp_with_grad(x, 0.0, 1.0)
    assert y.tolist() == [0.0, 0.5, 1.0, 1.0]
    (y * torch.tensor([1.0, 1.0, 1.0, -1.0])).sum().backward()
    # descending on x[0] (below range) with gradient +1 would lower it further: stopped; x[2] above range with
    # gradient +1 is pulled back down: kept; x[3] with −1 would rise further: stopped.
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_cutouts_shapes_ranges_and_seed():
    img = torch.rand(1, 3, 40, 24)
    a = cg.make_cutouts(img, 16, 6, generator=torch.Generator().manual_seed(3))
    b = cg.make_cutouts(img, 16, 6, generator=torch.Generator().manual_seed(3))
    c = cg.make_cutouts(img, 16, 6, generator=torch.Generator().manual_seed(4))
    assert a.shape == (6, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    plain = cg.make_cutouts(img, 16, 6, generator=torch.Generator().manual_seed(3), augment=False, noise=0.0)
    assert plain.min() >= 0 and plain.max() <= 1  # resized pixels of the image, nothing added
    whole = cg.make_cutouts(img[..., :16, :16], 16, 2, generator=torch.Generator(), augment=False, noise=0.0)
    assert torch.allclose(whole, img[..., :16, :16].expand(2, -1, -1, -1))  # image side = CLIP's: the image itself
    with pytest.raises(ValueError, match="one image"):
        cg.make_cutouts(torch.rand(2, 3, 8, 8), 8, 1, generator=torch.Generator())


def test_codebook_range_is_laid_out_like_z(models):
    _, tok = models
    lo, hi = cg.codebook_range(tok)
    q = tok.quantizer
    z = q.lookup(torch.randint(0, q.codebook_size, (1, q.channels, 3, 3)))
    assert lo.shape == hi.shape == (1, q.channels * q.cfg.dim, 1, 1)
    assert torch.all(z >= lo) and torch.all(z <= hi)
    assert torch.equal(lo[0, : q.cfg.dim, 0, 0], q.codebook.min(0).values)


# --------------------------------------------------------------------------------------
# The CLIP folder
# --------------------------------------------------------------------------------------
def test_clip_encodes_unit_vectors_with_its_tokenizer(files, models):
    clip, _ = models
    v = files["vocab"]
    ids = clip.tokenize("a cat")[0].tolist()
    assert ids == [v["<|startoftext|>"], v["a</w>"], v["cat</w>"], v["<|endoftext|>"]]  # the test's BPE is read
    text = clip.encode_text(["a cat", "the dog"])
    assert text.shape == (2, 16) and torch.allclose(text.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(text[0], text[1])
    img = torch.rand(3, 3, 32, 32, requires_grad=True)
    emb = clip.encode_image(img)
    assert emb.shape == (3, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-6)
    emb[:, 0].sum().backward()
    assert img.grad.abs().sum() > 0  # guidance needs this gradient
    with pytest.raises(ValueError, match="CLIP expects images"):
        clip.encode_image(torch.rand(1, 3, 24, 24))
    with pytest.raises(ValueError, match=f"at most {CONTEXT}"):
        clip.tokenize("a " * CONTEXT)
    with pytest.raises(ValueError, match="empty"):
        clip.tokenize("  ")


@pytest.mark.parametrize("remove, named", [
    ("model.safetensors", "model.safetensors"),
    ("config.json", "config.json"),
    ("vocab.json", "vocab.json"),
    ("merges.txt", "merges.txt"),
])
def test_a_missing_file_is_one_clear_error(tmp_path, files, remove, named):
    folder = tmp_path / "clip"
    shutil.copytree(files["clip"], folder)
    (folder / remove).unlink()
    with pytest.raises(ClipFilesError) as e:
        clip_files(folder)
    msg = str(e.value)
    assert str(folder / named) in msg and EXAMPLE_REPO in msg and "\n" not in msg
    with pytest.raises(ClipFilesError):
        load_clip(folder)


def test_which_layouts_are_refused(tmp_path, files):
    folder = tmp_path / "clip"
    shutil.copytree(files["clip"], folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ClipFilesError, match="never pytorch_model.bin"):
        clip_files(folder)
    (folder / "config.json").rename(folder / "open_clip_config.json")
    with pytest.raises(ClipFilesError, match="open_clip checkpoint, which is not read"):
        clip_files(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(ClipFilesError, match="'siglip' model, not a transformers CLIPModel"):
        clip_files(folder)
    with pytest.raises(ClipFilesError, match="does not exist"):
        clip_files(tmp_path / "nowhere")
    # tokenizer.json alone (what a fast tokenizer saves) is enough
    from transformers import CLIPTokenizerFast

    alone = tmp_path / "alone"
    shutil.copytree(files["clip"], alone)
    CLIPTokenizerFast.from_pretrained(files["clip"]).backend_tokenizer.save(str(alone / "tokenizer.json"))
    (alone / "vocab.json").unlink()
    (alone / "merges.txt").unlink()
    assert clip_files(alone)["tokenizer"].name == "tokenizer.json"
    assert load_clip(alone).tokenize("a cat").tolist() == load_clip(files["clip"]).tokenize("a cat").tolist()


def test_without_transformers_the_error_says_how_to_install(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers → ImportError
    with pytest.raises(ImportError, match=r"pip install 'movq\[clip\]'"):
        load_clip(files["clip"])


# --------------------------------------------------------------------------------------
# The optimisation
# --------------------------------------------------------------------------------------
def _fixed_loss(clip, image, text) -> float:
    """The guidance loss on cut-outs drawn with one fixed seed, without noise: comparable across images."""
    cuts = cg.make_cutouts(image, clip.image_size, 16, generator=torch.Generator().manual_seed(123), noise=0.0)
    return float(cg.spherical_distance(clip.encode_image(cuts), text).mean())


def test_guidance_lowers_the_loss_and_changes_the_image(models):
    clip, tok = models
    g = torch.Generator().manual_seed(0)
    z0 = cg.random_latent(tok, (8, 8), g)
    start_image, start_tokens = cg.synthesize(tok, z0)
    cfg = ClipGuidanceConfig(steps=15, cutn=8)
    res = cg.guide(tok, clip, [cg.Prompt("a cat")], z0, cfg, generator=g, snapshot_every=5)
    text = clip.encode_text(["a cat"])
    with torch.no_grad():
        before, after = _fixed_loss(clip, start_image, text), _fixed_loss(clip, res.image, text)
    assert after < before - 0.02, (before, after)
    assert res.final_similarity[0] > res.initial_similarity[0] + 0.02
    assert np.mean(res.losses[-5:]) < np.mean(res.losses[:5])
    changed = (res.tokens != start_tokens).float().mean()
    assert changed > 0.2 and (res.image - start_image).abs().mean() > 0.02
    assert [s for s, _ in res.frames] == [0, 5, 10, 15]
    assert torch.equal(res.frames[0][1], start_image.detach()) and torch.equal(res.frames[-1][1], res.image)
    # the result is exactly its tokens decoded, and z stayed within the codebook's range
    with torch.no_grad():
        assert torch.allclose(res.image, (tok.decode_indices(res.tokens).add(1) / 2).clamp(0, 1), atol=1e-6)
    lo, hi = cg.codebook_range(tok)
    assert torch.all(res.z >= lo) and torch.all(res.z <= hi)


def test_a_negative_weight_guides_away(models):
    clip, tok = models
    z0 = cg.random_latent(tok, (8, 8), torch.Generator().manual_seed(0))
    res = cg.guide(tok, clip, [cg.Prompt("a cat", -1.0)], z0, ClipGuidanceConfig(steps=15, cutn=8),
                   generator=torch.Generator().manual_seed(0))
    assert res.final_similarity[0] < res.initial_similarity[0] - 0.02


def test_guide_rejects_bad_settings(models):
    clip, tok = models
    z0 = cg.random_latent(tok, (8, 8), torch.Generator())
    with pytest.raises(ValueError, match="weight 0"):
        cg.guide(tok, clip, [cg.Prompt("a cat", 0.0)], z0, ClipGuidanceConfig(steps=1), generator=torch.Generator())
    with pytest.raises(ValueError, match="cutn >= 1"):
        cg.guide(tok, clip, [cg.Prompt("a cat")], z0, ClipGuidanceConfig(cutn=0), generator=torch.Generator())


# --------------------------------------------------------------------------------------
# The tool
# --------------------------------------------------------------------------------------
def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_tool_writes_image_strip_tokens_and_json(tmp_path, files, capsys):
    out = tmp_path / "g"
    code, err = run(capsys, "--clip", files["clip"], "--tokenizer", files["tok"], "--prompt", "a cat",
                    "--prompt", "the dog:-0.5", "--out", out, "--steps", 6, "--cutn", 4, "--save-every", 2,
                    "--size", "24x16", "--cpu")
    assert code == 0, err
    image = _png(out / "image.png")
    assert image.shape == (16, 24, 3)
    info = json.loads((out / "run.json").read_text())
    assert [p["text"] for p in info["prompts"]] == ["a cat", "the dog"] and info["prompts"][1]["weight"] == -0.5
    assert info["steps"] == 6 and len(info["loss"]["per_step"]) == 6 and info["frames"] == [0, 2, 4, 6]
    assert info["start"] == {"kind": "random"} and info["size"] == [16, 24] and info["seed"] == 0
    assert all(math.isfinite(p["final_similarity"]) for p in info["prompts"])
    strip = _png(out / "progress.png")
    assert strip.shape == (16 + 4, 4 * (24 + 2) + 2, 3)  # four frames in a row, 2 px apart
    assert np.array_equal(strip[2:18, -26:-2], image)  # the last frame is the result
    tokens = np.load(out / "tokens.npy")
    assert tokens.shape == (2, 8, 12) and tokens.dtype == np.uint16
    tok = MoVQ.from_pretrained(files["tok"]).eval()
    with torch.no_grad():
        decoded = tok.decode_indices(torch.from_numpy(tokens.astype(np.int64))[None])
    assert np.abs(((decoded[0].clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy() - image).max() <= 1
    # OUT holds a run now: refused without --overwrite
    code, err = run(capsys, "--clip", files["clip"], "--tokenizer", files["tok"], "--prompt", "a cat", "--out", out)
    assert code == 2 and len(err) == 1 and "--overwrite" in err[0]


def test_a_seed_fixes_the_run(tmp_path, files, capsys):
    img = tmp_path / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(img)
    runs = {}
    for name, seed in [("a", 5), ("b", 5), ("c", 6)]:
        code, err = run(capsys, "--clip", files["clip"], "--tokenizer", files["tok"], "--prompt", "a cat",
                        "--out", tmp_path / name, "--steps", 4, "--cutn", 4, "--seed", seed, "--init-image", img,
                        "--init-weight", 0.5, "--cpu")
        assert code == 0, err
        runs[name] = (json.loads((tmp_path / name / "run.json").read_text()), (tmp_path / name / "image.png").read_bytes())
    (a, a_png), (b, b_png), (c, _) = runs["a"], runs["b"], runs["c"]
    assert a["start"]["kind"] == "image" and a["settings"]["init_weight"] == 0.5
    assert a["loss"]["per_step"] == b["loss"]["per_step"] and a_png == b_png
    assert a["prompts"] == b["prompts"]
    assert a["loss"]["per_step"] != c["loss"]["per_step"]  # other cut-outs


def _save_prior(folder, model_class, cfg):
    """A prior of ``cfg`` (seeded weights) saved with its sampling defaults, as the prior trainer leaves it."""
    torch.manual_seed(0)
    model_class(cfg.model).save_pretrained(folder)
    save_sampling_defaults(folder, SamplingDefaults(cfg.sample, cfg.data.tokenizer))
    return folder


def test_starting_from_a_maskgit_sample(tmp_path, files, capsys):
    cfg = load_config(PriorConfig, {
        "model": {"codebook_size": 16, "channels": 2, "grid": 8, "num_classes": 3, "width": 32, "depth": 1, "heads": 2},
        "data": {"tokenizer": str(files["tok"])}, "sample": {"steps": 3}})
    prior = _save_prior(tmp_path / "prior", MaskGIT, cfg)
    code, err = run(capsys, "--clip", files["clip"], "--prior", prior, "--prior-class", 1, "--prompt", "a dog",
                    "--out", tmp_path / "g", "--steps", 2, "--cutn", 2, "--cpu")
    assert code == 0, err
    info = json.loads((tmp_path / "g" / "run.json").read_text())
    assert info["start"]["kind"] == "prior" and info["start"]["prior_class"] == 1 and info["start"]["prior_steps"] == 3
    assert info["tokenizer"]["path"] == str(files["tok"]) and info["size"] == [16, 16]
    code, err = run(capsys, "--clip", files["clip"], "--prior", prior, "--prior-class", 3, "--prompt", "a dog",
                    "--out", tmp_path / "h", "--cpu")
    assert code == 2 and len(err) == 1 and "outside [0, 3)" in err[0]
    code, err = run(capsys, "--clip", files["clip"], "--prior", files["tok"], "--prompt", "a dog", "--out", tmp_path / "h")
    assert code == 2 and len(err) == 1 and "not a prior" in err[0]


def test_starting_from_an_autoregressive_sample(tmp_path, files, capsys):
    """--prior reads either prior by the class in its config.json; the start is that prior's sample."""
    from movq.generation.sampler import load_prior, load_tokenizer_for, sample_prior
    from movq.models.autoregressive import AutoregressivePrior

    cfg = load_config(PriorConfig, {
        "kind": "autoregressive",
        "model": {"codebook_size": 16, "channels": 2, "grid": 8, "num_classes": 3, "width": 32, "depth": 1, "heads": 2,
                  "factorization": "cell"},
        "data": {"tokenizer": str(files["tok"])}, "sample": {"top_k": 4}})
    prior = _save_prior(tmp_path / "ar", AutoregressivePrior, cfg)
    code, err = run(capsys, "--clip", files["clip"], "--prior", prior, "--prior-class", 2, "--prompt", "a dog",
                    "--out", tmp_path / "g", "--steps", 1, "--cutn", 2, "--seed", 3, "--cpu")
    assert code == 0, err
    info = json.loads((tmp_path / "g" / "run.json").read_text())
    assert info["start"]["prior_kind"] == "autoregressive" and info["start"]["prior_class"] == 2
    # the start is the autoregressive prior's own sample with the seed's generator (its defaults: top-k 4)
    model, defaults = load_prior(prior)
    tokens = sample_prior(model, torch.tensor([2]), defaults.sample, num_samples=1,
                          generator=torch.Generator().manual_seed(3))
    tok = load_tokenizer_for(model, files["tok"], "cpu")
    from movq.generation.clip_guidance import latent_from_tokens, synthesize

    with torch.no_grad():
        start, _ = synthesize(tok, latent_from_tokens(tok, tokens))  # [1, 3, 16, 16] in [0, 1]
    expected = (start[0] * 255).round().clamp(0, 255).permute(1, 2, 0).numpy()
    first_frame = np.asarray(Image.open(tmp_path / "g" / "progress.png").convert("RGB"))[2:18, 2:18]
    assert info["size"] == [16, 16] and np.abs(first_frame.astype(float) - expected).max() <= 1


def test_bad_input_is_one_line_exit_2(tmp_path, files, capsys):
    c, t, out = files["clip"], files["tok"], tmp_path / "o"
    no_weights = tmp_path / "no_weights"
    shutil.copytree(c, no_weights)
    (no_weights / "model.safetensors").unlink()
    no_merges = tmp_path / "no_merges"
    shutil.copytree(c, no_merges)
    (no_merges / "merges.txt").unlink()
    cases = [
        (["--clip", no_weights, "--tokenizer", t, "--prompt", "a cat"], "model.safetensors is missing"),
        (["--clip", no_merges, "--tokenizer", t, "--prompt", "a cat"], "merges.txt is missing"),
        (["--clip", tmp_path / "nowhere", "--tokenizer", t, "--prompt", "a cat"], "does not exist"),
        (["--clip", c, "--tokenizer", t, "--prompt", ""], "has no text"),
        (["--clip", c, "--tokenizer", t, "--prompt", ":3"], "has no text"),
        (["--clip", c, "--tokenizer", t, "--prompt", "a cat:0"], "every weight is 0"),
        (["--clip", c, "--tokenizer", t, "--prompt", "a " * CONTEXT], f"at most {CONTEXT}"),
        (["--clip", c, "--tokenizer", t, "--prompt", "a cat", "--steps", 0], "--steps"),
        (["--clip", c, "--tokenizer", t, "--prompt", "a cat", "--lr", -1], "--lr"),
        (["--clip", c, "--tokenizer", t, "--prompt", "a cat", "--size", "15"], "multiple of the tokenizer's"),
        (["--clip", c, "--tokenizer", t, "--prompt", "a cat", "--size", "big"], "--size must be"),
        (["--clip", c, "--tokenizer", t, "--prompt", "a cat", "--prior-class", 1], "--prior-class needs --prior"),
        (["--clip", c, "--tokenizer", t, "--prompt", "a cat", "--init-image", tmp_path / "x.png"], "no such file"),
        (["--clip", c, "--prompt", "a cat"], "--tokenizer is needed"),
        (["--clip", c, "--tokenizer", tmp_path / "nowhere", "--prompt", "a cat"], "does not exist"),
        (["--clip", c, "--tokenizer", t], "--prompt"),
    ]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    cases.append((["--clip", c, "--tokenizer", t, "--prompt", "a cat", "--init-image", tmp_path / "broken.png"],
                  "not a usable image"))
    for args, expected in cases:
        code, err = run(capsys, *args, "--out", out, "--cpu")
        assert code == 2, (args, err)
        assert len(err) == 1 and expected in err[0], (args, err)
    assert not (out / "run.json").exists()
