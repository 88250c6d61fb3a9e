"""Text guidance with CLIP: VQGAN+CLIP on a MoVQ tokenizer.

Reference: Crowson et al., "VQGAN-CLIP: Open Domain Image Generation and Editing with Natural Language Guidance"
(ECCV 2022, arXiv:2204.08583), and its notebook. The variable is the tokenizer's continuous latent
``z [1, C·d, h, w]`` (``quant_conv``'s output, before quantization). One step:

    z_q = quantizer(z)                  straight-through: the value is the nearest codes, the gradient reaches z
    image = clamp(MoVQ.decode(z_q))     [0, 1]; the clamp passes gradients that point back into range
    cut-outs                            ``cutn`` random squares, side ~ U^cut_pow between CLIP's input size and the
                                        image's, resized to CLIP's input size; flips, small affine moves, colour
                                        jitter, Gaussian noise
    loss = Σ_p w_p · mean_cutouts spherical_distance(CLIP(cut-out), CLIP(prompt_p))  (+ init_weight · ‖z − z₀‖²/2)
    Adam step on z, then z clamped per component to the codebook's range

A negative prompt weight pushes away from that text. Every random draw (the start tokens, cut-out sizes and
places, augmentations, noise) comes from the ``torch.Generator`` given, so a seed fixes a run on CPU; CUDA's
backward of ``grid_sample`` / interpolation adds atomics, so GPU runs agree closely but not bit for bit.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from movq.config import ClipGuidanceConfig
from movq.models.autoencoder import MoVQ
from movq.models.clip import Clip

# Probabilities and ranges of the light augmentations (the recipe's kornia pipeline, without perspective and
# sharpness): small enough that a cut-out still shows what the image shows.
FLIP_P = 0.5
AFFINE_P = 0.7
AFFINE_DEGREES = 15.0
AFFINE_TRANSLATE = 0.1  # of the side
AFFINE_SCALE = (0.95, 1.05)
JITTER_P = 0.7
JITTER = 0.05  # brightness, contrast and saturation factors in 1 ± JITTER
_LUMA = (0.299, 0.587, 0.114)


class Prompt(NamedTuple):
    text: str
    weight: float = 1.0


def parse_prompt(spec: str) -> Prompt:
    """``"TEXT"`` or ``"TEXT:WEIGHT"`` (the recipe's syntax; a last ``:part`` that is not a number belongs to the
    text). Raises ValueError for an empty text or a non-finite weight."""
    text, weight = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep:
        try:
            weight = float(tail)
            text = head
        except ValueError:
            pass
    if not text.strip():
        raise ValueError(f"prompt {spec!r} has no text")
    if not math.isfinite(weight):
        raise ValueError(f"prompt {spec!r}: the weight must be a finite number")
    return Prompt(text.strip(), weight)


# --------------------------------------------------------------------------------------
# The pieces of the loss
# --------------------------------------------------------------------------------------
def spherical_distance(x: Tensor, y: Tensor) -> Tensor:
    """Squared great-circle distance ``2·arcsin(‖x − y‖ / 2)²`` between unit vectors: ``x [N, D]``, ``y [P, D]`` →
    ``[N, P]``; 0 for equal vectors, π²/2 for antipodal ones."""
    return (x[:, None] - y[None]).norm(dim=-1).div(2).arcsin().pow(2).mul(2)


class _ClampWithGrad(torch.autograd.Function):
    """``x.clamp(lo, hi)`` whose gradient is kept where following it moves ``x`` back towards the range (a plain
    clamp would stop every gradient on a saturated pixel)."""

    @staticmethod
    def forward(ctx, x: Tensor, lo: float, hi: float) -> Tensor:
        ctx.lo, ctx.hi = lo, hi
        ctx.save_for_backward(x)
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        return grad * (grad * (x - x.clamp(ctx.lo, ctx.hi)) >= 0), None, None


def clamp_with_grad(x: Tensor, lo: float, hi: float) -> Tensor:
    return _ClampWithGrad.apply(x, lo, hi)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator, device) -> Tensor:
    return torch.rand(n, generator=generator, device=device) * (hi - lo) + lo


def augment_cutouts(batch: Tensor, generator: torch.Generator) -> Tensor:
    """``[N, 3, S, S]`` → the same, each cut-out flipped (p = 0.5), moved by a small random rotation, shift and
    zoom (p = 0.7, borders repeated) and colour-jittered (p = 0.7); differentiable in ``batch``."""
    n, dev = batch.shape[0], batch.device
    flip = torch.rand(n, generator=generator, device=dev) < FLIP_P
    batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)

    apply = (torch.rand(n, generator=generator, device=dev) < AFFINE_P).float()
    angle = _uniform(n, -AFFINE_DEGREES, AFFINE_DEGREES, generator, dev) * (math.pi / 180) * apply
    scale = 1 + (_uniform(n, *AFFINE_SCALE, generator, dev) - 1) * apply
    shift = _uniform(2 * n, -AFFINE_TRANSLATE, AFFINE_TRANSLATE, generator, dev).view(n, 2) * 2 * apply[:, None]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], -1), torch.stack([sin, cos, shift[:, 1]], -1)], 1)
    grid = F.affine_grid(theta.to(batch.dtype), list(batch.shape), align_corners=False)  # [N, S, S, 2]
    batch = F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)

    apply = (torch.rand(n, generator=generator, device=dev) < JITTER_P).float()[:, None, None, None]
    factors = _uniform(3 * n, 1 - JITTER, 1 + JITTER, generator, dev).view(3, n, 1, 1, 1)
    bright, contrast, sat = (1 + (f - 1) * apply for f in factors)
    batch = batch * bright
    mean = batch.mean(dim=(1, 2, 3), keepdim=True)
    batch = mean + (batch - mean) * contrast
    gray = (batch * batch.new_tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return gray + (batch - gray) * sat


def make_cutouts(images: Tensor, cut_size: int, cutn: int, cut_pow: float = 1.0, *, generator: torch.Generator,
                 augment: bool = True, noise: float = 0.1) -> Tensor:
    """``images [1, 3, H, W]`` in [0, 1] → ``[cutn, 3, cut_size, cut_size]``: random squares of side
    ``min_side + U^cut_pow · (max_side − min_side)`` (``max_side = min(H, W)``, ``min_side = min(H, W, cut_size)``)
    at random places, resized (antialiased when shrinking), then :func:`augment_cutouts` and per cut-out Gaussian
    noise of std ``U(0, noise)``."""
    if images.dim() != 4 or images.shape[0] != 1:
        raise ValueError(f"make_cutouts expects one image [1, 3, H, W], got {tuple(images.shape)}")
    if cutn < 1 or cut_size < 1:
        raise ValueError(f"cutn and cut_size must be >= 1, got {cutn}, {cut_size}")
    H, W = images.shape[-2:]
    dev = images.device
    max_side, min_side = min(H, W), min(H, W, cut_size)
    draws = torch.rand(cutn, 3, generator=generator, device=dev).tolist()  # side, x, y of each cut-out
    cuts = []
    for u_side, u_x, u_y in draws:
        side = int(u_side**cut_pow * (max_side - min_side) + min_side)
        x0, y0 = int(u_x * (W - side + 1)), int(u_y * (H - side + 1))
        cut = images[:, :, y0 : y0 + side, x0 : x0 + side]
        cuts.append(F.interpolate(cut, size=(cut_size, cut_size), mode="bilinear", align_corners=False,
                                  antialias=side > cut_size))
    batch = torch.cat(cuts)
    if augment:
        batch = augment_cutouts(batch, generator)
    if noise > 0:
        std = torch.rand(cutn, 1, 1, 1, generator=generator, device=dev) * noise
        batch = batch + std * torch.randn(batch.shape, generator=generator, device=dev, dtype=batch.dtype)
    return batch


# --------------------------------------------------------------------------------------
# The latent: where it starts, its range, what it shows
# --------------------------------------------------------------------------------------
def random_latent(tokenizer: MoVQ, grid_hw: tuple[int, int], generator: torch.Generator) -> Tensor:
    """The recipe's start: uniformly random codes, ``z [1, C·d, h, w]``."""
    q = tokenizer.quantizer
    dev = q.codebook.device
    tokens = torch.randint(0, q.codebook_size, (1, q.channels, *grid_hw), generator=generator, device=dev)
    return latent_from_tokens(tokenizer, tokens)


