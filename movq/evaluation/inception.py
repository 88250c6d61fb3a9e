"""The Inception-v3 feature extractor that FID is defined with, in plain torch.

Reference: Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
Nash Equilibrium" (FID), computed on the pool features of the TensorFlow graph
``inception-2015-12-05``. This module follows the PyTorch port of that graph used by
torch-fidelity (and torchmetrics): same layer names, so the same weights file
``weights-inception-2015-12-05-6726825d.pth`` loads; the same quirks of the TF graph (average
pools that ignore padding, a max pool in the last block, BatchNorm eps 1e-3); and torch-fidelity's
preprocessing (uint8 input, TF1's bilinear resize to 299×299 without half-pixel centers, then
``(x - 128) / 128``). Output: the 2048-d global-average-pooled features of ``Mixed_7c``; with
:meth:`FIDInceptionV3.all_features` also what ADM's evaluator (Dhariwal & Nichol 2021,
guided-diffusion ``evaluations/evaluator.py``) reads from the same pass: the spatial features of sFID
(the first 7 channels of ``mixed_6/conv``, the 1×1 branch of ``Mixed_6d``, 17×17, flattened in TF's
NHWC order: 2023 values) and the logits of the Inception Score (the pool features times the softmax
weights, without the bias: ADM's ``softmax/logits/MatMul``, torch-fidelity's ``logits_unbiased``).
FIDs therefore equal torch-fidelity's, and torchmetrics' with ``antialias=False`` (its default
antialiased resize, and pytorch-fid's ``F.interpolate`` resize, differ by about one grey level
on 256² inputs: their FIDs are close but not identical).

Nothing is downloaded. The weights file is found by :func:`resolve_weights_path`; a missing or
altered file raises :class:`InceptionWeightsError` saying where it looked and how to get it.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from movq.utils import CACHE_ENV, cache_dir, read_state_dict, sha256_file

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
# pytorch-fid publishes the same port under another name; torch.hub's naming convention puts the
# first 8 hex digits of the file's sha256 in the name, and both names carry the same 8.
ALT_WEIGHTS_NAMES = ("pt_inception-2015-12-05-6726825d.pth",)
SHA256_PREFIX = "6726825d"
WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
ENV_WEIGHTS = "MOVQ_INCEPTION_WEIGHTS"

INPUT_SIZE = 299
NUM_FEATURES = 2048
NUM_CLASSES = 1008  # the TF graph's softmax has 1008 outputs (1000 classes + unused slots)
BN_EPS = 1e-3  # TF's batchnorm epsilon, not torch's 1e-5
SPATIAL_CHANNELS = 7  # sFID keeps the first 7 of mixed_6/conv's 192 channels (ADM: spatial[..., :7])
SPATIAL_SIZE = 17  # mixed_6/conv is 17×17
NUM_SPATIAL_FEATURES = SPATIAL_CHANNELS * SPATIAL_SIZE * SPATIAL_SIZE  # 2023


class InceptionFeatures(NamedTuple):
    """One Inception pass: what FID, sFID, precision / recall and the Inception Score read."""

    pool: Tensor  # [B, 2048] pool_3: FID, precision / recall
    spatial: Tensor  # [B, 2023] mixed_6/conv[..., :7] flattened (h, w, c): sFID
    logits: Tensor  # [B, 1008] pool_3 @ softmax weights, no bias: Inception Score


class InceptionWeightsError(RuntimeError):
    """The Inception weights file is missing, altered, or does not fit the network."""


# --------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------
def _tf1_source_coords(in_size: int, out_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Sample positions of TF1's ``resize_bilinear(align_corners=False)``.

    TF1 maps output pixel ``i`` to input coordinate ``i * in/out`` (no half-pixel offset, unlike
    ``F.interpolate``), so the last rows are clamped rather than symmetric. The scale is rounded
    to float32 before the multiply, as in the graph, so the fractions match it bit for bit.
    Returns (lo [out] int64, hi [out] int64, frac [out] float32).
    """
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    pos = torch.arange(out_size, dtype=torch.float32, device=device) * scale.to(device)
    lo = pos.long()  # pos >= 0, so truncation is floor
    hi = (lo + 1).clamp_max(in_size - 1)
    frac = pos - lo.float()
    return lo, hi, frac


