"""Tests of kernels/vq.py: torch reference vs a naive full-matrix computation, Triton (interpreted on CPU)
vs the reference, backend selection and input checks. Compare chosen distances, not indices: ties exist."""
import pytest
import torch
import torch.nn.functional as F

from kernels import VQResult, multichannel_vq, multichannel_vq_ref
from kernels.vq import BACKEND_ENV


def _naive(z, codebook, channels, cosine=False):
    """Full N x K distance matrix with torch.cdist, plain autograd: (z_q, idx, counts, cb_loss, commit_loss)."""
    B, Cd, h, w = z.shape
    d = Cd // channels
    zv = z.float().view(B, channels, d, h, w).permute(0, 1, 3, 4, 2).reshape(-1, d)
    cb = codebook.float()
    if cosine:
        zv, cb = F.normalize(zv, dim=-1, eps=1e-6), F.normalize(cb, dim=-1, eps=1e-6)
    idx = torch.cdist(zv.detach().double(), cb.detach().double()).argmin(1)
    e = cb[idx]
    zq = (zv + (e - zv).detach()).view(B, channels, h, w, d).permute(0, 1, 4, 2, 3).reshape(B, Cd, h, w)
    return (zq.to(z.dtype), idx.view(B, channels, h, w), torch.bincount(idx, minlength=cb.shape[0]),
            (zv.detach() - e).pow(2).mean(), (zv - e.detach()).pow(2).mean())


def _data(B=2, C=3, d=4, h=5, w=7, K=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, C * d, h, w, generator=g).to(dtype).requires_grad_(True)
    cb = torch.randn(K, d, generator=g).requires_grad_(True)
    return z, cb


def _chosen_dist(z, cb, channels, idx, cosine=False):
    """Exact fp32 (in fp64) squared distance of every vector to its chosen code, and the true minimum."""
    B, Cd, h, w = z.shape
    d = cb.shape[1]
    zv = z.detach().double().view(B, channels, d, h, w).permute(0, 1, 3, 4, 2).reshape(-1, d)
    c = cb.detach().double()
    if cosine:
        zv, c = F.normalize(zv, dim=-1, eps=1e-6), F.normalize(c, dim=-1, eps=1e-6)
    full = torch.cdist(zv, c).pow(2)
    return full.gather(1, idx.reshape(-1, 1)).squeeze(1), full.min(1).values


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("chunk", [5, 8192])
def test_reference_matches_naive(cosine, chunk):
    z, cb = _data()
    out = multichannel_vq_ref(z, cb, 3, cosine=cosine, chunk_size=chunk)
    assert isinstance(out, VQResult)
    zq, idx, counts, lcb, lcm = _naive(z, cb, 3, cosine)
    chosen, best = _chosen_dist(z, cb, 3, out.indices, cosine)
    torch.testing.assert_close(chosen, best, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.indices, idx)  # random data: no ties in fp64
    assert out.indices.dtype == torch.int64 and out.indices.shape == (2, 3, 5, 7)
    assert out.counts.dtype == torch.int64 and torch.equal(out.counts, counts) and out.counts.sum() == 2 * 3 * 5 * 7
    torch.testing.assert_close(out.z_q, zq)
    torch.testing.assert_close(out.codebook_loss, lcb)
    torch.testing.assert_close(out.commitment_loss, lcm)
    assert out.codebook_loss.dtype == torch.float32
    # gradients: z gets upstream + commitment only, codebook gets codebook loss only
    g = torch.randn_like(out.z_q)
    ga = torch.autograd.grad((out.z_q * g).sum() + 3 * out.codebook_loss + 5 * out.commitment_loss, (z, cb))
    gb = torch.autograd.grad((zq * g).sum() + 3 * lcb + 5 * lcm, (z, cb))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)


def test_reference_losses_route_gradients():
    z, cb = _data()
    out = multichannel_vq_ref(z, cb, 3)
    gz, gcb = torch.autograd.grad(out.codebook_loss, (z, cb), allow_unused=True)
    assert gz is None and gcb.abs().sum() > 0
    gz, gcb = torch.autograd.grad(out.commitment_loss, (z, cb), allow_unused=True)
    assert gcb is None and gz.abs().sum() > 0
    gz, = torch.autograd.grad(out.z_q.sum(), (z,))
    torch.testing.assert_close(gz, torch.ones_like(z))  # straight-through is the identity


def test_reference_layout_dtype_and_autocast():
    z, cb = _data(dtype=torch.bfloat16)
    zcl = z.detach().contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = multichannel_vq_ref(zcl, cb, 3)
    assert out.z_q.dtype == torch.bfloat16 and out.z_q.is_contiguous(memory_format=torch.channels_last)
    assert out.codebook_loss.dtype == torch.float32
    ref = multichannel_vq_ref(z.detach(), cb, 3)
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.z_q, ref.z_q)


@pytest.mark.parametrize("args, match", [
    (lambda z, cb: (z[0], cb, 3), "4-D"),
    (lambda z, cb: (z, cb[0], 3), "2-D"),
    (lambda z, cb: (z, cb, 4), "channels \\* d"),
    (lambda z, cb: (z, cb, 0), "positive int"),
    (lambda z, cb: (z[:0], cb, 3), "empty"),
    (lambda z, cb: (z, cb[:0], 3), "non-empty"),
    (lambda z, cb: (z.long(), cb, 3), "floating point"),
])
def test_bad_inputs_raise(args, match):
    z, cb = _data()
    with pytest.raises(ValueError, match=match):
        multichannel_vq(*args(z.detach(), cb.detach()), backend="torch")


def test_backend_selection(monkeypatch):
    z, cb = _data()
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    with pytest.raises(ValueError, match="unknown backend"):
        multichannel_vq(z, cb, 3, backend="cuda")
    monkeypatch.setenv(BACKEND_ENV, "bogus")
    with pytest.raises(ValueError, match=BACKEND_ENV.replace("$", "")):
        multichannel_vq(z, cb, 3)
    monkeypatch.setenv(BACKEND_ENV, "torch")
    out = multichannel_vq(z, cb, 3)
    assert torch.equal(out.indices, multichannel_vq_ref(z, cb, 3).indices)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        multichannel_vq(z, cb, 3, backend="triton")
