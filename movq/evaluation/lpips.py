"""LPIPS perceptual distance (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric", CVPR 2018; reference code: github.com/richzhang/PerceptualSimilarity), VGG16
trunk with the v0.1 linear heads, written in plain torch so that torchvision is not needed.

Two weight files, loaded from disk only (nothing is downloaded):

* the torchvision ImageNet VGG16 state dict ``vgg16-397923af.pth`` (keys ``features.{i}.weight``,
  ``features.{i}.bias`` for the 13 convolutions; ``classifier.*`` is ignored),
* the LPIPS v0.1 linear heads ``vgg.pth`` (keys ``lin{k}.model.1.weight``, shapes [1, C_k, 1, 1]).

Both are read with ``torch.load(weights_only=True)`` (or safetensors), so nothing but tensors is
ever unpickled. The module is frozen (no trainable parameters, always in eval mode) but stays
differentiable with respect to its inputs: it is a training loss.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from movq import utils
from movq.utils import read_state_dict

logger = logging.getLogger(__name__)

VGG_FILENAME = "vgg16-397923af.pth"
LIN_FILENAME = "vgg.pth"
VGG_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"

# VGG16 "D" configuration as laid out in torchvision's `features` Sequential: a number is a 3x3
# conv (+ ReLU), "M" a 2x2 max-pool. Indices of the modules, and so the state-dict keys, follow.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices (in `features`) of the ReLUs whose outputs LPIPS compares: relu1_2, relu2_2, relu3_3,
# relu4_3, relu5_3. Everything after index 29 (the last pool, the classifier) is unused.
_TAPS = (3, 8, 15, 22, 29)
_TAP_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS' ScalingLayer: maps [-1, 1] inputs to ImageNet-normalised ones, (x - shift) / scale.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_NORM_EPS = 1e-10  # LPIPS' eps in x / (||x|| + eps)
_MIN_SIZE = 16  # four 2x2 pools precede relu5_3


def _build_vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    in_ch = 3
    for item in _VGG16_CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers.append(nn.Conv2d(in_ch, item, kernel_size=3, padding=1))
            layers.append(nn.ReLU())  # not in-place: tapped outputs must survive the next layer
            in_ch = item
    return nn.Sequential(*layers)  # 30 modules, indices 0..29 as in torchvision


class _LinHead(nn.Module):
    """A 1x1 conv C → 1 without bias; index 0 is LPIPS' dropout slot (a no-op at inference),
    kept so the state-dict key is ``model.1.weight`` as in the released file."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _check_keys(
    path: Path, what: str, found: dict[str, torch.Tensor], expected: dict[str, torch.Size],
    ignore_prefixes: tuple[str, ...] = (),
) -> None:
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(
        k for k in found if k not in expected and not k.startswith(ignore_prefixes)
    )
    wrong = sorted(
        f"{k}: file has {list(found[k].shape)}, expected {list(s)}"
        for k, s in expected.items()
        if k in found and found[k].shape != s
    )
    if missing or unexpected or wrong:
        parts = [f"{path} is not a valid {what} file:"]
        if missing:
            parts.append(f"  missing keys: {missing}")
        if unexpected:
            parts.append(f"  unexpected keys: {unexpected}")
        if wrong:
            parts.append("  wrong shapes: " + "; ".join(wrong))
        raise ValueError("\n".join(parts))