def resize_bilinear_tf1(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize as TensorFlow 1.x ``tf.image.resize_bilinear(align_corners=False)``.

    x: float [B, C, H, W] -> [B, C, size[0], size[1]]. Interpolates along width first, then
    height, each as ``a + (b - a) * t``; that order is what makes it match the reference exactly
    in float32.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"resize_bilinear_tf1 expects a float [B, C, H, W] tensor, got {x.dtype} {tuple(x.shape)}")
    out_h, out_w = size
    y_lo, y_hi, dy = _tf1_source_coords(x.shape[2], out_h, x.device)
    x_lo, x_hi, dx = _tf1_source_coords(x.shape[3], out_w, x.device)
    dx = dx.to(x.dtype).view(1, 1, 1, out_w)
    dy = dy.to(x.dtype).view(1, 1, out_h, 1)

    def along_width(rows: Tensor) -> Tensor:  # [B, C, out_h, W] -> [B, C, out_h, out_w]
        left = rows.index_select(3, x_lo)
        return left + (rows.index_select(3, x_hi) - left) * dx

    top = along_width(x.index_select(2, y_lo))
    bottom = along_width(x.index_select(2, y_hi))
    return top + (bottom - top) * dy


def preprocess(images: Union[Tensor, Sequence[Tensor]]) -> Tensor:
    """uint8 [B, 3, H, W], or a sequence of uint8 [3, H_i, W_i] of mixed sizes -> float32
    [B, 3, 299, 299] in [-1, 1), as the TF graph's input ops. Each image is resized on its own,
    so batching images of different sizes together changes nothing."""
    if not isinstance(images, Tensor):
        return torch.cat([preprocess(img.unsqueeze(0)) for img in images])
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"Inception expects uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}"
        )
    x = resize_bilinear_tf1(images.float(), (INPUT_SIZE, INPUT_SIZE))
    return (x - 128) / 128  # the graph multiplies by 1/128 = 0.0078125; dividing is bit-identical


# --------------------------------------------------------------------------------------
# Network. Attribute names are the state-dict keys of the standard weights file.
# --------------------------------------------------------------------------------------
class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU: TF's ``conv2d_params`` + ``batchnorm``."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: Tensor) -> Tensor:
    # TF averages only over the valid (unpadded) pixels at the borders.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class Block35(nn.Module):
    """``Mixed_5b/c/d`` at 35×35: 1x1 | 1x1→5x5 | 1x1→3x3→3x3 | avgpool→1x1. Out: 224 + pool_ch."""

    def __init__(self, cin: int, pool_ch: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([a, b, c, d], dim=1)


class Reduce35(nn.Module):
    """``Mixed_6a``: 35×35 -> 17×17. 3x3/2 | 1x1→3x3→3x3/2 | maxpool/2. Out: 480 + cin."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], dim=1)


class Block17(nn.Module):
    """``Mixed_6b..e`` at 17×17 with factorized 7×7 convs (width ``mid``). Out: 768."""

    def __init__(self, cin: int, mid: int):
        super().__init__()
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, mid, 1)
        self.branch7x7_2 = ConvBN(mid, mid, **row)
        self.branch7x7_3 = ConvBN(mid, 192, **col)
        self.branch7x7dbl_1 = ConvBN(cin, mid, 1)
        self.branch7x7dbl_2 = ConvBN(mid, mid, **col)
        self.branch7x7dbl_3 = ConvBN(mid, mid, **row)
        self.branch7x7dbl_4 = ConvBN(mid, mid, **col)
        self.branch7x7dbl_5 = ConvBN(mid, 192, **row)
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = layer(c)
        d = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([a, b, c, d], dim=1)


class Reduce17(nn.Module):
    """``Mixed_7a``: 17×17 -> 8×8. 1x1→3x3/2 | 1x1→1x7→7x1→3x3/2 | maxpool/2. Out: 512 + cin."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b = layer(b)
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], dim=1)


class Block8(nn.Module):
    """``Mixed_7b/c`` at 8×8 with split 1×3 / 3×1 heads. Out: 2048.

    pool: "avg" for ``Mixed_7b``; "max" for ``Mixed_7c``, where the 2015 TF graph uses a max pool
    (the paper says average; FID is defined by the graph).
    """

    def __init__(self, cin: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], dim=1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], dim=1)
        if self.pool == "avg":
            p = _avg_pool_3x3(x)
        else:
            p = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        d = self.branch_pool(p)
        return torch.cat([a, b, c, d], dim=1)


