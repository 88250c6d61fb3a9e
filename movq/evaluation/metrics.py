"""Reconstruction metrics of an image tokenizer: PSNR, SSIM, LPIPS, codebook usage, perplexity.

These are the numbers tokenizer papers report beside rFID (VQGAN, Esser et al. 2021; MoVQ,
Zheng et al. 2022; ViT-VQGAN, Yu et al. 2022): PSNR and SSIM averaged per image on images mapped
to [0, 1] (SSIM with torchmetrics' 11×11 Gaussian window, sigma 1.5), LPIPS averaged per image,
the fraction of the K codes used at least once, and the perplexity ``exp(H)`` of the code
histogram over every token seen.

Everything is kept as sums and counts in float64/int64 tensors (``state``), so ranks combine by
summing: call :meth:`TokenizerMetrics.all_reduce_` (or ``merge`` two objects) before ``compute``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Optional, Union

import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from movq.models.quantizer import code_perplexity
from movq.utils import is_distributed

# Identical images have infinite PSNR; capping keeps the mean finite and says "lossless".
PSNR_CAP_DB = 100.0

# torchmetrics' SSIM pads its 11×11 window by reflection, 5 pixels a side: images need more than that.
SSIM_MIN_SIZE = 6
_SUM_KEYS = ("num_images", "psnr_sum", "ssim_sum", "lpips_sum", "lpips_count")


class TokenizerMetrics:
    """Accumulates reconstruction metrics over batches (and ranks).

    codebook_size: K, the number of codes the indices refer to.
    lpips: a callable ``(x, y) -> [B]`` on images in [-1, 1] (``movq.lpips.LPIPS``), or None to
        leave LPIPS out of the results.
    """

    def __init__(
        self,
        codebook_size: int,
        lpips: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        device: Union[str, torch.device] = "cpu",
    ):
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        self.codebook_size = codebook_size
        self.lpips = lpips
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        f64 = dict(dtype=torch.float64, device=self.device)
        self.state: dict[str, Tensor] = {k: torch.zeros((), **f64) for k in _SUM_KEYS}
        self.state["code_counts"] = torch.zeros(self.codebook_size, dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def update(self, x: Tensor, x_rec: Tensor, indices: Tensor) -> None:
        """x, x_rec: float [B, 3, H, W] in [-1, 1] (values outside are clamped); indices: int [B, ...]."""
        if x.shape != x_rec.shape or x.dim() != 4:
            raise ValueError(f"x and x_rec must both be [B, C, H, W], got {tuple(x.shape)} and {tuple(x_rec.shape)}")
        if indices.shape[0] != x.shape[0]:
            raise ValueError(f"indices batch {indices.shape[0]} != image batch {x.shape[0]}")
        flat = indices.reshape(-1).to(device=self.device, dtype=torch.int64)
        if flat.numel() and (flat.min() < 0 or flat.max() >= self.codebook_size):
            raise ValueError(
                f"indices must lie in [0, {self.codebook_size}), got range [{int(flat.min())}, {int(flat.max())}]"
            )
        x = x.detach().float().clamp(-1, 1)
        x_rec = x_rec.detach().float().clamp(-1, 1)
        target, preds = (x + 1) / 2, (x_rec + 1) / 2  # [B, C, H, W] in [0, 1]

        psnr = peak_signal_noise_ratio(preds, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
        psnr = psnr.nan_to_num(posinf=PSNR_CAP_DB).clamp_max(PSNR_CAP_DB)  # [B]
        ssim = structural_similarity_index_measure(preds, target, data_range=1.0, reduction="none")  # [B]
        s = self.state
        s["num_images"] += x.shape[0]
        s["psnr_sum"] += psnr.double().sum().to(self.device)
        s["ssim_sum"] += ssim.double().sum().to(self.device)
        if self.lpips is not None:
            dist = self.lpips(x_rec, x).reshape(-1)  # [B]
            s["lpips_sum"] += dist.double().sum().to(self.device)
            s["lpips_count"] += dist.numel()
        s["code_counts"] += torch.bincount(flat, minlength=self.codebook_size)

    def all_reduce_(self) -> TokenizerMetrics:
        """Sum the state over all ranks of the initialized process group (no-op without one)."""
        if is_distributed():
            for v in self.state.values():
                torch.distributed.all_reduce(v, op=torch.distributed.ReduceOp.SUM)
        return self

    def compute(self) -> dict[str, Optional[float]]:
        """Means over everything seen: psnr (dB), ssim, lpips (None without a model), codebook_usage
        (fraction of codes used), perplexity (of the code histogram), num_images."""
        s = self.state
        n = float(s["num_images"])
        counts = s["code_counts"].double()
        perplexity = float(code_perplexity(counts))
        lpips_n = float(s["lpips_count"])
        return {
            "psnr": float(s["psnr_sum"]) / n if n else float("nan"),
            "ssim": float(s["ssim_sum"]) / n if n else float("nan"),
            "lpips": float(s["lpips_sum"]) / lpips_n if lpips_n else None,
            "codebook_usage": float((counts > 0).sum()) / self.codebook_size,
            "perplexity": perplexity,
            "num_images": int(n),
        }
