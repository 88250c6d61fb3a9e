"""MaskGIT prior over multichannel MoVQ tokens.

Reference: Chang et al., "MaskGIT: Masked Generative Image Transformer" (CVPR 2022): a
bidirectional (BERT-like) transformer predicts masked tokens; training masks a fraction
``schedule(r), r ~ U(0, 1)`` of them and scores the masked ones only. Classifier-free guidance
(Ho & Salimans 2022) comes from a null class used with probability ``class_dropout``.

Multichannel layout (MoVQ, Zheng et al. 2022): tokens are ``int64 [B, C, h, w]``. The sequence
has one position per latent cell (h·w, not h·w·C, so attention costs the same as a one-channel
tokenizer), plus a leading class token:

* input of a cell = Σ_c E_c[token_c] + position embedding; each channel c has its own table
  E_c with K + 1 rows, the last a learned [MASK] embedding. Tables are per channel because a
  shared table would make the sum symmetric in the channels, losing which code sits in which
  channel of the latent.
* class token = class embedding (``num_classes + 1`` rows, the last = null class) + its
  position embedding. An unconditional model (``num_classes = 0``) has only the null row.
  With ``class_in_cells`` the class embedding is also added to every cell's input (the class token stays):
  a small model trained briefly then uses the class from its first layer on (measured on the shapes data).
* output: C linear heads of K logits per cell, ``[B, C, h, w, K]`` (the token layout plus K).

Masking is per token (cell × channel), with the schedule shared with sampling (:mod:`movq.models.masking`).

An image condition (``config.condition``, :mod:`movq.models.condition`) is ADDED to the cells' input
embeddings, one embedding per cell: the condition is spatially aligned with the token grid, and MaskGIT is
bidirectional, so every token sees every cell's condition through attention anyway; adding keeps the
sequence length (and the attention cost) as it is. A learned null condition stands for "no condition" (rows
dropped in training with ``condition.dropout``, the unconditional half of guidance).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from movq.config import MaskGITConfig
from movq.models.condition import ConditionEncoder, conditioning_summary, draw_dropout
from movq.models.masking import check_class_labels, mask_schedule, random_uniform
from movq.models.pretrained import PretrainedModel

# BERT / MaskGIT initialisation: truncated normal with this std, cut at ±2 std.
INIT_STD = 0.02
# LayerNorm epsilon of MaskGIT's transformer (BERT's 1e-12 underflows in bf16).
LN_EPS = 1e-6



class Attention(nn.Module):
    """Bidirectional multi-head self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, width: int, heads: int, attn_dropout: float, dropout: float):
        super().__init__()
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # [B, heads, T, D/heads]
        return self.drop(self.proj(rearrange(y, "b h t d -> b t (h d)")))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN x), then x + MLP(LN x)."""

    def __init__(self, cfg: MaskGITConfig):
        super().__init__()
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.attn = Attention(cfg.width, cfg.heads, cfg.attn_dropout, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.width, hidden), nn.GELU(), nn.Linear(hidden, cfg.width), nn.Dropout(cfg.dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MaskGIT(PretrainedModel, tags=["maskgit", "image-generation"]):
    """The prior: ``forward(tokens [B, C, h, w], labels [B]) -> logits [B, C, h, w, K]``."""

    config_class = MaskGITConfig
    card_title = "MaskGIT prior over MoVQ tokens"

    @classmethod
    def card_summary(cls, config: MaskGITConfig) -> str:
        h, w = config.grid_hw
        return (f"A MaskGIT prior (Chang et al., CVPR 2022) over {h}×{w} cells × {config.channels} channels of "
                f"tokens from a {config.codebook_size}-code MoVQ tokenizer; {conditioning_summary(config)}; transformer width "
                f"{config.width}, depth {config.depth}, {config.heads} heads.")

    def __init__(self, config: Union[MaskGITConfig, dict, str, None] = None):
        super().__init__()
        cfg = config if isinstance(config, MaskGITConfig) else MaskGITConfig.load(config)
        self.config = cfg
        h, w = cfg.grid_hw
        k, c = cfg.codebook_size, cfg.channels
        # One table of C·(K+1) rows: rows c·(K+1) … c·(K+1)+K belong to channel c (last = [MASK]).
        self.token_emb = nn.Embedding(c * (k + 1), cfg.width)
        self.register_buffer("channel_offset", torch.arange(c) * (k + 1), persistent=False)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, cfg.width)
        # built before apply(): its convolutions keep PyTorch's init, its null condition its own
        self.condition = ConditionEncoder(cfg.condition, (h, w), cfg.width) if cfg.condition else None
        self.pos_emb = nn.Parameter(torch.zeros(1, 1 + h * w, cfg.width))  # class token first
        self.emb_norm = nn.LayerNorm(cfg.width, eps=LN_EPS)  # BERT / MaskGIT normalise embeddings
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.head = nn.Linear(cfg.width, c * k)  # C heads of K logits
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.pos_emb, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def mask_id(self) -> int:
        """The [MASK] token id: K."""
        return self.config.codebook_size

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def null_class(self) -> int:
        """The label of the unconditional (dropped) class: num_classes."""
        return self.config.num_classes

    # ----------------------------------------------------------------------------------
    def _check_tokens(self, tokens: Tensor, allow_mask: bool) -> Tensor:
        cfg = self.config
        expected = (cfg.channels, *cfg.grid_hw)
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"MaskGIT: tokens must be an integer tensor, got {tokens.dtype}")
        if tokens.ndim != 4 or tuple(tokens.shape[1:]) != expected:
            want = ", ".join(map(str, expected))
            raise ValueError(f"MaskGIT: tokens must have shape [B, {want}], got {tuple(tokens.shape)}")
        if tokens.shape[0] == 0:
            raise ValueError("MaskGIT: got an empty batch of tokens (B = 0)")
        hi = cfg.codebook_size if allow_mask else cfg.codebook_size - 1
        if not torch.compiler.is_compiling() and ((tokens < 0) | (tokens > hi)).any():
            what = f"[0, {hi}] ({hi} = [MASK])" if allow_mask else f"[0, {hi}] (no [MASK] in targets)"
            got = f"[{int(tokens.min())}, {int(tokens.max())}]"
            raise ValueError(f"MaskGIT: token ids must lie in {what}, got {got}")
        return tokens.long()

    def _check_labels(self, labels: Optional[Tensor], batch: int, device: torch.device) -> Tensor:
        return check_class_labels("MaskGIT", labels, batch, self.null_class, device)

    def forward(self, tokens: Tensor, labels: Optional[Tensor] = None, condition: Optional[Tensor] = None,
                drop_condition: Optional[Tensor] = None) -> Tensor:
        """Logits ``[B, C, h, w, K]`` for ``tokens int [B, C, h, w]`` (id K = [MASK]).

        ``labels int [B]`` in ``[0, num_classes]``; ``num_classes`` (or ``labels=None``) is the
        null class. ``condition uint8 [B, ch, H', W']`` (a conditional model; None = the null
        condition), ``drop_condition bool [B]``: rows that get the null condition instead.
        """
        tokens = self._check_tokens(tokens, allow_mask=True)
        b, c, h, w = tokens.shape
        labels = self._check_labels(labels, b, tokens.device)
        ids = rearrange(tokens, "b c h w -> b (h w) c") + self.channel_offset  # per-channel rows
        x = self.token_emb(ids).sum(2)  # [B, h·w, D]: sum of the C channel embeddings of a cell
        if self.condition is not None:
            x = x + self.condition(condition, b, drop_condition)  # one condition embedding per cell
        elif condition is not None:
            raise ValueError("MaskGIT: a condition was given but the model has none (config.condition is null)")
        class_token = self.class_emb(labels)[:, None]  # [B, 1, D]
        if self.config.class_in_cells:
            x = x + class_token  # every cell also carries the class (the null class for a dropped label)
        x = torch.cat([class_token, x], 1) + self.pos_emb  # [B, 1 + h·w, D]
        x = self.emb_drop(self.emb_norm(x))
        for block in self.blocks:
            if self.config.gradient_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        logits = self.head(self.norm(x[:, 1:]))  # [B, h·w, C·K]
        return rearrange(logits, "b (h w) (c k) -> b c h w k", h=h, w=w, c=c)

    # ----------------------------------------------------------------------------------
    def random_mask(self, tokens: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Bool ``[B, C, h, w]``, True = masked: per sample ``ceil(N · rate)`` tokens, ≥ 1.

        ``rate = max(schedule(r), min_mask_rate)``, ``r ~ U(0, 1)``, N = C·h·w; which tokens is
        uniform over the cells and channels.
        """
        cfg = self.config
        b = tokens.shape[0]
        n = tokens[0].numel()
        rate = mask_schedule(random_uniform((b,), generator, tokens.device), cfg.mask_schedule)
        rate = rate.clamp(min=cfg.min_mask_rate)
        n_mask = torch.ceil(rate * n).long().clamp(1, n)  # [B]
        scores = random_uniform((b, n), generator, tokens.device)
        rank = scores.argsort(1).argsort(1)  # a random permutation rank per sample
        return (rank < n_mask[:, None]).reshape(tokens.shape)

    def training_loss(
        self, tokens: Tensor, labels: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
        condition: Optional[Tensor] = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Masked-token cross-entropy (with label smoothing) on ``tokens int [B, C, h, w]``.

        Returns ``(loss, logs)``; ``logs`` holds detached scalars ``loss``, ``accuracy`` (top-1 on
        masked tokens), ``mask_rate`` and ``class_dropped`` (fraction of labels set to null), and for a
        conditional model ``condition_dropped``. ``condition``: the samples' conditions (needed by a
        model with ``config.condition``).
        """
        cfg = self.config
        tokens = self._check_tokens(tokens, allow_mask=False)
        b = tokens.shape[0]
        if cfg.num_classes > 0 and labels is None:
            raise ValueError("MaskGIT.training_loss: a class-conditional model needs labels [B]")
        if cfg.condition is not None and condition is None:
            raise ValueError(f"MaskGIT.training_loss: a model conditioned on {cfg.condition.kind} needs its conditions")
        labels = self._check_labels(labels, b, tokens.device)
        dropped, cond_dropped = draw_dropout(cfg, b, generator, tokens.device, random_uniform)
        labels = torch.where(dropped, torch.full_like(labels, self.null_class), labels)
        masked = self.random_mask(tokens, generator)
        inputs = torch.where(masked, torch.full_like(tokens, self.mask_id), tokens)
        logits = self(inputs, labels, condition, cond_dropped)[masked]  # [M, K], the masked tokens only
        targets = tokens[masked]
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=cfg.label_smoothing)
        with torch.no_grad():
            logs = {
                "loss": loss.detach(),
                "accuracy": (logits.argmax(-1) == targets).float().mean(),
                "mask_rate": masked.float().mean(),
                "class_dropped": dropped.float().mean(),
            }
            if cond_dropped is not None:
                logs["condition_dropped"] = cond_dropped.float().mean()
        return loss, logs

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on matrices of linear layers, none on biases, norms, embeddings."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            is_matrix = p.ndim >= 2 and not name.endswith(("_emb.weight", "pos_emb", "condition.null"))
            (decay if is_matrix else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


__all__ = ["MaskGIT", "Attention", "Block", "INIT_STD", "LN_EPS"]
