"""The mask schedule MaskGIT shares between training and sampling (Chang et al., CVPR 2022, §3.2;
google-research/maskgit ``libml/mask_schedule.py``), seeded uniform draws, and the class-label check of
both priors (MaskGIT and the autoregressive prior share the null-class convention)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from movq.config import MASK_SCHEDULES


def mask_schedule(ratio: Union[float, Tensor], method: str = "cosine") -> Union[float, Tensor]:
    """Fraction of tokens still masked at progress ``ratio`` ∈ [0, 1]: 1 at 0, 0 at 1, decreasing.

    Training draws ``ratio ~ U(0, 1)`` and masks ``schedule(ratio)`` of the tokens; sampling at
    step t of T keeps ``schedule((t + 1) / T)`` of the initially unknown tokens masked.
    """
    if method == "cosine":  # MaskGIT's choice: few tokens revealed early, many late
        return torch.cos(ratio * math.pi / 2) if isinstance(ratio, Tensor) else math.cos(ratio * math.pi / 2)
    if method == "linear":
        return 1.0 - ratio
    if method == "square":
        return 1.0 - ratio**2
    raise ValueError(f"mask schedule must be one of {list(MASK_SCHEDULES)}, got {method!r}")


def random_uniform(
    shape: Sequence[int], generator: Optional[torch.Generator], device: torch.device
) -> Tensor:
    """U[0, 1) on ``device``, drawn on the generator's device (use one on ``device`` for speed)."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def check_class_labels(owner: str, labels: Optional[Tensor], batch: int, null_class: int,
                       device: torch.device) -> Tensor:
    """``labels`` as int64 ``[batch]`` (None: ``null_class`` for every row, on ``device``), or a ``ValueError``
    that names ``owner`` for labels that are not integers of that shape or lie outside [0, null_class]."""
    if labels is None:
        return torch.full((batch,), null_class, dtype=torch.long, device=device)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or tuple(labels.shape) != (batch,):
        raise ValueError(f"{owner}: labels must be integers of shape [{batch}], got {labels.dtype} {tuple(labels.shape)}")
    if not torch.compiler.is_compiling() and ((labels < 0) | (labels > null_class)).any():
        raise ValueError(
            f"{owner}: labels must lie in [0, {null_class}] ({null_class} = null class), "
            f"got [{int(labels.min())}, {int(labels.max())}]"
        )
    return labels.long()
