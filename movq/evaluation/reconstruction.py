"""A tokenizer's reconstruction metrics on an image source: rFID, PSNR, SSIM, LPIPS, codebook usage and
perplexity (the figures MoVQ and VQGAN papers report for their first stage).

Images are decoded and centre-cropped to the evaluation size exactly as the trainer's validation split is
(:mod:`movq.data.decode`), reconstructed by ``model(x)``, and compared; with an Inception extractor the
FID between originals and reconstructions (rFID) is computed from the same pass. Ranks split the
source's images and every statistic is reduced over them.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch import nn

from movq.data.decode import crop_square, images_from_uint8, images_to_uint8
from movq.evaluation.fid import FeatureAccumulator, frechet_distance, gather_report
from movq.evaluation.fid_sources import ImageSource, SourceReport
from movq.evaluation.metrics import TokenizerMetrics


@torch.no_grad()
def evaluate_tokenizer(model: nn.Module, source: ImageSource, *, size: int, batch_size: int = 50,
                       max_images: Optional[int] = None, extractor: Optional[nn.Module] = None,
                       lpips: Optional[nn.Module] = None, device="cpu", rank: int = 0, world: int = 1,
                       backend: str = "torchmetrics", progress=None) -> tuple[dict, SourceReport]:
    """Reconstruct ``source``'s images (this rank's share) with ``model``; returns the metrics reduced over
    ranks (``rfid`` None without ``extractor``, ``lpips`` None without it) and the merged source report.
    ``progress`` (optional) is called with the number of images read so far on this rank."""
    metrics = TokenizerMetrics(model.quantizer.codebook_size, lpips=lpips, device=device)
    real = fake = None
    if extractor is not None:
        real = FeatureAccumulator(extractor.num_features, device=device)
        fake = FeatureAccumulator(extractor.num_features, device=device)
    report = source.new_report()

    def step(batch: list[np.ndarray]) -> None:
        x8 = torch.from_numpy(np.stack(batch)).to(device)  # uint8 [B, S, S, 3]
        x = images_from_uint8(x8).contiguous()
        x_rec, enc = model(x)
        if extractor is not None:
            real.update(extractor(x8.permute(0, 3, 1, 2)))
            fake.update(extractor(images_to_uint8(x_rec).permute(0, 3, 1, 2)))
        metrics.update(x, x_rec, enc.indices)

    batch: list[np.ndarray] = []
    for n, img in enumerate(source.iterate(report, rank, world, max_images), 1):
        square, _ = crop_square(Image.fromarray(img), size)  # the validation crop of training
        batch.append(np.asarray(square, dtype=np.uint8))
        if len(batch) == batch_size:
            step(batch)
            batch = []
        if progress is not None:
            progress(n)
    if batch:
        step(batch)
    metrics.all_reduce_()
    rfid = None
    if extractor is not None:
        real.all_reduce_()
        fake.all_reduce_()
        rfid = frechet_distance(real.stats(source.spec), fake.stats("reconstructions"), backend=backend)
    return {"rfid": rfid, **metrics.compute(), "resolution": size}, gather_report(report)
