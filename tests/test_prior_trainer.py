"""The prior's trainer: bit-exact resume, NaN guard, model shape vs tokens, checkpoints that load,
pictures with and without a tokenizer, FID that stays off without Inception weights."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from test_tokens import tiny_tokenizer

from movq.config import ConfigError, PriorConfig, load_config
from movq.data.tokens import finish_shard, prepare_output, write_token_manifest
from movq.generation.sampler import load_prior
from movq.models.maskgit import MaskGIT
from movq.training.prior import PriorTrainer, resolve_model_shape
from movq.training.run import NonFiniteError

ROOT = Path(__file__).resolve().parents[1]



def make_tokens(out: Path, classes=("a", "b", "c"), n_shards=2, per=12, tokenizer=None) -> Path:
    """Token maps of C=2 × 4×4, K=16 with structure to learn: each cell repeats its class's pattern."""
    rng = np.random.default_rng(0)
    spec = {"channels": 2, "height": 4, "width": 4, "codebook_size": 16, "classes": list(classes)}
    if tokenizer is not None:
        spec["tokenizer"] = str(tokenizer)
    prepare_output(out, spec)
    patterns = rng.integers(0, 16, (max(1, len(classes)), 2, 4, 4))
    for j in range(n_shards):
        samples = []
        for i in range(per):
            c = (j * per + i) % max(1, len(classes))
            t = patterns[c].copy()
            t[:, rng.integers(4), rng.integers(4)] = rng.integers(0, 16, 2)  # a little noise
            samples.append((f"{j}_{i}", t.astype(np.uint16), c if classes else -1))
        finish_shard(out, j, samples, {}, {})
    write_token_manifest(out, n_shards)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("prior")
    tok = tiny_tokenizer(root / "tok", resolution=8)  # 8² images → 2 × 4×4 tokens, K = 16
    return {"tokens": make_tokens(root / "tokens", tokenizer=tok), "tokenizer": tok,
            "plain": make_tokens(root / "plain", classes=())}


def tiny_cfg(run_dir, tokens, **train) -> PriorConfig:
    base = {
        "model": {"codebook_size": 16, "channels": 2, "grid": 4, "num_classes": 3, "width": 32, "depth": 1,
                  "heads": 2, "dropout": 0.1, "attn_dropout": 0.0},
        "data": {"tokens": str(tokens), "batch_size": 4},
        "train": {"run_dir": str(run_dir), "max_steps": 6, "log_every": 1, "eval_every": 3, "save_every": 3,
                  "ema_decay": 0.9, "warmup_steps": 2, "grad_accum": 2, "lr": 1e-3, "betas": [0.9, 0.96],
                  "weight_decay": 0.05, **train},
        "sample": {"steps": 3, "grid_images": 3, "inpaint_images": 2, "cfg_scale": 2.0},
    }
    return load_config(PriorConfig, base)


def fit(cfg):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    trainer = PriorTrainer(cfg)
    return trainer, trainer.fit()


def train_records(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["kind"] == "train"}


def test_resume_is_bit_exact(tmp_path, data):
    straight, _ = fit(tiny_cfg(tmp_path / "a", data["tokens"]))
    fit(tiny_cfg(tmp_path / "b", data["tokens"], max_steps=3))
    resumed, summary = fit(tiny_cfg(tmp_path / "b", data["tokens"], resume="latest"))
    assert summary["steps"] == 6
    a, b = train_records(tmp_path / "a"), train_records(tmp_path / "b")
    for step in (4, 5, 6):
        for key in ("loss", "accuracy", "mask_rate", "class_dropped", "grad_norm"):
            assert a[step][key] == b[step][key], (step, key)
    sa, sb = straight.prior.state_dict(), resumed.prior.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ea, eb = straight.ema.model.state_dict(), resumed.ema.model.state_dict()
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    # the saved EMA is a loadable prior with the run's config, tokenizer path included
    model, defaults = load_prior(tmp_path / "a")
    assert all(torch.equal(model.state_dict()[k], ea[k]) for k in ea)
    assert defaults.tokenizer == str(data["tokenizer"]) and not model.training
    assert defaults.classes == json.loads((data["tokens"] / "manifest.json").read_text())["classes"]
    live, _ = load_prior(tmp_path / "a" / "checkpoints" / "0000006", prefer="model")
    assert all(torch.equal(live.state_dict()[k], sa[k]) for k in sa)
    # pictures decoded by the tokenizer: 8² images, a row of samples and three inpainting rows
    from PIL import Image

    assert Image.open(tmp_path / "a" / "images" / "samples_0000006.png").size == (3 * 10 + 2, 12)
    assert Image.open(tmp_path / "a" / "images" / "inpaint_0000006.png").size == (2 * 10 + 2, 3 * 10 + 2)