@contextlib.contextmanager
def _fp32_convs(device: torch.device):
    """Full-fp32 convolutions: TF32 (cuDNN's default on Ampere+) moves features by ~1e-3."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


class FIDInceptionV3(nn.Module):
    """uint8 images [B, 3, H, W] (any H, W; or a list of mixed sizes) -> pool features [B, 2048].

    Build with :meth:`from_pretrained` (checks the file); a bare constructor gives random weights.
    ``num_features`` is read by torchmetrics' ``FrechetInceptionDistance(feature=...)``.
    """

    num_features = NUM_FEATURES

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = Block35(192, pool_ch=32)
        self.Mixed_5c = Block35(256, pool_ch=64)
        self.Mixed_5d = Block35(288, pool_ch=64)
        self.Mixed_6a = Reduce35(288)
        self.Mixed_6b = Block17(768, mid=128)
        self.Mixed_6c = Block17(768, mid=160)
        self.Mixed_6d = Block17(768, mid=160)
        self.Mixed_6e = Block17(768, mid=192)
        self.Mixed_7a = Reduce17(768)
        self.Mixed_7b = Block8(1280, pool="avg")
        self.Mixed_7c = Block8(2048, pool="max")
        # The softmax layer: its weights give the Inception Score's logits (all_features); FID does not use it.
        self.fc = nn.Linear(NUM_FEATURES, NUM_CLASSES)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FIDInceptionV3:
        # BatchNorm must always use the stored TF statistics, whatever a caller's .train() says.
        return super().train(False)

    def features(self, x: Tensor, spatial: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """Preprocessed float [B, 3, 299, 299] -> [B, 2048], or with ``spatial`` (pool [B, 2048],
        spatial [B, 2023])."""
        x = self.Conv2d_1a_3x3(x)  # [B, 32, 149, 149]
        x = self.Conv2d_2a_3x3(x)  # [B, 32, 147, 147]
        x = self.Conv2d_2b_3x3(x)  # [B, 64, 147, 147]
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [B, 64, 73, 73]
        x = self.Conv2d_3b_1x1(x)  # [B, 80, 73, 73]
        x = self.Conv2d_4a_3x3(x)  # [B, 192, 71, 71]
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [B, 192, 35, 35]
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d):
            x = block(x)  # [B, 256 | 288 | 288, 35, 35]
        x = self.Mixed_6a(x)  # [B, 768, 17, 17]
        x = self.Mixed_6c(self.Mixed_6b(x))  # [B, 768, 17, 17]
        if spatial:  # TF's mixed_6/conv: Mixed_6d's 1x1 branch (conv, BN, ReLU), as Mixed_6d computes it
            s = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS]  # [B, 7, 17, 17]
            s = s.permute(0, 2, 3, 1).flatten(1)  # [B, 2023] in TF's (h, w, c) order
        x = self.Mixed_6e(self.Mixed_6d(x))  # [B, 768, 17, 17]
        x = self.Mixed_7a(x)  # [B, 1280, 8, 8]
        x = self.Mixed_7b(x)  # [B, 2048, 8, 8]
        x = self.Mixed_7c(x)  # [B, 2048, 8, 8]
        pool = x.mean(dim=(2, 3))  # [B, 2048]
        return (pool, s) if spatial else pool

    @torch.no_grad()
    def forward(self, images: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        """images: uint8 [B, 3, H, W], or a sequence of uint8 [3, H_i, W_i] -> [B, 2048]."""
        device = self.Conv2d_1a_3x3.conv.weight.device
        images = images.to(device) if isinstance(images, Tensor) else [img.to(device) for img in images]
        with torch.autocast(device.type, enabled=False), _fp32_convs(device):
            return self.features(preprocess(images)).float()

    @torch.no_grad()
    def all_features(self, images: Union[Tensor, Sequence[Tensor]]) -> InceptionFeatures:
        """Like ``forward``, plus the spatial features (sFID) and the unbiased logits (IS) of the same pass;
        ``pool`` equals ``forward(images)``."""
        device = self.Conv2d_1a_3x3.conv.weight.device
        images = images.to(device) if isinstance(images, Tensor) else [img.to(device) for img in images]
        with torch.autocast(device.type, enabled=False), _fp32_convs(device):
            pool, spatial = self.features(preprocess(images), spatial=True)
            logits = F.linear(pool, self.fc.weight)  # ADM's softmax/logits/MatMul: no bias
        return InceptionFeatures(pool.float(), spatial.float(), logits.float())

    @classmethod
    def from_pretrained(
        cls, path: Union[str, Path, None] = None, *, verify: bool = True, device: Union[str, torch.device] = "cpu"
    ) -> FIDInceptionV3:
        """Load the standard weights file (see :func:`resolve_weights_path` for the search order).

        verify: check the sha256 prefix; pass False only for stand-in files (tests), whose FIDs
        are not comparable with anyone's. Key names and shapes are checked either way.
        """
        state = load_state_dict(resolve_weights_path(path), verify=verify)
        with torch.device("meta"):  # skip the random init of 24M parameters about to be replaced
            model = cls()
        model.load_state_dict(state, strict=False, assign=True)  # keys already checked above
        for name, buf in model.named_buffers():
            if buf.is_meta:  # num_batches_tracked, absent from the file and unused in eval
                model.get_submodule(name.rpartition(".")[0]).register_buffer(
                    name.rpartition(".")[2], torch.zeros((), dtype=torch.long)
                )
        return model.to(device)


# --------------------------------------------------------------------------------------
# Weights file
# --------------------------------------------------------------------------------------
def _how_to_get() -> str:
    return (
        f"get it (once) from {WEIGHTS_URL} and pass --inception-weights PATH, set {ENV_WEIGHTS}=PATH, "
        f"or put it in ${CACHE_ENV} (default ~/.cache/movq)"
    )


def _candidate_paths() -> list[Path]:
    names = (WEIGHTS_NAME, *ALT_WEIGHTS_NAMES)
    dirs = [cache_dir()]
    # torch-fidelity / torchmetrics download into torch.hub's cache; reuse it if it is there.
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    return [d / n for d in dirs for n in names]


def resolve_weights_path(path: Union[str, Path, None] = None) -> Path:
    """Find the weights file: ``path``, else $MOVQ_INCEPTION_WEIGHTS, else the standard name in
    $MOVQ_CACHE_DIR (default ~/.cache/movq), else in torch.hub's checkpoint cache."""
    if path is None and os.environ.get(ENV_WEIGHTS):
        path = os.environ[ENV_WEIGHTS]
        source = f"${ENV_WEIGHTS}"
    else:
        source = "--inception-weights"
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InceptionWeightsError(f"Inception weights {p} (from {source}) not found; {_how_to_get()}")
        return p
    candidates = _candidate_paths()
    for p in candidates:
        if p.is_file():
            return p
    looked = ", ".join(str(p.parent) for p in candidates[:: 1 + len(ALT_WEIGHTS_NAMES)])
    raise InceptionWeightsError(
        f"Inception weights {WEIGHTS_NAME} (sha256 {SHA256_PREFIX}...) not found in {looked}; {_how_to_get()}"
    )


