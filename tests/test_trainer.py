"""The tokenizer trainer: bit-exact resume, NaN guard, crash-safe checkpoints, bad shards, signals,
and a 2-process CPU run (gloo)."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from movq.config import TokenizerConfig, load_config
from movq.models.autoencoder import MoVQ
from movq.training.losses import TokenizerLoss
from movq.training.run import NonFiniteError, lr_lambda
from movq.training.tokenizer import TokenizerTrainer

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def tiny_cfg(run_dir, cache, **train) -> TokenizerConfig:
    base = {
        "model": {"resolution": 16, "base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                  "attn_resolutions": [], "mid_attention": False, "norm_groups": 4},
        "quantizer": {"codebook_size": 16, "channels": 2, "dim": 4, "dead_code_threshold": 0.05},
        "discriminator": {"base_channels": 8, "n_layers": 1},
        "loss": {"perceptual_weight": 0.0, "disc_start": 2},
        "data": {"source": "builtin", "image_size": 16, "batch_size": 2, "num_workers": 0,
                 "cache_dir": str(cache), "builtin_train_size": 32, "builtin_val_size": 4},
        "train": {"run_dir": str(run_dir), "max_steps": 6, "log_every": 1, "eval_every": 100,
                  "save_every": 3, "ema_decay": 0.9, "warmup_steps": 2, "grad_accum": 2, **train},
    }
    return load_config(TokenizerConfig, base)


def fit(cfg):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    trainer = TokenizerTrainer(cfg)
    return trainer, trainer.fit()


def train_records(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["kind"] == "train"}


def stop_after(monkeypatch, steps: int) -> None:
    """The next run stops as on SIGTERM after ``steps`` steps (checkpoint saved, same max_steps: a pre-emption)."""
    from movq.training.run import StopFlag

    calls = iter(range(1, 10**6))
    monkeypatch.setattr(StopFlag, "poll", lambda self, device: (next(calls) > steps, False))


def test_resume_is_bit_exact(tmp_path, cache, monkeypatch):
    def cfg(run, **train):  # a decaying LR: G's and D's curves (D starts at disc_start = 2) continue exactly
        c = tiny_cfg(tmp_path / run, cache, lr_schedule="cosine", min_lr_ratio=0.1, **train)
        c.model.dropout = 0.1  # draws from the global RNG after the resume too
        return c

    straight, _ = fit(cfg("a"))
    with monkeypatch.context() as m:  # pre-empted at step 3
        stop_after(m, 3)
        assert fit(cfg("b"))[1]["steps"] == 3
    resumed, summary = fit(cfg("b", resume="latest"))
    assert summary["steps"] == 6
    a, b = train_records(tmp_path / "a"), train_records(tmp_path / "b")
    for step in (4, 5, 6):
        for key in ("loss", "rec_loss", "d_loss", "quant_loss", "grad_norm", "lr"):
            assert a[step][key] == b[step][key], (step, key)
    assert [b[s]["lr"] for s in (4, 5, 6)] == [1e-4 * lr_lambda("cosine", 2, 6, 0.1)(s) for s in (4, 5, 6)]
    for trainer in (straight, resumed):  # D stepped at steps 3 to 6, and its curve ends at max_steps
        assert trainer.sched_d.state_dict()["last_epoch"] == 4
        assert trainer.opt_d.param_groups[0]["lr"] == 1e-4 * lr_lambda("cosine", 2, 4, 0.1)(4)
    sa = straight.acc.unwrap_model(straight.model).state_dict()
    sb = resumed.acc.unwrap_model(resumed.model).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ea, eb = straight.ema.model.state_dict(), resumed.ema.model.state_dict()
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    # the saved EMA weights are a loadable tokenizer
    ckpt = tmp_path / "a" / "checkpoints" / "0000006"
    model = MoVQ.from_pretrained(ckpt / "ema")
    assert all(torch.equal(model.state_dict()[k], ea[k]) for k in ea)
    # each weight is stored once: model/, ema/ and discriminator.safetensors, no Accelerate copies beside them
    assert sorted(p.name for p in ckpt.glob("*.safetensors")) == ["discriminator.safetensors"]
    assert (ckpt / "model" / "model.safetensors").is_file() and (ckpt / "optimizer.bin").is_file()


def test_nan_loss_is_skipped_then_aborts(tmp_path, cache, monkeypatch):
    original = TokenizerLoss.generator_loss
    poison = {2}

    def generator_loss(self, x, x_rec, q, step, *args, **kw):
        loss, logs = original(self, x, x_rec, q, step, *args, **kw)
        if step in poison:
            loss = loss * float("nan")
            logs["loss"] = loss.detach()
        return loss, logs

    monkeypatch.setattr(TokenizerLoss, "generator_loss", generator_loss)
    trainer, summary = fit(tiny_cfg(tmp_path / "a", cache, max_steps=4))
    assert summary["bad_steps"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    recs = train_records(tmp_path / "a")
    assert recs[3]["bad_steps"] == 1 and np.isfinite(recs[4]["loss"])

    poison.update(range(3, 100))  # from step 3 on every step is bad: abort after max_bad_steps
    with pytest.raises(NonFiniteError, match="non-finite steps in a row"):
        fit(tiny_cfg(tmp_path / "b", cache, max_steps=20, max_bad_steps=2))
    # the last good checkpoint (step 3, saved before the bad run began) is intact
    assert MoVQ.from_pretrained(tmp_path / "b" / "checkpoints" / "0000003" / "model")


def test_crash_mid_checkpoint_keeps_previous(tmp_path, cache, monkeypatch):
    fit(tiny_cfg(tmp_path / "a", cache, max_steps=3))
    original = MoVQ.save_pretrained

    def crashing(self, directory):
        original(self, directory)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(MoVQ, "save_pretrained", crashing)
    with pytest.raises(OSError, match="simulated"):
        fit(tiny_cfg(tmp_path / "a", cache, max_steps=6, resume="latest"))
    monkeypatch.setattr(MoVQ, "save_pretrained", original)
    ckpts = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir() if not p.name.startswith("."))
    assert ckpts == ["0000003"]
    MoVQ.from_pretrained(tmp_path / "a" / "checkpoints" / "0000003" / "model")
    _, summary = fit(tiny_cfg(tmp_path / "a", cache, max_steps=6, resume="latest"))
    assert summary["steps"] == 6 and summary["checkpoint"].endswith("0000006")


def _jpeg(seed, size=24):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_corrupt_shard_members_are_counted(tmp_path, cache):
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    for s in range(2):
        with tarfile.open(shard_dir / f"train-{s:06d}.tar", "w") as tar:
            members = [(f"{s}_{i:03d}.jpg", _jpeg(s * 100 + i)) for i in range(6)]
            members.insert(2, (f"{s}_bad.jpg", _jpeg(999)[:200]))  # truncated
            members.insert(4, (f"{s}_txt.jpg", b"this is not an image"))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    cfg = tiny_cfg(tmp_path / "run", cache, max_steps=6, grad_accum=1, eval_every=1000, save_every=1000)
    cfg.data.source, cfg.data.train = "shards", str(shard_dir / "train-{000000..000001}.tar")
    cfg.data.val, cfg.data.epoch_length = cfg.data.train, 12  # one epoch = the 12 good images
    expected: dict = {}  # what the data stream itself reports for those 6 batches
    from movq.data.stream import train_batches

    for _, batch in zip(range(6), train_batches(cfg.data)):
        for k, v in batch["skipped"].items():
            expected[k] = expected.get(k, 0) + v
    assert set(expected) == {"truncated", "corrupt"}
    _, summary = fit(cfg)
    assert summary["steps"] == 6 and summary["data_skipped"] == expected
    rec = train_records(tmp_path / "run")[6]
    assert {k.split("/", 1)[1]: v for k, v in rec.items() if k.startswith("data_skipped/")} == expected


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", WANDB_MODE="offline")
    env.pop("TRITON_INTERPRET", None)
    return env


def test_sigterm_saves_and_exits_cleanly(tmp_path, cache):
    args = [sys.executable, str(ROOT / "tools" / "train_tokenizer.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
            f"train.run_dir={tmp_path}", "train.max_steps=100000", "train.log_every=1", "train.save_every=100000",
            "train.eval_every=100000", "data.batch_size=2", "data.num_workers=0", "data.image_size=32",
            "model.resolution=32", f"data.cache_dir={cache}", "data.builtin_train_size=32", "data.builtin_val_size=4"]
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out.decode()[-2000:]  # saved, and says it stopped early
    assert "no evaluation yet" in out.decode()
    ckpts = [p for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith(".")]
    assert len(ckpts) == 1
    state = json.loads((ckpts[0] / "trainer_state.json").read_text())
    assert state["step"] >= 2 and ckpts[0].name == f"{state['step']:07d}"


TWO_RANK_SCRIPT = """
import json, sys, torch
import movq.training.tokenizer as T
from movq.config import TokenizerConfig, load_config
cfg = load_config(TokenizerConfig, sys.argv[1])
seen = []
orig = T.train_batches
def recording(*a, **kw):
    for batch in orig(*a, **kw):
        seen.extend(batch["key"])
        yield batch
