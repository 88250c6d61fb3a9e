"""tools/sample.py on a tiny checkpoint: N images and a valid .npz, resumable and reproducible,
rank split, editing that keeps the known tokens, and clear failures on bad input."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from test_tokens import tiny_tokenizer

from movq.cli import sample as sample_tool
from movq.config import PriorConfig, load_config
from movq.generation.sampler import (
    SamplingDefaults,
    load_prior,
    plan_batches,
    sample_labels,
    save_sampling_defaults,
)
from movq.models.maskgit import MaskGIT

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A random class-conditional prior (3 classes, 2 × 4×4 tokens, K = 16) + its 8² tokenizer."""
    root = tmp_path_factory.mktemp("sample")
    tok = tiny_tokenizer(root / "tok", resolution=8)
    cfg = load_config(PriorConfig, {
        "model": {"codebook_size": 16, "channels": 2, "grid": 4, "num_classes": 3, "width": 32, "depth": 1, "heads": 2},
        "data": {"tokenizer": str(tok)},
        "sample": {"steps": 4, "cfg_scale": 1.5},
    })
    torch.manual_seed(0)
    folder = root / "run" / "checkpoints" / "0000010" / "ema"
    MaskGIT(cfg.model).save_pretrained(folder)
    save_sampling_defaults(folder, SamplingDefaults(cfg.sample, cfg.data.tokenizer))
    return root / "run"


def run(*args) -> int:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return sample_tool.main([str(a) for a in args])


def test_writes_n_images_and_npz_resumably(tmp_path, ckpt):
    out = tmp_path / "s"
    assert run("--checkpoint", ckpt, "--num-samples", 5, "--out", out, "--batch-size", 2, "--grid", "--steps-strip") == 0
    pngs = sorted(p.name for p in out.glob("[0-9]*.png"))
    assert pngs == [f"{i:06d}.png" for i in range(5)]
    with np.load(out / "samples.npz", allow_pickle=False) as f:
        arr = f["arr_0"]
    assert arr.shape == (5, 8, 8, 3) and arr.dtype == np.uint8
    assert (out / "grid.png").is_file()
    strip = np.asarray(Image.open(out / "steps.png"))
    assert strip.shape == (2 * 10 + 2, 4 * 10 + 2, 3)  # the first batch (2 samples) × 4 steps
    assert np.array_equal(strip[12:20, 32:40], arr[1])  # the last step is the written sample
    info = json.loads((out / "sampling.json").read_text())
    assert info["generated_now"] == 5 and info["steps"] == 4 and info["cfg_scale"] == 1.5

    # resumable: only the missing image is drawn again, identically (noise seeded per batch)
    before = (out / "000003.png").read_bytes()
    stamp = (out / "000000.png").stat().st_mtime_ns
    (out / "000003.png").unlink()
    assert run("--checkpoint", ckpt, "--num-samples", 5, "--out", out, "--batch-size", 2) == 0
    assert (out / "000003.png").read_bytes() == before
    assert (out / "000000.png").stat().st_mtime_ns == stamp
    assert json.loads((out / "sampling.json").read_text())["generated_now"] == 1
    # --classes all is the default labelling: the same sampling, nothing new to draw
    assert run("--checkpoint", ckpt, "--num-samples", 5, "--out", out, "--batch-size", 2, "--classes", "all") == 0
    assert json.loads((out / "sampling.json").read_text())["generated_now"] == 0
    # other settings are not mixed into the same folder (--save-tokens: tokens/ would miss the old samples)
    assert run("--checkpoint", ckpt, "--num-samples", 5, "--out", out, "--batch-size", 2, "--seed", 3) == 2
    assert run("--checkpoint", ckpt, "--num-samples", 5, "--out", out, "--batch-size", 2, "--save-tokens") == 2
    assert run("--checkpoint", ckpt, "--num-samples", 5, "--out", out, "--batch-size", 2, "--seed", 3, "--overwrite") == 0
    assert not (out / "grid.png").exists() and not (out / "steps.png").exists()  # not asked for this time
    assert json.loads((out / "sampling.json").read_text())["generated_now"] == 5

    # one class for all, and a different seed gives different samples
    assert run("--checkpoint", ckpt, "--num-samples", 2, "--out", tmp_path / "c", "--class-label", 2,
               "--seed", 1, "--steps", 2, "--cfg-scale", 1) == 0
    with np.load(tmp_path / "c" / "samples.npz") as f:
        assert f["arr_0"].shape == (2, 8, 8, 3) and not np.array_equal(f["arr_0"], arr[:2])


