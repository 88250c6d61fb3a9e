"""MaskGIT parallel decoding over multichannel tokens, with guidance, inpainting and outpainting.

Reference: Chang et al., "MaskGIT: Masked Generative Image Transformer" (CVPR 2022), and its
``libml/parallel_decode.py`` / ``libml/mask_schedule.py`` (google-research/maskgit): the decode
loop is one pure function taking a ``tokens_to_logits`` callable, and the mask schedule is shared
by training (:mod:`movq.models.masking`) and sampling. Classifier-free guidance follows Ho & Salimans (2022),
as used for masked token models by Muse (Chang et al. 2023).

Tokens are ``int64 [B, C, h, w]`` (C quantizer channels on an h×w grid); a masked token holds
``mask_id`` (= the codebook size K in this project). ``tokens_to_logits(tokens, step, steps)``
returns ``[B, C, h, w, K]``; ``step`` in ``[0, steps)`` lets it change with the step (guidance
schedules), a plain model ignores it. Every random draw comes from the ``torch.Generator`` given,
so a seed fixes the samples.

One decode step t of T (ratio r = (t + 1) / T):
  1. sample every unknown token from softmax(logits / temperature);
  2. confidence = log p(sampled token) + choice_temperature · (1 − r) · Gumbel noise,
     +inf for tokens fixed earlier or given by the caller;
  3. re-mask the ``floor(N₀ · schedule(r))`` least confident tokens (N₀: unknown at the start),
     always revealing at least one token; the last step (schedule(1) = 0) reveals all.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from movq.config import DEFAULT_CHOICE_TEMPERATURE, DEFAULT_STEPS
from movq.models.masking import mask_schedule, random_uniform

TokensToLogits = Callable[[Tensor, int, int], Tensor]

GUIDANCE_SCHEDULES = ("constant", "linear")

# Fixed tokens (known or revealed earlier) must rank above any noisy confidence. +inf, not a
# probability bound like 1.0, because log p + Gumbel noise has no upper bound.
_CONFIDENCE_OF_FIXED = math.inf
# Keeps log(−log(u)) finite: u is drawn in [0, 1), and u = 0 or 1 would give ±inf.
_UNIFORM_EPS = 1e-20


# --------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------
def guidance_scale(scale: float, schedule: str, step: int, steps: int) -> float:
    """Classifier-free guidance scale at ``step`` of ``steps``.

    ``constant``: ``scale`` at every step. ``linear``: ramps from 1 (the conditional model, no
    guidance) at the first step to ``scale`` at the last, as early steps set the layout and
    strong guidance there costs diversity.
    """
    if schedule == "constant":
        return float(scale)
    if schedule == "linear":
        frac = step / (steps - 1) if steps > 1 else 1.0
        return 1.0 + (float(scale) - 1.0) * frac
    raise ValueError(f"guidance schedule must be one of {list(GUIDANCE_SCHEDULES)}, got {schedule!r}")


# --------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------
def cfg_logits(model: Callable, tokens: Tensor, labels: Optional[Tensor], scale: float,
               condition: Optional[Tensor] = None) -> Tensor:
    """Guided logits ``uncond + scale · (cond − uncond)``, ``[B, C, h, w, K]``.

    ``model(tokens, labels)`` must accept the null class id ``model.null_class``. Scale 1 is the
    conditional model exactly (no unconditional pass); otherwise both passes run as one batch. With an
    image ``condition`` (a conditional prior) the unconditional pass drops class and condition together.
    """
    if scale == 1.0:
        return model(tokens, labels) if condition is None else model(tokens, labels, condition)
    if condition is None and (getattr(model, "num_classes", 1) == 0 or labels is None):
        raise ValueError(
            f"classifier-free guidance (scale {scale}) needs a class-conditional model and labels, or a "
            "condition; use scale 1 for an unconditional model"
        )
    b = tokens.shape[0]
    if labels is None:
        labels = torch.full((b,), model.null_class, dtype=torch.long, device=tokens.device)
    null = torch.full_like(labels, model.null_class)
    if condition is None:
        logits = model(torch.cat([tokens, tokens]), torch.cat([labels, null]))
    else:
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(tokens.device)
        logits = model(torch.cat([tokens, tokens]), torch.cat([labels, null]), torch.cat([condition, condition]), drop)
    cond, uncond = logits.float().chunk(2)
    return uncond + scale * (cond - uncond)


def guided_tokens_to_logits(
    model: Callable, labels: Optional[Tensor], *, scale: float = 1.0, schedule: str = "constant",
    condition: Optional[Tensor] = None,
) -> TokensToLogits:
    """A ``tokens_to_logits`` for :func:`decode`: the model with labels (and an image condition) and a
    guidance schedule."""
    guidance_scale(scale, schedule, 0, 1)  # validate the schedule name now, not at step 0

    def tokens_to_logits(tokens: Tensor, step: int, steps: int) -> Tensor:
        return cfg_logits(model, tokens, labels, guidance_scale(scale, schedule, step, steps), condition)

    return tokens_to_logits


# --------------------------------------------------------------------------------------
# The decode loop
# --------------------------------------------------------------------------------------
@dataclass
class DecodeHistory:
    """Every step of a decode, ``[B, T, C, h, w]`` each.

    ``states``: the tokens after step t (``mask_id`` where still masked).
    ``predictions``: the full sample drawn at step t before re-masking (for step strips).
    """

    states: Tensor
    predictions: Tensor



def _gumbel(shape: Sequence[int], generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    u = random_uniform(shape, generator, device)
    return -torch.log(-torch.log(u + _UNIFORM_EPS) + _UNIFORM_EPS)


def _known_mask(tokens: Tensor, known_mask: Optional[Tensor], mask_id: int) -> Tensor:
    if known_mask is None:
        return tokens != mask_id
    if known_mask.dtype != torch.bool:
        raise ValueError(f"known_mask must be a bool tensor, got {known_mask.dtype}")
    try:
        return torch.broadcast_to(known_mask.to(tokens.device), tokens.shape)
    except RuntimeError:
        raise ValueError(
            f"known_mask of shape {tuple(known_mask.shape)} does not broadcast to the tokens "
            f"{tuple(tokens.shape)} (give [h, w], [C, h, w] or [B, C, h, w])"
        ) from None


@torch.no_grad()
def decode(
    tokens_to_logits: TokensToLogits,
    tokens: Tensor,
    known_mask: Optional[Tensor] = None,
    *,
    mask_id: int,
    steps: int = DEFAULT_STEPS,
    temperature: float = 1.0,
    choice_temperature: float = DEFAULT_CHOICE_TEMPERATURE,
    generator: Optional[torch.Generator] = None,
    schedule: str = "cosine",
    return_history: bool = False,
) -> Union[Tensor, tuple[Tensor, DecodeHistory]]:
    """MaskGIT parallel decoding: fill every unknown token of ``tokens`` in ``steps`` steps.

    Args:
        tokens_to_logits: ``(tokens [B, C, h, w], step, steps) -> logits [B, C, h, w, K]``.
        tokens: ``int [B, C, h, w]``; known tokens in ``[0, K)``, the rest is ignored.
        known_mask: bool, broadcastable to ``tokens`` (``[h, w]`` from :func:`box_mask` works);
            ``None`` means "known where ``tokens != mask_id``". Known tokens are never changed.
        mask_id: the id the model reads as [MASK]; must lie outside ``[0, K)``.
        temperature: sampling temperature of the tokens (0 = argmax).
        choice_temperature: Gumbel noise scale on the re-masking confidence at step 0.
        generator: the source of all randomness (``None``: torch's global RNG).
        schedule: the mask schedule (see :func:`mask_schedule`).
        return_history: also return a :class:`DecodeHistory`.

    Returns ``int64 [B, C, h, w]`` with no masked token (and the history if asked).
    """
    if tokens.ndim != 4 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(
            f"tokens must be an integer tensor [B, C, h, w], got {tokens.dtype} {tuple(tokens.shape)}"
        )
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if temperature < 0 or choice_temperature < 0:
        raise ValueError(f"temperatures must be >= 0, got {temperature} and {choice_temperature}")
    mask_schedule(0.0, schedule)  # fail on a bad name before calling the model
    tokens = tokens.long()
    known = _known_mask(tokens, known_mask, mask_id)
    b = tokens.shape[0]
    x = torch.where(known, tokens, torch.full_like(tokens, mask_id))
    unknown0 = (~known).reshape(b, -1).sum(1)  # [B] N₀, the count the schedule scales
    states, predictions = [], []
    for step in range(steps):
        unknown = x == mask_id  # [B, C, h, w]
        if not unknown.any():  # small N₀ can finish before the last step: no model call needed
            states.append(x)
            predictions.append(x)
            continue
        logits = tokens_to_logits(x, step, steps)
        if logits.shape[:-1] != x.shape:
            raise ValueError(
                f"tokens_to_logits returned {tuple(logits.shape)}, expected {tuple(x.shape)} + (K,)"
            )
        logits = logits.float()
        k = logits.shape[-1]
        if step == 0:
            if 0 <= mask_id < k:
                raise ValueError(
                    f"mask_id {mask_id} is a real code of the {k}-way logits; it must lie outside [0, {k})"
                )
            given = tokens[known]
            if given.numel() and (given.min() < 0 or given.max() >= k):
                got = f"[{int(given.min())}, {int(given.max())}]"
                raise ValueError(f"known tokens must lie in [0, {k}), got {got}")
        if temperature > 0:  # Gumbel-max: argmax(logits / T + G) ~ softmax(logits / T)
            sampled = torch.argmax(logits / temperature + _gumbel(logits.shape, generator, logits.device), -1)
        else:
            sampled = logits.argmax(-1)
        sampled = torch.where(unknown, sampled, x)
        predictions.append(sampled)

        ratio = (step + 1) / steps
        # Confidence in the model's own (untempered) belief, so temperature 0 ranks sensibly too.
        logp = torch.gather(F.log_softmax(logits, -1), -1, sampled.unsqueeze(-1)).squeeze(-1)
        noise_scale = choice_temperature * (1.0 - ratio)
        if noise_scale > 0:
            logp = logp + noise_scale * _gumbel(logp.shape, generator, logp.device)
        confidence = torch.where(unknown, logp, torch.full_like(logp, _CONFIDENCE_OF_FIXED))

        # How many stay masked: the schedule's share of N₀, but always reveal at least one.
        n_mask = torch.floor(unknown0.double() * mask_schedule(ratio, schedule)).long()
        n_mask = torch.minimum(n_mask, unknown.reshape(b, -1).sum(1) - 1).clamp(min=0)  # [B]
        order = torch.argsort(confidence.reshape(b, -1), dim=1, stable=True)  # least confident first
        positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(1, order, positions)  # rank of each token
        remask = (rank < n_mask[:, None]).reshape(x.shape)
        x = torch.where(remask, torch.full_like(sampled, mask_id), sampled)
        states.append(x)
    if return_history:
        return x, DecodeHistory(torch.stack(states, 1), torch.stack(predictions, 1))
    return x


def generate(
    model: Callable,
    labels: Optional[Tensor],
    *,
    generator: Optional[torch.Generator] = None,
    tokens: Optional[Tensor] = None,
    known_mask: Optional[Tensor] = None,
    num_samples: Optional[int] = None,
    cfg_scale: float = 1.0,
    cfg_schedule: str = "constant",
    condition: Optional[Tensor] = None,
    **decode_kwargs,
) -> Union[Tensor, tuple[Tensor, DecodeHistory]]:
    """Sample (or inpaint / outpaint) tokens with a :class:`movq.models.maskgit.MaskGIT`.

    Without ``tokens`` it starts from all-[MASK] of the model's shape, ``B`` taken from
    ``labels`` or ``num_samples``. Put the model in ``eval()`` first (dropout). ``condition``:
    ``uint8 [B or 1, ch, H', W']`` image conditions of a conditional prior (None: its null condition).
    Extra keyword arguments go to :func:`decode`.
    """
    cfg = model.config
    if tokens is None:
        if labels is None and num_samples is None:
            raise ValueError("give labels or num_samples (or tokens) to set the batch size")
        n = labels.shape[0] if labels is not None else num_samples
        if n < 1:
            raise ValueError(f"generate: the batch size must be ≥ 1, got {n} (from labels or num_samples)")
        h, w = cfg.grid_hw
        device = next(model.parameters()).device
        tokens = torch.full((n, cfg.channels, h, w), model.mask_id, dtype=torch.long, device=device)
    if condition is not None:
        if getattr(model, "condition", None) is None:
            raise ValueError("a condition was given but the prior has none (its config.condition is null)")
        b = tokens.shape[0]
        if condition.ndim == 4 and condition.shape[0] == 1 and b > 1:
            condition = condition.expand(b, -1, -1, -1)
        condition = condition.to(tokens.device)
    fn = guided_tokens_to_logits(model, labels, scale=cfg_scale, schedule=cfg_schedule, condition=condition)
    return decode(fn, tokens, known_mask, mask_id=model.mask_id, generator=generator, **decode_kwargs)


# --------------------------------------------------------------------------------------
# Inpainting and outpainting
# --------------------------------------------------------------------------------------
def box_mask(
    h: int,
    w: int,
    box: Sequence[float],
    *,
    image_size: Union[int, Sequence[int]],
    inside: bool = True,
) -> Tensor:
    """Known-token mask ``bool [h, w]`` for editing an image-space box.

    ``box`` is ``(x0, y0, x1, y1)`` in pixels of an image of ``image_size`` (``H`` or ``(H, W)``),
    half-open, x along the width. ``inside=True`` regenerates the box (inpainting): known = cells
    not touching it. ``inside=False`` regenerates everything outside it (outpainting): known = cells
    lying fully inside it. Either way every pixel to be regenerated lies in an unknown cell. All C
    channels of a cell share its mask (``decode`` broadcasts ``[h, w]``).
    """
    ih, iw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(box) != 4:
        raise ValueError(f"box must be (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= iw and 0 <= y0 < y1 <= ih):
        raise ValueError(f"box {tuple(box)} must satisfy 0 <= x0 < x1 <= {iw} and 0 <= y0 < y1 <= {ih}")
    if ih % h or iw % w:
        raise ValueError(f"image size {(ih, iw)} is not a multiple of the token grid {(h, w)}")
    sy, sx = ih // h, iw // w  # pixels per cell
    rows = torch.arange(h, dtype=torch.float64) * sy  # top edge of each cell
    cols = torch.arange(w, dtype=torch.float64) * sx
    touch = ((rows + sy > y0) & (rows < y1))[:, None] & ((cols + sx > x0) & (cols < x1))[None, :]
    within = ((rows >= y0) & (rows + sy <= y1))[:, None] & ((cols >= x0) & (cols + sx <= x1))[None, :]
    return ~touch if inside else within
