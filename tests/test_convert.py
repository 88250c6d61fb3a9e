"""Checkpoint conversion (movq/convert.py, tools/convert.py): parity with the source models and errors.

diffusers is compared against the real ``diffusers.VQModel``. taming and MoVQGAN are compared against a
functional forward written here from their published architecture (taming-transformers
``diffusionmodules/model.py`` + ``vqvae/quantize.py``, MoVQGAN ``movq_modules.py``), run on stand-in state
dicts that carry their published key names and shapes.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from movq.cli.convert import main as cli
from movq.interop.checkpoint_io import ConvertError, load_checkpoint  # noqa: E402
from movq.interop.convert import convert
from movq.models.autoencoder import MoVQ  # noqa: E402

TOL = 1e-4  # max abs difference in fp32 that the issue asks for
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# taming / MoVQGAN stand-ins: published key layout, random weights
# --------------------------------------------------------------------------------------
def _conv(sd, name, cin, cout, k, g):
    sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) / math.sqrt(cin * k * k)
    sd[f"{name}.bias"] = 0.1 * torch.randn(cout, generator=g)


def _gn(sd, name, c, g):
    sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
    sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)


def _norm(sd, name, c, g, zq=None, add_conv=False):
    if zq is None:  # taming Normalize: GroupNorm(32)
        _gn(sd, name, c, g)
        return
    _gn(sd, f"{name}.norm_layer", c, g)  # MoVQGAN SpatialNorm
    if add_conv:
        _conv(sd, f"{name}.conv", zq, zq, 3, g)
    _conv(sd, f"{name}.conv_y", zq, c, 1, g)
    _conv(sd, f"{name}.conv_b", zq, c, 1, g)


def _res(sd, name, cin, cout, g, **nkw):
    _norm(sd, f"{name}.norm1", cin, g, **nkw)
    _conv(sd, f"{name}.conv1", cin, cout, 3, g)
    _norm(sd, f"{name}.norm2", cout, g, **nkw)
    _conv(sd, f"{name}.conv2", cout, cout, 3, g)
    if cin != cout:
        _conv(sd, f"{name}.nin_shortcut", cin, cout, 1, g)


def _attn(sd, name, c, g, **nkw):
    _norm(sd, f"{name}.norm", c, g, **nkw)
    for p in ("q", "k", "v", "proj_out"):
        _conv(sd, f"{name}.{p}", c, c, 1, g)


def vqgan_state_dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), z_channels=8, embed_dim=4,
                     n_embed=32, movq=False, add_conv=False, seed=0):
    """A taming VQModel (``movq=False``) or MoVQGAN MOVQ state dict, built level by level as they are."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    dec = dict(zq=embed_dim, add_conv=add_conv) if movq else {}
    n = len(ch_mult)
    _conv(sd, "encoder.conv_in", 3, ch, 3, g)
    c = ch
    for i, m in enumerate(ch_mult):
        for j in range(num_res_blocks):
            _res(sd, f"encoder.down.{i}.block.{j}", c, ch * m, g)
            c = ch * m
            if i in attn_levels:
                _attn(sd, f"encoder.down.{i}.attn.{j}", c, g)
        if i != n - 1:
            _conv(sd, f"encoder.down.{i}.downsample.conv", c, c, 3, g)
    _res(sd, "encoder.mid.block_1", c, c, g)
    _attn(sd, "encoder.mid.attn_1", c, g)
    _res(sd, "encoder.mid.block_2", c, c, g)
    _gn(sd, "encoder.norm_out", c, g)
    _conv(sd, "encoder.conv_out", c, z_channels, 3, g)
    _conv(sd, "quant_conv", z_channels, embed_dim, 1, g)
    sd["quantize.embedding.weight"] = torch.randn(n_embed, embed_dim, generator=g)
    _conv(sd, "post_quant_conv", embed_dim, z_channels, 1, g)
    _conv(sd, "decoder.conv_in", z_channels, c, 3, g)
    _res(sd, "decoder.mid.block_1", c, c, g, **dec)
    _attn(sd, "decoder.mid.attn_1", c, g, **dec)
    _res(sd, "decoder.mid.block_2", c, c, g, **dec)
    for i in reversed(range(n)):
        for j in range(num_res_blocks + 1):
            _res(sd, f"decoder.up.{i}.block.{j}", c, ch * ch_mult[i], g, **dec)
            c = ch * ch_mult[i]
            if i in attn_levels:
                _attn(sd, f"decoder.up.{i}.attn.{j}", c, g, **dec)
        if i != 0:
            _conv(sd, f"decoder.up.{i}.upsample.conv", c, c, 3, g)
    _norm(sd, "decoder.norm_out", c, g, **dec)
    _conv(sd, "decoder.conv_out", c, 3, 3, g)
    return sd


