"""Larger-than-training sampling: MaskGIT's windowed decoding over a canvas (movq.generation.canvas) and both
priors through movq.generation.sampler.sample_prior at and above the training grid."""
import pytest
import torch

from movq.config import AutoregressiveConfig, MaskGITConfig, SampleConfig
from movq.generation.canvas import canvas_windows, decode_canvas, generate_canvas, window_starts
from movq.generation.maskgit import generate
from movq.generation.sampler import prior_kind, sample_prior
from movq.models.autoregressive import AutoregressivePrior
from movq.models.maskgit import MaskGIT

K, C, GRID, CLASSES = 16, 2, (3, 4), 3


def test_window_starts_cover_the_axis():
    assert window_starts(16, 8, 4) == [0, 4, 8]
    assert window_starts(16, 8, 0) == [0, 8]
    assert window_starts(10, 8, 4) == [0, 2]  # the last window flush with the edge
    assert window_starts(8, 8, 7) == [0]
    assert window_starts(9, 4, 3) == list(range(6))
    for size, win, ov in [(16, 8, 4), (10, 8, 4), (13, 5, 2), (7, 3, 0)]:
        covered = set()
        starts = window_starts(size, win, ov)
        for s in starts:
            covered |= set(range(s, s + win))
        assert covered == set(range(size)) and starts == sorted(set(starts))
        assert all(b - a <= win - ov for a, b in zip(starts, starts[1:]))  # neighbours share ≥ overlap cells
    with pytest.raises(ValueError, match="at least the window"):
        window_starts(4, 8, 2)
    with pytest.raises(ValueError, match="overlap"):
        window_starts(16, 8, 8)
    assert canvas_windows((6, 8), (3, 4)) == [(i, j) for i in (0, 2, 3) for j in (0, 2, 4)]  # overlaps 1 and 2
    assert canvas_windows(8, 4, overlap=0) == [(0, 0), (0, 4), (4, 0), (4, 4)]


class Recorder:
    """A tokens_to_logits that prefers token (row + col) mod K of the window and records its inputs."""

    def __init__(self):
        self.inputs = []

    def __call__(self, tokens, step, steps):
        self.inputs.append((tokens.clone(), step))
        b, c, h, w = tokens.shape
        pref = (torch.arange(h)[:, None] + torch.arange(w)[None]) % K
        logits = torch.zeros(b, c, h, w, K)
        logits.scatter_(-1, pref.expand(b, c, h, w)[..., None], 5.0)
        return logits


