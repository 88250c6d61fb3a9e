"""Sampling the autoregressive prior: KV-cached, token by token, and on grids larger than the
training grid by taming's sliding window.

References: Esser et al., "Taming Transformers" (CVPR 2021) and its ``scripts/sample_conditional.py``
(top-k sampling; a larger grid sampled position by position, each token conditioned on the sampled
tokens inside a window of the training size around it, positions re-indexed within the window);
Holtzman et al., "The Curious Case of Neural Text Degeneration" (ICLR 2020) for top-p (nucleus)
sampling; Ho & Salimans (2022) for classifier-free guidance.

Both samplers are pure functions of the model, the labels and an explicit ``torch.Generator``:
every random draw is one ``U[0, 1)`` tensor of ``[B, K]`` per token, in raster order (cells, then
channels), turned into a sample by the Gumbel-max trick. Guidance runs the conditional and the
null-class sequences as one doubled batch and samples from
``uncond + scale · (cond − uncond)`` (scale 1: the conditional model alone, no second pass). For a prior
with an image condition the unconditional sequences drop class and condition together (the null class and
the learned null condition), so guidance strengthens both.

Tokens come out as ``int64 [B, C, H, W]``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from movq.models.masking import random_uniform

# Keeps log(−log(u)) finite: u is drawn in [0, 1), and u = 0 would give −inf (as movq.generation.maskgit).
_UNIFORM_EPS = 1e-20
# Snapshots of the token grid kept by return_history (evenly spaced over the cells).
DEFAULT_HISTORY_STEPS = 8
UNSAMPLED = -1  # the value of not-yet-sampled tokens in history states


@dataclass
class SampleHistory:
    """``states [B, S, C, H, W]``: the grid after S evenly spaced numbers of cells (``UNSAMPLED``
    where not drawn yet; the last is the result). ``logprobs [B, C, H, W]``: log-probability of
    each drawn token under the distribution it was drawn from (guided, tempered, filtered)."""

    states: Tensor
    logprobs: Tensor


# --------------------------------------------------------------------------------------
# One token from logits
# --------------------------------------------------------------------------------------
def filter_logits(logits: Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> Tensor:
    """``logits [..., K]`` with −inf outside the top-k and outside the top-p nucleus (the smallest set
    of most likely tokens whose probability reaches ``top_p``; the most likely token always stays)."""
    k = logits.shape[-1]
    if top_k is not None:
        if not 1 <= top_k:
            raise ValueError(f"top_k must be >= 1 (or None), got {top_k}")
        if top_k < k:
            kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] (or None), got {top_p}")
        if top_p < 1:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = F.softmax(sorted_logits, dim=-1)
            before = probs.cumsum(-1) - probs  # probability of the tokens ranked above
            drop_sorted = before >= top_p  # the top token has before = 0 < top_p: always kept
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, -math.inf)
    return logits


def sample_logits(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor]:
    """Draw one token per row of ``logits [B, K]``: ``(tokens int64 [B], log-prob [B])``.

    One ``U[0, 1) [B, K]`` draw per call (also at temperature 0, which takes the argmax), so the
    generator advances the same whatever the settings."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    u = random_uniform(logits.shape, generator, logits.device)
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    logits = filter_logits(logits, top_k, top_p)
    if temperature > 0:  # Gumbel-max: argmax(logits + G) ~ softmax(logits)
        tokens = torch.argmax(logits - torch.log(-torch.log(u + _UNIFORM_EPS) + _UNIFORM_EPS), -1)
    else:
        tokens = logits.argmax(-1)
    logp = torch.gather(F.log_softmax(logits, -1), -1, tokens[:, None])[:, 0]
    return tokens, logp