# --------------------------------------------------------------------------------------
# reference forward of the published architecture, straight from the state dict
# --------------------------------------------------------------------------------------
def _c(sd, name, x, padding=0, stride=1):
    return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], stride=stride, padding=padding)


def _ref_norm(sd, name, x, zq):
    if f"{name}.norm_layer.weight" in sd:  # MoVQGAN SpatialNorm
        z = F.interpolate(zq, size=x.shape[-2:], mode="nearest")
        if f"{name}.conv.weight" in sd:  # add_conv
            z = _c(sd, f"{name}.conv", z, padding=1)
        f = F.group_norm(x, 32, sd[f"{name}.norm_layer.weight"], sd[f"{name}.norm_layer.bias"], eps=1e-6)
        return f * _c(sd, f"{name}.conv_y", z) + _c(sd, f"{name}.conv_b", z)
    return F.group_norm(x, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)


def _ref_res(sd, name, x, zq):
    h = _c(sd, f"{name}.conv1", F.silu(_ref_norm(sd, f"{name}.norm1", x, zq)), padding=1)
    h = _c(sd, f"{name}.conv2", F.silu(_ref_norm(sd, f"{name}.norm2", h, zq)), padding=1)
    if f"{name}.nin_shortcut.weight" in sd:
        x = _c(sd, f"{name}.nin_shortcut", x)
    return x + h


def _ref_attn(sd, name, x, zq):
    b, c, hh, ww = x.shape
    h = _ref_norm(sd, f"{name}.norm", x, zq)
    q, k, v = (_c(sd, f"{name}.{p}", h).reshape(b, c, hh * ww) for p in "qkv")
    w = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * c ** -0.5, dim=2)  # [b, query, key]
    h = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + _c(sd, f"{name}.proj_out", h)


def _levels(sd, prefix):
    n = 0
    while f"{prefix}.{n}.block.0.conv1.weight" in sd:
        n += 1
    return n


def _blocks(sd, prefix):
    n = 0
    while f"{prefix}.block.{n}.conv1.weight" in sd:
        n += 1
    return n


def ref_encode(sd, x):
    """taming Encoder + quant_conv + VectorQuantizer2 (argmin of ‖z‖² + ‖e‖² − 2 z·e)."""
    h = _c(sd, "encoder.conv_in", x, padding=1)
    n = _levels(sd, "encoder.down")
    for i in range(n):
        for j in range(_blocks(sd, f"encoder.down.{i}")):
            h = _ref_res(sd, f"encoder.down.{i}.block.{j}", h, None)
            if f"encoder.down.{i}.attn.{j}.q.weight" in sd:
                h = _ref_attn(sd, f"encoder.down.{i}.attn.{j}", h, None)
        if i != n - 1:
            h = _c(sd, f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2)
    h = _ref_res(sd, "encoder.mid.block_1", h, None)
    h = _ref_attn(sd, "encoder.mid.attn_1", h, None)
    h = _ref_res(sd, "encoder.mid.block_2", h, None)
    h = _c(sd, "encoder.conv_out", F.silu(_ref_norm(sd, "encoder.norm_out", h, None)), padding=1)
    z = _c(sd, "quant_conv", h)
    e = sd["quantize.embedding.weight"]
    b, d, hh, ww = z.shape
    zf = z.permute(0, 2, 3, 1).reshape(-1, d)
    dist = zf.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * zf @ e.t()
    idx = dist.argmin(1)
    return e[idx].view(b, hh, ww, d).permute(0, 3, 1, 2), idx.view(b, hh, ww)


