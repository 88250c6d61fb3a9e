"""Autoregressive (GPT) prior over multichannel MoVQ tokens, with a sliding attention window.

References: Esser et al., "Taming Transformers for High-Resolution Image Synthesis" (CVPR 2021):
a GPT over the code grid in raster order, p(z) = Π p(z_i | z_<i, c), the class as a leading
token, cross-entropy training, token-by-token sampling, and a sliding attention window for grids
larger than the training one; Lee et al., "Autoregressive Image Generation using Residual
Quantization" (RQ-Transformer, CVPR 2022): a spatial transformer over cells plus a small depth
transformer over the codes of one cell; Ho & Salimans (2022): classifier-free guidance from a null
class used in training with probability ``class_dropout``. nanoGPT (karpathy) for the block.

Tokens are ``int64 [B, C, h, w]``: C quantizer channels on an h×w grid (MoVQ, Zheng et al. 2022).
``factorization`` says how the C tokens of a cell are ordered:

* ``flat``: one sequence position per token, raster over cells and, within a cell, channels
  0…C−1 (h·w·C positions); the input of a position is the previous token (per-channel embedding
  table), its position embedding = cell embedding + channel embedding; one head of K logits.
* ``cell``: one position per cell (h·w positions); the input is the sum of the previous cell's C
  channel embeddings (as in :mod:`movq.models.maskgit`); C heads predict the cell's C tokens
  independently given the earlier cells (fast, but blind to dependence inside a cell).
* ``depth``: the ``cell`` spatial transformer, then per cell a causal depth transformer over its C
  channels (RQ-Transformer): input 0 is the spatial output, input c the embedding of token c−1;
  output c predicts token c, so the cell's tokens are modelled jointly, at h·w spatial positions.

The spatial sequence has N "units" (tokens for ``flat``, cells otherwise). Position s ∈ [0, N)
predicts unit s; its input is the class embedding at s = 0 and unit s−1 after, plus the position
embedding of s. ``window`` W (in cells; 0 = full causal attention) limits position s to the
positions (s − W·U, s] (U = units per cell: C for ``flat``, else 1), i.e. the W cells before the
one it predicts, plus position 0: the class token stays visible however long the sequence, so the
condition is never lost. Training uses that banded causal mask; :class:`KVCache` keeps the class
slot plus a ring of W·U slots, so sampling costs O(W) time and memory per token, not O(N).

An image condition (``config.condition``, :mod:`movq.models.condition`) is read as a PREFIX of P = h·w
condition embeddings (one per cell, plus a learned position embedding each) in front of the class token:
a token must see the condition of the cells after it in raster order (the edges of the whole shape, the
low-resolution image below the current row), which an embedding added at its own position cannot give.
The prefix comes first so that the class token stays the position that predicts unit 0 and every other
position keeps its meaning: the sequence is ``[cond_0 … cond_{P−1}, class, unit_0 … unit_{N−2}]`` and the
output at sequence position P + s predicts unit s. The prefix and the class token (1 + P "sink" positions)
stay visible under the window like the class token alone does without a condition, and the cache keeps
them (prefilled before the first token).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from movq.config import FACTORIZATIONS, AutoregressiveConfig
from movq.models.condition import ConditionEncoder, conditioning_summary, draw_dropout
from movq.models.masking import check_class_labels, random_uniform
from movq.models.pretrained import PretrainedModel

# GPT-2 / nanoGPT initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2·layers).
INIT_STD = 0.02
LN_EPS = 1e-5  # nanoGPT / GPT-2


def window_mask(length: int, window_units: int, device=None, sink: int = 1) -> Tensor:
    """Bool ``[length, length]``, True = may attend: key j ≤ query i and (j > i − window_units or
    j < sink: the class token and a condition prefix before it). ``window_units ≥ length − sink`` is plain
    causal attention."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    return (j <= i) & ((j > i - window_units) | (j < sink))


