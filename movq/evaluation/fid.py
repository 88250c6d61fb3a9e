"""Fréchet Inception Distance: statistics, the distance, and a tracker for training.

FID (Heusel et al. 2017) is ``|mu_a - mu_b|² + Tr(S_a + S_b - 2 (S_a S_b)^½)`` over the 2048-d
Inception pool features of two image sets (:mod:`movq.inception`). The statistics are float64;
features are accumulated as sums (count, Σf, Σffᵀ), so ranks of a distributed run combine with one
all-reduce and every image is counted exactly once. The distance is computed by torchmetrics'
``FrechetInceptionDistance`` (eigenvalues of S_a S_b) or, independently, with scipy's ``sqrtm``
as pytorch-fid does; the tests hold them to each other.

Image sources (folders, webdataset shards, ``.npz`` images or statistics) are read by
:mod:`movq.fid_sources`; :func:`compute_source_stats` turns one into statistics. The source
names, :class:`FIDStats` and :class:`FIDError` are re-exported here, so ``movq.fid`` stays the
one entry point.
"""
from __future__ import annotations

import contextlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from movq.data.decode import images_to_uint8
from movq.evaluation.fid_sources import FIDError, FIDStats, ImageSource, SourceReport
from movq.evaluation.inception import NUM_SPATIAL_FEATURES, FIDInceptionV3, InceptionWeightsError
from movq.utils import rank_and_world

logger = logging.getLogger(__name__)

BACKENDS = ("torchmetrics", "scipy")


# --------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------
class FeatureAccumulator:
    """Running sums of features — count, Σf [D], Σffᵀ [D, D] — in float64, summable over ranks."""

    def __init__(self, dim: int = 2048, device: Union[str, torch.device] = "cpu"):
        self.dim = dim
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: Tensor) -> None:
        """features: [B, D]."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be [B, {self.dim}], got {tuple(features.shape)}")
        f = features.to(device=self.total.device, dtype=torch.float64)
        self.count += f.shape[0]
        self.total += f.sum(dim=0)
        self.outer += f.T @ f

    def all_reduce_(self) -> FeatureAccumulator:
        """Sum over the ranks of the initialized process group (no-op without one)."""
        if rank_and_world()[1] > 1:
            import torch.distributed as dist

            for t in (self.count, self.total, self.outer):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return self

    def stats(self, name: str = "features") -> FIDStats:
        n = int(self.count)
        if n < 2:
            raise FIDError(f"{name}: {n} image(s); FID needs at least 2")
        mu = self.total / n
        # Unbiased covariance from raw moments; float64 keeps the cancellation harmless.
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return FIDStats(mu.cpu().numpy(), sigma.cpu().numpy(), n)


# --------------------------------------------------------------------------------------
# The distance
# --------------------------------------------------------------------------------------
def _check_pair(a: FIDStats, b: FIDStats) -> None:
    if a.mu.shape != b.mu.shape:
        raise FIDError(f"statistics have different feature sizes: {a.mu.shape[0]} vs {b.mu.shape[0]}")


def frechet_distance_scipy(a: FIDStats, b: FIDStats, eps: float = 1e-6) -> float:
    """FID with scipy's matrix square root of S_a S_b (the pytorch-fid formulation)."""
    from scipy import linalg

    _check_pair(a, b)
    diff = a.mu - b.mu
    covmean = linalg.sqrtm(a.sigma @ b.sigma)
    if not np.isfinite(covmean).all():
        # A singular product (fewer images than dimensions) can defeat the Schur method;
        # a tiny ridge on both covariances makes it well posed.
        logger.warning("FID: sqrtm of a singular product; adding %g to the covariance diagonals", eps)
        ridge = np.eye(a.sigma.shape[0]) * eps
        covmean = linalg.sqrtm((a.sigma + ridge) @ (b.sigma + ridge))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise FIDError(f"FID: matrix square root has a large imaginary part ({imag:.3g}); statistics are invalid")
        covmean = covmean.real
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


