"""The autoregressive prior: causality, the KV cache, the attention window, sampling (seeds,
guidance, top-k / top-p, history) and sampling on grids larger than the training grid."""
import math

import pytest
import torch

from movq.generation.autoregressive import (
    UNSAMPLED,
    filter_logits,
    guided,
    sample,
    sample_large,
    sample_logits,
    window_origin,
)
from movq.models.autoregressive import FACTORIZATIONS, AutoregressiveConfig, AutoregressivePrior, window_mask

K, C, GRID, CLASSES = 16, 3, (3, 4), 5


def _model(factorization="depth", window=0, depth=2, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(codebook_size=K, channels=C, grid=GRID, num_classes=CLASSES, factorization=factorization,
               width=32, depth=depth, heads=4, depth_layers=1, window=window, **kw)
    return AutoregressivePrior(cfg).eval()


def _tokens(b=2, seed=1):
    return torch.randint(0, K, (b, C, *GRID), generator=torch.Generator().manual_seed(seed))


def _raster(tokens):
    """[B, C, h, w] → [B, h·w·C] in sampling order (cells, then channels)."""
    return tokens.permute(0, 2, 3, 1).reshape(tokens.shape[0], -1)


def _grid(flat):
    h, w = GRID
    return flat.reshape(flat.shape[0], h, w, C).permute(0, 3, 1, 2)


def _cached_logits(model, tokens, labels):
    """Teacher-forced logits through embed_step / step / token_logits (the sampler's path)."""
    cache = model.new_cache(tokens.shape[0], tokens.device)
    units, prev, out = model.to_units(tokens), None, []
    for s in range(model.config.seq_len):
        hidden = model.step(model.embed_step(s, labels, prev), s, cache)
        out.append(torch.stack([model.token_logits(hidden, units[:, s, :c]) for c in range(units.shape[2])], 1))
        prev = units[:, s]
    return model.from_units(torch.stack(out, 1), *GRID)


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("factorization", FACTORIZATIONS)
@pytest.mark.parametrize("window", [0, 2])
def test_causal(factorization, window):
    model, labels = _model(factorization, window), torch.tensor([1, 3])
    tokens = _tokens()
    flat = _raster(tokens)
    logits = model(tokens, labels).permute(0, 2, 3, 1, 4).reshape(2, -1, K)  # [B, h·w·C, K] raster
    n = flat.shape[1]
    for t in (0, 5, n - 1):
        later = flat.clone()
        later[:, t:] = (later[:, t:] + 1 + torch.arange(n - t)) % K  # every token from t on changes
        changed = model(_grid(later), labels).permute(0, 2, 3, 1, 4).reshape(2, -1, K)
        torch.testing.assert_close(changed[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-6)
    # and the logits do depend on the past: the first token moves the last token's logits
    first = flat.clone()
    first[:, 0] = (first[:, 0] + 1) % K
    moved = model(_grid(first), labels).permute(0, 2, 3, 1, 4).reshape(2, -1, K)
    if window == 0:
        assert (moved[:, -1] - logits[:, -1]).abs().max() > 1e-4


@pytest.mark.parametrize("factorization,window", [(f, w) for f in FACTORIZATIONS for w in (0, 2)]
                         + [("flat", 1), ("cell", 100)])  # a ring of one cell; a window past the grid
def test_cache_equals_no_cache(factorization, window):
    model, labels, tokens = _model(factorization, window), torch.tensor([0, CLASSES]), _tokens()
    torch.testing.assert_close(_cached_logits(model, tokens, labels), model(tokens, labels), rtol=1e-5, atol=1e-5)


def test_window_mask():
    m = window_mask(6, 2)
    expect = torch.tensor([[1, 0, 0, 0, 0, 0],
                           [1, 1, 0, 0, 0, 0],
                           [1, 1, 1, 0, 0, 0],
                           [1, 0, 1, 1, 0, 0],   # the class token (column 0) always stays visible
                           [1, 0, 0, 1, 1, 0],
                           [1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, expect)
    assert torch.equal(window_mask(5, 4), torch.ones(5, 5).tril().bool())  # W ≥ N − 1: plain causal


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
@pytest.mark.parametrize("depth", [1, 2])
def test_window_limits_what_a_token_sees(factorization, depth):
    """One layer sees the W cells before a token's cell (and the class); L layers see L·W cells."""
    w_cells = 2
    model, labels, tokens = _model(factorization, w_cells, depth=depth), torch.tensor([2, 4]), _tokens()
    h, w = GRID
    target = h * w - 1  # the last cell
    reach = depth * w_cells  # cells before the target that can matter
    logits = model(tokens, labels)
    far = tokens.clone().permute(0, 2, 3, 1).reshape(2, h * w, C)
    far[:, : target - reach] = (far[:, : target - reach] + 7) % K  # every cell out of reach
    far = far.reshape(2, h, w, C).permute(0, 3, 1, 2)
    out = model(far, labels)
    torch.testing.assert_close(out[..., -1, -1, :], logits[..., -1, -1, :], rtol=0, atol=1e-6)
    near = tokens.clone().permute(0, 2, 3, 1).reshape(2, h * w, C)
    near[:, target - 1] = (near[:, target - 1] + 7) % K  # the cell just before: inside the window
    near = near.reshape(2, h, w, C).permute(0, 3, 1, 2)
    assert (model(near, labels)[..., -1, -1, :] - logits[..., -1, -1, :]).abs().max() > 1e-4
    # the class token is never outside the window
    assert (model(tokens, torch.tensor([3, 0]))[..., -1, -1, :] - logits[..., -1, -1, :]).abs().max() > 1e-4


def test_training_loss_learns_and_reports_bits():
    model = _model("depth").train()
    tokens, labels = _tokens(4, seed=5), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(40):
        loss, logs = model.training_loss(tokens, labels, generator=g)
        assert math.isclose(logs["bits_per_token"].item(), loss.item() / math.log(2), rel_tol=1e-6)
        first = first if first is not None else logs["bits_per_token"].item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.5  # about log2(16) = 4 bits at initialisation
    assert logs["bits_per_token"].item() < 1.0  # four sequences memorised
    assert 0 <= logs["class_dropped"].item() <= 1


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="factorization"):
        AutoregressiveConfig(factorization="zigzag")
    with pytest.raises(ValueError, match="window"):
        AutoregressiveConfig(window=-1)
    with pytest.raises(ValueError, match="divisible"):
        AutoregressiveConfig(width=30, heads=4)
    model = _model()
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(1, C, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.full((1, C, *GRID), K))
    with pytest.raises(ValueError, match="labels"):
        model(_tokens(), torch.tensor([0, CLASSES + 1]))
    with pytest.raises(ValueError, match="needs labels"):
        model.training_loss(_tokens())


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------
def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_sampling_is_seeded(factorization):
    model, labels = _model(factorization, window=2), torch.tensor([0, 1, 4])
    kw = dict(temperature=0.9, top_k=8, top_p=0.95, cfg_scale=1.5)
    a = sample(model, labels, generator=_gen(7), **kw)
    b = sample(model, labels, generator=_gen(7), **kw)
    c = sample(model, labels, generator=_gen(8), **kw)
    assert a.shape == (3, C, *GRID) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < K


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_guidance_scale_one_is_conditional_and_zero_unconditional(factorization):
    model, labels = _model(factorization), torch.tensor([1, 2, 3, 4])
    with torch.no_grad():  # at initialisation the classes barely differ (std 0.02): make them matter
        model.class_emb.weight.mul_(100)
    null = torch.full_like(labels, model.null_class)
    kw = dict(return_history=True, history_steps=1)
    cond, h_cond = sample(model, labels, generator=_gen(3), **kw)
    tokens, h = sample(model, labels, generator=_gen(3), cfg_scale=1.0, **kw)
    assert torch.equal(tokens, cond) and torch.equal(h.logprobs, h_cond.logprobs)
    # scale 0 samples from the null-class half of the doubled batch alone: the unconditional model
    uncond, h_uncond = sample(model, null, generator=_gen(3), **kw)
    tokens, h = sample(model, labels, generator=_gen(3), cfg_scale=0.0, **kw)
    assert torch.equal(tokens, uncond)
    torch.testing.assert_close(h.logprobs, h_uncond.logprobs, rtol=1e-5, atol=1e-5)
    assert (h_cond.logprobs - h_uncond.logprobs).abs().max() > 1e-3  # the classes do matter
    x, y = torch.randn(2, K), torch.randn(2, K)
    assert torch.equal(guided(x, y, 1.0), y + (x - y)) and torch.equal(guided(x, y, 0.0), y)
    with pytest.raises(ValueError, match="guidance"):
        sample(model, num_samples=2, cfg_scale=2.0)


def test_filters_and_temperature():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    assert torch.isfinite(filter_logits(logits, top_k=2)).sum() == 2
    p = logits.softmax(-1)[0]  # 0.64, 0.23, 0.09, ...
    assert torch.isfinite(filter_logits(logits, top_p=float(p[0]) - 0.01)).sum() == 1
    assert torch.isfinite(filter_logits(logits, top_p=float(p[0]) + 0.01)).sum() == 2
    assert torch.isfinite(filter_logits(logits, top_p=1.0)).all()
    for kw in ({"top_k": 1}, {"top_p": 1e-6}, {"temperature": 0.0}):
        tok, logp = sample_logits(logits.repeat(64, 1), generator=_gen(0), **kw)
        assert (tok == 0).all()
    tok, logp = sample_logits(logits.repeat(4000, 1), generator=_gen(0))
    freq = torch.bincount(tok, minlength=5).float() / 4000
    torch.testing.assert_close(freq, logits.softmax(-1)[0], atol=0.03, rtol=0)
    torch.testing.assert_close(logp, logits.log_softmax(-1)[0, tok])
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        sample(_model(), num_samples=1, temperature=-1.0)


def test_history():
    model = _model("flat")
    tokens, hist = sample(model, torch.tensor([0, 1]), generator=_gen(0), return_history=True, history_steps=4)
    assert hist.states.shape == (2, 4, C, *GRID) and torch.equal(hist.states[:, -1], tokens)
    assert (hist.states[:, 0] == UNSAMPLED).any() and (hist.states[:, 0] != UNSAMPLED).any()
    assert hist.logprobs.shape == tokens.shape and (hist.logprobs <= 0).all()


# --------------------------------------------------------------------------------------
# Larger than the training grid
# --------------------------------------------------------------------------------------
def test_window_origin():
    assert [window_origin(i, 10, 4) for i in range(10)] == [0, 0, 0, 1, 2, 3, 4, 5, 6, 6]
    assert [window_origin(i, 4, 4) for i in range(4)] == [0, 0, 0, 0]


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_sample_large(factorization):
    model, labels = _model(factorization, window=2), torch.tensor([1, 3])
    big = sample_large(model, (5, 7), labels, generator=_gen(4), top_k=10, cfg_scale=2.0)
    assert big.shape == (2, C, 5, 7) and big.min() >= 0 and big.max() < K
    assert torch.equal(big, sample_large(model, (5, 7), labels, generator=_gen(4), top_k=10, cfg_scale=2.0))
    # at the training size the sliding window is the whole grid: the cached sampler's tokens
    same = sample_large(model, GRID, labels, generator=_gen(9))
    assert torch.equal(same, sample(model, labels, generator=_gen(9)))
    tokens, hist = sample_large(model, 6, labels, generator=_gen(1), return_history=True, history_steps=3)
    assert tokens.shape == (2, C, 6, 6) and hist.states.shape == (2, 3, C, 6, 6)
    assert torch.equal(hist.states[:, -1], tokens)
    with pytest.raises(ValueError, match="at least the training grid"):
        sample_large(model, (2, 7), labels)


def test_sample_large_conditions_on_the_window_only():
    """At temperature 0 a cell is the argmax of the model's logits given its window: the last cell
    of a wide grid equals the argmax of one teacher-forced pass over its crop alone."""
    model, labels = _model("cell"), torch.tensor([2])
    h, w = GRID
    a = sample_large(model, (h, 3 * w), labels, generator=_gen(0), temperature=0.0)
    i, j = h - 1, 3 * w - 1
    i0, j0 = window_origin(i, h, h), window_origin(j, 3 * w, w)
    crop = a[:, :, i0 : i0 + h, j0 : j0 + w]
    logits = model(crop, labels)  # teacher-forced over the crop = what the sampler saw
    assert torch.equal(logits[:, :, i - i0, j - j0].argmax(-1), a[:, :, i, j])
