"""Which path the VQ op takes on CUDA (kernels/_backend.py): torch's fp32 precision flags read under both APIs,
and the fallback policy, with the Triton interpreter standing in for a GPU that is too old or cannot compile
(monkeypatched device checks and kernel launchers), up to a tokenizer training step that finishes on the torch
path with one warning."""
import logging

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

import movq.kernels.vq as vq
from movq.config import TokenizerConfig, load_config
from movq.kernels import _backend, multichannel_vq, multichannel_vq_ref
from movq.kernels._autotune import INTERPRET
from movq.kernels.vq import BACKEND_ENV

pytestmark = pytest.mark.skipif(not INTERPRET, reason="simulates a GPU with the Triton interpreter on CPU tensors")

WARNING_TEXT = "the Triton path is not used"


def _data(B=2, C=2, d=8, h=3, w=4, K=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, C * d, h, w, generator=g).requires_grad_(True)
    cb = torch.randn(K, d, generator=g).requires_grad_(True)
    return z, cb


def _warnings(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and WARNING_TEXT in r.getMessage()]


def _spy(monkeypatch, name="_multichannel_vq_triton"):
    calls = []
    real = getattr(vq, name)

    def spy(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(vq, name, spy)
    return calls


# ------------------------------------------------------------------------------------------------
# precision flags: torch 2.13 raises on reading allow_tf32 once the new fp32_precision API was used
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def precision_restored():
    m = torch.backends.cuda.matmul
    saved = (torch.backends.fp32_precision, m.fp32_precision)
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:
        legacy = "highest"
    yield m
    # this order returns torch to a consistent state whichever API the test used
    torch.set_float32_matmul_precision(legacy)
    torch.backends.fp32_precision = saved[0]
    m.fp32_precision = saved[1]
    assert (torch.backends.fp32_precision, m.fp32_precision) == saved
    assert torch.get_float32_matmul_precision() == legacy


def _set_legacy_on(m):
    m.allow_tf32 = True


def _set_legacy_off(m):
    m.allow_tf32 = False


def _set_new_tf32(m):
    m.fp32_precision = "tf32"


def _set_new_ieee(m):
    m.fp32_precision = "ieee"


def _set_generic_tf32(m):
    torch.backends.fp32_precision = "tf32"


def _set_matmul_precision_high(m):
    torch.set_float32_matmul_precision("high")


def _set_legacy_then_new_ieee(m):
    m.allow_tf32 = True
    m.fp32_precision = "ieee"


@pytest.mark.parametrize("setter, expected, legacy_read_raises", [
    (_set_legacy_on, True, False), (_set_legacy_off, False, False), (_set_matmul_precision_high, True, False),
    (_set_new_tf32, True, True), (_set_new_ieee, False, False), (_set_generic_tf32, True, True),
    (_set_legacy_then_new_ieee, False, True),
])
def test_precision_flags_are_read_under_both_apis(setter, expected, legacy_read_raises, precision_restored,
                                                  monkeypatch):
    m = precision_restored
    setter(m)
    if legacy_read_raises:  # what the op used to read: the crash of issue 12
        with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
            _ = m.allow_tf32
    assert _backend.tf32_allowed() is expected
    calls = _spy(monkeypatch)
    z, cb = _data()
    out = multichannel_vq(z, cb, 2, backend="triton")  # allow_tf32=None: read from torch
    assert [c["allow_tf32"] for c in calls] == [expected]
    (out.z_q.sum() + out.commitment_loss).backward()
    assert int(out.counts.sum()) == z.numel() // 8 and torch.isfinite(z.grad).all()


def test_precision_default_is_exact(precision_restored):
    assert _backend.tf32_allowed() is False


# ------------------------------------------------------------------------------------------------
# fallback policy
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def gpu_default(monkeypatch):
    """The default backend is Triton for these CPU tensors, as it is for CUDA tensors (the interpreter runs it);
    the policy's memory is cleared before and after."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(_backend, "default_backend", lambda z: "triton")
    _backend.reset()
    yield
    _backend.reset()


def _old_gpu(monkeypatch):
    monkeypatch.setattr(_backend, "device_capability", lambda device: (7, 5))
    monkeypatch.setattr(_backend, "device_label", lambda device: "cuda:0 (Tesla T4)")


class _FailingLauncher:
    """Stands in for a @triton.jit kernel whose compile fails: kernel[grid](...) raises ``error``."""

    def __init__(self, error):
        self.error, self.calls = error, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls += 1
            raise self.error
        return launch


def _out_of_shared_memory():
    from triton.runtime.errors import OutOfResources

    return OutOfResources(294912, 232448, "shared memory")


def _ptxas_error():
    from triton.runtime.errors import PTXASError

    return PTXASError("ptxas fatal: Unresolved extern function (simulated)")


def _assert_like_reference(out, z, cb, channels=2):
    ref = multichannel_vq_ref(z, cb, channels)
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.z_q, ref.z_q)
    torch.testing.assert_close(out.codebook_loss, ref.codebook_loss)


def test_default_path_uses_triton_without_a_warning(gpu_default, monkeypatch, caplog):
    calls = _spy(monkeypatch)
    z, cb = _data()
    out = multichannel_vq(z, cb, 2)
    assert len(calls) == 1 and not _warnings(caplog)
    _assert_like_reference(out, z, cb)


def test_old_gpu_falls_back_with_one_warning(gpu_default, monkeypatch, caplog):
    _old_gpu(monkeypatch)
    calls = _spy(monkeypatch)
    z, cb = _data()
    for _ in range(3):
        out = multichannel_vq(z, cb, 2)
        _assert_like_reference(out, z, cb)
    assert calls == []
    (warning,) = _warnings(caplog)
    msg = warning.getMessage()
    assert "sm_75" in msg and "Tesla T4" in msg and "sm_80 or newer" in msg and "torch reference" in msg
    assert f"{BACKEND_ENV}=triton" in msg


def test_forced_triton_on_an_old_gpu_raises(gpu_default, monkeypatch):
    _old_gpu(monkeypatch)
    monkeypatch.setenv(BACKEND_ENV, "triton")
    z, cb = _data()
    with pytest.raises(RuntimeError, match="sm_75.*sm_80 or newer"):
        multichannel_vq(z, cb, 2)
    with pytest.raises(RuntimeError, match="sm_75"):
        multichannel_vq(z, cb, 2, backend="triton")  # the argument forces too


@pytest.mark.parametrize("make_error, text", [(_out_of_shared_memory, "OutOfResources"), (_ptxas_error, "PTXASError")])
def test_compile_error_falls_back_once_per_key(gpu_default, monkeypatch, caplog, make_error, text):
    failing = _FailingLauncher(make_error())
    monkeypatch.setattr(vq, "_vq_search_kernel", failing)
    z, cb = _data()
    for _ in range(3):
        out = multichannel_vq(z, cb, 2)
        _assert_like_reference(out, z, cb)
        out.z_q.sum().backward()
    assert failing.calls == 1  # decided on the first call, remembered for the key
    (warning,) = _warnings(caplog)
    assert text in warning.getMessage() and "forward failed" in warning.getMessage()
    # another key (a different width) is tried on its own
    z2, cb2 = _data(d=4)
    multichannel_vq(z2, cb2, 2)
    assert failing.calls == 2 and len(_warnings(caplog)) == 2


def test_forced_triton_raises_the_compile_error(gpu_default, monkeypatch, caplog):
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(vq, "_vq_search_kernel", _FailingLauncher(_out_of_shared_memory()))
    monkeypatch.setenv(BACKEND_ENV, "triton")
    z, cb = _data()
    with pytest.raises(OutOfResources, match="shared memory"):
        multichannel_vq(z, cb, 2)
    assert not _warnings(caplog)


def test_backward_failure_falls_back_to_torch_gradients(gpu_default, monkeypatch, caplog):
    failing = _FailingLauncher(_ptxas_error())
    monkeypatch.setattr(vq, "_vq_backward_kernel", failing)
    z, cb = _data()
    calls = _spy(monkeypatch)
    out = multichannel_vq(z, cb, 2)
    assert len(calls) == 1  # the forward ran on Triton
    g = torch.randn(out.z_q.shape, generator=torch.Generator().manual_seed(3))
    ga = torch.autograd.grad((out.z_q * g).sum() + 0.7 * out.codebook_loss + 1.3 * out.commitment_loss, (z, cb))
    ref = multichannel_vq_ref(z, cb, 2)
    gb = torch.autograd.grad((ref.z_q * g).sum() + 0.7 * ref.codebook_loss + 1.3 * ref.commitment_loss, (z, cb))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert failing.calls == 1
    (warning,) = _warnings(caplog)
    assert "backward failed" in warning.getMessage() and "PTXASError" in warning.getMessage()
    multichannel_vq(z, cb, 2)
    assert len(calls) == 1  # from now on the key runs on torch


def test_unsupported_dtype_falls_back_but_forced_raises(gpu_default, caplog):
    z, cb = _data()
    z64 = z.detach().double()
    out = multichannel_vq(z64, cb.detach(), 2)
    assert out.z_q.dtype == torch.float64
    (warning,) = _warnings(caplog)
    assert "float64" in warning.getMessage()
    with pytest.raises(ValueError, match="float64"):
        multichannel_vq(z64, cb.detach(), 2, backend="triton")


# ------------------------------------------------------------------------------------------------
# a tokenizer training step on the fallback path
# ------------------------------------------------------------------------------------------------


def _tiny_tokenizer_cfg(tmp_path) -> TokenizerConfig:
    return load_config(TokenizerConfig, {
        "model": {"resolution": 16, "base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                  "attn_resolutions": [], "mid_attention": False, "norm_groups": 4},
        "quantizer": {"codebook_size": 16, "channels": 2, "dim": 4},
        "discriminator": {"base_channels": 8, "n_layers": 1},
        "loss": {"perceptual_weight": 0.0, "disc_start": 0},  # the one step includes the discriminator
        "data": {"source": "builtin", "image_size": 16, "batch_size": 2, "num_workers": 0,
                 "cache_dir": str(tmp_path / "cache"), "builtin_train_size": 8, "builtin_val_size": 2},
        "train": {"run_dir": str(tmp_path / "run"), "max_steps": 1, "log_every": 1, "eval_every": 100,
                  "save_every": 100, "warmup_steps": 1, "trackers": []},
    })


def _train(cfg):
    from movq.training.tokenizer import TokenizerTrainer

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return TokenizerTrainer(cfg).fit()


@pytest.mark.parametrize("simulate", ["old_gpu", "compile_error", "none"])
def test_training_step_finishes_on_the_torch_path(gpu_default, monkeypatch, caplog, tmp_path, simulate):
    calls = _spy(monkeypatch)
    failing = _FailingLauncher(_out_of_shared_memory())
    if simulate == "old_gpu":
        _old_gpu(monkeypatch)
    elif simulate == "compile_error":
        monkeypatch.setattr(vq, "_vq_search_kernel", failing)
    with caplog.at_level(logging.WARNING, logger="movq.kernels.vq"):
        summary = _train(_tiny_tokenizer_cfg(tmp_path))
    assert summary["steps"] == 1
    warnings = _warnings(caplog)
    if simulate == "none":  # the control: the same run takes the Triton path, silently
        assert len(calls) >= 1 and not warnings
        return
    assert len(warnings) == 1, [w.getMessage() for w in warnings]
    assert ("sm_75" if simulate == "old_gpu" else "OutOfResources") in warnings[0].getMessage()
    assert len(calls) == (0 if simulate == "old_gpu" else 1) and failing.calls == (simulate == "compile_error")
