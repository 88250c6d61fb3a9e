"""Parallel decode: schedule, determinism, known tokens, guidance, history, box masks."""
import pytest
import torch

from movq.config import MaskGITConfig
from movq.generation.maskgit import (
    box_mask,
    cfg_logits,
    decode,
    generate,
    guidance_scale,
    guided_tokens_to_logits,
)
from movq.models.maskgit import MaskGIT
from movq.models.masking import mask_schedule

K, C, H, W = 16, 2, 4, 4


def fixed_logits(seed: int = 0, batch: int = 3):
    """A stand-in model: logits that depend on the step and on how many tokens are still masked."""
    base = torch.randn(batch, C, H, W, K, generator=torch.Generator().manual_seed(seed))

    def fn(tokens, step, steps):
        assert tokens.shape == (batch, C, H, W)
        return base + 0.1 * (tokens == K).float().sum((1, 2, 3))[:, None, None, None, None]

    return fn


def all_masked(batch: int = 3):
    return torch.full((batch, C, H, W), K, dtype=torch.long)


def tiny_model(**kw) -> MaskGIT:
    torch.manual_seed(0)
    cfg = MaskGITConfig(codebook_size=K, channels=C, grid=(H, W), num_classes=5, width=32, depth=1, heads=2,
                        dropout=0.0, attn_dropout=0.0, **kw)
    return MaskGIT(cfg).eval()


@pytest.mark.parametrize("method", ["cosine", "linear", "square"])
def test_schedule_monotone_from_one_to_zero(method):
    r = torch.linspace(0, 1, 101, dtype=torch.float64)
    s = mask_schedule(r, method)
    assert s[0] == 1 and abs(float(s[-1])) < 1e-12
    assert torch.all(s[1:] <= s[:-1])
    assert mask_schedule(0.5, method) == pytest.approx(float(mask_schedule(torch.tensor(0.5, dtype=torch.float64), method)))
    with pytest.raises(ValueError, match="mask schedule"):
        mask_schedule(0.5, "exp")


@pytest.mark.parametrize("steps", [1, 4, 8, 12])
def test_decode_ends_unmasked_and_history_follows_schedule(steps):
    tokens = all_masked()
    known = torch.zeros(3, C, H, W, dtype=torch.bool)
    known[1, :, :2] = True  # sample 1 starts with half its tokens known
    known[2] = True  # sample 2 is fully known
    tokens[known] = 3
    out, hist = decode(fixed_logits(), tokens, known, mask_id=K, steps=steps,
                       generator=torch.Generator().manual_seed(0), return_history=True)
    assert out.shape == tokens.shape and out.dtype == torch.long
    assert not (out == K).any() and out.min() >= 0 and out.max() < K
    assert hist.states.shape == (3, steps, C, H, W) and hist.predictions.shape == hist.states.shape
    assert torch.equal(hist.states[:, -1], out)
    assert not (hist.predictions == K).any()
    n0 = (~known).flatten(1).sum(1)
    masked = (hist.states == K).flatten(2).sum(2)  # [B, T]
    prev = n0.clone()
    for t in range(steps):
        expected = torch.minimum(torch.floor(n0 * mask_schedule((t + 1) / steps)).long(), (prev - 1).clamp(min=0))
        assert torch.equal(masked[:, t], expected), (t, masked[:, t], expected)
        prev = masked[:, t]
    assert torch.all(masked[:, 1:] <= masked[:, :-1])  # monotone
    # once revealed, a token never changes again
    for t in range(1, steps):
        fixed = hist.states[:, t - 1] != K
        assert torch.equal(hist.states[:, t][fixed], hist.states[:, t - 1][fixed])


def test_known_tokens_never_change():
    torch.manual_seed(1)
    tokens = torch.randint(0, K, (3, C, H, W))
    known = torch.rand(3, C, H, W) < 0.4
    out, hist = decode(fixed_logits(), tokens, known, mask_id=K, generator=torch.Generator().manual_seed(0),
                       return_history=True)
    assert torch.equal(out[known], tokens[known])
    for t in range(hist.states.shape[1]):
        assert torch.equal(hist.states[:, t][known], tokens[known])
        assert torch.equal(hist.predictions[:, t][known], tokens[known])


def test_known_mask_none_means_not_mask_id_and_broadcasts():
    tokens = all_masked()
    tokens[:, :, 0, 0] = 5
    out = decode(fixed_logits(), tokens, None, mask_id=K, generator=torch.Generator().manual_seed(0))
    assert torch.all(out[:, :, 0, 0] == 5)
    known_hw = torch.zeros(H, W, dtype=torch.bool)
    known_hw[0] = True
    tokens = torch.randint(0, K, (3, C, H, W))
    out = decode(fixed_logits(), tokens, known_hw, mask_id=K, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :, 0], tokens[:, :, 0])


