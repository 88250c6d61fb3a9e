"""FID Inception-v3: weights-file layout, loading checks, TF1 preprocessing, and (when its source
is at hand) parity with torch-fidelity's extractor. Inception at 299² is slow on CPU: ≤ 4 images."""
import importlib
import os
import sys
import types
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from movq.evaluation import inception as inc
from movq.evaluation.inception import FIDInceptionV3, InceptionWeightsError


@pytest.fixture(scope="module")
def standin_state():
    return inc.standin_state_dict(seed=0)


@pytest.fixture(scope="module")
def standin(tmp_path_factory, standin_state):
    path = tmp_path_factory.mktemp("inception") / "standin.pth"
    torch.save(standin_state, path)
    return path


def test_state_dict_layout_matches_the_standard_file(standin_state):
    # Facts of weights-inception-2015-12-05-6726825d.pth (torch-fidelity's TF port): 94 conv+BN
    # units (5 tensors each) and a 1008-way fc; a few keys pinned with their shapes.
    state = standin_state
    assert len(state) == 94 * 5 + 2
    expected = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_6e.branch7x7dbl_2.conv.weight": (192, 192, 7, 1),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.endswith("num_batches_tracked") for k in state)  # the converted file has none


def test_loads_standin_and_extracts_features(standin):
    model = FIDInceptionV3.from_pretrained(standin, verify=False)
    assert model.num_features == 2048
    model.train()  # must not switch BatchNorm to batch statistics
    assert not model.training and not model.Mixed_7c.branch_pool.bn.training
    imgs = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    feats = model(imgs)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and feats.std() > 0.01
    # Images of different sizes can share a batch (each is resized on its own): same features.
    odd = torch.randint(0, 256, (3, 20, 31), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    mixed = model([imgs[1], odd])
    torch.testing.assert_close(mixed[0], feats[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixed[1], model(odd[None])[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        model(imgs.float())


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape", "not_a_dict"])
def test_rejects_wrong_files(tmp_path, damage, standin_state):
    state = dict(standin_state)
    if damage == "missing":
        del state["Mixed_6c.branch7x7dbl_3.bn.running_mean"]
        match = "missing key.*Mixed_6c.branch7x7dbl_3.bn.running_mean"
    elif damage == "unexpected":
        state["AuxLogits.fc.weight"] = torch.zeros(1)
        match = "unexpected key.*AuxLogits"
    elif damage == "shape":
        state["fc.weight"] = torch.zeros(1000, 2048)
        match = r"fc.weight has shape \(1000, 2048\), expected \(1008, 2048\)"
    else:
        state = [torch.zeros(1)]
        match = "does not hold a state dict of tensors"
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(InceptionWeightsError, match=match):
        FIDInceptionV3.from_pretrained(path, verify=False)


def test_checksum_is_checked(standin):
    with pytest.raises(InceptionWeightsError) as err:
        FIDInceptionV3.from_pretrained(standin)  # verify=True: a stand-in cannot pass
    msg = str(err.value)
    assert str(standin) in msg and inc.SHA256_PREFIX in msg and inc.WEIGHTS_URL in msg
    assert "\n" not in msg


def test_weights_are_found_by_env_and_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(inc.ENV_WEIGHTS, raising=False)
    monkeypatch.setenv(inc.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(InceptionWeightsError) as err:
        inc.resolve_weights_path()
    msg = str(err.value)
    for part in (inc.WEIGHTS_NAME, str(tmp_path / "cache"), str(tmp_path / "torch"), inc.WEIGHTS_URL, "6726825d"):
        assert part in msg
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    hub = tmp_path / "torch" / "hub" / "checkpoints" / inc.WEIGHTS_NAME
    hub.write_bytes(b"x")
    assert inc.resolve_weights_path() == hub  # torch-fidelity's download location is reused
    (tmp_path / "cache").mkdir()
    cached = tmp_path / "cache" / inc.WEIGHTS_NAME
    cached.write_bytes(b"x")
    assert inc.resolve_weights_path() == cached  # our cache dir comes first
    other = tmp_path / "elsewhere.pth"
    other.write_bytes(b"x")
    monkeypatch.setenv(inc.ENV_WEIGHTS, str(other))
    assert inc.resolve_weights_path() == other
    assert inc.resolve_weights_path(cached) == cached  # an explicit path wins over the env
    with pytest.raises(InceptionWeightsError, match="nope.pth.*not found"):
        inc.resolve_weights_path(tmp_path / "nope.pth")


def _tf1_resize_numpy(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Independent float64 loop version of TF1 resize_bilinear(align_corners=False): output
    pixel i samples input coordinate i * in / out, neighbours clamped at the far edge."""
    h, w = x.shape
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        sy = i * h / out_h
        y0 = int(np.floor(sy))
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for j in range(out_w):
            sx = j * w / out_w
            x0 = int(np.floor(sx))
            x1, fx = min(x0 + 1, w - 1), sx - x0
            top = x[y0, x0] * (1 - fx) + x[y0, x1] * fx
            bottom = x[y1, x0] * (1 - fx) + x[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


def test_tf1_resize_pinned():
    # A ramp upsampled 2x: TF1 samples 0, 0.5, 1, ... and repeats the last value at the end,
    # where torch's half-pixel interpolate is symmetric. The values are the definition.
    ramp = torch.tensor([[[[0.0, 10.0, 20.0, 30.0]]]])
    out = inc.resize_bilinear_tf1(ramp, (1, 8))
    assert out.flatten().tolist() == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 30.0]
    torch_default = F.interpolate(ramp, size=(1, 8), mode="bilinear", align_corners=False)
    assert not torch.equal(out, torch_default)
    # Downsampling 7 -> 3 picks columns 0, 7/3, 14/3.
    row = torch.arange(7.0).view(1, 1, 1, 7)
    torch.testing.assert_close(inc.resize_bilinear_tf1(row, (1, 3)).flatten(),
                               torch.tensor([0.0, 7 / 3, 14 / 3]))
    # A fixed 5x6 pattern to 299x299 against the float64 loop.
    pattern = (np.arange(30).reshape(5, 6) * 37 % 256).astype(np.float64)
    ours = inc.resize_bilinear_tf1(torch.tensor(pattern, dtype=torch.float32)[None, None], (299, 299))
    np.testing.assert_allclose(ours[0, 0].numpy(), _tf1_resize_numpy(pattern, 299, 299), atol=2e-4)


def test_preprocess_pinned():
    # Checkerboard 0/255 4x4 -> 299²: scaled by (x - 128) / 128, so corners are -1 and 127/128.
    board = ((np.indices((4, 4)).sum(0) % 2) * 255).astype(np.uint8)
    imgs = torch.from_numpy(np.stack([board, 255 - board, np.full((4, 4), 128, np.uint8)]))[None]  # [1, 3, 4, 4]
    x = inc.preprocess(imgs)
    assert x.shape == (1, 3, 299, 299) and x.dtype == torch.float32
    assert x[0, 0, 0, 0] == -1.0 and x[0, 1, 0, 0] == 127 / 128 and (x[0, 2] == 0).all()
    expected = (_tf1_resize_numpy(board.astype(np.float64), 299, 299) - 128) / 128
    np.testing.assert_allclose(x[0, 0].numpy(), expected, atol=2e-6)
    assert abs(float(x[0, 0].double().sum()) - expected.sum()) < 1e-2  # pinned checksum
    # An image already 299² is only rescaled.
    same = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8)
    assert torch.equal(inc.preprocess(same), (same.float() - 128) / 128)


def _torch_fidelity_src(tmp_path):
    """torch-fidelity's source from $MOVQ_TORCH_FIDELITY (a .whl from `pip download --no-deps
    torch-fidelity`, or a folder holding torch_fidelity/). It is never pip-installed here: an
    installed copy without torchvision breaks torchmetrics' own FID import."""
    src = os.environ.get("MOVQ_TORCH_FIDELITY")
    if not src or not os.path.exists(src):
        pytest.skip("set MOVQ_TORCH_FIDELITY to a torch-fidelity wheel or source folder for the parity test")
    if src.endswith(".whl"):
        with zipfile.ZipFile(src) as whl:
            whl.extractall(tmp_path / "tf")
        src = str(tmp_path / "tf")
    return os.path.join(src, "torch_fidelity")


def _torch_fidelity_functions(path, wanted, **constants):
    """Functions of one torch-fidelity module (its imports left out: they pull in torchvision)."""
    import ast

    tree = ast.parse(open(path).read())
    module = ast.Module([n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted], [])
    namespace = {"np": np, "torch": torch, "vprint": lambda *a, **k: None, **constants}
    exec(compile(module, path, "exec"), namespace)
    return namespace


def _torch_fidelity_fid_functions(path):
    return _torch_fidelity_functions(path, ("fid_features_to_statistics", "fid_statistics_to_metric"),
                                     KEY_METRIC_FID="frechet_inception_distance")


def test_parity_with_torch_fidelity(standin, tmp_path):
    pkg_dir = _torch_fidelity_src(tmp_path)
    # Load only the three modules the extractor needs (they import no torchvision), under a
    # stand-in package so torch_fidelity/__init__ is never run; removed again before anything
    # else (torchmetrics probes for torch_fidelity) can see it.
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = [pkg_dir]
    sys.modules["torch_fidelity"] = pkg
    try:
        ref_mod = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
        interp = importlib.import_module("torch_fidelity.interpolate_compat_tensorflow")
        for hw in [(4, 4), (17, 40), (299, 299), (320, 301)]:
            x = torch.randint(0, 256, (1, 3, *hw), generator=torch.Generator().manual_seed(hw[0])).float()
            ref = interp.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
            assert torch.equal(inc.resize_bilinear_tf1(x, (299, 299)), ref), hw
        reference = ref_mod.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                        feature_extractor_weights_path=str(standin))
        imgs = torch.randint(0, 256, (4, 3, 37, 53), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
        expected, expected_logits = reference(imgs)
    finally:
        for name in [m for m in sys.modules if m == "torch_fidelity" or m.startswith("torch_fidelity.")]:
            del sys.modules[name]
    extractor = FIDInceptionV3.from_pretrained(standin, verify=False)
    got = extractor(imgs)
    assert ((got - expected).abs().max() / expected.abs().max()) < 1e-4
    # the Inception Score's logits are torch-fidelity's logits_unbiased; with one split and no shuffle its
    # IS is ADM's formula (movq.evaluation.adm) on them
    logits = extractor.all_features(imgs).logits
    assert ((logits - expected_logits).abs().max() / expected_logits.abs().max()) < 1e-4
    isc = _torch_fidelity_functions(os.path.join(pkg_dir, "metric_isc.py"), ("isc_features_to_metric",),
                                    KEY_METRIC_ISC_MEAN="inception_score_mean", KEY_METRIC_ISC_STD="std")
    from movq.evaluation.adm import inception_score

    theirs_is = isc["isc_features_to_metric"](expected_logits, splits=1, shuffle=False)["inception_score_mean"]
    assert inception_score(logits, split_size=len(logits)) == pytest.approx(theirs_is, rel=1e-4)
    # FID: torch-fidelity's own statistics and distance functions, taken from its metric_fid.py
    # (that module as a whole imports torchvision), on its features, against this project's
    # accumulator and torchmetrics path on ours.
    theirs = _torch_fidelity_fid_functions(os.path.join(pkg_dir, "metric_fid.py"))
    to_stats, to_fid = theirs["fid_features_to_statistics"], theirs["fid_statistics_to_metric"]
    fid_ref = to_fid(to_stats(expected[:2].double()), to_stats(expected[2:].double()), False)
    from movq.evaluation.fid import FeatureAccumulator, frechet_distance

    stats = []
    for part in (got[:2], got[2:]):
        acc = FeatureAccumulator()
        acc.update(part)
        stats.append(acc.stats())
    assert frechet_distance(*stats) == pytest.approx(fid_ref["frechet_inception_distance"], rel=1e-3)