class _Precomputed(nn.Module):
    """The 'feature extractor' handed to torchmetrics: features are already computed."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def frechet_distance_torchmetrics(a: FIDStats, b: FIDStats) -> float:
    """FID by torchmetrics' ``FrechetInceptionDistance`` from (mu, sigma).

    The metric keeps its data as sums (count, Σf, Σffᵀ); statistics files only carry mu and
    sigma, so the sums are rebuilt for a count of 2, which reproduces mu and sigma exactly and
    keeps rounding smallest (fewer images means less cancellation in Σffᵀ - n·mu·muᵀ).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_pair(a, b)
    d = a.mu.shape[0]
    # The statistics are already global; a metric syncing on compute would sum every rank's copy.
    metric = FrechetInceptionDistance(feature=_Precomputed(d), reset_real_features=False, sync_on_compute=False)
    metric.update(torch.zeros(0, d, dtype=torch.float64), real=True)  # records the output dtype
    n = 2
    for prefix, s in (("real", a), ("fake", b)):
        mu, sigma = torch.from_numpy(s.mu), torch.from_numpy(s.sigma)
        states = {
            "features_sum": n * mu,
            "features_cov_sum": (n - 1) * sigma + n * torch.outer(mu, mu),
            "features_num_samples": torch.tensor(n),
        }
        for key, value in states.items():
            name = f"{prefix}_{key}"
            if not hasattr(metric, name):
                raise FIDError(f"this torchmetrics version has no state {name!r}; use backend='scipy'")
            setattr(metric, name, value.to(getattr(metric, name).dtype))
    with _one_cpu_thread():
        return float(metric.compute())


@contextlib.contextmanager
def _one_cpu_thread():
    """Run the 2048² nonsymmetric eigensolver on one thread. It gains little from more, and when
    the cores are shared (data-loader workers, other jobs) OpenMP's spin-waiting made it 10-30x
    slower: 3 s on one thread vs 40-110 s on two, measured on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def frechet_distance(a: FIDStats, b: FIDStats, backend: str = "torchmetrics") -> float:
    """FID between two sets of statistics; backend "torchmetrics" or "scipy"."""
    if backend == "torchmetrics":
        return frechet_distance_torchmetrics(a, b)
    if backend == "scipy":
        return frechet_distance_scipy(a, b)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


# --------------------------------------------------------------------------------------
# Images -> statistics
# --------------------------------------------------------------------------------------
def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class SourceFeatures:
    """What one Inception pass over a source gives (:func:`compute_source_features`). ``pool`` and
    ``logits`` are kept per image, in the source's order, when asked for (precision / recall, IS)."""

    stats: FIDStats  # pool_3 statistics: FID
    report: SourceReport
    spatial: Optional[FIDStats] = None  # mixed_6/conv statistics: sFID
    pool: Optional[Tensor] = None  # [N, 2048] float32
    logits: Optional[Tensor] = None  # [N, 1008] float32


def compute_source_stats(
    source: ImageSource,
    extractor: FIDInceptionV3,
    *,
    batch_size: int = 50,
    max_images: Optional[int] = None,
    progress: bool = False,
) -> tuple[FIDStats, SourceReport]:
    """Inception statistics of a source, over all ranks when a process group is initialized.

    Images of different sizes share a batch: the extractor resizes each one to 299² on its own.
    Returns stats and the report summed over ranks.
    """
    out = compute_source_features(source, extractor, batch_size=batch_size, max_images=max_images, progress=progress)
    return out.stats, out.report


