"""A judge of class-conditional samples of the shapes dataset: a small CNN classifier trained on
its real images, giving the class accuracy of samples and a diversity figure.

Why: FID on a few hundred CPU-sized samples says little, and the photo crops of the builtin
dataset cannot be judged by eye. On ``movq.data.shapes`` a sample of class "star" either shows a
star or it does not, and a classifier trained on real images (≈ 100% accurate on held-out real
images) says which; comparing the accuracy of samples with the accuracy on real images tells a
working prior from a broken one (the "classification accuracy score" idea of Ravuri & Vinyals
2019, used the other way round, as in the Inception score's classifier).

Accuracy alone rewards a prior that draws the same perfect star every time, hence the second
figure. **Diversity** = mean over classes of the mean pairwise distance between the judge's
features of the samples of that class, divided by the same quantity for real images of that class
(1 ≈ as varied as the data, → 0 = collapse onto one image per class; above 1 means more varied,
usually noisier, than the data). The features (:meth:`ShapeJudge.features`) are the last
convolutional stage average-pooled to 2 × 2 cells, L2-normalised: the classifier's penultimate
layer (its head averages those cells) kept at a coarse resolution so that position, size, colour
and background, which the class ignores, still separate two images. Distances are taken within a
class, so a prior that only draws the wrong classes cannot look diverse.

The judge looks at 16² (the input average-pooled 2× at the main job's 32², 4× at 64²) and trains with
flips, 90° turns, blur, smooth colour noise and pixel noise, so that a reconstruction's soft edges and
blotchy colours (what a tokenizer gives back, and so what any prior's samples look like at best) do not
cost it accuracy; the shape classes are invariant to all of these. Measured on the reconstructions of
a 600-step 32² tokenizer (shapes recipe 1): the first recipe (32² input, blur and pixel noise only) put 66% of them in
their class, this one 80%, while both are ≥ 99% right on real images. It is saved as safetensors with
its config in the metadata; loading unpickles nothing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from movq.data.shapes import _SHAPES_VERSION, SHAPE_CLASSES, render_shapes

logger = logging.getLogger(__name__)

_JUDGE_VERSION = 2  # part of the cache key of trained judges: bump it when the recipe changes
_POOL = 2  # the feature map is pooled to 2 × 2 cells (see the module docstring)
_COLOUR_NOISE_GRID = 4  # the smooth colour noise is drawn on a 4 × 4 grid and upsampled


@dataclass
class JudgeConfig:
    """The classifier and its training recipe."""

    image_size: int = 32  # the main job's image size
    classes: tuple[str, ...] = SHAPE_CLASSES
    # The input is average-pooled by this factor first: shapes stay recognisable at 16², the classifier
    # trains in half a CPU minute, and generator noise finer than that is ignored.
    downsample: int = 2
    widths: tuple[int, ...] = (16, 32, 64)  # one stage each, halving the size: 16² → 2²
    train_images: int = 4096  # the first images of the shapes dataset's train split
    steps: int = 600
    augment: bool = True  # flips, 90° turns, blur and noise (see the module docstring)
    max_blur: float = 2.4  # largest Gaussian blur sigma, in pixels of a 64² image (scaled with image_size)
    max_noise: float = 0.1  # largest std of the per-pixel noise (images in [-1, 1])
    # Largest std of a smooth colour error: noise on a 4 × 4 grid, bilinearly upsampled, per channel (the
    # blotchy colour shifts a tokenizer's reconstruction has, which a sample also has). 0 = off.
    max_colour_noise: float = 0.15
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0  # data seed of the shapes dataset (its train split) and of the training run

    def __post_init__(self) -> None:
        if self.downsample < 1 or self.image_size % self.downsample:
            raise ValueError(f"JudgeConfig: downsample must be >= 1 and divide image_size {self.image_size}")
        if self.image_size // self.downsample < 2 ** len(self.widths):
            raise ValueError(f"JudgeConfig: image_size {self.image_size} is too small for {len(self.widths)} halving stages")
        if not self.classes or not self.widths or min(self.widths) < 1:
            raise ValueError("JudgeConfig: classes and widths must be non-empty, widths positive")
        if self.train_images < 1 or self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("JudgeConfig: train_images, steps, batch_size and lr must be positive")

    def key(self) -> str:
        """A hash of everything that decides the trained weights (the cache key)."""
        spec = {**asdict(self), "version": _JUDGE_VERSION, "shapes_version": _SHAPES_VERSION}  # and the images
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


class ShapeJudge(nn.Module):
    """``forward(images [B, 3, S, S] in [-1, 1]) -> logits [B, classes]``: a VGG-style CNN, per width a
    stage of two 3×3 conv + BatchNorm + ReLU and a 2× max-pool, then the head on the mean of the
    2 × 2-pooled last stage (BatchNorm: it trains in a few hundred steps where GroupNorm took thousands)."""

    def __init__(self, config: Optional[JudgeConfig] = None):
        super().__init__()
        self.config = cfg = config or JudgeConfig()
        layers, cin = [], 3
        for width in cfg.widths:
            for i in range(2):
                layers += [nn.Conv2d(cin if i == 0 else width, width, 3, padding=1, bias=False),
                           nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(2))
            cin = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin, len(cfg.classes))

    @property
    def classes(self) -> tuple[str, ...]:
        return self.config.classes

    def _cells(self, x: Tensor) -> Tensor:
        s = self.config.image_size
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (s, s):
            raise ValueError(f"ShapeJudge: images must be [B, 3, {s}, {s}] (its training size), got {tuple(x.shape)}")
        if self.config.downsample > 1:
            x = F.avg_pool2d(x, self.config.downsample)
        return F.adaptive_avg_pool2d(self.body(x), _POOL)  # [B, F, 2, 2]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self._cells(x).mean((2, 3)))

    def features(self, x: Tensor) -> Tensor:
        """``[B, 4·F]``: the penultimate layer kept at 2 × 2 cells, L2-normalised."""
        return F.normalize(self._cells(x).flatten(1), dim=1)

    # ----------------------------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Safetensors with the config as JSON metadata, written through a temp file + rename."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(tmp), metadata={"config": json.dumps(asdict(self.config))})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], map_location: str = "cpu") -> ShapeJudge:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"judge weights {path} not found (train them with movq.evaluation.judge.train_judge)")
        try:
            with safe_open(str(path), framework="pt", device=map_location) as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
            raw = json.loads(meta["config"])
        except Exception as e:  # safetensors reports damage with its own error type
            raise ValueError(f"{path} is not a judge checkpoint (safetensors with a 'config' entry): {e}") from None
        cfg = JudgeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        judge = cls(cfg)
        missing, unexpected = judge.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path} does not match the judge: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return judge.eval()


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------
def as_judge_input(images: Union[Tensor, np.ndarray]) -> Tensor:
    """float32 ``[B, 3, H, W]`` in [-1, 1] from uint8 ``[B, H, W, 3]`` (or ``[B, 3, H, W]``), or from
    floats in [-1, 1] ``[B, 3, H, W]`` (clamped, as a decoder's output is)."""
    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise ValueError(f"images must be a batch [B, H, W, 3] or [B, 3, H, W], got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        if x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
        return x.float().div(127.5).sub(1.0)
    if not x.dtype.is_floating_point or x.shape[1] != 3:
        raise ValueError(f"images must be uint8, or floats [B, 3, H, W] in [-1, 1], got {x.dtype} {tuple(x.shape)}")
    return x.float().clamp(-1, 1)


@torch.no_grad()
def _batched(fn, x: Tensor, batch: int = 256) -> Tensor:
    return torch.cat([fn(x[i : i + batch]) for i in range(0, len(x), batch)]) if len(x) else fn(x)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
def _augment(x: Tensor, g: torch.Generator, cfg: JudgeConfig) -> Tensor:
    """Flips, 90° turns, a Gaussian blur of random width, smooth colour noise and pixel noise, per image."""
    b, s = x.shape[0], x.shape[-1]
    u = torch.rand(b, 6, generator=g)
    x = torch.where((u[:, 0] < 0.5)[:, None, None, None], x.flip(3), x)
    x = torch.where((u[:, 1] < 0.5)[:, None, None, None], x.flip(2), x)
    x = torch.where((u[:, 2] < 0.5)[:, None, None, None], x.transpose(2, 3), x)
    sigma = u[:, 3] * cfg.max_blur * s / 64  # [B]
    r = 3
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t[None] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)  # [B, 7]; σ → 0 is the identity kernel
    xb = x.reshape(1, b * 3, s, s)
    kk = k.repeat_interleave(3, 0)
    xb = F.conv2d(F.pad(xb, (r, r, 0, 0), mode="replicate"), kk[:, None, None, :], groups=b * 3)
    xb = F.conv2d(F.pad(xb, (0, 0, r, r), mode="replicate"), kk[:, None, :, None], groups=b * 3)
    x = xb.reshape(b, 3, s, s)
    if cfg.max_colour_noise > 0:
        coarse = torch.randn(b, 3, _COLOUR_NOISE_GRID, _COLOUR_NOISE_GRID, generator=g)
        smooth = F.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)
        x = x + smooth * (u[:, 5] * cfg.max_colour_noise)[:, None, None, None]
    noise = torch.randn(x.shape, generator=g) * (u[:, 4] * cfg.max_noise)[:, None, None, None]
    return (x + noise).clamp(-1, 1)