def ref_decode(sd, zq):
    """post_quant_conv + taming Decoder / MoVQGAN MOVQDecoder(z, zq)."""
    cond = zq if "decoder.norm_out.norm_layer.weight" in sd else None
    h = _c(sd, "decoder.conv_in", _c(sd, "post_quant_conv", zq), padding=1)
    h = _ref_res(sd, "decoder.mid.block_1", h, cond)
    h = _ref_attn(sd, "decoder.mid.attn_1", h, cond)
    h = _ref_res(sd, "decoder.mid.block_2", h, cond)
    for i in reversed(range(_levels(sd, "decoder.up"))):
        for j in range(_blocks(sd, f"decoder.up.{i}")):
            h = _ref_res(sd, f"decoder.up.{i}.block.{j}", h, cond)
            if f"decoder.up.{i}.attn.{j}.q.weight" in sd:
                h = _ref_attn(sd, f"decoder.up.{i}.attn.{j}", h, cond)
        if i != 0:
            h = _c(sd, f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"), padding=1)
    return _c(sd, "decoder.conv_out", F.silu(_ref_norm(sd, "decoder.norm_out", h, cond)), padding=1)


def images(n=2, size=16, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def assert_parity(model: MoVQ, sd: dict, x: torch.Tensor) -> None:
    with torch.no_grad():
        zq_ref, idx_ref = ref_encode(sd, x)
        rec_ref = ref_decode(sd, zq_ref)
        rec, enc = model(x)
    assert torch.equal(enc.indices[:, 0], idx_ref)
    assert (rec - rec_ref).abs().max().item() <= TOL
    assert rec_ref.abs().max() > 0.1  # not a trivially small output


# --------------------------------------------------------------------------------------
# a Lightning-style .ckpt with objects that weights_only refuses
# --------------------------------------------------------------------------------------
def _fake_lightning_module():
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_path = "/somewhere/last.ckpt"

    class AttributeDict(dict):
        pass

    for cls in (ModelCheckpoint, AttributeDict):
        cls.__module__, cls.__qualname__ = mod.__name__, cls.__name__
        setattr(mod, cls.__name__, cls)
    return mod


class _Payload:
    """Unpickles as a call to ``mkdir_fn(path)``: converting must never run it."""

    def __init__(self, path, mkdir_fn):
        self.path, self.mkdir_fn = path, mkdir_fn

    def __reduce__(self):
        return (self.mkdir_fn, (self.path,))


def save_lightning_ckpt(path: Path, state: dict, payload=None) -> None:
    mod = _fake_lightning_module()
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__]
    saved = {n: sys.modules.get(n) for n in names}
    for n in names:
        sys.modules[n] = mod if n == mod.__name__ else types.ModuleType(n)
    try:
        ckpt = {"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.0.8",
                "callbacks": {mod.ModelCheckpoint: {"best_model_score": torch.tensor(0.5)}},
                "extra": mod.ModelCheckpoint(), "state_dict": state}
        if payload == "hparams":  # save_hyperparameters() stores Lightning's AttributeDict, a dict subclass
            ckpt["hyper_parameters"] = mod.AttributeDict(n_embed=48)
        elif payload is not None:
            ckpt["payload"] = payload
        torch.save(ckpt, path)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def with_loss_keys(sd):
    g = torch.Generator().manual_seed(5)
    return {**sd, "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4, generator=g),
            "loss.perceptual_loss.lin0.model.1.weight": torch.randn(1, 8, 1, 1, generator=g),
            "loss.logvar": torch.zeros(())}


# --------------------------------------------------------------------------------------
# diffusers
# --------------------------------------------------------------------------------------
DIFFUSERS_CASES = {
    "spatial_f4_attn": dict(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32, 64), norm_type="spatial", latent_channels=4, vq_embed_dim=4),
    "group_f2_no_mid_attn": dict(
        down_block_types=("AttnDownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "AttnUpDecoderBlock2D"),
        block_out_channels=(32, 64), norm_type="group", latent_channels=6, vq_embed_dim=3,
        mid_block_add_attention=False, layers_per_block=2),
}


def make_vqmodel(case: str, seed: int = 0):
    diffusers = pytest.importorskip("diffusers")  # a test-only extra: only these tests need it
    torch.manual_seed(seed)
    vq = diffusers.VQModel(in_channels=3, out_channels=3, num_vq_embeddings=64, norm_num_groups=32,
                           sample_size=32, **{"layers_per_block": 1, **DIFFUSERS_CASES[case]}).eval()
    with torch.no_grad():  # move every weight off its init (norms at 1/0 would hide swapped keys)
        for p in vq.parameters():
            p.add_(0.1 * torch.randn_like(p))
        vq.quantize.embedding.weight.normal_()
    return vq


@pytest.fixture(scope="module", params=sorted(DIFFUSERS_CASES))
def diffusers_folder(request, tmp_path_factory):
    vq = make_vqmodel(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    vq.save_pretrained(folder)
    return vq, folder


def test_diffusers_parity(diffusers_folder, tmp_path):
    vq, folder = diffusers_folder
    assert cli(["--from", "diffusers", str(folder), str(tmp_path / "out")]) == 0
    model = MoVQ.from_pretrained(tmp_path / "out").eval()
    assert model.config.quantizer.beta_on == "codebook" and model.config.quantizer.channels == 1
    x = images(size=32)
    with torch.no_grad():
        h = vq.encode(x).latents
        _, _, (_, _, idx) = vq.quantize(h)
        ref = vq.decode(h).sample
        rec, enc = model(x)
        # Kandinsky decodes its prior's latents without quantizing them: movq's decode does the same
        latents = torch.randn_like(h)
        ref_unq = vq.decode(latents, force_not_quantize=True).sample
        rec_unq = model.decode(latents)
    assert torch.equal(enc.indices.flatten(), idx.flatten())
    assert (rec - ref).abs().max().item() <= TOL
    assert (rec_unq - ref_unq).abs().max().item() <= TOL
    info = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert info["source_format"] == "diffusers"


def test_diffusers_old_attention_names(diffusers_folder, tmp_path):
    """Pre-0.14 diffusers files name the attention projections query/key/value/proj_attn."""
    vq, folder = diffusers_folder
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    old = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
           .replace(".to_out.0.", ".proj_attn."): v for k, v in state.items()}
    (tmp_path / "old").mkdir()
    save_file(old, tmp_path / "old" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "old" / "config.json").write_text((folder / "config.json").read_text())
    new = convert("diffusers", tmp_path / "old").model
    ref = convert("diffusers", folder).model
    for (k, a), b in zip(new.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


# --------------------------------------------------------------------------------------
# taming and MoVQGAN
# --------------------------------------------------------------------------------------
def test_taming_parity_from_lightning_ckpt(tmp_path):
    sd = vqgan_state_dict(ch_mult=(1, 2, 2), attn_levels=(2,), z_channels=8, embed_dim=4, n_embed=48)
    keep = tmp_path / "keep"  # the checkpoint asks for shutil.rmtree(keep); a stand-in takes the call
    keep.mkdir()
    save_lightning_ckpt(tmp_path / "last.ckpt", with_loss_keys(sd), _Payload(str(keep), shutil.rmtree))
    yaml_cfg = {"model": {"target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": 4, "n_embed": 48, "ddconfig": {
            "double_z": False, "z_channels": 8, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [16], "dropout": 0.0},
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"}}}}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(yaml_cfg))
    out = tmp_path / "out"
    assert cli(["--from", "taming", str(tmp_path / "last.ckpt"), str(out),
                "--source-config", str(tmp_path / "model.yaml")]) == 0
    assert keep.is_dir(), "unpickling ran code from the checkpoint"
    model = MoVQ.from_pretrained(out).eval()
    m = model.config.model
    assert (m.norm, m.z_channels, tuple(m.attn_resolutions), m.resolution) == ("group", 8, (16,), 64)
    assert_parity(model, sd, images(size=16))
    info = json.loads((out / "conversion.json").read_text())
    assert info["dropped_keys"] == {"loss: discriminator / LPIPS": 3}


@pytest.mark.parametrize("add_conv", [False, True])
def test_movqgan_parity(tmp_path, add_conv):
    sd = vqgan_state_dict(ch_mult=(1, 2), attn_levels=(1,), z_channels=4, embed_dim=4, movq=True,
                          add_conv=add_conv, num_res_blocks=2)
    torch.save(sd, tmp_path / "movqgan.ckpt")  # the released MoVQGAN files are plain state dicts
    result = convert("movqgan", tmp_path / "movqgan.ckpt")
    assert result.model.config.model.norm == "spatial"
    assert result.model.config.model.spatial_norm_conv is add_conv
    assert tuple(result.model.config.model.attn_resolutions) == (128,)  # level 1 of a nominal 256
    assert_parity(result.model, sd, images(size=16))


def test_movqgan_ema_weights(tmp_path):
    """MoVQGAN keeps LitEma copies as ema_<module>.<name without dots>; --ema converts those."""
    sd = vqgan_state_dict(movq=True, z_channels=4, seed=2)
    ema_sd = vqgan_state_dict(movq=True, z_channels=4, seed=3)
    full = dict(sd)
    for k, v in ema_sd.items():
        module, rest = k.split(".", 1)
        full[f"ema_{module}.{rest.replace('.', '')}"] = v
    for m in ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv"):
        full[f"ema_{m}.decay"] = torch.tensor(0.9999)
        full[f"ema_{m}.num_updates"] = torch.tensor(-1, dtype=torch.int)
    save_file(full, tmp_path / "movqgan.safetensors")
    raw = convert("movqgan", tmp_path / "movqgan.safetensors")
    ema = convert("movqgan", tmp_path / "movqgan.safetensors", use_ema=True)
    x = images(size=16)
    assert_parity(raw.model, sd, x)
    assert_parity(ema.model, ema_sd, x)
    assert "weights taken from the EMA copies" in ema.notes


def test_taming_remap_subset(tmp_path):
    """With quantize.used, tokens are positions in `used`; decoding token t decodes code used[t]."""
    sd = vqgan_state_dict(n_embed=40, embed_dim=4, z_channels=4)
    used = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:30]
    torch.save({"state_dict": {**sd, "quantize.used": used}}, tmp_path / "remap.ckpt")
    model = convert("taming", tmp_path / "remap.ckpt").model
    assert model.config.quantizer.codebook_size == 30
    x = images(n=4, size=16)
    with torch.no_grad():
        _, idx_full = ref_encode(sd, x)
        tokens = model.encode(x).indices[:, 0]
        hit = torch.isin(idx_full, used)  # taming maps hits outside `used` to random/extra tokens
        assert hit.float().mean() > 0.5
        assert torch.equal(used[tokens][hit], idx_full[hit])
        t = torch.randint(0, 30, (2, 1, 8, 8))
        e = sd["quantize.embedding.weight"][used[t[:, 0]]].permute(0, 3, 1, 2)
        assert (model.decode_indices(t) - ref_decode(sd, e)).abs().max().item() <= TOL
    full = convert("taming", tmp_path / "remap.ckpt", remap="full").model
    assert full.config.quantizer.codebook_size == 40


def test_legacy_beta_gradients(tmp_path):
    """Converted quantizers weight the codebook term by β, as taming's legacy=True does."""
    sd = vqgan_state_dict(z_channels=4, embed_dim=4)
    torch.save(sd, tmp_path / "vq.pt")
    quantizer = convert("taming", tmp_path / "vq.pt").model.quantizer.train()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    quantizer(z).loss.backward()
    e = sd["quantize.embedding.weight"].clone().requires_grad_(True)
    zf = z.detach().permute(0, 2, 3, 1).reshape(-1, 4).requires_grad_(True)
    idx = torch.cdist(zf, e).argmin(1)
    zq = e[idx]
    legacy = ((zq.detach() - zf) ** 2).mean() + 0.25 * ((zq - zf.detach()) ** 2).mean()
    legacy.backward()
    torch.testing.assert_close(quantizer.codebook.grad, e.grad)
    torch.testing.assert_close(z.grad.permute(0, 2, 3, 1).reshape(-1, 4), zf.grad)


# --------------------------------------------------------------------------------------
# errors: one clear line, exit status 2
# --------------------------------------------------------------------------------------
def run_cli_error(capsys, *args) -> str:
    assert cli([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "Traceback" not in err
    return err


def test_wrong_from_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["--from", "vqgan", str(tmp_path), str(tmp_path / "out")])
    assert e.value.code == 2
    assert "invalid choice: 'vqgan'" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["blocked_module", "method_call", "dict_subclass"])
def test_objects_weights_only_refuses(tmp_path, capsys, case):
    """Objects torch's weights_only loader will not build even from stand-ins: a clear error, nothing run."""
    payload = tmp_path / "payload_ran"
    extra = {"blocked_module": _Payload(str(payload), os.mkdir), "method_call": _Payload(payload, Path.mkdir),
             "dict_subclass": "hparams"}[case]
    save_lightning_ckpt(tmp_path / "evil.ckpt", vqgan_state_dict(), extra)
    err = run_cli_error(capsys, "--from", "taming", tmp_path / "evil.ckpt", tmp_path / "out")
    assert "weights_only=True) refuses" in err and ".safetensors" in err
    assert not payload.exists()


def test_truncated_files(tmp_path, capsys):
    sd = vqgan_state_dict()
    torch.save(sd, tmp_path / "vq.ckpt")
    save_file(sd, tmp_path / "vq.safetensors")
    for name in ("vq.ckpt", "vq.safetensors"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: len(data) // 2])
        err = run_cli_error(capsys, "--from", "taming", tmp_path / f"cut_{name}", tmp_path / "out")
        assert f"cut_{name}" in err and "truncated or corrupt" in err
    (tmp_path / "empty.ckpt").write_bytes(b"")  # an exception without a message
    assert "truncated or corrupt" in run_cli_error(capsys, "--from", "taming", tmp_path / "empty.ckpt", tmp_path / "o")


def test_diffusers_files_given_as_taming(tmp_path, capsys, diffusers_folder):
    _, folder = diffusers_folder
    weights = folder / "diffusion_pytorch_model.safetensors"
    assert "--from diffusers" in run_cli_error(capsys, "--from", "taming", weights, tmp_path / "o")
    assert "use --from diffusers" in run_cli_error(capsys, "--from", "taming", folder, tmp_path / "o")


def test_other_architectures(tmp_path, capsys):
    taming = tmp_path / "taming.pt"
    torch.save(vqgan_state_dict(), taming)
    movqgan = tmp_path / "movqgan.pt"
    torch.save(vqgan_state_dict(movq=True, z_channels=4), movqgan)
    assert "--from taming" in run_cli_error(capsys, "--from", "movqgan", taming, tmp_path / "o")
    assert "--from movqgan" in run_cli_error(capsys, "--from", "taming", movqgan, tmp_path / "o")
    assert "no config.json" in run_cli_error(capsys, "--from", "diffusers", taming, tmp_path / "o")
    resnet = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.randn(8, 3, 7, 7), "fc.weight": torch.randn(10, 8)}, resnet)
    err = run_cli_error(capsys, "--from", "taming", resnet, tmp_path / "o")
    assert "does not look like a taming VQGAN" in err and "encoder.conv_in.weight" in err
    kl = tmp_path / "kl"
    kl.mkdir()
    (kl / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 4}))
    save_file({"x": torch.zeros(1)}, kl / "diffusion_pytorch_model.safetensors")
    assert "AutoencoderKL, not a VQModel" in run_cli_error(capsys, "--from", "diffusers", kl, tmp_path / "o")
    prefixed = tmp_path / "transformer.ckpt"
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in vqgan_state_dict().items()}}, prefixed)
    assert "--prefix first_stage_model." in run_cli_error(capsys, "--from", "taming", prefixed, tmp_path / "o")
    assert cli(["--from", "taming", str(prefixed), str(tmp_path / "o"), "--prefix", "first_stage_model."]) == 0
    # a transformer with a VQ conditioning stage too: both named, the first stage first
    both = tmp_path / "cond_transformer.ckpt"
    torch.save({"state_dict": {f"{p}.{k}": v for p in ("cond_stage_model", "first_stage_model")
                               for k, v in vqgan_state_dict().items()}}, both)
    assert "pass --prefix first_stage_model. or --prefix cond_stage_model." in run_cli_error(
        capsys, "--from", "taming", both, tmp_path / "o2")
    ema_only = tmp_path / "ema_only.pt"
    torch.save({f"ema_{k.split('.', 1)[0]}.{k.split('.', 1)[1].replace('.', '')}": v  # LitEma per module
                for k, v in vqgan_state_dict().items()}, ema_only)
    assert "only EMA copies" in run_cli_error(capsys, "--from", "taming", ema_only, tmp_path / "o3")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: foo\n")
    assert "unexpected value in the source config" in run_cli_error(
        capsys, "--from", "taming", tmp_path / "taming.pt", tmp_path / "o4", "--source-config", bad_yaml)