def test_label_rules():
    args = sample_tool.parse_args(["--checkpoint", "c", "--num-samples", "4", "--out", "o"])
    index = np.arange(4)
    assert sample_tool._label_rule(args, 3) == "cycle"
    assert sample_labels("cycle", 3, index, "cpu").tolist() == [0, 1, 2, 0]
    assert sample_tool._label_rule(args, 0) == "null"  # an unconditional prior
    edit = ["--edit", "x.png", "--box", "0,0,4,4"]
    args = sample_tool.parse_args(["--checkpoint", "c", "--num-samples", "4", "--out", "o", *edit])
    assert sample_tool._label_rule(args, 3) == "null"  # the image's class is unknown: no made-up classes
    assert sample_labels("null", 3, index, "cpu") is None
    args = sample_tool.parse_args(["--checkpoint", "c", "--num-samples", "4", "--out", "o", *edit, "--classes", "all"])
    assert sample_tool._label_rule(args, 3) == "cycle"
    args = sample_tool.parse_args(["--checkpoint", "c", "--num-samples", "4", "--out", "o", *edit, "--class-label", "2"])
    assert sample_tool._label_rule(args, 3) == "class 2"
    assert sample_labels("class 2", 3, index, "cpu").tolist() == [2, 2, 2, 2]


def test_rank_split_covers_each_index_once():
    n, b, world = 11, 3, 3
    seen = [int(i) for r in range(world) for batch in plan_batches(n, r, world, b) for i in batch]
    assert len(seen) == len(set(seen))  # whole batches (their noise does not depend on n), no index twice
    assert set(range(n)) <= set(seen) and all(len(batch) == b for batch in plan_batches(n, 0, world, b))


@pytest.mark.parametrize("outpaint", [False, True])
def test_edit_keeps_known_tokens(tmp_path, ckpt, outpaint):
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "e"
    args = ["--checkpoint", ckpt, "--num-samples", 3, "--out", out, "--edit", image, "--box", "4,2,10,8",
            "--save-tokens", "--batch-size", 3] + (["--outpaint"] if outpaint else [])
    assert run(*args) == 0
    src = np.load(out / "edit_source.npz")
    known = src["known"]  # [4, 4]: centre crop 12² → 8², box → cells
    assert known.shape == (4, 4) and 0 < known.sum() < 16
    changed = np.zeros((4, 4), bool)
    for i in range(3):
        t = np.load(out / "tokens" / f"{i:06d}.npy")
        assert t.dtype == np.uint16 and t.shape == (2, 4, 4)
        assert np.array_equal(t[:, known], src["tokens"][:, known])
        changed |= (t != src["tokens"]).any(0)
    assert not (changed & known).any() and changed.any()
    assert (out / "edit.png").is_file() and np.load(out / "samples.npz")["arr_0"].shape == (3, 8, 8, 3)


def test_bad_inputs_fail_clearly(tmp_path, ckpt, capsys):
    image = tmp_path / "photo.png"
    Image.new("RGB", (16, 12)).save(image)
    base = ["--num-samples", 2, "--out", tmp_path / "o"]
    cases = [
        (["--checkpoint", tmp_path / "missing"], "--checkpoint"),
        (["--checkpoint", ckpt, "--class-label", 3], "--class-label 3 is outside [0, 3)"),
        (["--checkpoint", ckpt, "--edit", tmp_path / "none.png", "--box", "0,0,4,4"], "no such file"),
        (["--checkpoint", ckpt, "--edit", image, "--box", "4,2,40,8"], "must satisfy 0 <= x0 < x1 <= 16"),
        (["--checkpoint", ckpt, "--edit", image, "--box", "0,2,2,8"], "outside the centre square"),
        (["--checkpoint", ckpt, "--tokenizer", tmp_path], "--tokenizer"),
        (["--checkpoint", ckpt, "--tokenizer", tmp_path], "is not a model folder"),
        (["--checkpoint", ckpt.parent / "tok"], "holds a tokenizer (MoVQ), not a prior (MaskGIT or AutoregressivePrior)"),
    ]
    for extra, message in cases:
        assert run(*extra, *base) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
    for extra in (["--box", "1,2,3"], ["--box", "0,0,4,4"], ["--outpaint"], ["--num-samples", 0]):
        with pytest.raises(SystemExit) as e:
            sample_tool.parse_args(["--checkpoint", str(ckpt), "--num-samples", "2", "--out", "o", *map(str, extra)])
        assert e.value.code == 2
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.png"))



