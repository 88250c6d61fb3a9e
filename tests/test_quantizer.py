import pytest
import torch
from einops import rearrange

from movq.config import QuantizerConfig
from movq.models.quantizer import MultichannelQuantizer


def make(**kw) -> MultichannelQuantizer:
    torch.manual_seed(0)
    q = MultichannelQuantizer(QuantizerConfig(**{"codebook_size": 16, "channels": 3, "dim": 4, **kw}))
    with torch.no_grad():
        q.codebook.normal_()
    return q


def reference(z, codebook, channels, beta):
    """Hand-written VQ-VAE: full distance matrix, straight-through, β on the commitment term."""
    zf = rearrange(z, "b (c d) h w -> (b c h w) d", c=channels)
    idx = torch.cdist(zf.detach(), codebook.detach()).argmin(1)
    e = codebook[idx]
    loss = (zf.detach() - e).pow(2).mean() + beta * (zf - e.detach()).pow(2).mean()
    zq = zf + (e - zf).detach()
    B, _, h, w = z.shape
    return rearrange(zq, "(b c h w) d -> b (c d) h w", b=B, c=channels, h=h, w=w), idx, loss


def test_matches_hand_written_autograd_reference():
    q = make(beta=0.25)
    z = torch.randn(2, 12, 5, 3, requires_grad=True)
    out = q(z)
    upstream = torch.randn_like(out.z_q)
    (out.z_q * upstream).sum().add(out.loss).backward()
    g_z, g_cb = z.grad.clone(), q.codebook.grad.clone()

    z2 = z.detach().clone().requires_grad_(True)
    cb2 = q.codebook.detach().clone().requires_grad_(True)
    zq, idx, loss = reference(z2, cb2, 3, 0.25)
    (zq * upstream).sum().add(loss).backward()
    assert torch.equal(out.indices.flatten(), idx)
    torch.testing.assert_close(out.z_q, zq)
    torch.testing.assert_close(out.loss, loss)
    torch.testing.assert_close(g_z, z2.grad)
    torch.testing.assert_close(g_cb, cb2.grad)


def test_beta_sits_on_the_commitment_term():
    q = make(beta=0.1)
    z = torch.randn(1, 12, 2, 2, requires_grad=True)
    out = q(z)
    out.loss.backward()
    e = q.lookup(out.indices).detach()
    n = z.numel()
    # d(loss)/dz comes from the commitment term only: 2β(z − e)/n; the codebook gets 2(e − z)/n.
    torch.testing.assert_close(z.grad, 2 * 0.1 * (z.detach() - e) / n)
    grad_e = torch.zeros_like(q.codebook)
    flat_e = rearrange(2 * (e - z.detach()) / n, "b (c d) h w -> (b c h w) d", c=3)
    grad_e.index_add_(0, out.indices.flatten(), flat_e)
    torch.testing.assert_close(q.codebook.grad, grad_e)


def test_distances_in_fp32_under_autocast():
    q = make(codebook_size=64)
    z = torch.randn(2, 12, 6, 6)
    with torch.no_grad():
        ref = q(z).indices
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = q(z).indices
    assert torch.equal(ref, got)


def test_chunked_search_matches_one_chunk():
    z = torch.randn(2, 12, 7, 5)
    a = make(chunk_size=5)(z).indices
    b = make(chunk_size=10_000)(z).indices
    assert torch.equal(a, b)


def test_ema_moves_codebook_toward_assigned_mean():
    q = make(ema=True, ema_decay=0.5).train()
    assert not q.codebook.requires_grad
    z = torch.randn(4, 12, 4, 4)
    before = q.codebook.detach().clone()
    out = q(z)
    assert out.codebook_loss == 0
    flat = rearrange(z, "b (c d) h w -> (b c h w) d", c=3)
    k = int(torch.bincount(out.indices.flatten()).argmax())
    mean_k = flat[out.indices.flatten() == k].mean(0)
    assert (q.codebook[k] - mean_k).norm() < (before[k] - mean_k).norm()


def test_dead_codes_restart_from_encoder_outputs():
    q = make(dead_code_threshold=0.5, usage_decay=0.5).train()
    z = torch.randn(2, 12, 3, 3) + 10.0  # far from every code: one code wins everything
    for _ in range(4):
        q(z)
    flat = rearrange(z, "b (c d) h w -> (b c h w) d", c=3)
    dist_to_data = torch.cdist(q.codebook.detach(), flat).min(1).values
    # restarted codes are copies of encoder outputs
    assert (dist_to_data < 1e-5).sum() >= q.codebook_size // 2


def test_kmeans_init_and_usage_statistics():
    q = make(kmeans_init=True, codebook_size=4, channels=1, dim=2).train()
    centers = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [5.0, -5.0], [-5.0, -5.0]])
    z = centers.repeat(8, 1) + 0.01 * torch.randn(32, 2)
    z = rearrange(z, "(b h w) d -> b d h w", b=2, h=4, w=4)
    out = q(z)
    assert bool(q.initted)
    assert torch.cdist(q.codebook.detach(), centers).min(0).values.max() < 0.1
    assert out.usage == 1.0  # all four codes chosen this step
    torch.testing.assert_close(out.perplexity, torch.tensor(4.0))