def test_unmapped_and_missing_keys_are_listed(tmp_path):
    sd = vqgan_state_dict()
    extra = {**sd, "encoder.mystery.weight": torch.zeros(3)}
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(ConvertError, match=r"1 source key\(s\) not mapped \['encoder.mystery.weight'\]"):
        convert("taming", tmp_path / "extra.pt")
    short = dict(sd)
    del short["decoder.up.1.block.0.conv2.bias"]
    torch.save(short, tmp_path / "short.pt")
    with pytest.raises(ConvertError, match=r"1 weight\(s\) missing \['decoder.up.1.block.0.conv2.bias'\]"):
        convert("taming", tmp_path / "short.pt")
    bad = dict(sd)
    bad["decoder.conv_in.bias"] = torch.zeros(5)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ConvertError, match="shapes disagree.*decoder.conv_in.bias"):
        convert("taming", tmp_path / "bad.pt")


def test_source_config_must_agree(tmp_path):
    torch.save(vqgan_state_dict(), tmp_path / "vq.pt")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"ddconfig": {
        "ch": 64, "ch_mult": [1, 2], "num_res_blocks": 1, "resolution": 32, "attn_resolutions": [16],
        "z_channels": 8, "in_channels": 3, "out_ch": 3}}))
    with pytest.raises(ConvertError, match=r"disagrees with the weights.*'ch': \(64, 32\)"):
        convert("taming", tmp_path / "vq.pt", source_config=tmp_path / "cfg.yaml")