def test_warns_when_the_tokenizer_is_not_the_tokens_one(tmp_path, ckpt, capsys):
    model, defaults = load_prior(ckpt)
    defaults.tokenizer_sha256 = "0" * 64  # its tokens were made by some other tokenizer
    model.save_pretrained(tmp_path / "prior")
    save_sampling_defaults(tmp_path / "prior", defaults)
    assert run("--checkpoint", tmp_path / "prior", "--num-samples", 1, "--out", tmp_path / "s", "--steps", 1) == 0
    assert "learned tokens of another tokenizer" in capsys.readouterr().err
    defaults.tokenizer_sha256 = None  # nothing to compare with: no warning
    model.save_pretrained(tmp_path / "prior2")
    save_sampling_defaults(tmp_path / "prior2", defaults)
    assert run("--checkpoint", tmp_path / "prior2", "--num-samples", 1, "--out", tmp_path / "s2", "--steps", 1) == 0
    assert "another tokenizer" not in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# The autoregressive prior, larger images, and tools/fid.py on both priors' folders
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ar_ckpt(ckpt):
    """A random autoregressive prior of the same tokens (3 classes, 2 × 4×4, K = 16), same tokenizer."""
    from movq.models.autoregressive import AutoregressivePrior

    tok = ckpt.parent / "tok"
    cfg = load_config(PriorConfig, {
        "kind": "autoregressive",
        "model": {"codebook_size": 16, "channels": 2, "grid": 4, "num_classes": 3, "width": 32, "depth": 1,
                  "depth_layers": 1, "heads": 2},
        "data": {"tokenizer": str(tok)},
        "sample": {"cfg_scale": 1.5, "top_k": 12},
    })
    torch.manual_seed(1)
    folder = ckpt.parent / "ar" / "checkpoints" / "0000010" / "ema"
    AutoregressivePrior(cfg.model).save_pretrained(folder)
    save_sampling_defaults(folder, SamplingDefaults(cfg.sample, cfg.data.tokenizer))
    return ckpt.parent / "ar"


def test_autoregressive_prior_samples_resumably_with_its_settings(tmp_path, ar_ckpt):
    out = tmp_path / "s"
    assert run("--checkpoint", ar_ckpt, "--num-samples", 5, "--out", out, "--batch-size", 2, "--grid",
               "--steps-strip", "--top-p", 0.9, "--save-tokens") == 0
    with np.load(out / "samples.npz") as f:
        arr = f["arr_0"]
    assert arr.shape == (5, 8, 8, 3) and (out / "grid.png").is_file()
    info = json.loads((out / "sampling.json").read_text())
    assert info["kind"] == "autoregressive" and info["top_k"] == 12 and info["top_p"] == 0.9
    assert info["cfg_scale"] == 1.5 and "steps" not in info and info["grid"] == [4, 4]
    strip = np.asarray(Image.open(out / "steps.png"))
    assert strip.shape[0] == 2 * 10 + 2 and strip.shape[1] > 10  # 2 samples × the snapshots of the canvas
    assert np.array_equal(strip[12:20, -10:-2], arr[1])  # the last snapshot is the written sample
    before = (out / "000004.png").read_bytes()
    (out / "000004.png").unlink()
    assert run("--checkpoint", ar_ckpt, "--num-samples", 5, "--out", out, "--batch-size", 2, "--top-p", 0.9,
               "--save-tokens") == 0
    assert (out / "000004.png").read_bytes() == before  # the same noise: redrawn identically
    assert json.loads((out / "sampling.json").read_text())["generated_now"] == 1
    # one class for all samples: every token map differs from another seed's
    assert run("--checkpoint", ar_ckpt, "--num-samples", 2, "--out", tmp_path / "c", "--class-label", 1,
               "--seed", 4, "--cfg-scale", 1) == 0