def test_loss_falls_and_token_maps_without_tokenizer(tmp_path, data):
    cfg = tiny_cfg(tmp_path / "a", data["plain"], max_steps=30, grad_accum=1, eval_every=30, save_every=30,
                   log_every=10, fid_every=30, inception_weights=str(tmp_path / "missing.pth"))
    cfg.model.num_classes = 0  # the tokens are unlabelled: an unconditional prior
    cfg.model.label_smoothing, cfg.model.dropout = 0.0, 0.0
    trainer, summary = fit(cfg)
    recs = train_records(tmp_path / "a")
    assert recs[30]["loss"] < recs[10]["loss"] - 0.3 and recs[30]["accuracy"] > 0.6, (recs[10], recs[30])
    assert "fid" not in summary["eval"]  # no tokenizer, no Inception weights: FID is skipped
    assert (tmp_path / "a" / "images" / "samples_0000030.png").is_file()  # token maps instead


def test_sample_grids_and_inpainting_go_to_tensorboard(tmp_path, data):
    from PIL import Image
    from test_trainer import tensorboard_images

    fit(tiny_cfg(tmp_path / "a", data["tokens"], max_steps=2, grad_accum=1, eval_every=2, save_every=100,
                 trackers=["tensorboard"]))
    images = tensorboard_images(tmp_path / "a")
    for name, png in (("images/samples", "samples_0000002.png"), ("images/inpaint", "inpaint_0000002.png")):
        w, h = Image.open(tmp_path / "a" / "images" / png).size
        assert images[name] == [(2, h, w)], name


def test_fid_with_standin_inception_weights(tmp_path, data, monkeypatch):
    from movq.evaluation import fid
    from movq.evaluation.inception import standin_state_dict

    weights = tmp_path / "standin-inception.pth"
    torch.save(standin_state_dict(seed=0), weights)
    original = fid.FIDTracker.__init__
    monkeypatch.setattr(fid.FIDTracker, "__init__", lambda self, *a, **kw: original(self, *a, **{**kw, "verify": False}))
    # fid_every=1 with eval_every=2: FID follows its own schedule, not the evaluation's (as the tokenizer's)
    cfg = tiny_cfg(tmp_path / "a", data["tokens"], max_steps=2, grad_accum=1, eval_every=2, fid_every=1,
                   fid_num_images=2, inception_weights=str(weights))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Inception at 299² dominates; one thread is as fast here and never oversubscribed
    try:
        _, summary = fit(cfg)
    finally:
        torch.set_num_threads(threads)
    assert np.isfinite(summary["eval"]["fid"]) and summary["eval"]["fid"] >= 0
    assert (tmp_path / "a" / "fid_reference.npz").is_file()  # made from decoded training tokens
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    fids = {r["step"]: r["fid"] for r in records if r["kind"] == "fid"}
    assert sorted(fids) == [1, 2] and fids[2] == summary["eval"]["fid"], records


def test_nan_loss_is_skipped_then_aborts(tmp_path, data, monkeypatch):
    original = MaskGIT.training_loss
    calls = {"n": 0, "poison": {5, 6}}

    def training_loss(self, tokens, labels=None, generator=None):
        loss, logs = original(self, tokens, labels, generator)
        calls["n"] += 1
        if calls["n"] in calls["poison"]:
            loss = loss * float("nan")
            logs["loss"] = loss.detach()
        return loss, logs

    monkeypatch.setattr(MaskGIT, "training_loss", training_loss)
    trainer, summary = fit(tiny_cfg(tmp_path / "a", data["tokens"], max_steps=4, eval_every=100))
    assert summary["bad_steps"] == 1  # micro-steps 5 and 6 make optimizer step 3 (grad_accum 2)
    assert all(torch.isfinite(p).all() for p in trainer.prior.parameters())
    recs = train_records(tmp_path / "a")
    assert recs[3]["bad_steps"] == 1 and np.isfinite(recs[4]["loss"])

    calls["n"], calls["poison"] = 0, set(range(7, 1000))
    with pytest.raises(NonFiniteError, match="non-finite steps in a row"):
        fit(tiny_cfg(tmp_path / "b", data["tokens"], max_steps=20, max_bad_steps=2, eval_every=100))
    load_prior(tmp_path / "b" / "checkpoints" / "0000003")  # the last good checkpoint is intact


