"""LPIPS loads stand-in weight files with the released key layout and rejects bad ones clearly."""
import pytest
import torch

from movq.evaluation.lpips import LIN_FILENAME, LPIPS, VGG_FILENAME

_CONVS = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256),
          14: (256, 256), 17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512),
          26: (512, 512), 28: (512, 512)}


def _vgg_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (co, ci) in _CONVS.items():
        sd[f"features.{i}.weight"] = torch.randn(co, ci, 3, 3, generator=g) * (2.0 / (9 * ci)) ** 0.5
        sd[f"features.{i}.bias"] = torch.zeros(co)
    sd["classifier.0.weight"] = torch.zeros(4, 4)  # present in the real file, ignored
    return sd


def _lin_state(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
            for k, c in enumerate((64, 128, 256, 512, 512))}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("lpips")
    torch.save(_vgg_state(), d / VGG_FILENAME)
    torch.save(_lin_state(), d / LIN_FILENAME)
    return d


@pytest.fixture(scope="module")
def lpips(weights):
    return LPIPS(weights / VGG_FILENAME, weights / LIN_FILENAME)


def test_loads_frozen(lpips):
    assert not any(p.requires_grad for p in lpips.parameters())
    lpips.train()
    assert not lpips.training
    assert torch.equal(lpips.features[28].bias, torch.zeros(512))


def test_distance_properties(lpips):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    y = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    d_same = lpips(x, x)
    assert d_same.shape == (2,) and torch.all(d_same == 0)
    d = lpips(x, y)
    assert d.shape == (2,) and torch.all(d > 0)
    assert torch.allclose(d, lpips(y, x), rtol=1e-5)


def test_gradient_reaches_input(lpips):
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    y = (x + 0.1 * torch.randn_like(x)).requires_grad_(True)
    lpips(x, y).sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_rejects_small_or_mismatched_input(lpips):
    with pytest.raises(ValueError, match="at least 16x16"):
        lpips(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="same shape"):
        lpips(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 16, 16))


def test_from_pretrained_cache_dir(weights, monkeypatch):
    monkeypatch.setenv("MOVQ_CACHE_DIR", str(weights))
    assert isinstance(LPIPS.from_pretrained(), LPIPS)


def test_missing_file_message(weights, tmp_path, monkeypatch):
    monkeypatch.setenv("MOVQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError) as e:
        LPIPS.from_pretrained(lin_path=weights / LIN_FILENAME)
    msg = str(e.value)
    assert VGG_FILENAME in msg and str(tmp_path) in msg and "download.pytorch.org" in msg
    with pytest.raises(FileNotFoundError, match="PerceptualSimilarity"):
        LPIPS(weights / VGG_FILENAME, tmp_path / "nope.pth")


def test_missing_key_and_wrong_shape(weights, tmp_path):
    lin = _lin_state()
    del lin["lin3.model.1.weight"]
    lin["lin9.model.1.weight"] = torch.zeros(1, 8, 1, 1)
    torch.save(lin, tmp_path / "bad_lin.pth")
    with pytest.raises(ValueError, match=r"missing keys: \['lin3.model.1.weight'\]") as e:
        LPIPS(weights / VGG_FILENAME, tmp_path / "bad_lin.pth")
    assert "unexpected keys: ['lin9.model.1.weight']" in str(e.value)

    vgg = _vgg_state()
    vgg["features.5.weight"] = torch.zeros(128, 64, 1, 1)
    torch.save(vgg, tmp_path / "bad_vgg.pth")
    with pytest.raises(ValueError, match=r"features.5.weight: file has \[128, 64, 1, 1\], expected \[128, 64, 3, 3\]"):
        LPIPS(tmp_path / "bad_vgg.pth", weights / LIN_FILENAME)


def test_rejects_non_tensor_pickle(weights, tmp_path):
    import pickle

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"a": object()}, protocol=2))
    with pytest.raises(ValueError, match="could not read weights"):
        LPIPS(tmp_path / "evil.pth", weights / LIN_FILENAME)