@pytest.mark.parametrize("which", ["maskgit", "autoregressive"])
def test_larger_than_training_size(tmp_path, ckpt, ar_ckpt, which):
    prior = ckpt if which == "maskgit" else ar_ckpt
    out = tmp_path / "big"
    assert run("--checkpoint", prior, "--num-samples", 3, "--out", out, "--batch-size", 2, "--size", 12, 16,
               "--save-tokens", "--grid") == 0
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (3, 12, 16, 3)  # tokenizer f2: a 6×8 token grid from a 4×4 prior
    assert np.load(out / "tokens" / "000002.npy").shape == (2, 6, 8)
    info = json.loads((out / "sampling.json").read_text())
    assert info["grid"] == [6, 8] and info["image_size"] == [12, 16]
    assert info["overlap"] is None  # MaskGIT: the default, half a window; the autoregressive prior has none
    # the same by token grid
    assert run("--checkpoint", prior, "--num-samples", 3, "--out", tmp_path / "cells", "--batch-size", 2,
               "--cells", 6, 8) == 0
    assert np.array_equal(np.load(tmp_path / "cells" / "samples.npz")["arr_0"], np.load(out / "samples.npz")["arr_0"])
    if which == "maskgit":
        assert run("--checkpoint", prior, "--num-samples", 1, "--out", tmp_path / "ov", "--cells", 8, 8,
                   "--overlap", 0) == 0
        assert np.load(tmp_path / "ov" / "samples.npz")["arr_0"].shape == (1, 16, 16, 3)


def test_flags_of_the_other_prior_and_bad_sizes_fail_clearly(tmp_path, ckpt, ar_ckpt, capsys):
    image = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(image)
    base = ["--num-samples", 1, "--out", tmp_path / "o"]
    cases = [
        ([ckpt, "--top-k", 5], "--top-k do(es) not apply to a MaskGIT prior"),
        ([ar_ckpt, "--steps", 4], "--steps do(es) not apply to an autoregressive prior"),
        ([ar_ckpt, "--size", 16, 16, "--overlap", 2], "--overlap"),
        ([ar_ckpt, "--edit", image, "--box", "0,0,4,4"], "cannot fill a box"),
        ([ckpt, "--size", 4, 16], "smaller than the training grid 4×4 (8×8 pixels)"),
        ([ckpt, "--size", 9, 16], "multiples of the tokenizer's downsampling factor 2"),
        ([ckpt, "--cells", 8, 8, "--overlap", 4], "--overlap 4 must be less than the window"),
        ([ckpt, "--size", 16, 16, "--steps-strip"], "--steps-strip shows the sampler at the training size"),
    ]
    for extra, message in cases:
        assert run("--checkpoint", *extra, *base) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)


def test_fid_on_both_priors_sample_folders(tmp_path, ckpt, ar_ckpt):
    from movq.cli import fid as fid_tool
    from movq.evaluation.inception import standin_state_dict

    for name, prior in (("m", ckpt), ("a", ar_ckpt)):
        assert run("--checkpoint", prior, "--num-samples", 3, "--out", tmp_path / name, "--grid") == 0
    weights = tmp_path / "standin-inception.pth"
    torch.save(standin_state_dict(seed=0), weights)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Inception at 299² dominates; one thread is as fast here
    try:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        assert fid_tool.main([str(tmp_path / "m"), str(tmp_path / "a"), "--inception-weights", str(weights),
                              "--skip-checksum", "--json", str(tmp_path / "fid.json"), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads((tmp_path / "fid.json").read_text())
    assert np.isfinite(res["fid"]) and [s["images"] for s in res["sources"]] == [3, 3]  # grid.png is not a sample