@torch.no_grad()
def latent_from_tokens(tokenizer: MoVQ, tokens: Tensor) -> Tensor:
    """Tokens ``int [1, C, h, w]`` (e.g. a prior's sample) → their codes as ``z [1, C·d, h, w]`` (fp32)."""
    return tokenizer.quantizer.lookup(tokens).float()


@torch.no_grad()
def latent_from_image(tokenizer: MoVQ, image: Tensor) -> Tensor:
    """An image ``[1, 3, H, W]`` in [-1, 1] (H, W multiples of the tokenizer's factor) → its latent before
    quantization, ``z [1, C·d, H/f, W/f]`` (fp32)."""
    return tokenizer.encode_latent(image).float()


def codebook_range(tokenizer: MoVQ) -> tuple[Tensor, Tensor]:
    """Per-component min and max of the codes (as the quantizer compares them), laid out like z:
    ``[1, C·d, 1, 1]`` each."""
    q = tokenizer.quantizer
    codes = q.codes().detach().float()  # [K, d]
    lo, hi = codes.min(0).values.repeat(q.channels), codes.max(0).values.repeat(q.channels)  # z's (c d) order
    return lo.view(1, -1, 1, 1), hi.view(1, -1, 1, 1)


def synthesize(tokenizer: MoVQ, z: Tensor) -> tuple[Tensor, Tensor]:
    """``z [1, C·d, h, w]`` → (image ``[1, 3, h·f, w·f]`` in [0, 1], differentiable in z through the straight-through
    quantizer; its tokens ``int64 [1, C, h, w]``)."""
    q = tokenizer.quantizer(z)
    image = tokenizer.decode(q.z_q).float()
    return clamp_with_grad(image.add(1).div(2), 0.0, 1.0), q.indices