def test_decode_canvas_windows_see_what_is_drawn_and_keep_known_tokens():
    mask_id, (H, W), steps = K, (6, 8), 3
    canvas = torch.full((2, C, H, W), mask_id)
    known = torch.zeros(H, W, dtype=torch.bool)
    known[2:4, 3:5] = True  # a given patch in the middle: outpainting around it
    canvas[..., 2:4, 3:5] = 7
    fn = Recorder()
    out = decode_canvas(fn, canvas, known, window=GRID, mask_id=mask_id, steps=steps,
                        generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, C, H, W) and out.dtype == torch.int64
    assert (out != mask_id).all() and out.min() >= 0 and out.max() < K
    assert (out[..., 2:4, 3:5] == 7).all()  # known tokens are never changed
    windows = canvas_windows((H, W), GRID)
    firsts = [x for x, step in fn.inputs if step == 0]
    assert len(firsts) == len(windows) and len(fn.inputs) == steps * len(windows)
    filled = known.clone()
    for (i0, j0), first in zip(windows, firsts):
        seen = first[0, 0] != mask_id  # what this window was given as known at its first step
        assert torch.equal(seen, filled[i0 : i0 + 3, j0 : j0 + 4]), (i0, j0)
        filled[i0 : i0 + 3, j0 : j0 + 4] = True
    assert filled.all()
    # a pure function of the generator
    again = decode_canvas(Recorder(), canvas, known, window=GRID, mask_id=mask_id, steps=steps,
                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    # a canvas that is all known is returned as it is, without a model call
    fn = Recorder()
    assert torch.equal(decode_canvas(fn, out, None, window=GRID, mask_id=mask_id), out) and not fn.inputs
    with pytest.raises(ValueError, match="at least the window"):
        decode_canvas(fn, torch.full((1, C, 2, 8), mask_id), window=GRID, mask_id=mask_id)


def _maskgit(seed=0):
    torch.manual_seed(seed)
    return MaskGIT(MaskGITConfig(codebook_size=K, channels=C, grid=GRID, num_classes=CLASSES, width=32, depth=1,
                                 heads=2, dropout=0.0, attn_dropout=0.0)).eval()


def _ar(seed=0, factorization="depth"):
    torch.manual_seed(seed)
    return AutoregressivePrior(AutoregressiveConfig(codebook_size=K, channels=C, grid=GRID, num_classes=CLASSES,
                                                    width=32, depth=1, depth_layers=1, heads=2,
                                                    factorization=factorization)).eval()


def test_generate_canvas_at_and_above_the_training_grid():
    model, labels = _maskgit(), torch.tensor([0, 2])
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    big = generate_canvas(model, (5, 9), labels, generator=g(), steps=3, cfg_scale=2.0)
    assert big.shape == (2, C, 5, 9) and big.min() >= 0 and big.max() < K
    assert torch.equal(big, generate_canvas(model, (5, 9), labels, generator=g(), steps=3, cfg_scale=2.0))
    # one window is the training-size sampler
    same = generate_canvas(model, GRID, labels, generator=g(), steps=3)
    assert torch.equal(same, generate(model, labels, generator=g(), steps=3))


@pytest.mark.parametrize("kind", ["maskgit", "autoregressive"])
def test_sample_prior_both_kinds_at_and_above_the_training_grid(kind):
    model = _maskgit() if kind == "maskgit" else _ar()
    assert prior_kind(model) == kind
    labels = torch.tensor([1, 2, 0])
    settings = SampleConfig(steps=3, cfg_scale=1.5, top_k=8 if kind == "autoregressive" else None)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    small = sample_prior(model, labels, settings, generator=g())
    assert small.shape == (3, C, *GRID)
    assert torch.equal(small, sample_prior(model, labels, settings, generator=g()))
    for grid in [(6, 8), (3, 9), (7, 4)]:
        big = sample_prior(model, labels, settings, generator=g(), grid=grid)
        assert big.shape == (3, C, *grid) and big.min() >= 0 and big.max() < K
    _, hist = sample_prior(model, labels, settings, generator=g(), return_history=True)
    assert hist.states.shape[:2][0] == 3
    with pytest.raises(ValueError, match="training grid"):
        sample_prior(model, labels, settings, grid=(6, 8), return_history=True)
    if kind == "autoregressive":
        with pytest.raises(ValueError, match="MaskGIT setting"):
            sample_prior(model, labels, SampleConfig(cfg_schedule="linear"))


def test_autoregressive_completion_keeps_the_prompt_and_continues_it():
    """A prompt fixes the first cells; at temperature 0 the rest is the greedy continuation, which is what
    the unprompted greedy sampler drew after the same cells (prefix pass == token-by-token cache)."""
    for factorization in ("flat", "cell", "depth"):
        model, labels = _ar(1, factorization), torch.tensor([0, 1])
        with torch.no_grad():
            model.class_emb.weight.mul_(50)
        from movq.generation.autoregressive import sample

        greedy = sample(model, labels, temperature=0.0)
        cells = 5
        done = sample(model, labels, temperature=0.0, prompt=greedy, prompt_cells=cells)
        assert torch.equal(done, greedy), factorization
        other = torch.randint(0, K, greedy.shape, generator=torch.Generator().manual_seed(0))
        cont = sample(model, labels, generator=torch.Generator().manual_seed(1), prompt=other, prompt_cells=cells,
                      cfg_scale=2.0)
        flat_in, flat_out = other.flatten(2), cont.flatten(2)
        assert torch.equal(flat_out[..., :cells], flat_in[..., :cells])
        assert not torch.equal(flat_out[..., cells:], flat_in[..., cells:])
    with pytest.raises(ValueError, match="prompt_cells"):
        sample(model, labels, prompt=other, prompt_cells=GRID[0] * GRID[1])
    with pytest.raises(ValueError, match="needs a prompt"):
        sample(model, labels, prompt_cells=2)
