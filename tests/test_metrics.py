"""TokenizerMetrics: closed-form PSNR, SSIM of identical images, codebook usage and perplexity,
merging partial accumulators, LPIPS plumbing, bad inputs, and a 2-process all-reduce."""
import math
import socket

import pytest
import torch
import torch.multiprocessing as mp

from movq.evaluation.metrics import PSNR_CAP_DB, TokenizerMetrics


def _images(seed, b=4, h=16, w=16):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) - 0.5  # in [-0.5, 0.5): offsets stay inside [-1, 1]


def test_identical_reconstruction_and_uniform_codes():
    x = _images(0)
    m = TokenizerMetrics(codebook_size=8)
    indices = torch.arange(4 * 2 * 2 * 2).reshape(4, 2, 2, 2) % 8  # every code equally often
    m.update(x, x.clone(), indices)
    r = m.compute()
    assert r["psnr"] == PSNR_CAP_DB and r["ssim"] == pytest.approx(1.0, abs=1e-6) and r["lpips"] is None
    assert r["codebook_usage"] == 1.0 and r["perplexity"] == pytest.approx(8.0)
    assert r["num_images"] == 4


def test_psnr_closed_form_and_code_statistics():
    x = _images(1)
    m = TokenizerMetrics(codebook_size=16)
    # +0.1 in [-1, 1] is +0.05 in [0, 1]: MSE 0.0025, PSNR = 10·log10(1 / 0.0025).
    indices = torch.tensor([0, 0, 0, 1]).view(4, 1, 1, 1)
    m.update(x, x + 0.1, indices)
    r = m.compute()
    assert r["psnr"] == pytest.approx(10 * math.log10(1 / 0.0025), rel=1e-5)
    assert r["ssim"] < 1
    assert r["codebook_usage"] == 2 / 16
    p = torch.tensor([0.75, 0.25])
    assert r["perplexity"] == pytest.approx(math.exp(float(-(p * p.log()).sum())))


def test_batches_add_up_to_one_pass_and_lpips_is_averaged():
    x, y = _images(2, b=6), _images(3, b=6)
    idx = torch.randint(0, 32, (6, 4, 2, 2), generator=torch.Generator().manual_seed(0))
    lpips = lambda a, b: (a - b).abs().mean(dim=(1, 2, 3))  # noqa: E731 - a stand-in distance
    whole = TokenizerMetrics(32, lpips=lpips)
    whole.update(x, y, idx)
    parts = TokenizerMetrics(32, lpips=lpips)
    parts.update(x[:2], y[:2], idx[:2])
    parts.update(x[2:], y[2:], idx[2:])
    merged = parts.all_reduce_().compute()  # all_reduce_: no-op without a group
    for key, value in whole.compute().items():
        assert merged[key] == pytest.approx(value, rel=1e-9), key
    assert merged["lpips"] == pytest.approx(float((x - y).abs().mean()), rel=1e-6)
    whole.reset()
    assert whole.compute()["num_images"] == 0 and math.isnan(whole.compute()["psnr"])


def test_bad_inputs():
    m = TokenizerMetrics(8)
    x = _images(0)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 8\)"):
        m.update(x, x, torch.full((4, 1, 2, 2), 8))
    with pytest.raises(ValueError, match="same|both"):
        m.update(x, x[:, :, :8], torch.zeros(4, 1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="batch"):
        m.update(x, x, torch.zeros(3, 1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="codebook_size"):
        TokenizerMetrics(0)


def _worker(rank, world, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, y = _images(2, b=6), _images(3, b=6)
        idx = torch.arange(6 * 4).view(6, 4, 1, 1) % 32
        m = TokenizerMetrics(32)
        m.update(x[rank::world], y[rank::world], idx[rank::world])  # each rank its own share
        out[rank] = m.all_reduce_().compute()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_over_two_processes(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
    x, y = _images(2, b=6), _images(3, b=6)
    single = TokenizerMetrics(32)
    single.update(x, y, torch.arange(24).view(6, 4, 1, 1) % 32)
    expected = single.compute()
    for rank in range(2):
        for key, value in expected.items():
            assert out[rank][key] == (None if value is None else pytest.approx(value, rel=1e-9)), (rank, key)