def test_cli_keeps_existing_output(tmp_path, capsys):
    torch.save(vqgan_state_dict(), tmp_path / "vq.pt")
    assert cli(["--from", "taming", str(tmp_path / "vq.pt"), str(tmp_path / "out")]) == 0
    assert "--force" in run_cli_error(capsys, "--from", "taming", tmp_path / "vq.pt", tmp_path / "out")
    assert cli(["--from", "taming", str(tmp_path / "vq.pt"), str(tmp_path / "out"), "--force"]) == 0


def test_load_checkpoint_rejects_non_state_dicts(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ConvertError, match="holds no state dict"):
        load_checkpoint(tmp_path / "list.pt")
    torch.save({"encoder.conv_in.weight": torch.zeros(1), "meta": "text"}, tmp_path / "mixed.pt")
    with pytest.raises(ConvertError, match="not tensors"):
        load_checkpoint(tmp_path / "mixed.pt")


# --------------------------------------------------------------------------------------
# export: movq → diffusers (tools/convert.py --to diffusers)
# --------------------------------------------------------------------------------------
EXPORT_TOL = 1e-5  # the bound on the round trip diffusers → movq → diffusers


def _reconstruct(vq, x):
    with torch.no_grad():
        return vq(x).sample


def test_diffusers_round_trip(diffusers_folder, tmp_path):
    """diffusers → movq → diffusers: the same tensors, the same config, equal reconstructions."""
    diffusers = pytest.importorskip("diffusers")
    vq, folder = diffusers_folder
    assert cli(["--from", "diffusers", str(folder), str(tmp_path / "movq")]) == 0
    assert cli(["--to", "diffusers", str(tmp_path / "movq"), str(tmp_path / "back")]) == 0
    back = diffusers.VQModel.from_pretrained(tmp_path / "back").eval()
    x = images(n=1, size=16)
    assert (_reconstruct(back, x) - _reconstruct(vq, x)).abs().max().item() <= EXPORT_TOL
    original, exported = vq.state_dict(), back.state_dict()
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)
    keep = ("block_out_channels", "down_block_types", "up_block_types", "latent_channels", "vq_embed_dim",
            "num_vq_embeddings", "norm_type", "layers_per_block", "mid_block_add_attention", "norm_num_groups")
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in back.config.items() if k in keep} == \
        {k: list(v) if isinstance(v, tuple) else v for k, v in vq.config.items() if k in keep}