def test_model_shape_against_tokens(tmp_path, data):
    manifest = json.loads((data["tokens"] / "manifest.json").read_text())
    cfg = tiny_cfg(tmp_path, data["tokens"])
    cfg.model.codebook_size, cfg.model.grid = 64, 8
    with pytest.raises(ValueError, match=r"set model.codebook_size=16 model.grid=\[4, 4\]"):
        resolve_model_shape(cfg, manifest, "X")
    cfg.data.model_shape = "from_tokens"
    cfg = resolve_model_shape(cfg, manifest, "X")
    assert (cfg.model.codebook_size, cfg.model.grid_hw, cfg.model.num_classes) == (16, (4, 4), 3)
    plain = json.loads((data["plain"] / "manifest.json").read_text())
    with pytest.raises(ValueError, match="no class labels: set model.num_classes=0"):
        resolve_model_shape(tiny_cfg(tmp_path, data["plain"]), plain, "Y")
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(PriorConfig, {"data": {"token": "x"}})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prior(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="data.tokens must name a token folder"):
        fit(load_config(PriorConfig, {"train": {"run_dir": str(tmp_path / "r")}}))


TWO_RANK_SCRIPT = """
import json, sys, time
from pathlib import Path
import torch
from movq.cli import sample as sample_tool, tokenize
root, tok, img, out = map(Path, sys.argv[1:5])
write_manifest = tokenize.write_token_manifest
def slow_write(*args, **kwargs):  # rank 0 writes the manifest late: every rank's main() must wait for it
    time.sleep(2)
    return write_manifest(*args, **kwargs)
tokenize.write_token_manifest = slow_write
assert tokenize.main(["--tokenizer", str(tok), str(img), str(out / "tokens"), "--shard-size", "3", "--cpu"]) == 0
assert (out / "tokens" / "manifest.json").is_file()
from movq.config import load_config
from movq.config import PriorConfig
from movq.training.prior import PriorTrainer
cfg = load_config(PriorConfig, {
    "model": {"width": 32, "depth": 1, "heads": 2, "num_classes": 1},
    "data": {"tokens": str(out / "tokens"), "batch_size": 2, "model_shape": "from_tokens"},
    "train": {"run_dir": str(out / "run"), "max_steps": 3, "log_every": 1, "eval_every": 3, "save_every": 3},
    "sample": {"steps": 2, "grid_images": 2, "inpaint_images": 1}})
trainer = PriorTrainer(cfg)
trainer.acc.end_training = lambda: None  # keep the process group for the sampling below
trainer.fit()
flat = torch.cat([p.detach().flatten() for p in trainer.prior.parameters()])
rank = trainer.acc.process_index
assert sample_tool.main(["--checkpoint", str(out / "run"), "--num-samples", "5", "--out", str(out / "s"),
                            "--batch-size", "2", "--cpu"]) == 0
json.dump({"world": trainer.acc.num_processes, "params": flat.tolist()[:500], "sum": float(flat.double().sum()),
           "data": sorted(map(str, trainer.data.take(slice(None))["tokens"].flatten(1).tolist()))}, open(out / f"rank{rank}.json", "w"))
"""