T.train_batches = recording
trainer = T.TokenizerTrainer(cfg)
trainer.fit()
flat = torch.cat([p.detach().flatten() for p in trainer.acc.unwrap_model(trainer.model).parameters()])
rank = trainer.acc.process_index
json.dump({"world": trainer.acc.num_processes, "keys": seen, "params": flat.tolist()[:2000],
           "sum": float(flat.double().sum())}, open(sys.argv[2] + f"/rank{rank}.json", "w"))
"""


@pytest.mark.slow
def test_two_process_cpu_run(tmp_path, cache, free_port):
    cfg = tiny_cfg(tmp_path / "run", cache, max_steps=3, grad_accum=1, eval_every=3, warmup_steps=8)
    from movq.config import save_config

    save_config(cfg, tmp_path / "cfg.yaml")
    (tmp_path / "script.py").write_text(TWO_RANK_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port),
           str(tmp_path / "script.py"), str(tmp_path / "cfg.yaml"), str(tmp_path)]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["params"] == r1["params"] and r0["sum"] == r1["sum"]  # ranks stayed in sync
    assert r0["keys"] and not set(r0["keys"]) & set(r1["keys"])  # and read different samples
    # the warmup counts optimizer steps, not optimizer steps × processes
    lrs = {s: r["lr"] for s, r in train_records(tmp_path / "run").items()}
    assert lrs == pytest.approx({s: cfg.train.lr * (s + 1) / 8 for s in (1, 2, 3)}), lrs


def test_rfid_with_standin_inception_weights(tmp_path, cache, monkeypatch):
    from movq.evaluation import fid
    from movq.evaluation.inception import standin_state_dict

    weights = tmp_path / "standin-inception.pth"
    torch.save(standin_state_dict(seed=0), weights)
    original = fid.FIDTracker.__init__  # stand-in weights have no official checksum
    monkeypatch.setattr(fid.FIDTracker, "__init__", lambda self, *a, **kw: original(self, *a, **{**kw, "verify": False}))
    cfg = tiny_cfg(tmp_path / "run", cache, max_steps=2, grad_accum=1, fid_every=2, fid_num_images=4,
                   inception_weights=str(weights), save_every=100)
    _, summary = fit(cfg)
    assert np.isfinite(summary["eval"]["val/rfid"]) and summary["eval"]["val/rfid"] >= 0
    assert (tmp_path / "run" / "fid_reference.npz").is_file()
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["kind"] == "fid"] == [2]


def test_rfid_without_weights_goes_on(tmp_path, cache):
    cfg = tiny_cfg(tmp_path / "run", cache, max_steps=2, grad_accum=1, fid_every=1,
                   inception_weights=str(tmp_path / "missing.pth"), save_every=100)
    _, summary = fit(cfg)
    assert summary["steps"] == 2 and "val/rfid" not in summary["eval"]


def test_fp16_is_refused_with_a_reason(tmp_path, cache):
    with pytest.raises(ValueError, match="fp16 is not supported.*Use bf16"):
        fit(tiny_cfg(tmp_path / "run", cache, mixed_precision="fp16"))


def test_the_launchers_precision_is_taken_when_the_config_leaves_it_unset(tmp_path, cache, monkeypatch):
    """`accelerate launch --mixed_precision bf16` (and `accelerate config`) reach the process as
    ACCELERATE_MIXED_PRECISION: honoured when train.mixed_precision is unset, overridden when it is set."""
    from movq.training.run import make_accelerator

    def precision(**train):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        return make_accelerator(tiny_cfg(tmp_path / "run", cache, **train).train, str(tmp_path / "run")).mixed_precision

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert tiny_cfg(tmp_path / "run", cache).train.mixed_precision is None and precision() == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert precision() == "bf16" and precision(mixed_precision="no") == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ValueError, match=r"fp16 \(from the launcher.*is not supported.*Use bf16"):
        precision()
    assert precision(mixed_precision="bf16") == "bf16"
    # a run under the launcher's bf16 trains in bf16 and says so in its config.yaml
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    trainer, summary = fit(tiny_cfg(tmp_path / "bf16", cache, max_steps=1, grad_accum=1, save_every=100))
    assert summary["steps"] == 1 and trainer.acc.mixed_precision == "bf16"
    assert "mixed_precision: bf16" in (tmp_path / "bf16" / "config.yaml").read_text()
    AcceleratorState._reset_state(True)


def tensorboard_images(run_dir) -> dict:
    """``{tag: [(step, height, width)]}`` of every image in a run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict = {}
    for path in sorted(Path(run_dir).rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"images": 0})
        events.Reload()
        for tag in events.Tags()["images"]:
            found.setdefault(tag, []).extend((e.step, e.height, e.width) for e in events.Images(tag))
    return found