@pytest.mark.parametrize("norm", ["group", "spatial"])
def test_movq_models_export(tmp_path, norm):
    """A model trained in movq (C = 1) reconstructs in diffusers as in movq, token for token."""
    diffusers = pytest.importorskip("diffusers")
    from movq.config import TokenizerConfig, load_config
    from movq.interop.export import export_diffusers

    torch.manual_seed(0)
    cfg = load_config(TokenizerConfig, {
        "model": {"resolution": 32, "base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1,
                  "attn_resolutions": [16], "norm": norm, "z_channels": None if norm == "spatial" else 8},
        "quantizer": {"codebook_size": 64, "channels": 1, "dim": 4}})
    model = MoVQ(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # off the init, as in make_vqmodel
    result = export_diffusers(model, tmp_path / "d")
    assert any("legacy=True" in n for n in result.notes)  # movq's default β on the commitment term
    vq = diffusers.VQModel.from_pretrained(tmp_path / "d").eval()
    x = images(n=1, size=16)
    with torch.no_grad():
        rec, enc = model(x)
        h = vq.encode(x).latents
        _, _, (_, _, idx) = vq.quantize(h)
    assert torch.equal(enc.indices.flatten(), idx.flatten())
    assert (_reconstruct(vq, x) - rec).abs().max().item() <= TOL  # two implementations: TOL as for the import


@pytest.mark.parametrize("name", ["vqgan_ffhq256", "vqgan_imagenet256"])
def test_vqgan_twin_configs_export(name):
    """The shipped VQGAN twins give a VQModel config whose weights match key for key, shape for shape."""
    diffusers = pytest.importorskip("diffusers")
    from movq.interop.export import diffusers_config, diffusers_state_dict

    with torch.device("meta"):
        model = MoVQ.from_config(ROOT / "configs" / f"{name}.yaml")
        vq = diffusers.VQModel(**{k: v for k, v in diffusers_config(model.config).config.items()
                                  if not k.startswith("_")})
    ours = {k: tuple(v.shape) for k, v in diffusers_state_dict(model).items()}
    theirs = {k: tuple(v.shape) for k, v in vq.state_dict().items()}
    assert ours == theirs


def test_what_does_not_export(tmp_path, capsys):
    from movq.config import TokenizerConfig, load_config
    from movq.interop.export import diffusers_config

    err = run_cli_error(capsys, "--to", "diffusers", "missing/folder-xyz", tmp_path / "o")  # not local, not cached
    assert "missing/folder-xyz" in err
    with torch.device("meta"):
        four = MoVQ.from_config(ROOT / "configs" / "ffhq256.yaml")
    with pytest.raises(ConvertError, match=r"C = 4 channels per latent cell.*no diffusers class can hold"):
        diffusers_config(four.config)
    base = {"model": {"norm": "spatial"}, "quantizer": {"channels": 1, "dim": 4}}
    cases = {"cosine": ({"quantizer": {"cosine": True}}, "l2-normalised"),
             "add_conv": ({"model": {"spatial_norm_conv": True}}, "add_conv"),
             "groups": ({"model": {"norm_groups": 16}}, "always uses 32 groups"),
             "z": ({"model": {"z_channels": 8}}, "must then equal the code width"),
             "extra": ({"model": {"decoder_extra_block": False}}, "num_res_blocks \\+ 1"),
             "mult": ({"model": {"channel_mult": [2, 2]}}, "conv_in outputs")}
    for over, message in cases.values():
        cfg = load_config(TokenizerConfig, {k: {**base[k], **over.get(k, {})} for k in base})
        with pytest.raises(ConvertError, match=message):
            diffusers_config(cfg)
    # a multichannel model through the command line: exit 2, one line, nothing written
    small = {"model": {"resolution": 16, "base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                       "attn_resolutions": [], "norm_groups": 4}, "quantizer": {"codebook_size": 16, "channels": 2,
                                                                               "dim": 4}}
    MoVQ(load_config(TokenizerConfig, small)).save_pretrained(tmp_path / "c2")
    err = run_cli_error(capsys, "--to", "diffusers", tmp_path / "c2", tmp_path / "o2")
    assert "C = 2 channels per latent cell" in err and not (tmp_path / "o2").exists()
    with pytest.raises(SystemExit):
        cli(["--to", "diffusers", "--ema", str(tmp_path / "c2"), str(tmp_path / "o3")])
    assert "--ema: only with --from" in capsys.readouterr().err


def test_export_keeps_an_existing_folder(tmp_path, capsys, diffusers_folder):
    _, folder = diffusers_folder
    assert cli(["--from", "diffusers", str(folder), str(tmp_path / "m")]) == 0
    assert cli(["--to", "diffusers", str(tmp_path / "m"), str(tmp_path / "d")]) == 0
    assert "--force" in run_cli_error(capsys, "--to", "diffusers", tmp_path / "m", tmp_path / "d")
    assert cli(["--to", "diffusers", str(tmp_path / "m"), str(tmp_path / "d"), "--force"]) == 0
    card = (tmp_path / "m" / "README.md").read_text()  # the converted folder's model card names its source
    assert "## Converted from" in card and "* format: `diffusers`" in card