@torch.no_grad()
def clip_similarity(clip: Clip, image: Tensor, text: Tensor) -> Tensor:
    """Cosine similarity of a whole image (``[1, 3, H, W]`` in [0, 1]; centre square, resized as CLIP's own
    preprocessing does) with each unit text embedding ``text [P, D]`` → ``[P]``, no cut-outs, no noise."""
    H, W = image.shape[-2:]
    side = min(H, W)
    top, left = (H - side) // 2, (W - side) // 2
    square = image[..., top : top + side, left : left + side]
    x = F.interpolate(square, size=(clip.image_size, clip.image_size), mode="bicubic", align_corners=False,
                      antialias=side > clip.image_size).clamp(0, 1)
    return (clip.encode_image(x) @ text.T)[0]


# --------------------------------------------------------------------------------------
# The optimisation
# --------------------------------------------------------------------------------------
@dataclass
class GuidanceResult:
    z: Tensor  # [1, C·d, h, w], the final latent
    tokens: Tensor  # int64 [1, C, h, w], its codes
    image: Tensor  # [1, 3, H, W] in [0, 1]: the tokens decoded
    losses: list[float]  # the loss of every step (on that step's random cut-outs)
    initial_similarity: list[float]  # per prompt, clip_similarity of the start image
    final_similarity: list[float]  # per prompt, of the final image
    frames: list[tuple[int, Tensor]] = field(default_factory=list)  # (steps taken, image [1, 3, H, W] in [0, 1])


def guide(
    tokenizer: MoVQ,
    clip: Clip,
    prompts: Sequence[Prompt],
    z0: Tensor,
    cfg: ClipGuidanceConfig,
    *,
    generator: torch.Generator,
    snapshot_every: int = 0,
    callback: Optional[Callable[[int, float], None]] = None,
) -> GuidanceResult:
    """Optimise ``z`` from ``z0 [1, C·d, h, w]`` for ``cfg.steps`` Adam steps (see the module docstring).

    ``tokenizer`` and ``clip`` are used frozen in eval mode (this sets both). ``frames`` holds the image after
    0, ``snapshot_every``, 2·``snapshot_every``, ... steps and after the last (none but the last when 0).
    ``callback(step, loss)`` is called after each step (a progress bar)."""
    if not prompts:
        raise ValueError("guide needs at least one prompt")
    if not any(p.weight for p in prompts):
        raise ValueError("every prompt has weight 0: nothing to guide towards")
    if cfg.steps < 0 or cfg.cutn < 1 or not cfg.lr > 0 or not cfg.cut_pow > 0 or cfg.noise < 0 or cfg.init_weight < 0:
        raise ValueError(f"bad guidance settings {cfg}: steps >= 0, cutn >= 1, lr > 0, cut_pow > 0, noise >= 0 and "
                         "init_weight >= 0 are needed")
    tokenizer.eval().requires_grad_(False)
    clip.eval().requires_grad_(False)
    text = clip.encode_text([p.text for p in prompts])  # [P, D]
    weights = torch.tensor([p.weight for p in prompts], device=text.device)
    z0 = z0.detach().float()
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=cfg.lr)
    lo, hi = codebook_range(tokenizer)
    lo, hi = lo.to(z.device), hi.to(z.device)

    image, _ = synthesize(tokenizer, z0)
    initial = clip_similarity(clip, image.detach(), text).tolist()
    frames = [(0, image.detach())] if snapshot_every else []
    losses: list[float] = []
    for step in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        image, _ = synthesize(tokenizer, z)
        if snapshot_every and step and step % snapshot_every == 0:
            frames.append((step, image.detach()))
        cutouts = make_cutouts(image, clip.image_size, cfg.cutn, cfg.cut_pow, generator=generator,
                               augment=cfg.augment, noise=cfg.noise)
        dist = spherical_distance(clip.encode_image(cutouts), text)  # [cutn, P]
        loss = (dist.mean(0) * weights).sum()
        if cfg.init_weight:
            loss = loss + cfg.init_weight * F.mse_loss(z, z0) / 2
        loss.backward()
        opt.step()
        if cfg.clamp:
            with torch.no_grad():
                z.copy_(torch.minimum(torch.maximum(z, lo), hi))
        losses.append(float(loss.detach()))
        if callback is not None:
            callback(step, losses[-1])
    with torch.no_grad():
        image, tokens = synthesize(tokenizer, z)
    if not frames or frames[-1][0] != cfg.steps:
        frames.append((cfg.steps, image))
    final = clip_similarity(clip, image, text).tolist()
    return GuidanceResult(z.detach(), tokens, image, losses, initial, final, frames)