def guided(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance ``uncond + scale · (cond − uncond)`` (scale 0 = unconditional)."""
    return uncond + scale * (cond - uncond)


# --------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------
def _setup(model, labels: Optional[Tensor], num_samples: Optional[int], cfg_scale: float,
           condition: Optional[Tensor] = None):
    """(conditional labels [B], the labels the model runs: [B] or [2B] with the null half, the conditions it
    runs (None: the null condition) and which of them are dropped to the null condition)."""
    if labels is None and num_samples is None:
        raise ValueError("give labels or num_samples to set the batch size")
    n = labels.shape[0] if labels is not None and labels.ndim >= 1 else num_samples
    if n is None or n < 1:
        raise ValueError(f"the batch size must be >= 1, got {n} (from labels or num_samples)")
    if labels is not None and num_samples is not None and num_samples != n:
        raise ValueError(f"num_samples={num_samples} but {n} labels were given")
    device = next(model.parameters()).device
    labels = model.check_labels(labels, n, device)
    condition = _condition_batch(model, condition, n, device)
    if cfg_scale != 1.0:
        if condition is None and (model.num_classes == 0 or (labels == model.null_class).all()):
            raise ValueError(
                f"classifier-free guidance (scale {cfg_scale}) needs a class-conditional model and labels, or a "
                "condition; use cfg_scale=1 for an unconditional model"
            )
        run_cond, drop = None, None
        if condition is not None:
            run_cond = torch.cat([condition, condition])
            drop = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)]).to(device)
        return labels, torch.cat([labels, torch.full_like(labels, model.null_class)]), run_cond, drop
    return labels, labels, condition, None


def _condition_batch(model, condition: Optional[Tensor], n: int, device) -> Optional[Tensor]:
    """``condition`` on ``device`` with ``n`` rows (one row is repeated), or an error for a model without one."""
    if condition is None:
        return None
    if getattr(model, "condition", None) is None:
        raise ValueError("a condition was given but the prior has none (its config.condition is null)")
    if condition.ndim == 4 and condition.shape[0] == 1 and n > 1:
        condition = condition.expand(n, -1, -1, -1)
    return condition.to(device)


def _emit(model, hidden: Tensor, n: int, cfg_scale: float, generator, sampling: dict) -> tuple[Tensor, Tensor]:
    """Draw the U tokens of one unit from its spatial output ``hidden [B or 2B, D]``:
    ``(tokens [B, U], logprobs [B, U])``."""
    doubled = hidden.shape[0] == 2 * n
    prev = torch.zeros(hidden.shape[0], 0, dtype=torch.long, device=hidden.device)
    logps = []
    for _ in range(model.config.unit_tokens):
        logits = model.token_logits(hidden, prev).float()
        if doubled:
            cond, uncond = logits.chunk(2)
            logits = guided(cond, uncond, cfg_scale)
        tok, logp = sample_logits(logits, generator=generator, **sampling)
        logps.append(logp)
        tok = torch.cat([tok, tok]) if doubled else tok
        prev = torch.cat([prev, tok[:, None]], 1)
    return prev[:n], torch.stack(logps, 1)


def _sampling_kwargs(temperature, top_k, top_p) -> dict:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    filter_logits(torch.zeros(1, 2), top_k, top_p)  # validate now, not at the first token
    return {"temperature": temperature, "top_k": top_k, "top_p": top_p}


def _snapshots(cells: int, steps: int) -> set[int]:
    """Numbers of finished cells after which a history state is kept (always including all)."""
    steps = max(1, min(steps, cells))
    return {math.ceil(cells * (i + 1) / steps) for i in range(steps)}


# --------------------------------------------------------------------------------------
# Sampling at the training size
# --------------------------------------------------------------------------------------
@torch.no_grad()
def sample(
    model,
    labels: Optional[Tensor] = None,
    *,
    num_samples: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    cfg_scale: float = 1.0,
    prompt: Optional[Tensor] = None,
    prompt_cells: int = 0,
    return_history: bool = False,
    history_steps: int = DEFAULT_HISTORY_STEPS,
    condition: Optional[Tensor] = None,
) -> Union[Tensor, tuple[Tensor, SampleHistory]]:
    """Sample ``int64 [B, C, h, w]`` tokens of the training grid, one sequence position per step
    with the KV cache (the window's ring: O(W) work and memory per token).

    Args:
        model: an :class:`movq.models.autoregressive.AutoregressivePrior`; put it in ``eval()``.
        labels: ``int [B]`` classes (the null class = unconditional); None with ``num_samples``:
            unconditional.
        generator: the source of all randomness (None: torch's global RNG).
        temperature: divides the logits (0 = argmax). top_k / top_p: keep only the k most likely
            tokens / the nucleus of probability p (None: off).
        cfg_scale: classifier-free guidance (1 = the conditional model).
        prompt, prompt_cells: completion: the first ``prompt_cells`` cells in raster order are taken
            from ``prompt int [B, C, h, w]`` (read in one prefix pass) and the rest is sampled after
            them, e.g. ``prompt_cells = (h // 2) · w`` completes the bottom half of an image.
        return_history: also return a :class:`SampleHistory` of ``history_steps`` snapshots.
        condition: ``uint8 [B or 1, ch, H', W']`` image conditions of a conditional prior (None: the null
            condition, i.e. its unconditional model); read as the prefix of the sequence.
    """
    cfg = model.config
    sampling = _sampling_kwargs(temperature, top_k, top_p)
    labels, run_labels, run_cond, drop = _setup(model, labels, num_samples, cfg_scale, condition)
    n, (h, w), u = labels.shape[0], cfg.grid_hw, cfg.unit_tokens
    device = labels.device
    cache = model.new_cache(run_labels.shape[0], device)
    units = torch.zeros(n, cfg.seq_len, u, dtype=torch.long, device=device)
    logps = torch.zeros(n, cfg.seq_len, u, device=device)
    keep, states = _snapshots(h * w, history_steps) if return_history else set(), []
    start = _prompt_units(model, prompt, prompt_cells, n)
    prev, hidden = None, None
    # a conditional prior reads its condition prefix (and the class token after it) in one pass first
    prefix = model.condition_prefix(run_cond, run_labels.shape[0], drop) if model.prefix_len else None
    primed = bool(start) or prefix is not None
    if primed:
        units[:, :start] = model.to_units(prompt.to(device).long())[:, :start] if start else units[:, :0]
        given = units[:, :start] if run_labels.shape[0] == n else torch.cat([units[:, :start]] * 2)
        hidden = model.prefill(model.sequence_inputs(run_labels, given, prefix), cache)[:, -1]  # position `start`
        for _ in sorted(k for k in keep if k <= prompt_cells and start):  # snapshots inside the prompt: the prompt
            state = torch.full_like(units, UNSAMPLED)
            state[:, :start] = units[:, :start]
            states.append(model.from_units(state, h, w))
    for s in range(start, cfg.seq_len):
        if s > start or not primed:
            x = model.embed_step(s, run_labels, prev)
            hidden = model.step(x, s, cache)
        units[:, s], logps[:, s] = _emit(model, hidden, n, cfg_scale, generator, sampling)
        prev = torch.cat([units[:, s], units[:, s]]) if run_labels.shape[0] != n else units[:, s]
        cells_done = (s + 1) // cfg.units_per_cell
        if (s + 1) % cfg.units_per_cell == 0 and cells_done in keep:
            state = torch.full_like(units, UNSAMPLED)
            state[:, : s + 1] = units[:, : s + 1]
            states.append(model.from_units(state, h, w))
    tokens = model.from_units(units, h, w)
    if return_history:
        return tokens, SampleHistory(torch.stack(states, 1), model.from_units(logps, h, w))
    return tokens


def _prompt_units(model, prompt: Optional[Tensor], prompt_cells: int, n: int) -> int:
    """The number of sequence units a completion prompt fixes (checked)."""
    cfg = model.config
    h, w = cfg.grid_hw
    if prompt is None:
        if prompt_cells:
            raise ValueError(f"prompt_cells={prompt_cells} needs a prompt [B, C, h, w]")
        return 0
    if not 0 <= prompt_cells < h * w:
        raise ValueError(f"prompt_cells must lie in [0, {h * w - 1}] (a grid of {h}×{w} cells), got {prompt_cells}")
    if tuple(prompt.shape) != (n, cfg.channels, h, w) or prompt.dtype.is_floating_point:
        raise ValueError(f"prompt must be integer tokens of shape {(n, cfg.channels, h, w)}, got "
                         f"{prompt.dtype} {tuple(prompt.shape)}")
    head = prompt.reshape(n, cfg.channels, -1)[..., :prompt_cells]
    if head.numel() and (head.min() < 0 or head.max() >= cfg.codebook_size):
        raise ValueError(f"prompt tokens must lie in [0, {cfg.codebook_size - 1}]")
    return prompt_cells * cfg.units_per_cell


# --------------------------------------------------------------------------------------
# Larger than the training grid: taming's sliding window
# --------------------------------------------------------------------------------------
def window_origin(i: int, size: int, window: int) -> int:
    """First row (or column) of the training-size window for cell ``i`` of a ``size``-long axis:
    the cell sits in the window's middle (row ``window // 2``) where it can, else the window
    touches the grid's edge (taming's sample_conditional.py)."""
    return min(max(i - window // 2, 0), size - window)


@torch.no_grad()
def sample_large(
    model,
    grid: Union[int, Sequence[int]],
    labels: Optional[Tensor] = None,
    *,
    num_samples: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    cfg_scale: float = 1.0,
    return_history: bool = False,
    history_steps: int = DEFAULT_HISTORY_STEPS,
) -> Union[Tensor, tuple[Tensor, SampleHistory]]:
    """Sample ``int64 [B, C, H, W]`` tokens on a grid ``(H, W) ≥`` the training grid ``(h, w)``.

    Cells are drawn in raster order over the large grid. For cell (i, j) the window is the
    ``h × w`` crop at (``window_origin(i, H, h)``, ``window_origin(j, W, w)``); the model reads the
    crop's tokens before the cell's place in the crop (all already drawn: rows above are complete,
    and the row itself is drawn left to right) as if it were a training image, positions counted
    within the crop, and draws the cell's C tokens. Each cell costs one prefix pass of at most
    h·w cells (plus C cached steps for ``flat``), whatever (H, W). At ``(H, W) = (h, w)`` this is
    :func:`sample` without the cache (same draws, same tokens up to float rounding).

    Arguments as :func:`sample`; ``grid``: H = W or (H, W), in cells.
    """
    cfg = model.config
    h, w = cfg.grid_hw
    H, W = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    if H < h or W < w:
        raise ValueError(f"sample_large: the grid ({H}, {W}) must be at least the training grid ({h}, {w}); "
                         "use sample() at the training size")
    if getattr(model, "condition", None) is not None:
        raise ValueError("sample_large: a prior with an image condition samples at its training grid (the condition "
                         "covers that grid); use sample()")
    sampling = _sampling_kwargs(temperature, top_k, top_p)
    labels, run_labels, _, _ = _setup(model, labels, num_samples, cfg_scale)
    n, c, upc = labels.shape[0], cfg.channels, cfg.units_per_cell
    device = labels.device
    tokens = torch.full((n, c, H, W), UNSAMPLED, dtype=torch.long, device=device)
    logps = torch.zeros(n, c, H, W, device=device)
    keep, states = _snapshots(H * W, history_steps) if return_history else set(), []
    for i in range(H):
        i0 = window_origin(i, H, h)
        for j in range(W):
            j0 = window_origin(j, W, w)
            crop = tokens[:, :, i0 : i0 + h, j0 : j0 + w].clamp(min=0)  # unsampled cells lie after the target
            first = ((i - i0) * w + (j - j0)) * upc  # the cell's first unit in the crop's sequence
            units = model.to_units(crop)[:, :first]  # [B, first, U]: drawn before the cell
            if run_labels.shape[0] != n:
                units = torch.cat([units, units])
            cache = model.new_cache(run_labels.shape[0], device) if upc > 1 else None
            hidden = model.prefill(model.sequence_inputs(run_labels, units), cache)[:, -1]
            drawn, drawn_logp = [], []
            for k in range(upc):  # flat: the C channels one unit at a time, cached; else one unit
                if k:
                    prev = drawn[-1] if run_labels.shape[0] == n else torch.cat([drawn[-1], drawn[-1]])
                    hidden = model.step(model.embed_step(first + k, run_labels, prev), first + k, cache)
                tok, logp = _emit(model, hidden, n, cfg_scale, generator, sampling)
                drawn.append(tok)
                drawn_logp.append(logp)
            tokens[:, :, i, j] = torch.cat(drawn, 1)  # [B, C]: U tokens per unit, upc units
            logps[:, :, i, j] = torch.cat(drawn_logp, 1)
            if i * W + j + 1 in keep:
                states.append(tokens.clone())
    if return_history:
        return tokens, SampleHistory(torch.stack(states, 1), logps)
    return tokens


__all__ = ["sample", "sample_large", "sample_logits", "filter_logits", "guided", "window_origin",
           "SampleHistory", "UNSAMPLED", "DEFAULT_HISTORY_STEPS"]