def test_trackers_get_the_pictures_and_a_resume_continues_the_wandb_run(tmp_path, cache, monkeypatch):
    """Reconstruction grids and usage charts go to TensorBoard and wandb as well as images/; the wandb id is kept
    in the run folder and reused by a resume; the resolved config is logged as the trackers start."""
    import yaml

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"

    def cfg(**train):
        return tiny_cfg(run, cache, grad_accum=1, eval_every=1, save_every=1, trackers=["tensorboard", "wandb"], **train)

    fit(cfg(max_steps=1))
    assert list(run.rglob("events.out.tfevents.*"))
    assert not (tmp_path / "wandb").exists()  # wandb writes into the run folder, not the working directory
    run_id = (run / "wandb_id").read_text().strip()
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}"))) == 1
    fit(cfg(max_steps=2, resume="latest"))
    assert (run / "wandb_id").read_text().strip() == run_id
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # the same wandb run, continued
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2
    # the pictures: TensorBoard images (the PNGs' sizes) and wandb media files, at the eval steps
    grid = np.asarray(Image.open(run / "images" / "recon_0000001.png"))
    images = tensorboard_images(run)
    assert images["images/reconstruction"] == [(1, *grid.shape[:2]), (2, *grid.shape[:2])]
    assert [s for s, _, _ in images["images/codebook_usage"]] == [1, 2]
    media = sorted(p.name.rsplit("_", 1)[0] for p in (run / "wandb").rglob("media/images/**/*.png"))
    assert media == ["codebook_usage_1", "codebook_usage_2", "reconstruction_1", "reconstruction_2"]
    # the resolved config, once per start: the launcher-resolved precision, not null
    logged = [yaml.safe_load(p.read_text()) for p in sorted(run.rglob("hparams.yml"))]
    assert len(logged) == 2 and logged[0]["train.mixed_precision"] == "no" and logged[0]["data.image_size"] == 16
    # a fresh run (no checkpoint to resume) starts another wandb run
    from movq.training.run import RunDir

    assert RunDir(run, True).wandb_id(new=True) not in ("", run_id) and RunDir(run, False).wandb_id(new=False) is None