def compute_source_features(
    source: ImageSource,
    extractor: FIDInceptionV3,
    *,
    batch_size: int = 50,
    max_images: Optional[int] = None,
    progress: bool = False,
    spatial: bool = False,
    keep_pool: bool = False,
    keep_logits: bool = False,
) -> SourceFeatures:
    """FID statistics of a source and, from the same pass, sFID's statistics (``spatial``) and each
    image's pool features / logits in source order (``keep_pool``, ``keep_logits``; gathered from every
    rank, so each rank holds them all). The FID statistics are those of :func:`compute_source_stats`."""
    rank, world = rank_and_world()[0], rank_and_world()[1]
    report = source.new_report()
    device = _device_of(extractor)
    acc = FeatureAccumulator(extractor.num_features, device=device)
    acc_s = FeatureAccumulator(NUM_SPATIAL_FEATURES, device=device) if spatial else None
    every_output = spatial or keep_pool or keep_logits
    pending: list[np.ndarray] = []
    keys: list[tuple[int, int]] = []
    pools: list[Tensor] = []
    logits: list[Tensor] = []

    def flush():
        if len({img.shape for img in pending}) == 1:
            batch = torch.from_numpy(np.stack(pending)).permute(0, 3, 1, 2)  # [B, 3, H, W]
        else:
            batch = [torch.from_numpy(img).permute(2, 0, 1) for img in pending]  # B x [3, H_i, W_i]
        if not every_output:
            acc.update(extractor(batch))
        else:
            out = extractor.all_features(batch)
            acc.update(out.pool)
            if acc_s is not None:
                acc_s.update(out.spatial)
            if keep_pool:
                pools.append(out.pool.cpu())
            if keep_logits:
                logits.append(out.logits.cpu())
        pending.clear()

    total = source.expected(max_images)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        share = None if total is None else -(-total // world)
        bar = tqdm(total=share, desc=f"FID {source.spec}", unit="img", dynamic_ncols=True)
    for key, img in source.iterate_keyed(report, rank, world, max_images):
        pending.append(np.require(img, requirements=["C", "W"]))  # torch wants writable, contiguous
        keys.append(key)
        if len(pending) == batch_size:
            flush()
        if bar is not None:
            bar.update(1)
    if pending:
        flush()
    if bar is not None:
        bar.close()
    acc.all_reduce_()
    if acc_s is not None:
        acc_s.all_reduce_()
    report = gather_report(report)
    if len(report.sizes) > 1:
        common = ", ".join(f"{k}: {v}" for k, v in report.sizes.most_common(3))
        logger.warning("FID: %s has %d image sizes (%s, ...); each is resized to 299x299", source.spec,
                       len(report.sizes), common)
    if int(acc.count) < 2:
        raise FIDError(
            f"{source.spec}: {int(acc.count)} readable image(s) ({report.skipped} skipped); FID needs at least 2"
        )
    kept = {name: _in_source_order(keys, parts) for name, parts, want in
            (("pool", pools, keep_pool), ("logits", logits, keep_logits)) if want}
    return SourceFeatures(acc.stats(source.spec), report, acc_s.stats(f"{source.spec} (spatial)") if acc_s else None,
                          kept.get("pool"), kept.get("logits"))


def _in_source_order(keys: list[tuple[int, int]], parts: list[Tensor]) -> Tensor:
    """This rank's per-image rows, joined with every other rank's and sorted by their place in the source."""
    rows = torch.cat(parts) if parts else torch.zeros(0)
    if rank_and_world()[1] > 1:
        import torch.distributed as dist

        gathered: list = [None] * rank_and_world()[1]
        dist.all_gather_object(gathered, (keys, rows.numpy()))
        keys = [k for part_keys, _ in gathered for k in part_keys]
        rows = torch.cat([torch.from_numpy(r) for _, r in gathered if len(r)])
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return rows[order]


def gather_report(report: SourceReport) -> SourceReport:
    if rank_and_world()[1] == 1:
        return report
    import torch.distributed as dist

    parts: list = [None] * rank_and_world()[1]
    dist.all_gather_object(parts, report.as_dict(max_sizes=1 << 30))
    merged = SourceReport(report.source, report.kind)
    for p in parts:
        merged.merge(SourceReport(p["source"], p["kind"], p["images"], p["skipped"],
                                  Counter(p["converted"]), Counter(p["sizes"])))
    return merged


# --------------------------------------------------------------------------------------
# In training
# --------------------------------------------------------------------------------------
def _as_nchw_uint8(batch) -> Tensor:
    """uint8 NHWC (numpy or torch) or float NCHW in [-1, 1] (torch) -> uint8 [B, 3, H, W]."""
    t = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
    if not isinstance(t, Tensor) or t.dim() != 4:
        raise FIDError(f"FID images must be 4-D batches, got {type(batch).__name__} {getattr(batch, 'shape', '')}")
    if t.dtype == torch.uint8:
        if t.shape[3] not in (1, 3, 4):
            raise FIDError(f"uint8 FID images must be NHWC [B, H, W, 3], got {tuple(t.shape)}")
        t = t[..., :3] if t.shape[3] == 4 else t.expand(-1, -1, -1, 3)
        return t.permute(0, 3, 1, 2)
    if t.is_floating_point() and t.shape[1] == 3:
        return images_to_uint8(t).permute(0, 3, 1, 2)
    raise FIDError(
        f"FID images must be uint8 NHWC or float NCHW [B, 3, H, W] in [-1, 1], got {t.dtype} {tuple(t.shape)}"
    )


class FIDTracker:
    """FID of generated or reconstructed images against cached reference statistics.

    ``compute(images)`` takes a batch or an iterable of batches — uint8 NHWC arrays/tensors, or
    float NCHW tensors in [-1, 1] — and, under a process group, each rank passes its own share.
    When the Inception weights or the reference statistics are missing it logs once and returns
    None, so a training run goes on without FID.
    """

    def __init__(
        self,
        inception_weights: Union[str, Path, None] = None,
        reference_stats: Union[str, Path, FIDStats, None] = None,
        *,
        device: Union[str, torch.device, None] = None,
        batch_size: int = 50,
        verify: bool = True,
        backend: str = "torchmetrics",
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.inception_weights, self.reference_stats = inception_weights, reference_stats
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size, self.verify, self.backend = batch_size, verify, backend
        self._extractor: Optional[FIDInceptionV3] = None
        self._reference: Optional[FIDStats] = reference_stats if isinstance(reference_stats, FIDStats) else None
        self._warned: set[str] = set()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("FID disabled: %s", message)

    def extractor(self) -> Optional[FIDInceptionV3]:
        if self._extractor is None and "weights" not in self._warned:
            try:
                self._extractor = FIDInceptionV3.from_pretrained(
                    self.inception_weights, verify=self.verify, device=self.device
                )
            except InceptionWeightsError as e:
                self._warn_once("weights", str(e))
        return self._extractor

    def reference(self) -> Optional[FIDStats]:
        if self._reference is None and "reference" not in self._warned:
            if self.reference_stats is None:
                self._warn_once("reference", "no reference statistics given")
            elif not Path(self.reference_stats).is_file():
                self._warn_once("reference", f"reference statistics {self.reference_stats} not found")
            else:
                self._reference = FIDStats.load(self.reference_stats)
        return self._reference

    def compute_stats(self, images) -> Optional[FIDStats]:
        """Statistics of ``images`` over all ranks; None without Inception weights."""
        model = self.extractor()
        if model is None:
            return None
        acc = FeatureAccumulator(model.num_features, device=self.device)
        batches = [images] if isinstance(images, (np.ndarray, Tensor)) else images
        for batch in batches:
            x = _as_nchw_uint8(batch)
            for chunk in x.split(self.batch_size):
                acc.update(model(chunk))
        return acc.all_reduce_().stats("FID images")

    def ensure_reference(self, images) -> Optional[FIDStats]:
        """Compute and cache the reference statistics from ``images`` if the file is missing."""
        if self._reference is None and self.reference_stats is not None and Path(self.reference_stats).is_file():
            self._reference = FIDStats.load(self.reference_stats)
        if self._reference is None:
            stats = self.compute_stats(images)
            if stats is None:
                return None
            if self.reference_stats is not None and rank_and_world()[0] == 0:
                stats.save(self.reference_stats)
            self._reference = stats
        return self._reference

    def compute(self, images) -> Optional[float]:
        """FID of ``images`` against the reference, or None when FID is unavailable."""
        if self.reference() is None:
            return None
        stats = self.compute_stats(images)
        if stats is None:
            return None
        return frechet_distance(self._reference, stats, backend=self.backend)
