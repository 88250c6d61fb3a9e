import json

import pytest
import torch
import yaml

from movq.config import MaskGITConfig, TokenizerConfig, load_config, save_config
from movq.models.autoencoder import MoVQ
from movq.models.maskgit import MaskGIT


def tiny(**over) -> TokenizerConfig:
    base = {
        "model": {"resolution": 32, "base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                  "attn_resolutions": [16], "norm_groups": 4},
        "quantizer": {"codebook_size": 32, "channels": 2, "dim": 4},
    }
    for key, value in over.items():
        section, name = key.split("__")
        base.setdefault(section, {})[name] = value
    return load_config(TokenizerConfig, base)


@pytest.mark.parametrize(
    "over, size, tokens",
    [
        ({}, (32, 32), (2, 16, 16)),
        ({"model__norm": "group", "quantizer__channels": 1, "quantizer__dim": 8}, (32, 32), (1, 16, 16)),
        ({"model__channel_mult": [1, 1, 2], "model__mid_attention": False}, (32, 48), (2, 8, 12)),
        ({"model__z_channels": 12, "model__decoder_extra_block": False}, (16, 16), (2, 8, 8)),
        ({}, (33, 21), (2, 17, 11)),  # odd sizes: padded to a multiple of f, output cropped back
    ],
)
def test_shapes(over, size, tokens):
    torch.manual_seed(0)
    model = MoVQ(tiny(**over))
    x = torch.rand(2, 3, *size) * 2 - 1
    x_rec, enc = model(x)
    assert x_rec.shape == x.shape
    assert enc.indices.shape == (2, *tokens) and enc.indices.dtype == torch.int64
    q = model.config.quantizer
    assert enc.z_q.shape == (2, q.channels * q.dim, *tokens[1:])
    assert model.decode_indices(enc.indices).shape[-2:] == (tokens[1] * model.downsample_factor,
                                                            tokens[2] * model.downsample_factor)


def test_eval_forward_equals_decode_indices():
    torch.manual_seed(0)
    model = MoVQ(tiny()).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        x_rec, enc = model(x)
        assert torch.equal(enc.z_q, model.quantizer.lookup(enc.indices))
        torch.testing.assert_close(model.decode_indices(model.encode(x).indices), x_rec, rtol=0, atol=1e-6)


@pytest.mark.parametrize("norm", ["spatial", "group"])
def test_decoder_is_conditioned_on_zq(norm):
    torch.manual_seed(0)
    model = MoVQ(tiny(model__norm=norm)).eval()
    z = torch.randn(1, 8, 16, 16)
    zq_a, zq_b = torch.randn(1, 8, 16, 16), torch.randn(1, 8, 16, 16)
    with torch.no_grad():
        out_a, out_b = model.decoder(z, zq_a), model.decoder(z, zq_b)
    if norm == "spatial":
        assert (out_a - out_b).abs().max() > 1e-3
        n_spatial = sum(type(m).__name__ == "SpatialNorm" for m in model.decoder.modules())
        n_group = sum(isinstance(m, torch.nn.GroupNorm) for m in model.decoder.modules())
        assert n_spatial == n_group > 0  # every norm of the decoder is a SpatialNorm
    else:
        assert torch.equal(out_a, out_b)


def test_save_and_load_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = MoVQ(tiny(quantizer__ema=True)).train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    model(x)  # moves EMA buffers and usage counters away from their initial values
    model.eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    record = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    # the architecture only: no training section can break loading the model later
    assert record["format_version"] == 1 and record["class"] == "MoVQ"
    assert sorted(record["config"]) == ["model", "quantizer"]
    loaded = MoVQ.from_pretrained(tmp_path / "ckpt")
    assert not loaded.training
    with torch.no_grad():
        a, ea = model(x)
        b, eb = loaded(x)
    assert torch.equal(a, b) and torch.equal(ea.indices, eb.indices)
    assert loaded.config == model.config


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        MoVQ.from_pretrained(tmp_path)
    MoVQ(tiny()).save_pretrained(tmp_path / "a")
    MoVQ(tiny(quantizer__codebook_size=64)).save_pretrained(tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").replace(tmp_path / "b" / "model.safetensors")
    with pytest.raises(ValueError, match="wrong shapes.*codebook"):
        MoVQ.from_pretrained(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="could not read weights"):
        MoVQ.from_pretrained(tmp_path / "b")


def test_folders_of_the_previous_format_still_load(tmp_path):
    """Before format 1 a model folder held the whole training config as config.yaml."""
    cfg = tiny()
    torch.manual_seed(0)
    model = MoVQ(cfg).eval()
    model.save_pretrained(tmp_path / "new")
    (tmp_path / "old").mkdir()
    (tmp_path / "new" / "model.safetensors").replace(tmp_path / "old" / "model.safetensors")
    save_config(cfg, tmp_path / "old" / "config.yaml")  # with data / train / loss sections
    assert "train" in yaml.safe_load((tmp_path / "old" / "config.yaml").read_text())
    loaded = MoVQ.from_pretrained(tmp_path / "old")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])


def test_a_newer_format_or_another_model_is_refused(tmp_path):
    MoVQ(tiny()).save_pretrained(tmp_path / "m")
    record = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**record, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        MoVQ.from_pretrained(tmp_path / "m")
    MaskGIT(MaskGITConfig(codebook_size=16, channels=2, grid=2, num_classes=0, width=16, depth=1, heads=2)
            ).save_pretrained(tmp_path / "p")
    with pytest.raises(ValueError, match=r"holds a MaskGIT prior, not a tokenizer \(MoVQ\)"):
        MoVQ.from_pretrained(tmp_path / "p")


def test_weights_with_nan_are_refused(tmp_path):
    model = MoVQ(tiny())
    with torch.no_grad():
        model.decoder.conv_out.weight[0, 0, 0, 0] = float("nan")
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="NaN or inf in .*decoder.conv_out.weight"):
        MoVQ.from_pretrained(tmp_path / "m")


def test_gradient_checkpointing_same_gradients():
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = MoVQ(tiny(model__gradient_checkpointing=ckpt))
        x = torch.rand(2, 3, 32, 32) * 2 - 1
        x_rec, enc = model(x)
        ((x_rec - x).abs().mean() + enc.quant.loss).backward()
        grads.append(model.get_last_layer().grad.clone())
        assert model.encoder.conv_in.weight.grad is not None
    torch.testing.assert_close(grads[0], grads[1])


def test_bad_input_shape():
    model = MoVQ(tiny())
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.encode(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="non-empty batch"):
        model(torch.rand(0, 3, 32, 32))
    with pytest.raises(ValueError, match="indices must lie in"):
        model.decode_indices(torch.full((1, 2, 4, 4), 99))
