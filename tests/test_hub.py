"""Hub-shaped models: ``from_pretrained`` of a repo id through a Hub cache built here (HF_HUB_OFFLINE=1,
sockets blocked), ``save_pretrained(push_to_hub=True)`` / ``push_to_hub`` with the upload intercepted,
and the model card written beside the weights."""
from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard

from movq.config import MaskGITConfig, TokenizerConfig, load_config
from movq.generation.sampler import load_prior
from movq.models.autoencoder import MoVQ
from movq.models.hub import HUB_FILES, latest_metrics, looks_like_repo_id
from movq.models.maskgit import MaskGIT
from movq.models.pretrained import resolve_pretrained, write_model_card

SHA_MAIN = "a" * 40
SHA_V1 = "b" * 40


def tiny_movq(seed: int) -> MoVQ:
    torch.manual_seed(seed)
    cfg = load_config(TokenizerConfig, {
        "model": {"resolution": 16, "base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                  "attn_resolutions": [], "norm_groups": 4},
        "quantizer": {"codebook_size": 16, "channels": 2, "dim": 4}})
    return MoVQ(cfg).eval()


def tiny_maskgit(seed: int) -> MaskGIT:
    torch.manual_seed(seed)
    return MaskGIT(MaskGITConfig(codebook_size=16, channels=2, grid=2, num_classes=3, width=16, depth=1,
                                 heads=2)).eval()


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt fails the test: the Hub is read from the cache built here only."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a test tried to open a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # tests/conftest.py sets HF_HUB_OFFLINE=1


def add_snapshot(cache: Path, repo_id: str, sha: str, folder: Path, ref: str | None = "main") -> Path:
    """The Hub cache layout huggingface_hub downloads into: models--org--name/{refs/<ref>, snapshots/<sha>/}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / sha
    shutil.copytree(folder, snapshot)
    if ref is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(sha)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path):
    cache = tmp_path / "hub"
    a, b = tiny_movq(0), tiny_movq(1)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    add_snapshot(cache, "org/tiny-movq", SHA_MAIN, tmp_path / "a")
    add_snapshot(cache, "org/tiny-movq", SHA_V1, tmp_path / "b", ref="v1")
    return cache, a, b


def same_weights(m1: torch.nn.Module, m2: torch.nn.Module) -> bool:
    s1, s2 = m1.state_dict(), m2.state_dict()
    return s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_repo_id_through_the_cache(hub_cache):
    cache, a, b = hub_cache
    loaded = MoVQ.from_pretrained("org/tiny-movq", cache_dir=cache)
    assert same_weights(loaded, a) and not loaded.training
    assert same_weights(MoVQ.from_pretrained("org/tiny-movq", revision="v1", cache_dir=cache), b)
    assert same_weights(MoVQ.from_pretrained("org/tiny-movq", revision=SHA_V1, cache_dir=cache), b)
    assert same_weights(MoVQ.from_pretrained("org/tiny-movq", cache_dir=cache, local_files_only=True), a)
    on_meta = MoVQ.from_pretrained("org/tiny-movq", map_location="meta", cache_dir=cache)
    assert next(on_meta.parameters()).device.type == "meta"
    assert resolve_pretrained("org/tiny-movq", "MoVQ", cache_dir=cache).name == SHA_MAIN


def test_local_files_only_without_offline_mode(hub_cache, monkeypatch):
    cache, a, _ = hub_cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert same_weights(MoVQ.from_pretrained("org/tiny-movq", cache_dir=cache, local_files_only=True), a)


def test_a_local_path_wins_over_a_repo_id(hub_cache, tmp_path, monkeypatch):
    cache, a, b = hub_cache
    monkeypatch.chdir(tmp_path)
    b.save_pretrained(tmp_path / "org" / "tiny-movq")  # a relative folder named like the repo
    assert same_weights(MoVQ.from_pretrained("org/tiny-movq", cache_dir=cache), b)
    with pytest.raises(ValueError, match="revision='v1' is for Hub repo ids"):
        MoVQ.from_pretrained("org/tiny-movq", revision="v1", cache_dir=cache)


def test_missing_repo_or_revision_is_a_clear_error(hub_cache, tmp_path):
    cache, _, _ = hub_cache
    with pytest.raises(FileNotFoundError, match="org/absent is not a local folder, and as a Hugging Face repo id"):
        MoVQ.from_pretrained("org/absent", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="org/tiny-movq@v9 is not a local folder"):
        MoVQ.from_pretrained("org/tiny-movq", revision="v9", cache_dir=cache)
    # not repo-shaped: the local error, unchanged
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MoVQ.from_pretrained(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="does not exist"):  # three parts: a path, not a repo id
        MoVQ.from_pretrained(f"{tmp_path.name}/no/such-run")
    with pytest.raises(ValueError, match="holds a tokenizer \\(MoVQ\\), not a MaskGIT prior"):
        MaskGIT.from_pretrained("org/tiny-movq", cache_dir=cache)


def test_only_model_files_are_fetched():
    from huggingface_hub.utils import filter_repo_objects

    repo = ["model.safetensors", "config.json", "README.md", "ema/model.safetensors", "ema/config.json",
            "model/generation_config.json", "optimizer.bin", "random_states_0.pkl", "scheduler.bin",
            "discriminator.safetensors", "trainer_state.json", "other/model.safetensors"]
    assert sorted(filter_repo_objects(repo, allow_patterns=HUB_FILES)) == [
        "README.md", "config.json", "ema/config.json", "ema/model.safetensors", "model.safetensors",
        "model/generation_config.json"]


def test_repo_id_shapes():
    assert looks_like_repo_id("kandinsky-community/kandinsky-2-2-decoder")
    assert looks_like_repo_id("org/model.v2")
    for name in ("runs/tiny/checkpoints", "./org/name", "/abs/path", "org", "org/../x", "org--x/y", "-org/x"):
        assert not looks_like_repo_id(name), name


def test_checkpoint_layout_and_priors_from_the_hub(tmp_path):
    """A repo holding a trainer's checkpoint folder (model/ and ema/) loads its EMA weights, as locally."""
    cache = tmp_path / "hub"
    live, ema = tiny_maskgit(0), tiny_maskgit(1)
    live.save_pretrained(tmp_path / "ckpt" / "model")
    ema.save_pretrained(tmp_path / "ckpt" / "ema")
    add_snapshot(cache, "org/prior", SHA_MAIN, tmp_path / "ckpt")
    assert same_weights(MaskGIT.from_pretrained("org/prior", cache_dir=cache), ema)
    assert same_weights(MaskGIT.from_pretrained("org/prior", prefer="model", cache_dir=cache), live)
    assert same_weights(MaskGIT.from_pretrained("org/prior", subfolder="model", cache_dir=cache), live)
    # load_prior (tools/sample.py) resolves repo ids too; HF_HUB_CACHE is read at import, so patch it
    import huggingface_hub.constants as hub_constants

    hub_constants_cache = hub_constants.HF_HUB_CACHE
    try:
        hub_constants.HF_HUB_CACHE = str(cache)
        model, _ = load_prior("org/prior")
    finally:
        hub_constants.HF_HUB_CACHE = hub_constants_cache
    assert same_weights(model, ema)


@pytest.fixture
def uploads(monkeypatch):
    """Intercept the two Hub calls of an upload; record the files each upload would send."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = {str(p.relative_to(folder_path)): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}
        calls.append(("upload_folder", repo_id, {"files": files, **kwargs}))
        return f"https://huggingface.co/{repo_id}/commit/{'c' * 40}"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_save_pretrained_push_to_hub_uploads_the_folder(tmp_path, uploads):
    model = tiny_movq(0)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "conversion.json").write_text("{}")  # what else the folder holds goes too
    url = model.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="me/movq-tiny", private=True)
    assert url.endswith("/commit/" + "c" * 40)
    (kind1, repo1, kw1), (kind2, repo2, kw2) = uploads
    assert (kind1, repo1, kw1["private"]) == ("create_repo", "me/movq-tiny", True)
    assert (kind2, repo2) == ("upload_folder", "me/movq-tiny")
    assert sorted(kw2["files"]) == ["README.md", "config.json", "conversion.json", "model.safetensors"]
    assert "MoVQ.from_pretrained('me/movq-tiny')" in kw2["files"]["README.md"].decode()
    # what was uploaded, put in a cache as the Hub would serve it, loads back as the same model
    (tmp_path / "served").mkdir()
    for name, data in kw2["files"].items():
        (tmp_path / "served" / name).write_bytes(data)
    add_snapshot(tmp_path / "hub", "me/movq-tiny", SHA_MAIN, tmp_path / "served")
    assert same_weights(MoVQ.from_pretrained("me/movq-tiny", cache_dir=tmp_path / "hub"), model)
    assert model.save_pretrained(tmp_path / "plain") is None and len(uploads) == 2  # no push unless asked


def test_push_to_hub_of_the_mixin(uploads, tmp_path):
    model = tiny_maskgit(0)
    model.push_to_hub("me/prior", commit_message="first")
    (_, _, _), (kind, repo, kw) = uploads
    assert (kind, repo, kw["commit_message"]) == ("upload_folder", "me/prior", "first")
    assert {"README.md", "config.json", "model.safetensors"} <= set(kw["files"])
    assert "MaskGIT.from_pretrained('me/prior')" in kw["files"]["README.md"].decode()


def test_model_card(tmp_path):
    model = tiny_movq(0)
    model.save_pretrained(tmp_path / "m", model_card_kwargs={
        "training": {"data": {"source": "folder", "train": "data/ffhq/train", "val": None}, "step": 100},
        "metrics": {"val/psnr": {"value": 23.5, "step": 100}, "rfid": 4.25}})
    card = ModelCard.load(tmp_path / "m" / "README.md")
    assert card.data.library_name == "movq"
    assert {"movq", "image-tokenizer"} <= set(card.data.tags)
    body = card.text
    config_block = body.split("```json\n", 1)[1].split("```", 1)[0]
    assert json.loads(config_block) == json.loads((tmp_path / "m" / "config.json").read_text())
    assert "`data.train`: `data/ffhq/train`" in body and "data.val" not in body
    assert "| val/psnr | 23.5 | 100 |" in body and "| rfid | 4.25 | — |" in body
    assert "16² images → 8² cells × 2 channel(s) (f2), one codebook of 16 codes of width 4" in body
    # rewriting the card of a saved folder keeps the weights and adds what it is given
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    write_model_card(tmp_path / "m", source={"format": "diffusers", "path": "kandinsky/movq"})
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    text = (tmp_path / "m" / "README.md").read_text()
    assert "## Converted from" in text and "val/psnr" not in text


def test_latest_metrics_reads_the_run_records(tmp_path):
    lines = [{"step": 5, "kind": "eval", "val/psnr": 20.0}, {"step": 5, "kind": "train", "loss": 1.0},
             {"step": 10, "kind": "eval", "val/psnr": 21.0, "val/ssim": 0.5, "note": "x"},
             {"step": 10, "kind": "fid", "rfid": 30.0}, {"step": 15, "kind": "eval", "val/psnr": 99.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"torn')
    assert latest_metrics(tmp_path / "metrics.jsonl", 10) == {
        "val/psnr": {"value": 21.0, "step": 10}, "val/ssim": {"value": 0.5, "step": 10},
        "rfid": {"value": 30.0, "step": 10}}
    assert latest_metrics(tmp_path / "absent.jsonl", 10) == {}
