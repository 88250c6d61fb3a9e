"""Tests of kernels/vq.py: torch reference vs a naive full-matrix computation, Triton (interpreted on CPU)
vs the reference, backend selection and input checks. Compare chosen distances, not indices: ties exist."""
import pytest
import torch
import torch.nn.functional as F

from movq.kernels import VQResult, multichannel_vq, multichannel_vq_ref
from movq.kernels._autotune import INTERPRET
from movq.kernels.vq import BACKEND_ENV

# Triton runs interpreted on CPU tensors (conftest sets TRITON_INTERPRET=1 without a GPU) or compiled on CUDA
# ones: the Triton tests put their data there, so a GPU machine runs them compiled.
_DEV = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"


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
    z = torch.randn(B, C * d, h, w, generator=g).to(_DEV, dtype).requires_grad_(True)
    cb = torch.randn(K, d, generator=g).to(_DEV).requires_grad_(True)
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


# ------------------------------------------------------------------------------------------------
# Triton path (interpreted on CPU by conftest's TRITON_INTERPRET=1; compiled on a GPU)
# ------------------------------------------------------------------------------------------------


def _ref_given(z, cb, channels, idx, cosine):
    """The reference computation with the indices fixed (ties may pick a different, equally near code)."""
    B, Cd, h, w = z.shape
    d = cb.shape[1]
    zv = z.float().reshape(B, channels, d, h, w).permute(0, 1, 3, 4, 2).reshape(-1, d)
    c = cb.float()
    if cosine:
        zv, c = F.normalize(zv, dim=-1, eps=1e-6), F.normalize(c, dim=-1, eps=1e-6)
    e = c[idx.reshape(-1)]
    zq = (zv + (e - zv).detach()).reshape(B, channels, h, w, d).permute(0, 1, 4, 2, 3).reshape(B, Cd, h, w)
    return zq.to(z.dtype), (zv.detach() - e).pow(2).mean(), (zv - e.detach()).pow(2).mean(), e.detach()


def _check_triton(z, cb, channels, cosine, deterministic=False, **kw):
    """Run the Triton op and check every output and both gradients against the reference."""
    out = multichannel_vq(z, cb, channels, cosine=cosine, backend="triton", deterministic=deterministic, **kw)
    B, Cd, h, w = z.shape
    K, d = cb.shape
    assert out.indices.shape == (B, channels, h, w) and out.indices.dtype == torch.int64
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < K
    # chosen distance == true minimum within the rounding of the input precision
    chosen, best = _chosen_dist(z, cb, channels, out.indices, cosine)
    zv = z.detach().double().reshape(B, channels, d, h, w).permute(0, 1, 3, 4, 2).reshape(-1, d)
    c = cb.detach().double()
    zn = 1.0 if cosine else zv.norm(dim=1)
    cn = 1.0 if cosine else c.norm(dim=1).max()
    tol = 4 * torch.finfo(z.dtype).eps * zn * cn + 1e-5
    assert bool((chosen - best <= tol).all()), f"worst excess {(chosen - best - tol).max().item()}"
    ref_zq, ref_lcb, ref_lcm, e = _ref_given(z, cb, channels, out.indices, cosine)
    assert out.z_q.dtype == z.dtype and out.z_q.stride() == torch.empty_like(z).stride()
    codes = e.reshape(B, channels, h, w, d).permute(0, 1, 4, 2, 3).reshape(B, Cd, h, w)
    assert torch.equal(out.z_q.detach(), codes.to(z.dtype))  # exactly the chosen codes in z's dtype
    assert out.counts.dtype == torch.int64
    assert torch.equal(out.counts, torch.bincount(out.indices.reshape(-1), minlength=K))
    for got, want in ((out.codebook_loss, ref_lcb), (out.commitment_loss, ref_lcm)):
        assert got.dtype == torch.float32 and got.shape == ()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # loss values also match the reference's own (its indices may differ only at near-ties)
    ref = multichannel_vq_ref(z, cb, channels, cosine=cosine)
    torch.testing.assert_close(out.codebook_loss, ref.codebook_loss, rtol=2e-2 if z.dtype != torch.float32 else 1e-5,
                               atol=1e-6)
    g = torch.randn(out.z_q.shape, generator=torch.Generator().manual_seed(1)).to(z.device, z.dtype)
    wanted = [t for t in (z, cb) if t.requires_grad]
    ga = torch.autograd.grad((out.z_q * g).sum() + 0.7 * out.codebook_loss + 1.3 * out.commitment_loss, wanted)
    gb = torch.autograd.grad((ref_zq * g).sum() + 0.7 * ref_lcb + 1.3 * ref_lcm, wanted)
    for a, b in zip(ga, gb):
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        else:
            torch.testing.assert_close(a.float(), b.float(), rtol=2 * torch.finfo(a.dtype).eps, atol=1e-5)
    return out, ga


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 7, 40), (1, 2, 24, 3, 11, 33)])  # B, C, d, h, w, K: ragged N and K
def test_triton_matches_reference(dtype, cosine, shape):
    B, C, d, h, w, K = shape
    z, cb = _data(B, C, d, h, w, K, dtype=dtype)
    _check_triton(z, cb, C, cosine)