def load_state_dict(path: Union[str, Path], *, verify: bool = True) -> dict[str, Tensor]:
    """Read a weights file and check its keys and shapes against the network (never unpickles code).

    BatchNorm's ``num_batches_tracked`` is optional: the converted TF weights do not carry it.
    """
    path = Path(path)
    if verify:
        digest = sha256_file(path)
        if not digest.startswith(SHA256_PREFIX):
            raise InceptionWeightsError(
                f"Inception weights {path} have sha256 {digest[:16]}..., expected {SHA256_PREFIX}... "
                f"(a different or damaged file); {_how_to_get()}"
            )
    try:
        state = read_state_dict(path)
    except ValueError as e:
        raise InceptionWeightsError(f"Inception weights: {e}") from None
    with torch.device("meta"):
        expected = FIDInceptionV3().state_dict()
    required = {k for k in expected if not k.endswith("num_batches_tracked")}
    missing = sorted(required - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        raise InceptionWeightsError(f"Inception weights {path} do not fit the FID network: {'; '.join(parts)}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise InceptionWeightsError(
                f"Inception weights {path}: {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
            )
    return state


def standin_state_dict(seed: int = 0) -> dict[str, Tensor]:
    """Random weights with the standard key names and shapes, for tests and smoke runs.

    He-scaled convs and BatchNorm statistics near identity keep activations O(1) through all
    94 layers, so features are informative enough to compare implementations.
    """
    gen = torch.Generator().manual_seed(seed)
    state = {}
    with torch.device("meta"):
        reference = FIDInceptionV3().state_dict()
    for key, ref in reference.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("conv.weight"):
            fan_in = ref[0].numel()
            value = torch.randn(ref.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif key.endswith("running_var"):
            value = 0.5 + torch.rand(ref.shape, generator=gen)
        elif key.endswith("bn.weight"):
            value = 0.8 + 0.4 * torch.rand(ref.shape, generator=gen)
        elif key.endswith("running_mean") or key.endswith("bias"):
            value = 0.1 * torch.randn(ref.shape, generator=gen)
        else:  # fc.weight
            value = 0.01 * torch.randn(ref.shape, generator=gen)
        state[key] = value
    return state
