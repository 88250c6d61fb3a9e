"""Token canvases larger than the prior's training grid, for MaskGIT: windowed iterative decoding
(outpainting window by window).

A MaskGIT prior is trained on ``h × w`` token grids with a position embedding per cell, so it can only
read windows of that size. A larger ``H × W`` canvas is covered by training-size windows placed at a
stride of ``h − overlap`` (``w − overlap``), the last one against the canvas edge; the windows are
decoded one after another in raster order, each by :func:`movq.generation.maskgit.decode` with the
tokens already on the canvas inside it (from earlier windows, in the overlap, or given by the caller)
as known tokens, so every window is an outpainting of what is there. That is MaskGIT's own
outpainting (Chang et al. 2022, Sec. 4.3) applied one window at a time; the overlap is what ties a
window to its neighbours (0 = independent tiles, ``h − 1`` = the most context and the most windows).
The AR prior's counterpart is taming's sliding window, :func:`movq.generation.autoregressive.sample_large`.

Everything here is a pure function of its inputs and an explicit ``torch.Generator``: windows are
decoded in a fixed order, each drawing from the one generator.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from movq.generation.maskgit import TokensToLogits, decode, guided_tokens_to_logits


def _pair(v: Union[int, Sequence[int]], name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    v = tuple(int(x) for x in v)
    if len(v) != 2:
        raise ValueError(f"{name} must be one int or (h, w), got {v!r}")
    return v  # type: ignore[return-value]


def default_overlap(window: int) -> int:
    """Half the window (rounded down): each window after the first sees half of itself already drawn."""
    return window // 2


def window_starts(size: int, window: int, overlap: int) -> list[int]:
    """First rows (or columns) of the windows covering an axis of ``size`` cells: ``0, s, 2s, …`` with
    stride ``s = window − overlap``, and a last window flush with the edge (``size − window``)."""
    if window < 1 or size < window:
        raise ValueError(f"the canvas ({size}) must be at least the window ({window}) along every axis")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must lie in [0, {window - 1}] (the window is {window}), got {overlap}")
    stride = window - overlap
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def canvas_windows(canvas: Union[int, Sequence[int]], window: Union[int, Sequence[int]],
                   overlap: Union[int, Sequence[int], None] = None) -> list[tuple[int, int]]:
    """Top-left cells ``(i0, j0)`` of the windows that cover ``canvas`` (H, W), in raster order."""
    (H, W), (h, w) = _pair(canvas, "canvas"), _pair(window, "window")
    oh, ow = _pair(overlap, "overlap") if overlap is not None else (default_overlap(h), default_overlap(w))
    return [(i, j) for i in window_starts(H, h, oh) for j in window_starts(W, w, ow)]


@torch.no_grad()
def decode_canvas(
    tokens_to_logits: TokensToLogits,
    canvas: Tensor,
    known_mask: Optional[Tensor] = None,
    *,
    window: Union[int, Sequence[int]],
    mask_id: int,
    overlap: Union[int, Sequence[int], None] = None,
    generator: Optional[torch.Generator] = None,
    **decode_kwargs,
) -> Tensor:
    """Fill every unknown token of ``canvas int [B, C, H, W]`` window by window (see the module docstring).

    Args:
        tokens_to_logits: as for :func:`movq.generation.maskgit.decode`, on windows ``[B, C, h, w]``.
        canvas: ``int [B, C, H, W]`` with ``H ≥ h`` and ``W ≥ w``; known tokens in ``[0, K)``.
        known_mask: bool, broadcastable to ``canvas``; None = known where ``canvas != mask_id``.
        window: the training grid ``h`` or ``(h, w)``. overlap: cells shared by neighbouring windows
            (default half the window, per axis).
        decode_kwargs: ``steps``, ``temperature``, ``choice_temperature``, ``schedule`` of :func:`decode`,
            used for every window.

    Returns ``int64 [B, C, H, W]``; known tokens are unchanged. A window whose tokens are all known
    already is skipped (no model call, no random draw).
    """
    if canvas.ndim != 4 or canvas.dtype.is_floating_point or canvas.dtype == torch.bool:
        raise ValueError(f"canvas must be an integer tensor [B, C, H, W], got {canvas.dtype} {tuple(canvas.shape)}")
    h, w = _pair(window, "window")
    windows = canvas_windows(canvas.shape[-2:], (h, w), overlap)  # checks the sizes and the overlap
    x = canvas.long().clone()
    if known_mask is None:
        filled = x != mask_id
    else:
        if known_mask.dtype != torch.bool:
            raise ValueError(f"known_mask must be a bool tensor, got {known_mask.dtype}")
        try:
            filled = torch.broadcast_to(known_mask.to(x.device), x.shape).clone()
        except RuntimeError:
            raise ValueError(f"known_mask of shape {tuple(known_mask.shape)} does not broadcast to the canvas "
                             f"{tuple(x.shape)}") from None
    x = torch.where(filled, x, torch.full_like(x, mask_id))
    for i0, j0 in windows:
        crop = (..., slice(i0, i0 + h), slice(j0, j0 + w))
        known = filled[crop]
        if bool(known.all()):
            continue
        x[crop] = decode(tokens_to_logits, x[crop], known, mask_id=mask_id, generator=generator, **decode_kwargs)
        filled[crop] = True
    return x


def generate_canvas(
    model,
    grid: Union[int, Sequence[int]],
    labels: Optional[Tensor],
    *,
    num_samples: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    canvas: Optional[Tensor] = None,
    known_mask: Optional[Tensor] = None,
    overlap: Union[int, Sequence[int], None] = None,
    cfg_scale: float = 1.0,
    cfg_schedule: str = "constant",
    **decode_kwargs,
) -> Tensor:
    """Sample ``int64 [B, C, H, W]`` tokens of a ``grid`` (H = W or (H, W)) at least the training grid with a
    :class:`movq.models.maskgit.MaskGIT` in ``eval()``; at the training grid this is one window, i.e.
    :func:`movq.generation.maskgit.generate`. ``canvas`` / ``known_mask`` give known tokens (outpainting an
    image onto a larger canvas). Other arguments as :func:`movq.generation.maskgit.generate`."""
    cfg = model.config
    H, W = _pair(grid, "grid")
    if canvas is None:
        if labels is None and num_samples is None:
            raise ValueError("give labels or num_samples (or a canvas) to set the batch size")
        n = labels.shape[0] if labels is not None else num_samples
        if n < 1:
            raise ValueError(f"generate_canvas: the batch size must be >= 1, got {n}")
        device = next(model.parameters()).device
        canvas = torch.full((n, cfg.channels, H, W), model.mask_id, dtype=torch.long, device=device)
    elif tuple(canvas.shape[-2:]) != (H, W):
        raise ValueError(f"canvas {tuple(canvas.shape)} does not have the grid {(H, W)}")
    fn = guided_tokens_to_logits(model, labels, scale=cfg_scale, schedule=cfg_schedule)
    return decode_canvas(fn, canvas, known_mask, window=cfg.grid_hw, mask_id=model.mask_id, overlap=overlap,
                         generator=generator, **decode_kwargs)


__all__ = ["window_starts", "canvas_windows", "decode_canvas", "generate_canvas", "default_overlap"]
