"""The sample metrics of ADM's evaluator besides FID: Inception Score, sFID and precision / recall.

Reference: Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis" (NeurIPS 2021), whose
``evaluations/evaluator.py`` (openai/guided-diffusion) is the protocol most image-generation papers
report (ADM, DiT, LlamaGen, MaskGIT re-evaluations). Every number comes from one Inception pass
(:meth:`movq.evaluation.inception.FIDInceptionV3.all_features`):

* **sFID** (Nash et al. 2021): the Fréchet distance of the spatial features (the first 7 channels of
  ``mixed_6/conv``, 2023 values) instead of pool_3's; the same :func:`movq.evaluation.fid.frechet_distance`.
* **Inception Score** (Salimans et al. 2016): ``exp E_x KL(p(y|x) ‖ p(y))`` over the softmax of the
  unbiased logits, in consecutive splits of 5000 samples in their order, averaged (50 000 samples:
  10 splits). torch-fidelity's IS differs: 10 equal splits after a seeded shuffle.
* **Precision / recall** (Kynkäänniemi et al., NeurIPS 2019): each set's manifold is the union of balls
  around its pool features with radius the distance to the k = 3rd nearest neighbour (the point itself
  excluded); precision is the fraction of samples inside the reference manifold, recall the fraction
  of reference images inside the samples'. As in ADM, squared distances are computed in float16
  (``‖u‖² − 2u·v + ‖v‖²``, clamped at 0), falling back to float32 for a block with a non-finite value,
  in blocks of 10 000 × 10 000; ``fp16=False`` computes them in float32.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch
from torch import Tensor

IS_SPLIT_SIZE = 5000  # ADM: compute_inception_score(split_size=5000)
PR_NEIGHBOURS = 3  # ADM's ManifoldEstimator(nhood_sizes=(3,))
PR_BATCH = 10000  # ADM's row_batch_size = col_batch_size; also the blocks of the float16 fallback

ArrayLike = Union[Tensor, np.ndarray]


def _tensor(x: ArrayLike) -> Tensor:
    return torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else x


def inception_score(logits: ArrayLike, split_size: int = IS_SPLIT_SIZE) -> float:
    """IS of samples from their Inception logits ``[N, 1008]`` (in sample order), ADM's way: the mean over
    consecutive splits of ``split_size`` of ``exp(mean_x Σ_y p(y|x) (log p(y|x) − log p̄(y)))``."""
    logits = _tensor(logits).double()
    if logits.dim() != 2 or logits.shape[0] < 1:
        raise ValueError(f"inception_score expects logits [N, classes] with N >= 1, got {tuple(logits.shape)}")
    log_p = torch.log_softmax(logits, dim=1)  # log p(y|x), stable where a float32 softmax underflows to 0
    scores = []
    for part in log_p.split(split_size):
        log_marginal = torch.logsumexp(part, dim=0) - np.log(part.shape[0])  # log p̄(y) over the split
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores))


def pairwise_sq_distances(u: Tensor, v: Tensor, fp16: bool = True) -> Tensor:
    """Squared Euclidean distances ``[len(u), len(v)]`` as ADM's ``DistanceBlock``: in float16 when
    ``fp16`` and every value is finite, else in float32; returned as float32."""
    def block(a: Tensor, b: Tensor) -> Tensor:
        na = a.pow(2).sum(1, keepdim=True)  # [n, 1]
        nb = b.pow(2).sum(1, keepdim=True).T  # [1, m]
        return (na - 2 * (a @ b.T) + nb).clamp_min(0)

    if fp16:
        d16 = block(u.half(), v.half())
        if bool(torch.isfinite(d16).all()):
            return d16.float()
    return block(u.float(), v.float())


def manifold_radii(features: ArrayLike, k: int = PR_NEIGHBOURS, batch_size: int = PR_BATCH,
                   fp16: bool = True) -> Tensor:
    """The squared distance of every feature vector to its k-th nearest neighbour in the set (itself, at
    distance 0, excluded): float32 ``[N]``."""
    x = _tensor(features)
    n = x.shape[0]
    if n <= k:
        raise ValueError(f"precision / recall with k = {k} needs more than {k} images per set, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=x.device)
    for start in range(0, n, batch_size):
        rows = x[start:start + batch_size]
        d = torch.cat([pairwise_sq_distances(rows, x[c:c + batch_size], fp16) for c in range(0, n, batch_size)], 1)
        radii[start:start + len(rows)] = d.kthvalue(k + 1, dim=1).values  # k+1: the 0 to itself comes first
    return radii


def precision_recall(reference: ArrayLike, samples: ArrayLike, k: int = PR_NEIGHBOURS, batch_size: int = PR_BATCH,
                     fp16: bool = True) -> tuple[float, float]:
    """``(precision, recall)`` of ``samples`` against ``reference`` from their pool features ``[N, D]``
    (ADM's ``compute_prec_recall``): precision = P(sample inside the reference manifold), recall =
    P(reference image inside the samples' manifold)."""
    ref, fake = _tensor(reference), _tensor(samples).to(_tensor(reference).device)
    if ref.dim() != 2 or fake.dim() != 2 or ref.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be [N, D] with the same D, got {tuple(ref.shape)} and {tuple(fake.shape)}")
    r_ref, r_fake = manifold_radii(ref, k, batch_size, fp16), manifold_radii(fake, k, batch_size, fp16)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)  # covered by a sample's ball: recall
    fake_in = torch.zeros(len(fake), dtype=torch.bool, device=ref.device)  # inside a reference ball: precision
    for i in range(0, len(ref), batch_size):
        for j in range(0, len(fake), batch_size):
            d = pairwise_sq_distances(ref[i:i + batch_size], fake[j:j + batch_size], fp16)  # [b_ref, b_fake]
            ref_in[i:i + batch_size] |= (d <= r_fake[None, j:j + batch_size]).any(dim=1)
            fake_in[j:j + batch_size] |= (d <= r_ref[i:i + batch_size, None]).any(dim=0)
    return float(fake_in.double().mean()), float(ref_in.double().mean())