@pytest.mark.slow
def test_two_process_cpu_tokenize_train_sample(tmp_path, data, free_port):
    """torchrun with 2 CPU processes: tokenize, train (ranks in sync, disjoint data), sample."""
    import os
    import subprocess
    import sys

    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(8):
        (tmp_path / "img" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "img" / f"c{i % 2}" / f"{i}.png")
    (tmp_path / "script.py").write_text(TWO_RANK_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", WANDB_MODE="offline")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port),
           str(tmp_path / "script.py"), str(ROOT), str(data["tokenizer"]), str(tmp_path / "img"), str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["params"] == r1["params"] and r0["sum"] == r1["sum"]  # ranks stayed in sync
    assert r0["data"] and r1["data"] and len(r0["data"]) + len(r1["data"]) == 8
    assert json.loads((tmp_path / "tokens" / "manifest.json").read_text())["count"] == 8
    with np.load(tmp_path / "s" / "samples.npz") as f:
        assert f["arr_0"].shape == (5, 8, 8, 3)
    assert len(list((tmp_path / "s").glob("[0-9]*.png"))) == 5


def test_fid_batches_are_distinct_and_class_balanced_over_ranks():
    from movq.generation.sampler import batch_seed, plan_batches

    world, n, batch, classes = 4, 41, 3, 8  # n not a multiple of the global batch: nothing is dropped
    plans = [plan_batches(n, r, world, batch) for r in range(world)]
    index = [int(i) for plan in plans for b in plan for i in b if i < n]
    assert sorted(index) == list(range(n))  # every global index once
    seeds = [batch_seed(0, int(b[0])) for plan in plans for b in plan]
    assert len(set(seeds)) == len(seeds)  # no two batches share noise
    counts = np.bincount(np.array(index) % classes, minlength=classes)
    assert counts.max() - counts.min() <= 1, counts  # not the same classes on every rank


def tiny_ar_cfg(run_dir, tokens, **train) -> PriorConfig:
    base = {
        "kind": "autoregressive",
        "model": {"codebook_size": 16, "channels": 2, "grid": 4, "num_classes": 3, "width": 32, "depth": 1,
                  "depth_layers": 1, "heads": 2, "dropout": 0.1, "window": 2},
        "data": {"tokens": str(tokens), "batch_size": 4},
        "train": {"run_dir": str(run_dir), "max_steps": 6, "log_every": 1, "eval_every": 3, "save_every": 3,
                  "ema_decay": 0.9, "warmup_steps": 2, "grad_accum": 2, "lr": 1e-3, **train},
        "sample": {"grid_images": 3, "inpaint_images": 2, "cfg_scale": 2.0, "top_k": 8},
    }
    return load_config(PriorConfig, base)


def test_autoregressive_prior_trains_resumes_bit_exact_and_loads_by_kind(tmp_path, data):
    from movq.models.autoregressive import AutoregressivePrior

    straight, _ = fit(tiny_ar_cfg(tmp_path / "a", data["tokens"]))
    fit(tiny_ar_cfg(tmp_path / "b", data["tokens"], max_steps=3))
    resumed, summary = fit(tiny_ar_cfg(tmp_path / "b", data["tokens"], resume="latest"))
    assert summary["steps"] == 6 and isinstance(straight.prior, AutoregressivePrior)
    a, b = train_records(tmp_path / "a"), train_records(tmp_path / "b")
    for step in (4, 5, 6):
        for key in ("loss", "bits_per_token", "accuracy", "class_dropped", "grad_norm"):
            assert a[step][key] == b[step][key], (step, key)
    assert a[1]["bits_per_token"] > 3.0  # about log2(16) = 4 at the start
    sa, sb = straight.prior.state_dict(), resumed.prior.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ea, eb = straight.ema.model.state_dict(), resumed.ema.model.state_dict()
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    # the checkpoint's EMA loads by the class in its config.json, with the run's sampling defaults
    model, defaults = load_prior(tmp_path / "a")
    assert isinstance(model, AutoregressivePrior) and model.config == straight.cfg.model and not model.training
    assert all(torch.equal(model.state_dict()[k], ea[k]) for k in ea)
    assert defaults.sample.top_k == 8 and defaults.tokenizer == str(data["tokenizer"])
    assert json.loads((tmp_path / "a" / "checkpoints" / "0000006" / "ema" / "config.json").read_text())["class"] \
        == "AutoregressivePrior"
    with pytest.raises(ValueError, match="holds an autoregressive prior, not a MaskGIT prior"):
        MaskGIT.from_pretrained(tmp_path / "a")
    # pictures: a row of samples; the completion example (originals, top half kept, completed)
    from PIL import Image

    assert Image.open(tmp_path / "a" / "images" / "samples_0000006.png").size == (3 * 10 + 2, 12)
    assert Image.open(tmp_path / "a" / "images" / "complete_0000006.png").size == (2 * 10 + 2, 3 * 10 + 2)
    assert not list((tmp_path / "a" / "images").glob("inpaint_*"))


def test_prior_kind_in_configs(tmp_path, data):
    cfg = load_config(PriorConfig, ROOT / "configs" / "ar_base.yaml")
    assert cfg.kind == "autoregressive" and cfg.model.factorization == "depth"
    with pytest.raises(ConfigError, match="model.mask_schedule"):  # a MaskGIT key under an autoregressive kind
        load_config(PriorConfig, {"kind": "autoregressive", "model": {"mask_schedule": "cosine"}})
    with pytest.raises(ConfigError, match="kind"):
        load_config(PriorConfig, {"kind": "diffusion"})
    old = load_config(PriorConfig, {"model": {"width": 32, "heads": 2}})  # configs from before `kind`: MaskGIT
    assert old.kind == "maskgit" and type(old.model).__name__ == "MaskGITConfig"
    cfg = tiny_ar_cfg(tmp_path / "r", data["tokens"])
    cfg.sample.cfg_schedule = "linear"  # a MaskGIT setting: refused before training, not at the first eval
    with pytest.raises(ValueError, match="MaskGIT setting"):
        fit(cfg)