def test_a_missing_tracker_is_refused_where_the_accelerator_is_built(tmp_path, cache, monkeypatch):
    import importlib.util

    from movq.training.run import make_accelerator

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"train.trackers names wandb, .*pip install 'movq\[wandb\]'"):
        make_accelerator(tiny_cfg(tmp_path / "run", cache, trackers=["wandb"]).train, str(tmp_path / "run"))


def test_checkpoint_model_folders_carry_a_model_card(tmp_path, cache):
    """Each model folder of a checkpoint gets a README.md with the run's data, settings and metrics."""
    from huggingface_hub import ModelCard

    fit(tiny_cfg(tmp_path / "run", cache, max_steps=2, grad_accum=1, eval_every=2, save_every=100))
    psnr = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "eval"][-1]["val/psnr"]
    for sub in ("model", "ema"):
        card = ModelCard.load(tmp_path / "run" / "checkpoints" / "0000002" / sub / "README.md")
        assert card.data.library_name == "movq"
        assert "`data.source`: `builtin`" in card.text and "* step: `2`" in card.text
        assert f"| val/psnr | {psnr:.6g} | 2 |" in card.text
        assert "Measured on the EMA weights (`ema/`)" in card.text


def test_eval_mode_restores_every_submodule_even_on_error(tmp_path, cache, monkeypatch):
    from movq.training.run import eval_mode

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    net[0].eval()  # e.g. a frozen feature network inside a training model
    with pytest.raises(RuntimeError, match="boom"):
        with eval_mode(net):
            assert not any(m.training for m in net.modules())
            raise RuntimeError("boom")
    assert [m.training for m in net.modules()] == [True, False, True]

    # the trainer's evaluation fails half-way: the model it evaluated trains on in training mode
    def failing_update(*args, **kwargs):
        raise RuntimeError("boom")

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    trainer = TokenizerTrainer(tiny_cfg(tmp_path / "run", cache, max_steps=1, ema_decay=0.0))
    assert trainer._eval_model().training
    monkeypatch.setattr("movq.training.tokenizer.TokenizerMetrics.update", failing_update)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.evaluate()
    assert trainer._eval_model().training


