"""What a run on a cluster meets (issue 13), in one place: signals to the whole process group, two runs
on one folder, a frozen rank, damaged shards and checkpoints, full or read-only disks, bad values. Each
fault ends in one of: the run goes on with what it lost counted, or it stops with its work saved, or it
refuses with one ``error:`` line and exit code 2 (4 for a frozen rank) — never a traceback, a hang or a
silent loss. The multi-process cases are marked slow (they still run in CI)."""
import errno
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
import yaml
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from movq.config import DataConfig, TokenizerConfig, load_config, save_config
from movq.data.shards import ShardWriter, write_manifest
from movq.data.stream import build_dataloader, train_batches

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def tiny(run_dir, cache, **train) -> dict:
    """A tokenizer config small enough for a few CPU steps a second."""
    return {
        "model": {"resolution": 16, "base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                  "attn_resolutions": [], "mid_attention": False, "norm_groups": 4},
        "quantizer": {"codebook_size": 16, "channels": 2, "dim": 4, "dead_code_threshold": 0.05},
        "discriminator": {"base_channels": 8, "n_layers": 1},
        "loss": {"perceptual_weight": 0.0, "disc_start": 0},
        "data": {"source": "builtin", "image_size": 16, "batch_size": 2, "num_workers": 0,
                 "cache_dir": str(cache), "builtin_train_size": 32, "builtin_val_size": 4},
        "train": {"run_dir": str(run_dir), "max_steps": 2, "log_every": 1, "eval_every": 1000,
                  "save_every": 1, "ema_decay": 0.9, **train},
    }


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(config: Path, *overrides: str) -> int:
    """tools/train_tokenizer.py in this process."""
    from movq.cli.train import main_tokenizer

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return main_tokenizer(["--config", str(config), *overrides])


def one_error_line(err: str) -> str:
    """The text of the single ``error:`` line of a tool's stderr; no traceback."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _wait(condition, timeout: float, what: str, proc=None) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) while waiting for {what}: "
                                 f"{proc.stdout.read().decode()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _alive(pids) -> list[int]:
    """Those of ``pids`` that are still running (zombies count as gone)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from the parent PIDs in /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _checkpoint_steps(run: Path) -> list[int]:
    folder = run / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


# --------------------------------------------------------------------------------------
# 1. Signals to the whole process group; rotation that cannot be cut in half
# --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_group_signals_sigusr1_saves_and_goes_on_sigterm_saves_and_stops(tmp_path, cache):
    """SLURM, ``timeout`` and ``kill -TERM -PGID`` signal every process of the job, the loader's workers
    too: those must not die of it before the main process has saved."""
    run = tmp_path / "run"
    args = [sys.executable, str(ROOT / "tools" / "train_tokenizer.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
            f"train.run_dir={run}", "train.max_steps=100000", "train.log_every=1", "train.save_every=100000",
            "train.eval_every=100000", "data.batch_size=2", "data.num_workers=1", "data.image_size=32",
            "model.resolution=32", f"data.cache_dir={cache}", "data.builtin_train_size=32", "data.builtin_val_size=4"]
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait(lambda: len(_records(run)) >= 2, 180, "the first steps", proc)
        group = [proc.pid, *_descendants(proc.pid)]
        assert len(group) >= 2, "the loader worker is missing"
        os.killpg(proc.pid, signal.SIGUSR1)  # SLURM's --signal=USR1@120 to the job's processes
        _wait(lambda: _checkpoint_steps(run), 120, "the SIGUSR1 checkpoint", proc)
        first = _checkpoint_steps(run)[0]
        _wait(lambda: _records(run)[-1]["step"] >= first + 2, 120, "training after SIGUSR1", proc)
        os.killpg(proc.pid, signal.SIGTERM)  # e.g. timeout, scancel, a container stop
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = out.decode()
    assert proc.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert "killed by signal" not in text and "Traceback" not in text, text[-3000:]
    steps = _checkpoint_steps(run)
    last = json.loads((run / "checkpoints" / f"{steps[-1]:07d}" / "trainer_state.json").read_text())
    assert steps[0] == first and steps[-1] > first + 1 and last["step"] == steps[-1]
    assert f"stopping at step {steps[-1]}" in text
    from movq.models.autoencoder import MoVQ

    MoVQ.from_pretrained(run / "checkpoints" / f"{steps[-1]:07d}" / "ema")
    _wait(lambda: not _alive(group), 15, "every process of the run to end")


ERROR_WITH_A_LIVE_LOADER = """
import sys
from movq.config import DataConfig
from movq.data.stream import build_dataloader
cfg = DataConfig(source="builtin", image_size=16, batch_size=2, num_workers=1, cache_dir=sys.argv[1],
                 builtin_train_size=32, builtin_val_size=4)
it = iter(build_dataloader(cfg, "val"))
next(it)
raise RuntimeError("boom with a loader worker alive")
"""


def test_an_error_with_a_live_loader_worker_still_exits(tmp_path, cache):
    """Workers ignore SIGTERM (above), which multiprocessing's exit uses to end them before it waits for
    them: an exit with a loader still referenced (here by the traceback) must not wait forever."""
    res = subprocess.run([sys.executable, "-c", ERROR_WITH_A_LIVE_LOADER, str(cache)], env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "boom with a loader worker alive" in res.stderr, res.stderr[-2000:]


def _checkpointer(tmp_path, keep: int):
    from accelerate import Accelerator

    from movq.training.checkpoints import Checkpointer

    AcceleratorState._reset_state(True)
    acc = Accelerator(cpu=True)

    def write_weights(folder):
        for i in range(3):
            (folder / f"w{i}.txt").write_text("weights")

    return Checkpointer(acc, tmp_path / "checkpoints", keep, write_weights, lambda folder: None)


def test_rotation_cannot_be_interrupted_half_way(tmp_path, monkeypatch):
    """Deleting an old checkpoint that is cut short (a second Ctrl-C, kill -9) leaves no half-deleted
    folder under a checkpoint's name for ``train.resume=latest`` or a user to pick."""
    import movq.training.checkpoints as C

    ck = _checkpointer(tmp_path, keep=1)
    ck.save(1, {"step": 1})
    real_rmtree = C.shutil.rmtree

    def interrupted(path, *a, **kw):  # removes one file, then the process "dies"
        if not Path(path).exists():
            return real_rmtree(path, *a, **kw)
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        if files:
            files[0].unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(C.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ck.save(2, {"step": 2})
    monkeypatch.setattr(C.shutil, "rmtree", real_rmtree)
    for folder in ck.list():  # whatever is listed is complete
        assert sorted(p.name for p in folder.iterdir() if p.name.startswith(("w", "trainer"))) == [
            "trainer_state.json", "w0.txt", "w1.txt", "w2.txt"], folder
    assert [p.name for p in ck.list()] == ["0000002"]
    ck.save(3, {"step": 3})  # the next save clears what the interrupted one left
    assert sorted(p.name for p in ck.dir.iterdir()) == ["0000003"]


# --------------------------------------------------------------------------------------
# 2. Two runs on one folder
# --------------------------------------------------------------------------------------
HOLD_LOCK = """
import sys, time
from movq.training.run import RunDir
run = RunDir(sys.argv[1], is_main=True)
run.open()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_run_on_a_locked_folder_exits_2_naming_the_holder(tmp_path, cache, capfd):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], env=_env(), stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        cfg = write_config(tmp_path / "cfg.yaml", tiny(run, cache))
        assert train(cfg) == 2
        line = one_error_line(capfd.readouterr().err)
        assert f"PID {holder.pid} on host {os.uname().nodename}" in line and str(run) in line, line
        assert not (run / "metrics.jsonl").exists() and not (run / "config.yaml").exists()  # nothing written
        holder.kill()  # kill -9: the kernel drops the lock
        holder.wait()
        from movq.training.run import RunLock

        lock = RunLock(run)
        lock.acquire()  # free again, although run.lock still names the dead holder
        assert json.loads((run / "run.lock").read_text())["pid"] == os.getpid()
        lock.release()
    finally:
        holder.kill()


# --------------------------------------------------------------------------------------
# 3-4. Damaged shards: every promised sample is read or counted; a bad shard costs its samples only
# --------------------------------------------------------------------------------------
def _jpeg(seed: int, size: int = 20) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _shards(folder: Path, n_shards: int = 3, per: int = 10) -> Path:
    """``n_shards`` shards of ``per`` JPEGs each, with their manifest (as tools/make_shards.py writes)."""
    w = ShardWriter(folder, maxcount=per)
    for i in range(n_shards * per):
        w.write(f"{i:06d}", {"jpg": _jpeg(i)})
    write_manifest(folder, w.close(), classes=[])
    return folder


def _val_totals(cfg: DataConfig) -> tuple[int, dict]:
    """Images and skip counts of one pass over the val split (every shard read once)."""
    batches = list(build_dataloader(cfg, "val"))
    skipped: dict = {}
    for b in batches:
        for k, v in b["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    return sum(len(b["key"]) for b in batches), skipped


def _corrupt_header(path: Path, member: int) -> None:
    """Overwrite the tar header of member ``member`` (0-based) with junk: the tar breaks off there."""
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[member].offset
    data = bytearray(path.read_bytes())
    data[offset:offset + 512] = b"\x07" * 512
    path.write_bytes(bytes(data))


def test_every_sample_the_manifest_promises_is_read_or_counted(tmp_path):
    folder = _shards(tmp_path / "sh")
    cfg = DataConfig(source="shards", train=str(folder), val=str(folder), image_size=16, batch_size=4, num_workers=0)
    assert _val_totals(cfg) == (30, {})
    # A header broken mid-shard: without the sha256 check, 5 samples read and 5 counted as truncated.
    _corrupt_header(folder / "shard-000001.tar", member=5)
    cfg.verify = False
    assert _val_totals(cfg) == (25, {"shard_truncated": 5})
    # With it (the default) the damaged shard is passed over before any of its samples is used.
    cfg.verify = True
    assert _val_totals(cfg) == (20, {"shard_checksum": 10})
    # Flipped bytes inside a JPEG: the tar reads fine, the images would be garbage.
    folder = _shards(tmp_path / "flipped")
    data = bytearray((folder / "shard-000002.tar").read_bytes())
    data[2000:2100] = bytes(b ^ 0xFF for b in data[2000:2100])
    (folder / "shard-000002.tar").write_bytes(bytes(data))
    cfg.train = cfg.val = str(folder)
    assert _val_totals(cfg) == (20, {"shard_checksum": 10})
    from movq.data.sources import BadShardError

    cfg.on_bad_shard = "error"
    with pytest.raises(BadShardError, match=r"shard-000002.tar is damaged: its sha256 .*on_bad_shard=error"):
        _val_totals(cfg)
    # Manifest counts that lie: a shortfall is counted, and epochs are not made longer silently.
    folder = _shards(tmp_path / "lying")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0]["count"] = 13
    manifest["count"] = 33
    (folder / "manifest.json").write_text(json.dumps(manifest))
    cfg = DataConfig(source="shards", train=str(folder), val=str(folder), image_size=16, batch_size=4, num_workers=0)
    assert _val_totals(cfg) == (30, {"shard_truncated": 3})
    # A shard listed but deleted is said at the start and counted once per epoch.
    folder = _shards(tmp_path / "deleted")
    (folder / "shard-000001.tar").unlink()
    cfg = DataConfig(source="shards", train=str(folder), val=str(folder), image_size=16, batch_size=4,
                     num_workers=0, epoch_length=20)
    epoch = list(zip(range(2), train_batches(cfg)))  # 20 // 4 = 5 batches an epoch: the first 2
    assert sum(b["skipped"].get("shard_missing", 0) for _, b in epoch) == 10
    cfg.on_bad_shard = "error"
    with pytest.raises(FileNotFoundError, match="shard-000001.tar"):
        next(train_batches(cfg))


def test_make_shards_verify_checks_counts_and_missing_shards(tmp_path, capsys):
    from movq.cli.make_shards import main

    folder = _shards(tmp_path / "sh")
    assert main(["--verify", str(folder)]) == 0
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0]["count"], manifest["count"] = 9, 29
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "shard-000002.tar").unlink()
    capsys.readouterr()
    assert main(["--verify", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "shard-000000.tar: 10 samples, the manifest says 9" in out
    assert "shard-000002.tar: missing (10 samples)" in out
    manifest["count"] = "many"  # a count that is not a number: one line, exit 2
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert main(["--verify", str(folder)]) == 2
    assert "count 'many' is not the sum of its shards' counts" in one_error_line(capsys.readouterr().err)


def test_an_unreadable_shard_is_skipped_counted_and_resume_goes_on(tmp_path):
    folder = _shards(tmp_path / "sh", n_shards=4, per=4)
    (folder / "shard-000002.tar").write_bytes(b"")  # zero bytes, still listed with its 4 samples
    cfg = DataConfig(source="shards", train=str(folder), val=str(folder), image_size=16, batch_size=2, num_workers=0)
    steps = list(zip(range(20), train_batches(cfg)))  # 16 // 2 = 8 steps an epoch: 2.5 epochs
    assert all(b["image"].shape == (2, 3, 16, 16) for _, b in steps)  # full batches: ranks stay in step
    lost = sum(b["skipped"].get("shard_unreadable", 0) for _, b in steps)
    assert lost >= 4 * 3 and lost % 4 == 0  # its 4 samples, each time a pass comes to it
    for start in (3, 8, 13):  # a resume at any step gets the batches the run had there
        resumed = next(train_batches(cfg, start_step=start))
        assert resumed["key"] == steps[start][1]["key"]
    # Nothing usable at all is an error, not an endless loop.
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000003.tar"):
        (folder / name).write_bytes(b"junk" * 200)
    from movq.data.sources import DataError

    with pytest.raises(DataError, match="no usable image in any of the 4 shard"):
        next(train_batches(cfg))


def _tiny_tokenizer(path: Path, nan: bool = False) -> Path:
    from movq.models.autoencoder import MoVQ

    cfg = load_config(TokenizerConfig, tiny(path, None))
    torch.manual_seed(0)
    model = MoVQ(cfg)
    if nan:
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("nan")
    model.save_pretrained(path)
    return path


def _tokenize(*args) -> int:
    from movq.cli import tokenize

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return tokenize.main([str(a) for a in args])


def test_tokenize_counts_what_a_damaged_shard_cost_and_refuses_a_nan_tokenizer(tmp_path, capfd):
    tok = _tiny_tokenizer(tmp_path / "tok")
    folder = _shards(tmp_path / "sh", n_shards=2, per=10)
    _corrupt_header(folder / "shard-000001.tar", member=5)
    assert _tokenize("--tokenizer", tok, folder, tmp_path / "tokens", "--image-size", 16, "--workers", 1) == 0
    m = json.loads((tmp_path / "tokens" / "manifest.json").read_text())
    assert m["count"] == 10 and m["skipped"] == {"shard_checksum": 10}
    assert "skipped: {'shard_checksum': 10}" in capfd.readouterr().out
    assert _tokenize("--tokenizer", tok, folder, tmp_path / "tokens2", "--image-size", 16, "--on-bad-shard", "error") == 2
    assert "shard-000001.tar is damaged" in one_error_line(capfd.readouterr().err)
    # A tokenizer whose weights hold NaN would write all-zero tokens: refused before anything is written.
    bad = _tiny_tokenizer(tmp_path / "nan", nan=True)
    assert _tokenize("--tokenizer", bad, folder, tmp_path / "tokens3", "--image-size", 16) == 2
    assert "NaN" in one_error_line(capfd.readouterr().err)
    assert not (tmp_path / "tokens3").exists()


# --------------------------------------------------------------------------------------
# 5. A frozen rank
# --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_frozen_rank_ends_every_live_rank_within_the_timeout(tmp_path, cache, free_port):
    run = tmp_path / "run"
    cfg = tiny(run, cache, max_steps=100000, save_every=100000, dist_timeout=15)
    cfg["data"]["num_workers"] = 1
    config = write_config(tmp_path / "cfg.yaml", cfg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port),
           str(ROOT / "tools" / "train_tokenizer.py"), "--config", str(config)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    every = []
    try:
        _wait(lambda: len(_records(run)) >= 2, 240, "the first steps", proc)
        ranks = {}
        for pid in _descendants(proc.pid):
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next((e[5:].decode() for e in env if e.startswith(b"RANK=")), None)
            if rank is not None and "train_tokenizer" in Path(f"/proc/{pid}/cmdline").read_text():
                ranks.setdefault(rank, pid)
        assert set(ranks) == {"0", "1"}, ranks
        every = [proc.pid, *_descendants(proc.pid)]  # torchrun, both ranks, their loader workers
        os.kill(ranks["1"], signal.SIGSTOP)  # a rank that hangs (a stuck GPU, a dead node)
        t0 = time.time()
        out, _ = proc.communicate(timeout=150)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in _alive(every):
            os.kill(pid, signal.SIGKILL)
    text = out.decode()
    assert proc.returncode != 0 and elapsed < 90, (elapsed, text[-3000:])
    errors = [line for line in text.splitlines() if "error: " in line]
    assert any("train.dist_timeout=15" in line for line in errors), text[-3000:]
    _wait(lambda: not _alive(every), 15, "every process to end (no orphans)")


@pytest.mark.parametrize("message", [
    "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 15000ms for recv operation",
    "Application timeout caused pair closure",  # gloo, when the timeout hits inside DDP's buffer broadcast
    "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234",
])
def test_the_ways_gloo_says_a_collective_failed_are_recognised(message):
    from movq.training.run import collective_failure

    assert collective_failure(RuntimeError(message))
    assert not collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not collective_failure(ValueError(message))


# --------------------------------------------------------------------------------------
# 6. A skipped step leaves no trace
# --------------------------------------------------------------------------------------
def test_a_skipped_step_changes_no_weight_nor_buffer_and_keeps_the_last_good_checkpoint(tmp_path, cache, monkeypatch):
    from safetensors.torch import load_file

    from movq.training.tokenizer import TokenizerTrainer

    original, bad = TokenizerTrainer.micro_step, {2, 3}

    def poisoned(self, x):  # NaN images at steps 3 and 4 (self.step 2, 3): BatchNorm, EMA and usage see NaN
        return original(self, x * float("nan") if self.step in bad else x)

    monkeypatch.setattr(TokenizerTrainer, "micro_step", poisoned)
    cfg = tiny(tmp_path / "run", cache, max_steps=4, save_every=1, keep_checkpoints=2)
    cfg["quantizer"].update(ema=True, kmeans_init=False)
    assert train(write_config(tmp_path / "cfg.yaml", cfg)) == 0
    ckpts = tmp_path / "run" / "checkpoints"
    assert _checkpoint_steps(tmp_path / "run") == [2, 3, 4]  # 0000002, from before the streak, is kept
    for name in ("model/model.safetensors", "ema/model.safetensors", "discriminator.safetensors"):
        before, after = load_file(ckpts / "0000002" / name), load_file(ckpts / "0000004" / name)
        assert before.keys() == after.keys()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert not changed, (name, changed)  # running_mean / running_var, usage_ema, codebook, ...
    assert any("running_var" in k for k in load_file(ckpts / "0000004" / "discriminator.safetensors"))
    state = json.loads((ckpts / "0000004" / "trainer_state.json").read_text())
    assert state["guard"] == {"in_a_row": 2, "total": 2} and state["good"] is False


# --------------------------------------------------------------------------------------
# 7-8. One line, exit 2, for bad values and a hostile environment
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("model.base_channels=0", "model.base_channels"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.image_size=3", "data.image_size"),
    ("quantizer.beta=-1", "quantizer.beta"),
    ("data.epoch_length=-5", "data.epoch_length"),
    ("train.warmup_steps=-3", "train.warmup_steps"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("model.attn_resolutions=[7]", "model.attn_resolutions"),
    ("train.dist_timeout=0", "train.dist_timeout"),
])
def test_bad_values_are_refused_naming_the_key_and_leave_no_run_folder(tmp_path, cache, capfd, override, key):
    cfg = write_config(tmp_path / "cfg.yaml", tiny(tmp_path / "run", cache))
    assert train(cfg, override) == 2
    assert f"config key '{key}'" in one_error_line(capfd.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_an_unusable_run_folder_is_one_line(tmp_path, cache, capfd, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    cfg = write_config(tmp_path / "cfg.yaml", tiny(tmp_path / "file", cache))
    assert train(cfg) == 2
    assert "is a file" in one_error_line(capfd.readouterr().err)
    # A read-only file system (simulated: the tests may run as root, whom permissions do not stop).
    real_mkdir = Path.mkdir

    def read_only(self, *a, **kw):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", read_only)
    cfg = write_config(tmp_path / "cfg.yaml", tiny(tmp_path / "ro" / "run", cache))
    assert train(cfg) == 2
    assert "Read-only file system" in one_error_line(capfd.readouterr().err)


def test_checkpoint_faults_are_one_line_and_lose_nothing(tmp_path, cache, capfd, monkeypatch, caplog):
    import movq.training.tokenizer as T

    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny(run, cache, max_steps=2))
    assert train(cfg) == 0
    ckpts = run / "checkpoints"
    # A damaged latest checkpoint: the file is named, and the checkpoint that can be resumed instead.
    weights = ckpts / "0000002" / "model" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    capfd.readouterr()
    assert train(cfg, "train.max_steps=3", "train.resume=latest") == 2
    line = one_error_line(capfd.readouterr().err)
    assert "0000002 is damaged: model/model.safetensors" in line and f"train.resume={ckpts / '0000001'}" in line
    weights.write_bytes(good)
    optimizer = ckpts / "0000002" / "optimizer.bin"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF  # torch.load would not notice
    optimizer.write_bytes(bytes(data))
    assert train(cfg, "train.max_steps=3", "train.resume=latest") == 2
    assert "0000002 is damaged: optimizer.bin" in one_error_line(capfd.readouterr().err)
    # Resuming without an RNG state file is a warning, not a crash; a full disk during the next save is
    # one line saying what is intact.
    (ckpts / "0000001" / "random_states_0.pkl").unlink()
    real = T.save_state_dict

    def full(state, path, *a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(T, "save_state_dict", full)
    with caplog.at_level("WARNING"):
        assert train(cfg, "train.max_steps=3", f"train.resume={ckpts / '0000001'}") == 2
    assert "random_states_0.pkl is missing" in caplog.text
    line = one_error_line(capfd.readouterr().err)
    assert "No space left on device" in line and f"the previous checkpoint {ckpts / '0000001'} is intact" in line
    monkeypatch.setattr(T, "save_state_dict", real)
    assert [p.name for p in ckpts.iterdir() if not p.name.startswith("abandoned")] == ["0000001"]


def test_unusable_data_is_one_line(tmp_path, cache, capfd):
    # a folder of only bad images, read by a loader worker (whose error carries its whole traceback)
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(b"not a jpeg")
    cfg = tiny(tmp_path / "run", cache)
    cfg["data"].update(source="folder", train=str(tmp_path / "img"), val=str(tmp_path / "img"), num_workers=1)
    assert train(write_config(tmp_path / "cfg.yaml", cfg)) == 2
    assert "none of the 3 image files" in one_error_line(capfd.readouterr().err)
    # a manifest whose count is not a number
    folder = _shards(tmp_path / "sh", n_shards=1, per=4)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["count"] = "many"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    cfg["data"].update(source="shards", train=str(folder), val=str(folder), num_workers=0)
    assert train(write_config(tmp_path / "cfg.yaml", cfg)) == 2
    assert "not a valid shard manifest: its count 'many'" in one_error_line(capfd.readouterr().err)


# --------------------------------------------------------------------------------------
# 9. Folders with odd entries
# --------------------------------------------------------------------------------------
def test_a_fifo_named_like_an_image_does_not_block_and_empty_files_are_empty(tmp_path):
    from movq.data.decode import list_images

    root = tmp_path / "img"
    root.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "a.png")
    os.mkfifo(root / "x.jpg")  # reading it would wait for a writer forever
    (root / "empty.jpg").write_bytes(b"")

    def timeout(*_):
        raise TimeoutError("blocked on the FIFO")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    try:
        assert list_images(root) == ["a.png", "empty.jpg"]
        cfg = DataConfig(source="folder", train=str(root), val=str(root), image_size=16, batch_size=1, num_workers=0)
        assert _val_totals(cfg) == (1, {"empty": 1})
        from movq.cli.make_shards import pack_folder

        manifest = pack_folder(root, tmp_path / "sh", log=lambda *_: None)
        assert manifest["count"] == 1 and manifest["skipped"] == {"empty": 1, "not_regular_file": 1}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_save_config_round_trip_keeps_the_new_keys(tmp_path):
    cfg = load_config(TokenizerConfig, {"data": {"on_bad_shard": "error", "verify": False},
                                        "train": {"dist_timeout": 30}})
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(TokenizerConfig, tmp_path / "c.yaml")
    assert (again.data.on_bad_shard, again.data.verify, again.train.dist_timeout) == ("error", False, 30.0)
