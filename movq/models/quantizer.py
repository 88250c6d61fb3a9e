"""Multichannel vector quantizer with one shared codebook (MoVQ, Zheng et al. 2022, §3.2).

The encoder output ``z`` of shape ``[B, C·d, h, w]`` is read as ``C`` channels of width ``d`` per
latent cell; every channel is quantized against the same codebook ``[K, d]``, so an image becomes
``indices[B, C, h, w]``. The nearest-code search and the straight-through assignment are one op in
``movq.kernels.vq`` (fused Triton on CUDA, a chunked torch reference elsewhere); this module adds what is
stateful: EMA codebook updates, dead-code restarts, k-means init and usage statistics, following
the ``Codebook`` / ``VectorQuantize`` split of lucidrains' vector-quantize-pytorch.

Losses (van den Oord et al. 2017): codebook ``‖sg(z) − e‖²`` plus ``β · ‖z − sg(e)‖²`` commitment, β on
the commitment term (taming's ``legacy=True`` puts it on the codebook term; ``beta_on="codebook"``
reproduces that for converted checkpoints). With ``ema=True`` the
codebook term is dropped and the codebook follows an exponential moving average of its assignments.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from movq.config import QuantizerConfig
from movq.kernels.vq import NORM_EPS, multichannel_vq
from movq.utils import is_distributed

_NEVER = -(2**62)  # "last used at step" of a code that has never been chosen


class QuantizerOutput(NamedTuple):
    """What the quantizer returns; the scalar terms are there for logging.

    z_q: [B, C·d, h, w] quantized map (straight-through: gradients reach ``z`` unchanged).
    indices: int64 [B, C, h, w].
    loss: codebook_loss + β · commitment_loss (fp32 scalar; β on the codebook term with beta_on="codebook").
    usage: fraction of codes chosen within the last ``usage_window`` training steps.
    perplexity: exp(entropy) of the code histogram of this batch (all ranks in training, this rank in eval).
    """

    z_q: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor


def _all_reduce_(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t)
    return t


def _broadcast_(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.broadcast(t, src=0)
    return t


def code_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of a code histogram ``counts [K]``: K when every code is used equally, 1 for a single
    code; NaN for an empty histogram."""
    probs = counts.double() / counts.sum()
    return torch.exp(-(probs * torch.log(probs.clamp_min(1e-300))).sum()).to(torch.float32)


def _flatten(z: torch.Tensor, channels: int, cosine: bool) -> torch.Tensor:
    """[B, C·d, h, w] → fp32 [B·C·h·w, d] in the same order as ``indices.flatten()``, l2-normalized
    when ``cosine`` (the vectors as the search compares them)."""
    flat = rearrange(z.float(), "b (c d) h w -> (b c h w) d", c=channels)
    return F.normalize(flat, dim=-1, eps=NORM_EPS) if cosine else flat