class LPIPS(nn.Module):
    """LPIPS v0.1 (VGG16). ``forward(x, y)``: x, y [B, 3, H, W] in [-1, 1], H, W ≥ 16 → [B].

    ``LPIPS(vgg_path, lin_path)`` loads the two files named; ``LPIPS.from_pretrained()`` finds
    them in a cache directory.
    """

    def __init__(self, vgg_path: Union[str, os.PathLike], lin_path: Union[str, os.PathLike]):
        super().__init__()
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.features = _build_vgg16_features()
        self.lins = nn.ModuleList(_LinHead(c) for c in _TAP_CHANNELS)
        self._load(Path(vgg_path), Path(lin_path))
        self.requires_grad_(False)
        self.eval()

    def _load(self, vgg_path: Path, lin_path: Path) -> None:
        # Keys are checked against the released layouts (``features.{i}.*``,
        # ``lin{k}.model.1.weight``), not our own module names (``lins.{k}...``).
        for path, name, url in ((vgg_path, VGG_FILENAME, VGG_URL), (lin_path, LIN_FILENAME, LIN_URL)):
            if not path.is_file():
                raise FileNotFoundError(_missing_message(name, [path], url))
        vgg = read_state_dict(vgg_path)
        expected = {f"features.{k}": v.shape for k, v in self.features.state_dict().items()}
        _check_keys(vgg_path, "torchvision VGG16", vgg, expected, ignore_prefixes=("classifier.",))
        self.features.load_state_dict({k[len("features."):]: vgg[k] for k in expected})

        lin = read_state_dict(lin_path)
        expected = {
            f"lin{i}.model.1.weight": head.model[1].weight.shape for i, head in enumerate(self.lins)
        }
        _check_keys(lin_path, "LPIPS v0.1 vgg linear-head", lin, expected)
        for i, head in enumerate(self.lins):
            head.model[1].weight.data.copy_(lin[f"lin{i}.model.1.weight"])

    @classmethod
    def from_pretrained(
        cls,
        vgg_path: Optional[Union[str, os.PathLike]] = None,
        lin_path: Optional[Union[str, os.PathLike]] = None,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
    ) -> LPIPS:
        """Resolve each file: the explicit path if given (no fallback), else ``cache_dir``, else
        ``$MOVQ_CACHE_DIR``, else ``~/.cache/movq``, under its standard name; the VGG file is
        also looked for in torch hub's cache and the heads in an installed ``lpips`` package."""
        return cls(
            _resolve(vgg_path, VGG_FILENAME, VGG_URL, cache_dir, _torch_hub_dir()),
            _resolve(lin_path, LIN_FILENAME, LIN_URL, cache_dir, _lpips_package_dir()),
        )

    def train(self, mode: bool = True) -> LPIPS:
        # Frozen metric: a parent's .train() must not change it (it has no dropout/BN, but a
        # stand-in for the released dropout slot must never switch on).
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"LPIPS expects two images [B, 3, H, W] of the same shape, got {tuple(x.shape)} "
                f"and {tuple(y.shape)}"
            )
        B, _, H, W = x.shape
        if min(H, W) < _MIN_SIZE:
            raise ValueError(f"LPIPS (VGG16) needs images of at least {_MIN_SIZE}x{_MIN_SIZE}, got {H}x{W}")
        h = (torch.cat([x, y]) - self.shift.to(x.dtype)) / self.scale.to(x.dtype)  # [2B, 3, H, W]
        total = x.new_zeros(B, dtype=torch.float32)
        layer = 0
        for i, module in enumerate(self.features):
            h = module(h)
            if i != _TAPS[layer]:
                continue
            # Distances in fp32 whatever autocast chose for the trunk: the unit-normalisation
            # divides by a norm that can be tiny.
            with torch.autocast(device_type=h.device.type, enabled=False):
                f = _unit_normalize(h.float())  # [2B, C, h, w]
                diff = (f[:B] - f[B:]).square()  # [B, C, h, w]
                total = total + self.lins[layer](diff).mean(dim=(1, 2, 3))  # [B]
            layer += 1
            if layer == len(_TAPS):
                break
        return total


def _unit_normalize(f: torch.Tensor) -> torch.Tensor:
    """f / (||f||_channels + eps). The clamp keeps sqrt's gradient finite where a whole feature
    vector is zero (common after ReLU); it does not change the value anywhere else."""
    norm = f.square().sum(dim=1, keepdim=True).clamp_min(_NORM_EPS**2).sqrt()
    return f / (norm + _NORM_EPS)


def _torch_hub_dir() -> Path:
    torch_home = os.environ.get("TORCH_HOME")
    base = Path(torch_home) if torch_home else Path.home() / ".cache" / "torch"
    return base / "hub" / "checkpoints"


def _lpips_package_dir() -> Optional[Path]:
    try:
        spec = importlib.util.find_spec("lpips")  # located, not imported (it imports torchvision)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "weights" / "v0.1"


def _resolve(
    explicit: Optional[Union[str, os.PathLike]], name: str, url: str,
    cache_dir: Optional[Union[str, os.PathLike]], extra_dir: Optional[Path],
) -> Path:
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise FileNotFoundError(_missing_message(name, [path], url))
        return path
    candidates = [utils.cache_dir(cache_dir) / name]
    if extra_dir is not None:
        candidates.append(extra_dir / name)
    for path in candidates:
        if path.is_file():
            logger.info("LPIPS: using %s", path)
            return path
    raise FileNotFoundError(_missing_message(name, candidates, url))


def _missing_message(name: str, looked: list[Path], url: str) -> str:
    where = "\n".join(f"  {p}" for p in looked)
    return (
        f"LPIPS weight file '{name}' not found. Looked for:\n{where}\n"
        f"Nothing is downloaded at run time. Get it from {url}\n"
        f"and put it in {utils.cache_dir()} (or set ${utils.CACHE_ENV}, or give its path in the config: "
        "loss.lpips_vgg_path / loss.lpips_lin_path). To train without the perceptual term, set "
        "loss.perceptual_weight=0."
    )