class KVCache:
    """Keys and values of the positions a new position may attend to, per layer.

    Slots 0…S−1 hold the S = ``sink`` always-visible positions (the class token, after a condition
    prefix if any); slots S…S+R−1 hold the later positions in a ring of R = ``window_units`` slots,
    position s in slot ``S + (s − S) mod R``. Attention does not depend on the order of its keys
    (positions are in the embeddings), so the ring needs no shifting: memory is
    ``2 · layers · B · heads · (S + R) · head_dim`` whatever the sequence length.
    """

    def __init__(self, layers: int, batch: int, heads: int, head_dim: int, window_units: int,
                 device: torch.device, dtype: torch.dtype, sink: int = 1):
        self.ring, self.sink = max(window_units, 1), sink
        shape = (batch, heads, sink + self.ring, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.length = 0  # positions written so far (all layers)

    def slot(self, pos: int) -> int:
        return pos if pos < self.sink else self.sink + (pos - self.sink) % self.ring

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write_step(self, layer: int, k: Tensor, v: Tensor, pos: int) -> tuple[Tensor, Tensor]:
        """Store ``k, v [B, H, 1, d]`` of position ``pos``; return the keys and values it sees."""
        s = self.slot(pos)
        self.k[layer][:, :, s : s + 1] = k
        self.v[layer][:, :, s : s + 1] = v
        n = min(pos + 1, self.sink + self.ring)
        return self.k[layer][:, :, :n], self.v[layer][:, :, :n]

    def write_prefix(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Store positions 0…L−1 (``k, v [B, H, L, d]``) of a fresh cache: the sink positions and the
        last R positions."""
        length = k.shape[2]
        first = list(range(min(self.sink, length)))
        keep = list(range(max(self.sink, length - self.ring), length))
        slots = [self.slot(p) for p in first + keep]
        idx = first + keep
        self.k[layer][:, :, slots] = k[:, :, idx]
        self.v[layer][:, :, slots] = v[:, :, idx]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention, causal with an optional window, and its cached single step."""

    def __init__(self, width: int, heads: int, attn_dropout: float, dropout: float, layers: int):
        super().__init__()
        self.heads, self.attn_dropout = heads, attn_dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.proj.residual_layers = layers  # scaled init (see AutoregressivePrior._init_weights)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Optional[Tensor], cache: Optional[KVCache] = None,
                layer: int = 0, pos: Optional[int] = None) -> Tensor:
        """``x [B, T, D]``. ``mask``: bool [T, T] or None (plain causal). With ``cache`` and ``pos``:
        one new position (T = 1) attends to the cache; with ``cache`` alone: a prefix from position
        0 whose keys and values are stored."""
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        p = self.attn_dropout if self.training else 0.0
        if cache is not None and pos is not None:
            k, v = cache.write_step(layer, k, v, pos)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # [B, H, 1, d]: all cached keys visible
        else:
            if cache is not None:
                cache.write_prefix(layer, k, v)
            if mask is None:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.drop(self.proj(rearrange(y, "b h t d -> b t (h d)")))


class Block(nn.Module):
    """Pre-norm GPT block: x + attn(LN x), then x + MLP(LN x)."""

    def __init__(self, cfg: AutoregressiveConfig, layers: int):
        super().__init__()
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.attn = CausalSelfAttention(cfg.width, cfg.heads, cfg.attn_dropout, cfg.dropout, layers)
        self.norm2 = nn.LayerNorm(cfg.width, eps=LN_EPS)
        out = nn.Linear(hidden, cfg.width)
        out.residual_layers = layers
        self.mlp = nn.Sequential(nn.Linear(cfg.width, hidden), nn.GELU(), out, nn.Dropout(cfg.dropout))

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, cache: Optional[KVCache] = None,
                layer: int = 0, pos: Optional[int] = None) -> Tensor:
        x = x + self.attn(self.norm1(x), mask, cache, layer, pos)
        return x + self.mlp(self.norm2(x))