def test_weight_ema_averages_trained_parameters_and_copies_the_rest():
    from movq.config import QuantizerConfig
    from movq.models.quantizer import MultichannelQuantizer
    from movq.training.ema import EMA

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "lin": torch.nn.Linear(2, 2),
        "learned": MultichannelQuantizer(QuantizerConfig(codebook_size=8, channels=1, dim=2, kmeans_init=True)),
        "ema_codes": MultichannelQuantizer(QuantizerConfig(codebook_size=8, channels=1, dim=2, ema=True)),
    }).train()
    ema = EMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        model["lin"].weight.add_(1.0)
    z = torch.randn(16, 2, 1, 1) * 3
    model["learned"](z)  # k-means init: a jump from the random codes, not a training step
    model["ema_codes"](z)  # its codebook follows its own moving average
    ema.update(model)
    after = ema.model.state_dict()
    torch.testing.assert_close(after["lin.weight"], before["lin.weight"] + 0.1)  # averaged
    torch.testing.assert_close(after["learned.codebook"], model["learned"].codebook.detach())  # copied once...
    torch.testing.assert_close(after["ema_codes.codebook"], model["ema_codes"].codebook.detach())
    with torch.no_grad():
        model["learned"].codebook.add_(1.0)
    ema.update(model)  # ...then averaged like any trained weight
    torch.testing.assert_close(ema.model.state_dict()["learned.codebook"], model["learned"].codebook.detach() - 0.9)


def test_step_logs_average_the_micro_batches():
    from movq.training.loop import mean_micro_logs

    logs = mean_micro_logs([{"loss": torch.tensor(float("nan")), "n": 1.0},
                            {"loss": torch.tensor(2.0), "n": 3.0, "d_loss": torch.tensor(5.0)}])
    assert torch.isnan(logs["loss"])  # a non-finite first micro-batch is not hidden by the last one
    assert logs["n"] == 2.0 and logs["d_loss"] == 5.0
    logs = mean_micro_logs([{"loss": torch.tensor(1.0)}, {"loss": torch.tensor(2.0)}])
    assert logs["loss"].item() == 1.5