class MultichannelQuantizer(nn.Module):
    """C channels, one codebook of K codes of width d. See the module docstring."""

    # Parameters that forward() itself writes in training mode (k-means init, EMA updates, dead-code
    # restarts): a trainer that skips a step restores them with the buffers.
    forward_updates = ("codebook",)

    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        if cfg.codebook_size < 2 or cfg.dim < 1 or cfg.channels < 1:
            raise ValueError(
                f"quantizer needs codebook_size ≥ 2, dim ≥ 1, channels ≥ 1; got {cfg.codebook_size}, "
                f"{cfg.dim}, {cfg.channels}"
            )
        if not 0.0 < cfg.ema_decay < 1.0 or not 0.0 < cfg.usage_decay < 1.0:
            raise ValueError("ema_decay and usage_decay must lie in (0, 1)")
        if cfg.usage_window < 1 or cfg.chunk_size < 1:
            raise ValueError("usage_window and chunk_size must be ≥ 1")
        if cfg.beta_on not in ("commitment", "codebook"):
            raise ValueError(f"beta_on must be 'commitment' or 'codebook', got {cfg.beta_on!r}")
        if cfg.ema and cfg.beta_on == "codebook":
            raise ValueError("beta_on='codebook' weights the codebook term, which an EMA codebook (ema=True) does not have")
        self.cfg = cfg
        K, d = cfg.codebook_size, cfg.dim
        # taming's init; EMA codebooks are not trained by gradients.
        self.codebook = nn.Parameter(torch.empty(K, d).uniform_(-1.0 / K, 1.0 / K), requires_grad=not cfg.ema)
        self.register_buffer("initted", torch.tensor(not cfg.kmeans_init))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_used", torch.full((K,), _NEVER, dtype=torch.long))
        # Expected hits per step. New and restarted codes start at max(1, threshold): alive, and dead
        # again only if they then get fewer hits than the threshold (lucidrains' reset_cluster_size).
        self.register_buffer("usage_ema", torch.full((K,), self._fresh_usage))
        if cfg.ema:
            # One hit per code with embed_avg = codebook: consistent, so a code not hit in the first
            # steps keeps its value instead of jumping to embed_avg / eps.
            self.register_buffer("cluster_size", torch.ones(K))
            self.register_buffer("embed_avg", self.codebook.detach().clone())

    @property
    def _fresh_usage(self) -> float:
        return max(1.0, float(self.cfg.dead_code_threshold))

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    @property
    def channels(self) -> int:
        return self.cfg.channels

    def codes(self) -> torch.Tensor:
        """The codebook as used for lookup: [K, d] (l2-normalized in cosine mode)."""
        return F.normalize(self.codebook, dim=-1, eps=NORM_EPS) if self.cfg.cosine else self.codebook

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """indices int64 [B, C, h, w] → z_q [B, C·d, h, w]."""
        if indices.dim() != 4 or indices.shape[1] != self.channels:
            raise ValueError(f"indices must be [B, {self.channels}, h, w], got {tuple(indices.shape)}")
        if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"indices must be integers, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size}), got "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        e = self.codes()[indices.long()]  # [B, C, h, w, d]
        return rearrange(e, "b c h w d -> b (c d) h w")

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z: [B, C·d, h, w] → QuantizerOutput (see its docstring)."""
        cfg = self.cfg
        if z.dim() != 4 or z.shape[1] != cfg.channels * cfg.dim:
            raise ValueError(
                f"quantizer expects [B, {cfg.channels}×{cfg.dim}={cfg.channels * cfg.dim}, h, w], got {tuple(z.shape)}"
            )
        if z.numel() == 0:  # the losses, usage and k-means init are undefined on no vectors
            raise ValueError(f"quantizer got an empty input of shape {tuple(z.shape)}")
        if self.training and cfg.kmeans_init and not bool(self.initted):  # bool(): a host sync, k-means only
            self._kmeans_init(z.detach())

        res = multichannel_vq(z, self.codebook, cfg.channels, cosine=cfg.cosine, chunk_size=cfg.chunk_size)
        if cfg.ema:
            codebook_loss = res.codebook_loss.detach() * 0.0  # the codebook moves by EMA, not by this term
        else:
            codebook_loss = res.codebook_loss
        if cfg.beta_on == "commitment":
            loss = codebook_loss + cfg.beta * res.commitment_loss
        else:  # taming's legacy placement (see QuantizerConfig.beta_on)
            loss = cfg.beta * codebook_loss + res.commitment_loss

        counts = res.counts.float()
        if self.training:
            counts = _all_reduce_(counts.clone())
            self._update_statistics(z.detach(), res.indices, counts)
        perplexity = code_perplexity(counts)
        usage = ((self.step - self.last_used) < cfg.usage_window).float().mean()
        return QuantizerOutput(
            z_q=res.z_q,
            indices=res.indices,
            loss=loss,
            codebook_loss=codebook_loss.detach(),
            commitment_loss=res.commitment_loss.detach(),
            perplexity=perplexity,
            usage=usage,
        )

    # ------------------------------------------------------------------ training-time state
    @torch.no_grad()
    def _update_statistics(self, z: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        """EMA codebook, usage bookkeeping and dead-code restart; identical on every rank.

        A batch with non-finite encoder outputs (a step the trainer's guard will skip) leaves the
        codebook as it is: the checks are on all-reduced / broadcast values, so every rank agrees."""
        cfg = self.cfg
        self.step += 1
        self.last_used[counts > 0] = self.step
        self.usage_ema.mul_(cfg.usage_decay).add_(counts, alpha=1 - cfg.usage_decay)
        if cfg.ema or cfg.dead_code_threshold > 0:
            flat = _flatten(z, cfg.channels, cfg.cosine)
        if cfg.ema:
            embed_sum = torch.zeros_like(self.embed_avg).index_add_(0, indices.flatten(), flat)
            _all_reduce_(embed_sum)
            finite = torch.isfinite(embed_sum).all()  # a tensor: selecting with it needs no host sync
            cluster_size = torch.lerp(self.cluster_size, counts, 1 - cfg.ema_decay)
            embed_avg = torch.lerp(self.embed_avg, embed_sum, 1 - cfg.ema_decay)
            self.cluster_size.copy_(torch.where(finite, cluster_size, self.cluster_size))
            self.embed_avg.copy_(torch.where(finite, embed_avg, self.embed_avg))
            # Laplace smoothing keeps codes with no hits from dividing by zero (Sonnet's VQ-VAE-EMA).
            n = self.cluster_size.sum()
            eps = 1e-5
            smoothed = (self.cluster_size + eps) / (n + cfg.codebook_size * eps) * n
            self.codebook.data.copy_(self.embed_avg / smoothed.unsqueeze(1))
        if cfg.dead_code_threshold > 0:
            dead = self.usage_ema < cfg.dead_code_threshold
            if bool(dead.any()):
                self._restart(dead, flat)

    @torch.no_grad()
    def _restart(self, dead: torch.Tensor, flat: torch.Tensor) -> None:
        """Replace dead codes by random encoder outputs of this batch (rank 0's, broadcast; none when
        those are not finite)."""
        n_dead = int(dead.sum())
        pick = torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)
        new = _broadcast_(flat[pick].contiguous())
        if not bool(torch.isfinite(new).all()):
            return
        self.codebook.data[dead] = new.to(self.codebook.dtype)
        self.usage_ema[dead] = self._fresh_usage
        if self.cfg.ema:
            self.embed_avg[dead] = new
            self.cluster_size[dead] = 1.0

    @torch.no_grad()
    def _kmeans_init(self, z: torch.Tensor) -> None:
        """k-means (Lloyd) on this batch's vectors, computed on rank 0 and broadcast."""
        cfg = self.cfg
        flat = _flatten(z, cfg.channels, cfg.cosine)
        gen = torch.Generator(device=flat.device).manual_seed(0)
        K = cfg.codebook_size
        # With fewer vectors than codes, sample with replacement; duplicates split over iterations.
        idx = torch.randint(0, flat.shape[0], (K,), generator=gen, device=flat.device)
        if flat.shape[0] >= K:
            idx = torch.randperm(flat.shape[0], generator=gen, device=flat.device)[:K]
        centroids = flat[idx].clone()
        points = flat[:, :, None, None]  # [N, d, 1, 1]: the search op with one channel
        for _ in range(cfg.kmeans_iters):
            assign = multichannel_vq(points, centroids, 1, chunk_size=cfg.chunk_size).indices.flatten()
            sums = torch.zeros_like(centroids).index_add_(0, assign, flat)
            hits = torch.bincount(assign, minlength=K).float()
            moved = sums / hits.clamp_min(1.0).unsqueeze(1)
            centroids = torch.where(hits.unsqueeze(1) > 0, moved, centroids)
            if cfg.cosine:
                centroids = F.normalize(centroids, dim=-1, eps=NORM_EPS)
        _broadcast_(centroids)
        if not bool(torch.isfinite(centroids).all()):  # non-finite inputs: try again on the next batch
            return
        self.codebook.data.copy_(centroids)
        if cfg.ema:
            self.embed_avg.copy_(centroids)
            self.cluster_size.fill_(1.0)
        self.initted.fill_(True)