def test_triton_split_k_equals_single_pass():
    from movq.kernels.vq import _vq_forward
    z, cb = _data(2, 3, 24, 5, 7, 40)
    one = _vq_forward(z.detach(), cb.detach(), 3, cosine=False, allow_tf32=False, split_k=1)
    three = _vq_forward(z.detach(), cb.detach(), 3, cosine=False, allow_tf32=False, split_k=3)  # one split empty
    for a, b in zip(one[:3], three[:3]):
        assert torch.equal(a, b)
    torch.testing.assert_close(one[3], three[3])


@pytest.mark.parametrize("cosine", [False, True])
def test_triton_deterministic_is_bit_reproducible(cosine):
    z, cb = _data(2, 2, 8, 6, 5, 16)
    runs = [_check_triton(z, cb, 2, cosine, deterministic=True)[1] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_triton_layouts_and_partial_graphs():
    z, cb = _data(2, 2, 8, 4, 6, 16)
    zcl = z.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    out, _ = _check_triton(zcl, cb, 2, False)
    assert out.z_q.is_contiguous(memory_format=torch.channels_last)
    zs = torch.randn(2, 20, 4, 9, device=_DEV)[:, 2:18, :, ::2].requires_grad_(True)  # non-dense view: read through strides
    _check_triton(zs, cb, 2, True)
    # only the codebook loss: no gradient to z; only the commitment loss: none to the codebook
    out = multichannel_vq(z, cb, 2, backend="triton")
    gz, gcb = torch.autograd.grad(out.codebook_loss, (z, cb), allow_unused=True, retain_graph=True)
    assert gz is None and gcb.abs().sum() > 0
    gz, gcb = torch.autograd.grad(out.commitment_loss, (z, cb), allow_unused=True, retain_graph=True)
    assert gcb is None and gz.abs().sum() > 0
    gz, = torch.autograd.grad(out.z_q.sum(), (z,))  # expanded (zero-stride) upstream gradient
    torch.testing.assert_close(gz, torch.ones_like(z))
    frozen = multichannel_vq(z.detach(), cb.detach(), 2, backend="triton")
    assert frozen.z_q.grad_fn is None or not frozen.z_q.requires_grad


def test_triton_cosine_zero_vector_and_wide_d():
    z, cb = _data(1, 2, 40, 3, 5, 24)  # d = 40: padded to 64, one resident tile
    with torch.no_grad():
        z[0, :40, 1, 2] = 0.0  # F.normalize's eps branch
    _check_triton(z, cb, 2, True)
    _check_triton(z, cb, 2, False)


@pytest.mark.parametrize("d, cosine", [(256, False), (100, True), (260, False), (260, True)])
def test_triton_resident_row_and_chunked_widths(d, cosine):
    """d = 256: the widest row kept resident through the search (one tl.dot per code tile); d = 100: padded
    to 128 and written back in two 64-wide epilogue chunks; d = 260 (> 256): the chunked search that re-reads
    z per code tile, with a masked last chunk."""
    z, cb = _data(1, 2, d, 3, 4, 40)
    _check_triton(z, cb, 2, cosine)


@pytest.mark.parametrize("shape", [(1, 1, 4, 1, 1, 1), (1, 1, 3, 1, 2, 2), (1, 3, 1, 1, 1, 5)])
def test_triton_tiny_shapes(shape):
    """One vector, one code; two codes; d = 1 (padded to 16)."""
    B, C, d, h, w, K = shape
    z, cb = _data(B, C, d, h, w, K)
    _check_triton(z, cb, C, False)


def test_triton_ties_go_to_the_smallest_code():
    z = torch.zeros(1, 4, 2, 3, device=_DEV)  # C = 1, d = 4: every vector is 0
    cb = torch.tensor([[2.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, -1.0, 0]] * 10, device=_DEV)
    out = multichannel_vq(z, cb, 1, backend="triton")  # codes 1, 2, 3, 5, 6, ... are all at distance 1
    assert out.indices.unique().tolist() == [1]
    from movq.kernels.vq import _vq_forward
    split = _vq_forward(z, cb, 1, cosine=False, allow_tf32=False, split_k=4)  # the tie across splits too
    assert split.idx.unique().tolist() == [1]


def test_triton_deterministic_losses_are_bit_reproducible():
    z, cb = _data(2, 3, 8, 5, 7, 40)
    runs = [multichannel_vq(z, cb, 3, backend="triton", deterministic=True) for _ in range(2)]
    assert torch.equal(runs[0].codebook_loss, runs[1].codebook_loss)
    assert torch.equal(runs[0].commitment_loss, runs[1].commitment_loss)
    torch.testing.assert_close(runs[0].codebook_loss, multichannel_vq_ref(z, cb, 3).codebook_loss)


def test_env_var_selects_triton(monkeypatch):
    import movq.kernels.vq as vq
    seen = []
    real = vq._multichannel_vq_triton

    def spy(*a, **k):
        seen.append(1)
        return real(*a, **k)

    monkeypatch.setattr(vq, "_multichannel_vq_triton", spy)
    z, cb = _data()
    monkeypatch.setenv(BACKEND_ENV, "triton")
    out = multichannel_vq(z, cb, 3)
    assert seen and torch.equal(out.counts, torch.bincount(out.indices.reshape(-1), minlength=16))
    monkeypatch.delenv(BACKEND_ENV)
    multichannel_vq(z, cb, 3)  # default: torch on CPU, triton on CUDA
    assert len(seen) == (2 if z.is_cuda else 1)


# GPU twins: compiled kernels, larger shapes (skipped without CUDA by conftest)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("d", [4, 64, 256])
def test_gpu_matches_reference(dtype, cosine, d):
    z, cb = _data(4, 4, d, 16, 16, 1000)
    _check_triton(z.detach().to(_DEV).requires_grad_(True), cb.detach().to(_DEV).requires_grad_(True), 4, cosine)


@pytest.mark.gpu
@pytest.mark.parametrize("K, d", [(65536, 8), (4096, 512)])
def test_gpu_large_codebooks_and_d(K, d):
    z, cb = _data(2, 4, d, 16, 16, K, dtype=torch.bfloat16)
    _check_triton(z.detach().cuda().requires_grad_(True), cb.detach().cuda().requires_grad_(True), 4, False)


@pytest.mark.gpu
def test_gpu_deterministic_and_tf32():
    z, cb = _data(8, 4, 64, 16, 16, 1024)
    z, cb = z.detach().cuda().requires_grad_(True), cb.detach().cuda().requires_grad_(True)
    runs = [_check_triton(z, cb, 4, False, deterministic=True)[1] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    out = multichannel_vq(z, cb, 4, allow_tf32=True)
    chosen, best = _chosen_dist(z, cb, 4, out.indices)
    assert bool((chosen - best <= 1e-2 * best.clamp_min(1)).all())