def test_resuming_an_older_checkpoint_sets_the_later_timeline_aside(tmp_path, cache):
    fit(tiny_cfg(tmp_path / "a", cache, max_steps=6, save_every=3, keep_checkpoints=5))
    ckpts = tmp_path / "a" / "checkpoints"
    # roll back to step 3 (e.g. after a divergence) and train on to step 4
    _, summary = fit(tiny_cfg(tmp_path / "a", cache, max_steps=4, save_every=3, resume=str(ckpts / "0000003")))
    assert sorted(p.name for p in ckpts.iterdir()) == ["0000003", "0000004", "abandoned-0000006"]
    assert Path(summary["checkpoint"]).name == "0000004"
    steps = [json.loads(line)["step"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3, 4]  # no record of the abandoned steps 4-6 left behind
    old = [json.loads(line)["step"] for line in (tmp_path / "a" / "metrics.abandoned.jsonl").read_text().splitlines()]
    assert {4, 5, 6} <= set(old) and min(old) == 4
    # 'latest' now continues the new timeline
    trainer, summary = fit(tiny_cfg(tmp_path / "a", cache, max_steps=5, save_every=3, resume="latest"))
    assert summary["steps"] == 5 and Path(summary["checkpoint"]).name == "0000005"


def test_resume_with_another_data_layout_warns(tmp_path, cache, capsys):
    fit(tiny_cfg(tmp_path / "a", cache, max_steps=2, save_every=2))
    capsys.readouterr()
    fit(tiny_cfg(tmp_path / "a", cache, max_steps=3, grad_accum=1, resume="latest"))
    out = capsys.readouterr().out
    assert "another data layout (grad_accum 2 → 1)" in out
    fit(tiny_cfg(tmp_path / "a", cache, max_steps=4, grad_accum=1, resume="latest"))
    assert "another data layout" not in capsys.readouterr().out


FAILING_EVAL_SCRIPT = """
import sys
import movq.training.tokenizer as T
from movq.config import TokenizerConfig, load_config
def evaluate(self):
    raise RuntimeError("boom in evaluate")
T.TokenizerTrainer.evaluate = evaluate
T.TokenizerTrainer(load_config(TokenizerConfig, sys.argv[1])).fit()
"""


def test_an_error_with_loader_workers_running_exits(tmp_path, cache):
    """The loader's worker processes must not keep a failed run alive (they once ignored SIGTERM, and
    the interpreter's exit waited for them forever)."""
    from movq.config import save_config

    cfg = tiny_cfg(tmp_path / "run", cache, max_steps=2, grad_accum=1, eval_every=1)
    cfg.data.num_workers = 1
    save_config(cfg, tmp_path / "cfg.yaml")
    (tmp_path / "script.py").write_text(FAILING_EVAL_SCRIPT)
    res = subprocess.run([sys.executable, str(tmp_path / "script.py"), str(tmp_path / "cfg.yaml")], env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "boom in evaluate" in res.stderr, res.stderr[-2000:]


def test_a_run_folder_is_not_reused_by_accident(tmp_path, cache):
    from movq.training.checkpoints import ResumeError

    fit(tiny_cfg(tmp_path / "a", cache, max_steps=2, save_every=2))
    config = (tmp_path / "a" / "config.yaml").read_text()
    with pytest.raises(ValueError, match="already holds checkpoints .*train.resume=latest"):
        fit(tiny_cfg(tmp_path / "a", cache, max_steps=4))
    other = tiny_cfg(tmp_path / "a", cache, max_steps=4, resume="latest")
    other.model.base_channels = 16  # not the model that was saved
    with pytest.raises(ResumeError, match="does not fit this config's model"):
        fit(other)
    assert (tmp_path / "a" / "config.yaml").read_text() == config  # the run's record is left as it was


def test_data_errors_come_before_training(tmp_path, cache):
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    cfg = tiny_cfg(tmp_path / "run", cache)
    cfg.data.source, cfg.data.train, cfg.data.val = "folder", str(tmp_path / "img"), None
    with pytest.raises(ValueError, match="data.val must be set"):
        TokenizerTrainer(cfg)
    cfg.data.val = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        TokenizerTrainer(cfg)
    assert not (tmp_path / "run").exists()  # nothing was started