class AutoregressivePrior(PretrainedModel):
    """The prior: ``forward(tokens [B, C, h, w], labels [B]) -> logits [B, C, h, w, K]`` (teacher
    forced: the logits of every token given the tokens before it), plus the incremental pieces
    :mod:`movq.generation.autoregressive` samples with (:meth:`embed_step`, :meth:`step`,
    :meth:`prefill`, :meth:`token_logits`)."""

    config_class = AutoregressiveConfig

    @classmethod
    def card_summary(cls, config: AutoregressiveConfig) -> str:
        h, w = config.grid_hw
        window = f"a window of {config.window} cells" if config.window else "full causal attention"
        return (f"An autoregressive prior (taming-transformers' GPT, raster order) over {h}×{w} cells × "
                f"{config.channels} channels of tokens from a {config.codebook_size}-code MoVQ tokenizer; "
                f"{conditioning_summary(config)}; factorization {config.factorization}, {window}; transformer "
                f"width {config.width}, depth {config.depth}, {config.heads} heads.")

    def __init__(self, config: Union[AutoregressiveConfig, dict, str, None] = None):
        super().__init__()
        cfg = config if isinstance(config, AutoregressiveConfig) else AutoregressiveConfig.load(config)
        self.config = cfg
        h, w = cfg.grid_hw
        k, c, d = cfg.codebook_size, cfg.channels, cfg.width
        # One table of C·K rows: rows c·K … c·K+K−1 embed channel c's codes (see movq.models.maskgit on why
        # per channel); shared by the spatial input and the depth transformer.
        self.token_emb = nn.Embedding(c * k, d)
        self.register_buffer("channel_offset", torch.arange(c) * k, persistent=False)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, d)
        self.cell_pos = nn.Parameter(torch.zeros(h * w, d))
        self.condition = ConditionEncoder(cfg.condition, (h, w), d) if cfg.condition else None
        if self.condition is not None:
            self.condition_pos = nn.Parameter(torch.zeros(h * w, d))  # the prefix's positions
        if cfg.factorization == "flat":
            self.channel_pos = nn.Parameter(torch.zeros(c, d))  # which channel a position predicts
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, cfg.depth) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=LN_EPS)
        if cfg.factorization == "cell":
            self.head = nn.Linear(d, c * k)  # C heads of K logits
        else:
            self.head = nn.Linear(d, k)
        if cfg.factorization == "depth":
            self.depth_pos = nn.Parameter(torch.zeros(c, d))
            self.depth_blocks = nn.ModuleList(Block(cfg, cfg.depth_layers) for _ in range(cfg.depth_layers))
            self.depth_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.apply(self._init_weights)
        for p in (self.cell_pos, getattr(self, "channel_pos", None), getattr(self, "depth_pos", None),
                  getattr(self, "condition_pos", None)):
            if p is not None:
                nn.init.normal_(p, std=INIT_STD)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            std = INIT_STD / math.sqrt(2 * m.residual_layers) if hasattr(m, "residual_layers") else INIT_STD
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=INIT_STD)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def null_class(self) -> int:
        """The label of the unconditional (dropped) class: num_classes."""
        return self.config.num_classes

    @property
    def prefix_len(self) -> int:
        """P, the condition prefix's positions before the class token (h·w with a condition, else 0)."""
        return self.config.seq_len // self.config.units_per_cell if self.condition is not None else 0

    @property
    def sink(self) -> int:
        """Positions every position sees whatever the window: the prefix and the class token."""
        return self.prefix_len + 1

    # ----------------------------------------------------------------------------------
    # Layout: token grid <-> units of the sequence
    # ----------------------------------------------------------------------------------
    def to_units(self, tokens: Tensor) -> Tensor:
        """``[B, C, h, w]`` → ``[B, N, U]`` in sequence order (raster over cells, then channels)."""
        u = self.config.unit_tokens
        return rearrange(tokens, "b c h w -> b (h w c)")[..., None] if u == 1 else rearrange(tokens, "b c h w -> b (h w) c")

    def from_units(self, units: Tensor, h: int, w: int) -> Tensor:
        """``[B, N, U]`` (or ``[B, N, U, K]``) → ``[B, C, h, w]`` (or ``[B, C, h, w, K]``)."""
        c = self.config.channels
        if self.config.unit_tokens == 1:
            return rearrange(units, "b (h w c) 1 ... -> b c h w ...", h=h, w=w, c=c)
        return rearrange(units, "b (h w) c ... -> b c h w ...", h=h, w=w)

    def position(self, s: Union[int, Tensor]) -> Tensor:
        """Position embedding(s) ``[..., D]`` of sequence position(s) s (the unit they predict)."""
        if self.config.factorization == "flat":
            c = self.config.channels
            return self.cell_pos[s // c] + self.channel_pos[s % c]
        return self.cell_pos[s]

    def embed_units(self, units: Tensor, positions: Tensor) -> Tensor:
        """Input embeddings ``[B, L, D]`` of ``units int [B, L, U]`` read at ``positions [L]`` (≥ 1):
        unit s−1 is the input of position s."""
        if self.config.unit_tokens == 1:
            channel = (positions - 1) % self.config.channels  # the channel of unit s − 1
            return self.token_emb(units[..., 0] + self.channel_offset[channel])
        return self.token_emb(units + self.channel_offset).sum(2)  # Σ of the C channel embeddings

    # ----------------------------------------------------------------------------------
    # Checks
    # ----------------------------------------------------------------------------------
    def _check_tokens(self, tokens: Tensor) -> Tensor:
        cfg = self.config
        expected = (cfg.channels, *cfg.grid_hw)
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"AutoregressivePrior: tokens must be an integer tensor, got {tokens.dtype}")
        if tokens.ndim != 4 or tuple(tokens.shape[1:]) != expected:
            want = ", ".join(map(str, expected))
            raise ValueError(f"AutoregressivePrior: tokens must have shape [B, {want}], got {tuple(tokens.shape)}")
        if tokens.shape[0] == 0:
            raise ValueError("AutoregressivePrior: got an empty batch of tokens (B = 0)")
        if not torch.compiler.is_compiling() and ((tokens < 0) | (tokens >= cfg.codebook_size)).any():
            got = f"[{int(tokens.min())}, {int(tokens.max())}]"
            raise ValueError(f"AutoregressivePrior: token ids must lie in [0, {cfg.codebook_size - 1}], got {got}")
        return tokens.long()

    def check_labels(self, labels: Optional[Tensor], batch: int, device: torch.device) -> Tensor:
        """``labels`` as int64 ``[batch]`` on ``device`` (None: the null class); a clear error for bad ones."""
        return check_class_labels("AutoregressivePrior", labels, batch, self.null_class, device).to(device)

    # ----------------------------------------------------------------------------------
    # The spatial transformer
    # ----------------------------------------------------------------------------------
    def condition_prefix(self, condition: Optional[Tensor], batch: int, drop: Optional[Tensor] = None) -> Tensor:
        """``[B, P, D]``: the encoded condition (the null condition where ``drop`` or for None) plus the
        prefix's position embeddings (before dropout; :meth:`sequence_inputs` applies it)."""
        if self.condition is None:
            raise ValueError("AutoregressivePrior: the model has no condition (config.condition is null)")
        return self.condition(condition, batch, drop) + self.condition_pos

    def sequence_inputs(self, labels: Tensor, units: Tensor, prefix: Optional[Tensor] = None) -> Tensor:
        """``[B, P + L, D]`` inputs: the condition ``prefix [B, P, D]`` (a conditional model), then
        positions 0…L−1: the class, then ``units [B, L−1, U]`` (units 0…L−2)."""
        length = units.shape[1] + 1
        pos = torch.arange(length, device=units.device)
        x = self.class_emb(labels)[:, None]
        if length > 1:
            x = torch.cat([x, self.embed_units(units, pos[1:])], 1)
        x = x + self.position(pos)
        if (prefix is None) != (self.condition is None):
            raise ValueError("AutoregressivePrior.sequence_inputs: a conditional model needs its condition prefix "
                             "and an unconditional one takes none")
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], 1)
        return self.emb_drop(x)

    def _mask(self, length: int, device) -> Optional[Tensor]:
        r, sink = self.config.window_units, self.sink
        return None if r >= length - sink else window_mask(length, r, device, sink)

    def prefill(self, x: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        """Spatial outputs ``[B, L, D]`` (after the final norm) of inputs ``x [B, L, D]`` at positions
        0…L−1, under the window mask; with ``cache`` (fresh) their keys and values are stored."""
        mask = self._mask(x.shape[1], x.device)
        for i, block in enumerate(self.blocks):
            if self.config.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask, cache, i)
        if cache is not None:
            cache.length = x.shape[1]
        return self.norm(x)

    def new_cache(self, batch: int, device: torch.device, dtype: Optional[torch.dtype] = None) -> KVCache:
        """An empty cache; its dtype is autocast's where autocast is on (keys and values come out of the
        projections in that dtype), else the weights'."""
        cfg = self.config
        if dtype is None:
            kind = torch.device(device).type
            on = torch.is_autocast_enabled(kind)
            dtype = torch.get_autocast_dtype(kind) if on else next(self.parameters()).dtype
        return KVCache(cfg.depth, batch, cfg.heads, cfg.width // cfg.heads, cfg.window_units, device, dtype, self.sink)

    def embed_step(self, pos: int, labels: Tensor, prev: Optional[Tensor]) -> Tensor:
        """Input ``[B, 1, D]`` of position ``pos``: the class (pos 0) or ``prev int [B, U]``, unit pos−1."""
        if pos == 0:
            x = self.class_emb(labels)
        else:
            x = self.embed_units(prev[:, None], torch.tensor([pos], device=prev.device))[:, 0]
        return x[:, None] + self.position(pos)

    def step(self, x: Tensor, pos: int, cache: KVCache) -> Tensor:
        """Spatial output ``[B, D]`` of one new position ``pos`` (input ``x [B, 1, D]``; pos counts from the
        class token, i.e. sequence position P + pos), attending to the cache; its keys and values are added
        (in the window's ring)."""
        at = pos + self.prefix_len
        if at != cache.length:
            p = self.prefix_len
            raise ValueError(f"KVCache holds positions 0…{cache.length - 1 - p} (after a prefix of {p}); the next step "
                             f"is {cache.length - p}, got {pos}")
        for i, block in enumerate(self.blocks):
            x = block(x, None, cache, i, at)
        cache.length = at + 1
        return self.norm(x)[:, 0]

    # ----------------------------------------------------------------------------------
    # Heads
    # ----------------------------------------------------------------------------------
    def _depth(self, hidden: Tensor, tokens: Tensor) -> Tensor:
        """Depth transformer: ``hidden [M, D]`` and the cell's first tokens ``[M, c]`` (c < C) →
        outputs ``[M, c + 1, D]`` predicting tokens 0…c."""
        n = tokens.shape[1]
        x = hidden[:, None]
        if n:
            x = torch.cat([x, self.token_emb(tokens + self.channel_offset[:n])], 1)
        x = x + self.depth_pos[: n + 1]
        for block in self.depth_blocks:
            x = block(x)  # plain causal attention over at most C positions
        return self.depth_norm(x)

    def token_logits(self, hidden: Tensor, prev: Tensor) -> Tensor:
        """Logits ``[B, K]`` of the next token of a unit, given the unit's spatial output
        ``hidden [B, D]`` and its tokens drawn so far ``prev int [B, c]`` (c < U)."""
        f, c, k = self.config.factorization, prev.shape[1], self.config.codebook_size
        if f == "flat":
            return self.head(hidden)
        if f == "cell":  # channel c's head; the other channels' tokens are not an input
            return F.linear(hidden, self.head.weight[c * k : (c + 1) * k], self.head.bias[c * k : (c + 1) * k])
        return self.head(self._depth(hidden, prev)[:, -1])

    def unit_logits(self, hidden: Tensor, units: Tensor) -> Tensor:
        """Teacher-forced logits ``[B, N, U, K]`` of every unit from spatial outputs ``[B, N, D]``."""
        f, b, n = self.config.factorization, hidden.shape[0], hidden.shape[1]
        if f == "flat":
            return self.head(hidden)[:, :, None]
        if f == "cell":
            return rearrange(self.head(hidden), "b n (c k) -> b n c k", c=self.config.channels)
        inner = self._depth(rearrange(hidden, "b n d -> (b n) d"), rearrange(units[..., :-1], "b n c -> (b n) c"))
        return rearrange(self.head(inner), "(b n) c k -> b n c k", b=b, n=n)

    # ----------------------------------------------------------------------------------
    def forward(self, tokens: Tensor, labels: Optional[Tensor] = None, condition: Optional[Tensor] = None,
                drop_condition: Optional[Tensor] = None) -> Tensor:
        """Logits ``[B, C, h, w, K]``: for each token, p(token | tokens before it, class, condition).

        ``labels int [B]`` in ``[0, num_classes]``; ``num_classes`` (or ``labels=None``) is the null class.
        ``condition uint8 [B, ch, H', W']`` (a conditional model; None = the null condition),
        ``drop_condition bool [B]``: rows that get the null condition instead.
        """
        tokens = self._check_tokens(tokens)
        b, _, h, w = tokens.shape
        labels = self.check_labels(labels, b, tokens.device)
        if self.condition is None and condition is not None:
            raise ValueError("AutoregressivePrior: a condition was given but the model has none (config.condition is null)")
        prefix = self.condition_prefix(condition, b, drop_condition) if self.condition is not None else None
        units = self.to_units(tokens)  # [B, N, U]
        hidden = self.prefill(self.sequence_inputs(labels, units[:, :-1], prefix))[:, self.prefix_len :]  # [B, N, D]
        return self.from_units(self.unit_logits(hidden, units), h, w)

    def training_loss(
        self, tokens: Tensor, labels: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
        condition: Optional[Tensor] = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Next-token cross-entropy on ``tokens int [B, C, h, w]``.

        Returns ``(loss, logs)``; ``logs`` holds detached scalars ``loss``, ``bits_per_token`` (the
        NLL without label smoothing, in bits), ``accuracy`` (top-1) and ``class_dropped``, and for a
        conditional model ``condition_dropped``. ``condition``: the samples' conditions (needed by a model
        with ``config.condition``).
        """
        cfg = self.config
        tokens = self._check_tokens(tokens)
        b = tokens.shape[0]
        if cfg.num_classes > 0 and labels is None:
            raise ValueError("AutoregressivePrior.training_loss: a class-conditional model needs labels [B]")
        if cfg.condition is not None and condition is None:
            raise ValueError("AutoregressivePrior.training_loss: a model conditioned on "
                             f"{cfg.condition.kind} needs its conditions")
        labels = self.check_labels(labels, b, tokens.device)
        dropped, cond_dropped = draw_dropout(cfg, b, generator, tokens.device, random_uniform)
        labels = torch.where(dropped, torch.full_like(labels, self.null_class), labels)
        logits = self(tokens, labels, condition, cond_dropped).float().flatten(0, -2)  # [B·C·h·w, K]
        targets = tokens.flatten()
        loss = F.cross_entropy(logits, targets, label_smoothing=cfg.label_smoothing)
        with torch.no_grad():
            nll = loss if cfg.label_smoothing == 0 else F.cross_entropy(logits, targets)
            logs = {
                "loss": loss.detach(),
                "bits_per_token": nll.detach() / math.log(2),
                "accuracy": (logits.argmax(-1) == targets).float().mean(),
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
            is_matrix = p.ndim >= 2 and not name.endswith(("_emb.weight", "_pos", "condition.null"))
            (decay if is_matrix else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


__all__ = [
    "AutoregressiveConfig", "AutoregressivePrior", "KVCache", "CausalSelfAttention", "Block", "window_mask",
    "FACTORIZATIONS",
]