def test_usage_window():
    q = make(usage_window=2).train()
    q(torch.randn(1, 12, 4, 4))
    first = q.last_used.clone()
    for _ in range(3):
        q(torch.full((1, 12, 1, 1), 50.0))  # always the same few codes
    out = q(torch.full((1, 12, 1, 1), 50.0))
    assert out.usage <= 3 / 16
    assert (first > 0).sum() > out.usage * 16


def test_cosine_codes_are_unit_norm():
    q = make(cosine=True)
    out = q(torch.randn(2, 12, 3, 3))
    vecs = rearrange(out.z_q, "b (c d) h w -> (b c h w) d", c=3)
    torch.testing.assert_close(vecs.norm(dim=-1), torch.ones(vecs.shape[0]))


def test_bad_shapes():
    q = make()
    with pytest.raises(ValueError, match=r"\[B, 3×4=12, h, w\]"):
        q(torch.randn(1, 8, 2, 2))
    q = make(kmeans_init=True)
    with pytest.raises(ValueError, match="empty input"):  # in training mode, before the k-means init
        q(torch.randn(0, 12, 2, 2))
    assert not bool(q.initted)
    with pytest.raises(ValueError):
        MultichannelQuantizer(QuantizerConfig(codebook_size=1))


def _fixed(codes: torch.Tensor, **kw) -> MultichannelQuantizer:
    """A one-channel quantizer whose codebook (and EMA state) is exactly ``codes [K, d]``."""
    q = MultichannelQuantizer(QuantizerConfig(codebook_size=codes.shape[0], channels=1, dim=codes.shape[1], **kw))
    with torch.no_grad():
        q.codebook.copy_(codes)
        if q.cfg.ema:
            q.embed_avg.copy_(codes)
    return q.train()


def _as_map(vectors: torch.Tensor) -> torch.Tensor:
    """[N, d] → [N, d, 1, 1], one vector per image."""
    return vectors[:, :, None, None]


def test_ema_codes_without_hits_keep_their_value():
    codes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    q = _fixed(codes, ema=True, ema_decay=0.9)
    for _ in range(3):
        q(_as_map(0.01 * torch.randn(16, 2)))  # every vector goes to code 0
    torch.testing.assert_close(q.codebook[1:], codes[1:], atol=1e-3, rtol=1e-3)


def test_dead_code_threshold_above_one_keeps_codes_that_reach_it():
    codes = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [-4.0, 0.0], [50.0, 50.0]])
    q = _fixed(codes, dead_code_threshold=2.0)
    batch = _as_map(codes[:4].repeat(4, 1))  # 4 hits per step for codes 0-3, none for code 4
    for _ in range(5):
        q(batch)
    torch.testing.assert_close(q.codebook[:4], codes[:4])  # never restarted: 4 hits ≥ threshold
    assert (q.usage_ema[:4] >= 2.0).all(), q.usage_ema
    assert torch.cdist(q.codebook[4:].detach(), codes[:4]).min() < 1e-6  # the unused one was restarted


@pytest.mark.parametrize("kw", [dict(ema=True), dict(dead_code_threshold=0.5, usage_decay=0.1), dict(kmeans_init=True)])
def test_non_finite_batch_leaves_the_codebook_intact(kw):
    codes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    q = _fixed(codes, **kw)
    bad = torch.randn(8, 2)
    bad[:, 0] = float("nan")  # codes without hits are restarted from these with usage_decay=0.1
    q(_as_map(bad))
    assert torch.isfinite(q.codebook).all() and all(torch.isfinite(b).all() for b in q.buffers())
    if kw.get("kmeans_init"):
        assert not bool(q.initted)  # tried again on the next batch
    out = q(_as_map(torch.randn(8, 2)))
    assert torch.isfinite(out.loss) and bool(q.initted)


def test_ema_backward_uses_the_codes_of_its_forward(monkeypatch):
    """The EMA update rewrites the codebook inside forward; both backends' gradients use the old codes."""
    from movq.kernels._autotune import INTERPRET

    dev = "cpu" if INTERPRET else "cuda"  # where Triton runs: its interpreter, or compiled
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("Triton is not interpreted and there is no GPU")
    grads = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MOVQ_VQ_BACKEND", backend)
        q = make(ema=True, ema_decay=0.5).train().to(dev)
        torch.manual_seed(1)
        z = torch.randn(2, 12, 3, 3).to(dev).requires_grad_()
        out = q(z)
        (out.loss + (out.z_q * torch.linspace(-1, 1, out.z_q.numel()).view_as(out.z_q)).sum()).backward()
        grads[backend] = z.grad
    torch.testing.assert_close(grads["triton"], grads["torch"])