def test_same_generator_same_samples_different_seed_differs():
    def run(seed):
        return decode(fixed_logits(), all_masked(), mask_id=K, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_temperature_zero_and_no_choice_noise_is_deterministic():
    a = decode(fixed_logits(), all_masked(), mask_id=K, temperature=0.0, choice_temperature=0.0,
               generator=torch.Generator().manual_seed(0))
    b = decode(fixed_logits(), all_masked(), mask_id=K, temperature=0.0, choice_temperature=0.0,
               generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(a, fixed_logits()(all_masked(), 0, 1).argmax(-1))  # argmax of a fixed model


def test_guidance_scale_one_equals_conditional():
    model = tiny_model()
    tokens = all_masked()
    labels = torch.tensor([0, 2, 4])
    assert torch.equal(cfg_logits(model, tokens, labels, 1.0), model(tokens, labels))
    fn = guided_tokens_to_logits(model, labels, scale=1.0, schedule="linear")
    assert torch.equal(fn(tokens, 3, 8), model(tokens, labels))
    # a scale other than 1 extrapolates away from the null class
    s = 3.0
    cond, uncond = model(tokens, labels), model(tokens, torch.full_like(labels, model.null_class))
    torch.testing.assert_close(cfg_logits(model, tokens, labels, s), uncond + s * (cond - uncond), atol=1e-5, rtol=1e-5)
    # decode with scale 1 equals decode of the plain conditional model
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = generate(model, labels, generator=g(), cfg_scale=1.0)
    b = decode(lambda x, t, n: model(x, labels), all_masked(), mask_id=K, generator=g())
    assert torch.equal(a, b)


def test_guidance_schedules():
    assert [guidance_scale(3.0, "constant", t, 4) for t in range(4)] == [3.0] * 4
    ramp = [guidance_scale(3.0, "linear", t, 5) for t in range(5)]
    assert ramp[0] == 1.0 and ramp[-1] == 3.0 and all(b > a for a, b in zip(ramp, ramp[1:]))
    assert guidance_scale(2.0, "linear", 0, 1) == 2.0
    with pytest.raises(ValueError, match="guidance schedule"):
        guidance_scale(2.0, "cosine", 0, 4)
    with pytest.raises(ValueError, match="guidance schedule"):
        guided_tokens_to_logits(tiny_model(), None, scale=2.0, schedule="nope")


def test_generate_unconditional_and_inpaint_with_model():
    model = tiny_model()
    out, hist = generate(model, None, num_samples=2, generator=torch.Generator().manual_seed(0), steps=4,
                         return_history=True)
    assert out.shape == (2, C, H, W) and not (out == K).any() and hist.states.shape[1] == 4
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        generate(model, None, num_samples=2, cfg_scale=2.0)
    with pytest.raises(ValueError, match="batch size must be ≥ 1"):
        generate(model, None, num_samples=0)
    # inpainting: the given tokens outside the box stay
    image = torch.randint(0, K, (2, C, H, W))
    known = box_mask(H, W, (16, 16, 48, 48), image_size=64)
    out = generate(model, torch.tensor([1, 3]), tokens=image, known_mask=known, cfg_scale=2.0,
                   cfg_schedule="linear", generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :, known], image[:, :, known])
    assert not torch.equal(out, image)


def test_box_mask():
    # 64×64 image, 4×4 grid: 16-pixel cells. A box over pixels [16, 40) touches cells 1 and 2.
    known = box_mask(4, 4, (16, 16, 40, 40), image_size=64)
    assert known.shape == (4, 4) and known.dtype == torch.bool
    assert not known[1:3, 1:3].any() and known.sum() == 12
    # outpainting keeps only cells lying fully inside the box: cell 1 only
    keep = box_mask(4, 4, (16, 16, 40, 40), image_size=64, inside=False)
    assert keep.sum() == 1 and keep[1, 1]
    # x is the width axis
    wide = box_mask(2, 4, (0, 0, 16, 32), image_size=(32, 64))
    assert not wide[:, 0].any() and wide[:, 1:].all()
    with pytest.raises(ValueError, match="box"):
        box_mask(4, 4, (40, 16, 16, 40), image_size=64)
    with pytest.raises(ValueError, match="box"):
        box_mask(4, 4, (0, 0, 80, 10), image_size=64)
    with pytest.raises(ValueError, match="multiple"):
        box_mask(3, 3, (0, 0, 8, 8), image_size=64)


def test_decode_bad_inputs():
    fn = fixed_logits()
    with pytest.raises(ValueError, match="integer tensor"):
        decode(fn, all_masked().float(), mask_id=K)
    with pytest.raises(ValueError, match="steps"):
        decode(fn, all_masked(), mask_id=K, steps=0)
    with pytest.raises(ValueError, match="temperatures"):
        decode(fn, all_masked(), mask_id=K, temperature=-1.0)
    with pytest.raises(ValueError, match="mask schedule"):
        decode(fn, all_masked(), mask_id=K, schedule="exp")
    with pytest.raises(ValueError, match="bool"):
        decode(fn, all_masked(), torch.zeros(H, W), mask_id=K)
    with pytest.raises(ValueError, match="does not broadcast"):
        decode(fn, all_masked(), torch.zeros(H + 1, W, dtype=torch.bool), mask_id=K)
    with pytest.raises(ValueError, match="mask_id 3 is a real code"):
        decode(fn, torch.full((3, C, H, W), 3), torch.zeros(H, W, dtype=torch.bool), mask_id=3)
    with pytest.raises(ValueError, match="known tokens must lie"):
        t = all_masked()
        t[:, 0, 0, 0] = 99
        decode(fn, t, mask_id=K)
    with pytest.raises(ValueError, match="tokens_to_logits returned"):
        decode(lambda x, t, n: torch.zeros(3, C, H, K), all_masked(), mask_id=K)


def test_choice_noise_varies_the_reveal_order():
    """At temperature 0 the tokens are argmaxes; only the Gumbel choice noise picks which stay masked."""
    def first_state(seed, choice_temperature):
        _, hist = decode(fixed_logits(), all_masked(), mask_id=K, temperature=0.0,
                         choice_temperature=choice_temperature, generator=torch.Generator().manual_seed(seed),
                         return_history=True)
        return hist.states[:, 0] == K

    assert not torch.equal(first_state(0, 4.5), first_state(1, 4.5))
    assert torch.equal(first_state(0, 0.0), first_state(1, 0.0))