def train_judge(config: Optional[JudgeConfig] = None) -> tuple[ShapeJudge, dict]:
    """Train a judge on the first ``train_images`` images of the shapes train split (CPU: about a
    minute at the defaults). Returns ``(judge in eval mode, logs)``; ``logs`` holds the final
    training loss and accuracy."""
    cfg = config or JudgeConfig()
    g = torch.Generator().manual_seed(cfg.seed)
    images, labels = render_shapes(cfg.train_images, cfg.image_size, cfg.seed, "train")
    x_all = as_judge_input(images)  # [N, 3, S, S]
    y_all = torch.from_numpy(labels)
    torch.manual_seed(cfg.seed)  # the initial weights
    judge = ShapeJudge(cfg)
    opt = torch.optim.AdamW(judge.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.15)
    judge.train()
    losses, accs = [], []
    for _ in range(cfg.steps):
        idx = torch.randint(len(x_all), (cfg.batch_size,), generator=g)
        x, y = x_all[idx], y_all[idx]
        x = _augment(x, g, cfg) if cfg.augment else x
        logits = judge(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        accs.append((logits.argmax(1) == y).float().mean().item())
    tail = max(1, cfg.steps // 10)
    logs = {"train_loss": float(np.mean(losses[-tail:])), "train_accuracy": float(np.mean(accs[-tail:]))}
    return judge.eval(), logs


def pretrained_judge(cache: Union[str, os.PathLike], config: Optional[JudgeConfig] = None) -> ShapeJudge:
    """The judge of ``config`` from ``cache/judge-<key>.safetensors``, trained and saved there first
    if missing (the key hashes the config, so another recipe never loads stale weights)."""
    cfg = config or JudgeConfig()
    path = Path(cache) / f"judge-{cfg.image_size}px-{cfg.key()}.safetensors"
    if path.is_file():
        return ShapeJudge.load(path)
    logger.info("training the shapes judge (%d steps) into %s", cfg.steps, path)
    judge, logs = train_judge(cfg)
    judge.save(path)
    logger.info("judge trained: %s", logs)
    return judge


# --------------------------------------------------------------------------------------
# Judging
# --------------------------------------------------------------------------------------
@torch.no_grad()
def predict(judge: ShapeJudge, images) -> Tensor:
    """Predicted class indices ``int64 [B]``."""
    judge.eval()
    return _batched(lambda x: judge(x).argmax(1), as_judge_input(images))


def _labels(labels, n: int) -> Tensor:
    y = torch.as_tensor(labels).long().flatten()
    if y.shape[0] != n:
        raise ValueError(f"{n} images but {y.shape[0]} labels")
    return y


def class_accuracy(judge: ShapeJudge, images, labels) -> float:
    """Fraction of images the judge puts in their intended class."""
    x = as_judge_input(images)
    y = _labels(labels, len(x))
    if len(x) == 0:
        raise ValueError("class_accuracy: no images")
    return float((predict(judge, x) == y).float().mean())


@torch.no_grad()
def feature_spread(judge: ShapeJudge, images, labels) -> dict[int, float]:
    """Per class (with ≥ 2 images): the mean pairwise L2 distance of the judge's features."""
    judge.eval()
    x = as_judge_input(images)
    y = _labels(labels, len(x))
    f = _batched(judge.features, x)
    out = {}
    for c in torch.unique(y).tolist():
        fc = f[y == c]
        n = len(fc)
        if n >= 2:
            out[int(c)] = float(torch.cdist(fc, fc).sum() / (n * (n - 1)))
    return out


def diversity(judge: ShapeJudge, images, labels, real_images, real_labels) -> float:
    """Mean over classes of (within-class feature spread of the samples) / (that of real images):
    see the module docstring. Classes with fewer than 2 samples or real images are left out."""
    fake, real = feature_spread(judge, images, labels), feature_spread(judge, real_images, real_labels)
    common = sorted(set(fake) & set(real))
    if not common:
        raise ValueError("diversity: no class has at least 2 samples and 2 real images")
    return float(np.mean([fake[c] / max(real[c], 1e-12) for c in common]))


def real_reference(config: Optional[JudgeConfig] = None, n: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """``n`` held-out real images (the shapes val split) at the judge's size, and their labels."""
    cfg = config or JudgeConfig()
    return render_shapes(n, cfg.image_size, cfg.seed, "val")


def judge_samples(judge: ShapeJudge, images, labels, real: Optional[tuple] = None) -> dict:
    """``{accuracy, real_accuracy, relative_accuracy, diversity, per_class}`` of samples meant to be
    of class ``labels``; ``real`` = (images, labels) of held-out real images (default: 512 of the
    val split)."""
    real_x, real_y = real if real is not None else real_reference(judge.config)
    x, y = as_judge_input(images), _labels(labels, len(images))
    pred = predict(judge, x)
    acc = float((pred == y).float().mean())
    real_acc = class_accuracy(judge, real_x, real_y)
    per_class = {judge.classes[c]: float((pred[y == c] == c).float().mean()) for c in torch.unique(y).tolist()}
    return {"accuracy": acc, "real_accuracy": real_acc, "relative_accuracy": acc / max(real_acc, 1e-12),
            "diversity": diversity(judge, x, y, real_x, real_y), "per_class": per_class}


__all__ = [
    "JudgeConfig", "ShapeJudge", "train_judge", "pretrained_judge", "predict", "class_accuracy",
    "feature_spread", "diversity", "judge_samples", "real_reference", "as_judge_input",
]
