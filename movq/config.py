"""Configuration: one dataclass per component, loaded from YAML with ``key.sub=value`` overrides.

The loader is strict, as a config typo should never train the wrong model for a week: an unknown
key or a value of the wrong type fails with a message naming the key and the file. Every run and
checkpoint stores its resolved config (``save_config``) so a resume or ``from_pretrained`` rebuilds
exactly the same model.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from movq.utils import atomic_write


class ConfigError(ValueError):
    """A config file or override that does not match the dataclass it describes."""


class ConfigValueError(ConfigError):
    """A value outside what its field allows. ``key`` is the field's name within its section; the loader
    and :func:`check_config` turn it into the full dotted key (``model.base_channels``)."""

    def __init__(self, owner: str, key: str, reason: str):
        super().__init__(f"{owner}.{key} {reason}")
        self.key, self.reason = key, reason


def _require(owner: str, *checks: tuple[bool, str, str]) -> None:
    """Raise ``ConfigValueError`` for the first ``(ok, key, reason)`` that is not ok."""
    for ok, key, reason in checks:
        if not ok:
            raise ConfigValueError(owner, key, reason)


def _at_least(obj: Any, key: str, low: float) -> tuple[bool, str, str]:
    value = getattr(obj, key)
    return value >= low, key, f"must be ≥ {low}, got {value}"


def _fraction(obj: Any, key: str) -> tuple[bool, str, str]:
    """A decay or dropout rate: in [0, 1)."""
    value = getattr(obj, key)
    return 0 <= value < 1, key, f"must lie in [0, 1), got {value}"


# --------------------------------------------------------------------------------------
# Stage 1: the tokenizer
# --------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """Encoder / decoder shape. Paper setting (MoVQ, Zheng et al. 2022): 256² → 16×16 cells."""

    in_channels: int = 3
    out_channels: int = 3
    # The training image size: it places attention (attn_resolutions are feature-map sizes) and is the
    # default image size of tools/tokenize_dataset.py and tools/fid.py (converted checkpoints: 256, nominal).
    resolution: int = 256
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # len(channel_mult) - 1 downsamplings
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    # Encoder output / decoder input width; None = channels × dim of the quantizer. taming's VQGANs
    # use a wider z_channels and project to the code width with quant_conv / post_quant_conv.
    z_channels: Optional[int] = None
    norm: Literal["spatial", "group"] = "spatial"  # spatial = MoVQ decoder, group = VQGAN baseline
    norm_groups: int = 32
    # MoVQGAN's SpatialNorm(add_conv=True): a 3×3 conv on the upsampled zq before conv_y / conv_b.
    spatial_norm_conv: bool = False
    # How SpatialNorm's conv_y / conv_b start in a new model (loaded weights replace them): "identity" =
    # scale 1, shift 0, the GroupNorm decoder at step 0 (as DiT's adaLN-zero); "default" = PyTorch's
    # conv init, as MoVQGAN and diffusers.
    spatial_norm_init: Literal["identity", "default"] = "default"
    # The map SpatialNorm is conditioned on: "quantized" = zq before post_quant_conv (the paper, MoVQGAN,
    # diffusers; C·d wide); "post_quant" = after it (z_channels wide).
    spatial_norm_zq: Literal["quantized", "post_quant"] = "quantized"
    # taming/MoVQGAN put an extra res block in each decoder level (num_res_blocks + 1)
    decoder_extra_block: bool = True
    # attention in the middle of encoder and decoder (taming: always on)
    mid_attention: bool = True
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        _require(
            "ModelConfig",
            *(_at_least(self, k, 1) for k in ("in_channels", "out_channels", "resolution", "base_channels",
                                               "num_res_blocks", "norm_groups")),
            (len(self.channel_mult) > 0 and min(self.channel_mult) >= 1, "channel_mult",
             f"must be a non-empty list of multipliers ≥ 1, got {list(self.channel_mult)}"),
            (all(r >= 1 for r in self.attn_resolutions), "attn_resolutions",
             f"must be feature-map sizes ≥ 1, got {list(self.attn_resolutions)}"),
            _fraction(self, "dropout"),
            (self.z_channels is None or self.z_channels >= 1, "z_channels", f"must be ≥ 1 or null, got {self.z_channels}"),
            (self.norm in ("spatial", "group"), "norm", f"must be spatial or group, got {self.norm!r}"),
        )


@dataclass
class QuantizerConfig:
    """Multichannel VQ: C channels of width ``dim`` share one codebook of ``codebook_size`` codes."""

    codebook_size: int = 1024
    channels: int = 4  # C; the latent has channels * dim feature maps
    dim: int = 64  # d, the width of one code
    beta: float = 0.25  # weight of the commitment term ‖z − sg(e)‖² (not the codebook term)
    # Which term β multiplies. "codebook" reproduces taming's / diffusers' legacy=True quantizer
    # (loss = ‖z − sg(e)‖² + β‖sg(z) − e‖²), which their released VQGAN / MoVQ weights were trained with.
    beta_on: Literal["commitment", "codebook"] = "commitment"
    cosine: bool = False  # l2-normalise codes and inputs (ViT-VQGAN style)
    ema: bool = False  # EMA codebook updates instead of the codebook loss
    ema_decay: float = 0.99
    kmeans_init: bool = False  # initialise the codebook by k-means on the first training batch
    kmeans_iters: int = 10
    # Restart codes whose EMA usage (expected hits per step) drops below this, from recent
    # encoder outputs. 0 disables.
    dead_code_threshold: float = 0.0
    usage_decay: float = 0.99  # decay of the per-code usage EMA (drives dead-code restart)
    usage_window: int = 1000  # a code counts as "used" if it was chosen in the last N training steps
    chunk_size: int = 8192  # rows per chunk of the torch nearest-code search (bounds memory)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        _require(
            "QuantizerConfig",
            _at_least(self, "codebook_size", 2), _at_least(self, "channels", 1), _at_least(self, "dim", 1),
            _at_least(self, "beta", 0), _at_least(self, "kmeans_iters", 0), _at_least(self, "dead_code_threshold", 0),
            (0 < self.ema_decay < 1, "ema_decay", f"must lie in (0, 1), got {self.ema_decay}"),
            (0 < self.usage_decay < 1, "usage_decay", f"must lie in (0, 1), got {self.usage_decay}"),
            _at_least(self, "usage_window", 1), _at_least(self, "chunk_size", 1),
        )


@dataclass
class DiscriminatorConfig:
    """PatchGAN (pix2pix / taming NLayerDiscriminator)."""

    in_channels: int = 3
    base_channels: int = 64
    n_layers: int = 3
    norm: Literal["batch", "spectral", "none"] = "batch"

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        _require("DiscriminatorConfig", _at_least(self, "in_channels", 1), _at_least(self, "base_channels", 1),
                 _at_least(self, "n_layers", 1))

    def min_image_size(self) -> int:
        """The smallest input with at least one patch logit: ``n_layers`` 4×4 stride-2 convolutions halve
        the size (rounding down), then two 4×4 stride-1 ones take one pixel each."""
        return 3 * 2**self.n_layers


@dataclass
class LossConfig:
    """Weights and schedule of the tokenizer loss (taming's VQLPIPSWithDiscriminator)."""

    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual_weight: float = 1.0  # LPIPS; 0 turns it off (and no weights are needed)
    lpips_vgg_path: Optional[str] = None  # torchvision vgg16-397923af.pth
    lpips_lin_path: Optional[str] = None  # LPIPS v0.1 vgg.pth linear heads
    codebook_weight: float = 1.0
    disc_weight: float = 0.8
    disc_factor: float = 1.0
    disc_start: int = 10000  # GAN terms are off before this step (generator and discriminator)
    adaptive_weight_max: float = 1e4
    adaptive_weight_eps: float = 1e-4

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        _require(
            "LossConfig",
            *(_at_least(self, k, 0) for k in ("l1_weight", "l2_weight", "perceptual_weight", "codebook_weight",
                                               "disc_weight", "disc_factor", "disc_start")),
            (self.adaptive_weight_max > 0, "adaptive_weight_max", f"must be > 0, got {self.adaptive_weight_max}"),
            (self.adaptive_weight_eps > 0, "adaptive_weight_eps", f"must be > 0, got {self.adaptive_weight_eps}"),
        )


@dataclass
class DataConfig:
    """Where images come from. ``source``: builtin (offline default), shapes (offline, labelled:
    ``movq.data.shapes``), folder or shards."""

    source: Literal["builtin", "shapes", "folder", "shards"] = "builtin"
    train: Optional[str] = None  # folder path or shard pattern (brace patterns allowed)
    val: Optional[str] = None
    image_size: int = 256
    batch_size: int = 8  # per process
    num_workers: int = 2
    cache_dir: Optional[str] = None  # builtin dataset shards; default $MOVQ_CACHE_DIR or ~/.cache/movq
    builtin_train_size: int = 2048  # images made for the training split of builtin (crops) or shapes
    builtin_val_size: int = 64
    # Samples per training epoch over all ranks (each rank yields epoch_length // (batch_size *
    # world_size) batches). Default: the dataset size (file count or manifest count).
    epoch_length: Optional[int] = None
    shuffle_buffer: int = 1000  # encoded samples held per worker to shuffle within shards
    random_flip: bool = True
    seed: int = 0  # data order, augmentation and the builtin dataset's crops
    # Check each shard's sha256 against its manifest when a loader process first reads it (a hash pass
    # over the file before its samples are used; loader workers are new processes every epoch).
    verify: bool = True
    # A shard that cannot be used (unreadable, sha256 or sample count not as in its manifest, listed but
    # missing, no usable image): "skip" counts its samples as skipped (data_skipped/shard_*) and goes on
    # with the others, so one bad shard in thousands costs its samples, not the run (nor every resume of
    # it); "error" stops with a line naming the shard.
    on_bad_shard: Literal["skip", "error"] = "skip"

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        _require(
            "DataConfig",
            (self.source in ("builtin", "shapes", "folder", "shards"), "source",
             f"must be builtin, shapes, folder or shards, got {self.source!r}"),
            *(_at_least(self, k, 1) for k in ("image_size", "batch_size", "builtin_train_size", "builtin_val_size",
                                               "shuffle_buffer")),
            _at_least(self, "num_workers", 0),
            (self.epoch_length is None or self.epoch_length >= 1, "epoch_length",
             f"must be ≥ 1 (or null: the dataset size), got {self.epoch_length}"),
            (self.on_bad_shard in ("skip", "error"), "on_bad_shard", f"must be skip or error, got {self.on_bad_shard!r}"),
        )


@dataclass
class TrainConfig:
    """Loop settings shared by both trainers."""

    run_dir: str = "runs/tokenizer"
    max_steps: int = 100000
    lr: float = 1e-4
    disc_lr: Optional[float] = None  # defaults to lr
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    # After the warmup: constant (taming, MoVQ), or a cosine (MaskGIT) / linear decay to min_lr_ratio · lr at
    # max_steps (the discriminator's, which starts at loss.disc_start, ends there too)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # max global grad norm, G and D each; 0 disables (taming: none; MoVQGAN: by value 1.0)
    grad_accum: int = 1
    # None: the launcher's choice (accelerate launch --mixed_precision, accelerate config, ACCELERATE_MIXED_PRECISION),
    # else no. fp16 is refused, see training.run.make_accelerator
    mixed_precision: Optional[Literal["no", "bf16", "fp16"]] = None
    ema_decay: float = 0.999  # 0 disables the EMA copy of the generator
    seed: int = 0
    log_every: int = 50
    eval_every: int = 1000
    save_every: int = 1000
    keep_checkpoints: int = 3
    resume: Optional[str] = None  # "latest" or a checkpoint folder
    max_bad_steps: int = 10  # abort after this many non-finite steps in a row
    trackers: tuple[str, ...] = ()  # "wandb", "tensorboard"
    project: str = "movq"
    fid_every: int = 0  # 0: no FID during training
    fid_num_images: int = 1000
    inception_weights: Optional[str] = None
    fid_reference: Optional[str] = None  # .npz of mu/sigma for the eval set
    # Seconds a collective (all-reduce, barrier, broadcast) may wait for the other ranks: after that a rank
    # that froze or died ends the run on every live rank (an error line, exit code 4) instead of a hang.
    # It bounds the longest gap between two steps' collectives too (rank 0 alone writing a checkpoint,
    # FID reference statistics), hence minutes rather than seconds.
    dist_timeout: float = 600.0

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        _require(
            "TrainConfig",
            _at_least(self, "max_steps", 0), (self.lr > 0, "lr", f"must be > 0, got {self.lr}"),
            (self.disc_lr is None or self.disc_lr > 0, "disc_lr", f"must be > 0 (or null: lr), got {self.disc_lr}"),
            (all(0 <= b < 1 for b in self.betas), "betas", f"must lie in [0, 1), got {list(self.betas)}"),
            _at_least(self, "weight_decay", 0), _at_least(self, "warmup_steps", 0), _at_least(self, "grad_clip", 0),
            _at_least(self, "grad_accum", 1), _fraction(self, "ema_decay"),
            *(_at_least(self, k, 1) for k in ("log_every", "eval_every", "save_every", "keep_checkpoints",
                                               "fid_num_images")),
            _at_least(self, "max_bad_steps", 0), _at_least(self, "fid_every", 0),
            (self.dist_timeout > 0, "dist_timeout", f"must be > 0 seconds, got {self.dist_timeout}"),
        )


@dataclass
class MoVQConfig:
    """The tokenizer's architecture alone: what a model folder's ``config.json`` stores."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)


@dataclass
class TokenizerConfig:
    """Everything a tokenizer run needs, grouped by component as in taming (``model`` and ``quantizer``
    make the :class:`MoVQConfig`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------------------
# Stage 2: the priors
# --------------------------------------------------------------------------------------
# How MaskGIT's masked fraction falls from 1 to 0 (movq.models.masking.mask_schedule).
MaskSchedule = Literal["cosine", "linear", "square"]
MASK_SCHEDULES = typing.get_args(MaskSchedule)

# Steps of the parallel decode: MaskGIT reports 8 steps as its best FID on ImageNet 256
# (Fig. 4), with quality flat to 12 and worse beyond.
DEFAULT_STEPS = 8


# Scale of the Gumbel noise on the re-masking confidence at step 0, annealed linearly to 0:
# the value of MaskGIT's ImageNet configs. Without it the model keeps its most "obvious" tokens
# first (flat backgrounds) and samples lose diversity.
DEFAULT_CHOICE_TEMPERATURE = 4.5


# Image conditions of the priors (movq.data.conditions makes them, movq.models.condition encodes them).
ConditionKind = Literal["edges", "segmentation", "lowres"]
CONDITION_KINDS = typing.get_args(ConditionKind)


@dataclass
class ConditionConfig:
    """An image condition of a prior (``model.condition``; null = none): what it is and how it is encoded.

    ``edges``: Canny edges (the union over R, G, B), 1 channel {0, 1} at the image size. ``segmentation``: a label
    map of ``num_classes`` classes at the image size, one-hot in the encoder. ``lowres``: the RGB image
    box-downsampled by ``factor``. The trainer checks kind and parameters against the token folder's."""

    kind: ConditionKind = "edges"
    num_classes: int = 0  # segmentation: classes of the label map (0 … num_classes − 1); else 0
    factor: int = 4  # lowres: the downsampling factor
    sigma: float = 1.0  # edges: the Gaussian of skimage.feature.canny, in pixels at the image size
    # The condition's (height, width) in training; null: set from the token folder by the trainer. Sampling
    # resizes a condition of another size to it.
    size: Optional[tuple[int, int]] = None
    hidden: int = 64  # channels of the condition encoder's convolutions
    # P(condition → the learned null condition) in training, for guidance and unconditional sampling. One draw
    # per sample decides both this and class_dropout (dropped if u < rate), so with equal rates class and
    # condition are dropped together: the null branch of guidance (both dropped) is what training saw.
    dropout: float = 0.1

    def __post_init__(self) -> None:
        self.check()

    @property
    def channels(self) -> int:
        """Channels of the stored condition (uint8 ``[channels, H, W]``): 3 for lowres, else 1."""
        return 3 if self.kind == "lowres" else 1

    def check(self) -> None:
        _require(
            "ConditionConfig",
            (self.kind in CONDITION_KINDS, "kind", f"must be one of {list(CONDITION_KINDS)}, got {self.kind!r}"),
            (self.kind != "segmentation" or self.num_classes >= 2, "num_classes",
             f"must be ≥ 2 for a segmentation condition, got {self.num_classes}"),
            (self.kind == "segmentation" or self.num_classes == 0, "num_classes",
             f"is for segmentation conditions only (0 for {self.kind}), got {self.num_classes}"),
            _at_least(self, "factor", 1),
            (self.sigma > 0, "sigma", f"must be > 0, got {self.sigma}"),
            (self.size is None or min(self.size) >= 1, "size", f"must be positive or null, got {self.size}"),
            _at_least(self, "hidden", 1),
            (0 <= self.dropout <= 1, "dropout", f"must lie in [0, 1], got {self.dropout}"),
        )

    def params(self) -> dict:
        """How the condition is made from an image: what a token folder's condition must match."""
        extra = {"edges": {"sigma": self.sigma}, "lowres": {"factor": self.factor},
                 "segmentation": {"num_classes": self.num_classes}}[self.kind]
        return {"kind": self.kind, **extra}


def _prior_transformer_checks(cfg) -> list[tuple[bool, str]]:
    """``(ok, message)`` for the fields both priors' transformers share (MaskGIT, autoregressive)."""
    h, w = cfg.grid_hw
    return [
        (cfg.codebook_size >= 2, f"codebook_size must be >= 2, got {cfg.codebook_size}"),
        (cfg.channels >= 1, f"channels must be >= 1, got {cfg.channels}"),
        (h >= 1 and w >= 1, f"grid must be positive, got {cfg.grid!r}"),
        (cfg.num_classes >= 0, f"num_classes must be >= 0, got {cfg.num_classes}"),
        (cfg.depth >= 1, f"depth must be >= 1, got {cfg.depth}"),
        (cfg.heads >= 1, f"heads must be >= 1, got {cfg.heads}"),
        (cfg.width % cfg.heads == 0, f"width {cfg.width} must be divisible by heads {cfg.heads}"),
        (cfg.mlp_ratio > 0, f"mlp_ratio must be > 0, got {cfg.mlp_ratio}"),
        (0 <= cfg.dropout < 1 and 0 <= cfg.attn_dropout < 1, "dropout rates must lie in [0, 1)"),
        (0 <= cfg.class_dropout <= 1, f"class_dropout must lie in [0, 1], got {cfg.class_dropout}"),
        (0 <= cfg.label_smoothing < 1, f"label_smoothing must lie in [0, 1), got {cfg.label_smoothing}"),
    ]


@dataclass
class MaskGITConfig:
    """Shape and training objective of the prior. Defaults: MaskGIT's ImageNet 256 model."""

    codebook_size: int = 1024  # K; token id K is [MASK]
    channels: int = 4  # C, tokens per cell (MoVQ paper: 16×16×4)
    grid: Union[int, tuple[int, int]] = 16  # h = w, or (h, w)
    num_classes: int = 1000  # 0 = unconditional; id num_classes is the null class
    width: int = 768
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0  # 768 → 3072, as in BERT-base / MaskGIT
    dropout: float = 0.1  # embeddings and residual branches (MaskGIT: 0.1)
    attn_dropout: float = 0.1  # attention probabilities (MaskGIT: 0.1)
    class_dropout: float = 0.1  # P(label → null) in training, for guidance (Muse / DiT: 0.1)
    label_smoothing: float = 0.1  # MaskGIT: 0.1
    # The class embedding as MaskGIT has it, a token before the cells (False), or that token AND added to every
    # cell's input embedding (True): each cell then carries the class from the first layer on. On the shapes
    # data (configs/maskgit_shapes.yaml) it took MaskGIT's sample accuracy from 0.875 to 0.910 (stars 0.19 → 0.38).
    class_in_cells: bool = False
    # Lower bound on the masked fraction in training. MaskGIT has none (it masks ≥ 1 token);
    # raising it spends fewer steps on the nearly solved, barely informative low-mask inputs.
    min_mask_rate: float = 0.0
    mask_schedule: MaskSchedule = "cosine"
    gradient_checkpointing: bool = False
    # An image condition, added to each cell's input embedding (movq.models.condition); null = none.
    condition: Optional[ConditionConfig] = None

    def __post_init__(self) -> None:
        checks = [
            *_prior_transformer_checks(self),
            (0 <= self.min_mask_rate <= 1, f"min_mask_rate must lie in [0, 1], got {self.min_mask_rate}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"MaskGITConfig: {msg}")
        if self.mask_schedule not in MASK_SCHEDULES:
            raise ValueError(
                f"MaskGITConfig: mask_schedule must be one of {list(MASK_SCHEDULES)}, got {self.mask_schedule!r}"
            )

    @property
    def grid_hw(self) -> tuple[int, int]:
        g = self.grid
        return (g, g) if isinstance(g, int) else (int(g[0]), int(g[1]))

    @classmethod
    def load(cls, source=None, overrides=()) -> MaskGITConfig:
        """From a YAML path / dict / instance, strictly (see :func:`movq.config.load_config`)."""
        return load_config(cls, source, overrides)


# How the autoregressive prior orders the C tokens of a cell (movq.models.autoregressive).
Factorization = Literal["flat", "cell", "depth"]
FACTORIZATIONS = typing.get_args(Factorization)


@dataclass
class AutoregressiveConfig:
    """Shape and objective of the autoregressive prior (:mod:`movq.models.autoregressive`). Defaults:
    the GPT of taming's faces configs (24 layers, 16 heads, width 1664) on MoVQ's 16×16×4 tokens."""

    codebook_size: int = 1024  # K
    channels: int = 4  # C, tokens per cell
    grid: Union[int, tuple[int, int]] = 16  # h = w, or (h, w): the training grid
    num_classes: int = 1000  # 0 = unconditional; id num_classes is the null class
    # flat: h·w·C positions; cell: h·w positions, C independent heads; depth: h·w positions plus a
    # small transformer over a cell's C tokens (RQ-Transformer). depth had the lowest held-out NLL at
    # equal budget (benchmarks/results/ar_factorization_cpu.json).
    factorization: Factorization = "depth"
    width: int = 1664
    depth: int = 24  # spatial transformer layers
    depth_layers: int = 2  # layers of the depth transformer (factorization=depth only)
    heads: int = 16
    mlp_ratio: float = 4.0
    dropout: float = 0.0  # embeddings and residual branches (taming: 0.0)
    attn_dropout: float = 0.0  # attention probabilities (taming: 0.0)
    class_dropout: float = 0.1  # P(label → null) in training, for guidance (DiT / Muse: 0.1)
    label_smoothing: float = 0.0  # taming: none; bits/token in the logs are always without it
    window: int = 0  # attention window in cells (each position sees the W cells before it); 0 = full
    gradient_checkpointing: bool = False
    # An image condition, read as a prefix of h·w embeddings before the class token (movq.models.condition);
    # null = none.
    condition: Optional[ConditionConfig] = None

    def __post_init__(self) -> None:
        checks = [
            *_prior_transformer_checks(self),
            (self.depth_layers >= 1, f"depth_layers must be >= 1, got {self.depth_layers}"),
            (self.window >= 0, f"window must be >= 0 cells (0 = full attention), got {self.window}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"AutoregressiveConfig: {msg}")
        if self.factorization not in FACTORIZATIONS:
            raise ValueError(
                f"AutoregressiveConfig: factorization must be one of {list(FACTORIZATIONS)}, got {self.factorization!r}"
            )

    @property
    def grid_hw(self) -> tuple[int, int]:
        g = self.grid
        return (g, g) if isinstance(g, int) else (int(g[0]), int(g[1]))

    @property
    def unit_tokens(self) -> int:
        """Tokens per sequence position: 1 (flat) or C."""
        return 1 if self.factorization == "flat" else self.channels

    @property
    def units_per_cell(self) -> int:
        """Sequence positions per cell: C (flat) or 1."""
        return self.channels if self.factorization == "flat" else 1

    @property
    def seq_len(self) -> int:
        """N, the spatial transformer's sequence length."""
        h, w = self.grid_hw
        return h * w * self.units_per_cell

    @property
    def window_units(self) -> int:
        """Positions (besides the class token) a position attends to: ``min(W·U, N − 1)``
        (W = 0: N − 1, full attention)."""
        n = self.seq_len - 1
        return min(self.window * self.units_per_cell, n) if self.window else n

    @classmethod
    def load(cls, source=None, overrides=()) -> AutoregressiveConfig:
        """From a YAML path / dict / instance, strictly (see :func:`movq.config.load_config`)."""
        return load_config(cls, source, overrides)


@dataclass
class TokenDataConfig:
    """Where the prior's tokens come from (a folder written by ``tools/tokenize_dataset.py``)."""

    tokens: Optional[str] = None  # the token folder (manifest.json + tokens-*.tar)
    batch_size: int = 64  # per process
    seed: int = 0  # data order (a resume continues the same order)
    verify: bool = True  # check every shard's sha256 against the manifest when loading
    # Tokenizer that decodes samples to images (grids, FID). None: the one named in the manifest, if
    # that folder exists; without any, grids are written as token maps.
    tokenizer: Optional[str] = None
    # "check": model.codebook_size / channels / grid must equal the tokens' (else an error saying
    # which override to set). "from_tokens": take them from the manifest, and num_classes too (an
    # unconditional model, num_classes 0, stays unconditional).
    model_shape: Literal["check", "from_tokens"] = "check"

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        _require("TokenDataConfig", _at_least(self, "batch_size", 1))


@dataclass
class SampleConfig:
    """Sampling settings for grids, FID and tools/sample.py: MaskGIT's parallel decoding (T = 8, choice
    temperature 4.5) and the autoregressive prior's token-by-token sampling (top-k / top-p)."""

    steps: int = DEFAULT_STEPS  # MaskGIT: decoding steps T
    temperature: float = 1.0  # token sampling temperature (0 = argmax); both priors
    choice_temperature: float = DEFAULT_CHOICE_TEMPERATURE  # MaskGIT: Gumbel noise on the re-masking confidence
    cfg_scale: float = 1.0  # classifier-free guidance; 1 = the conditional model; both priors
    cfg_schedule: Literal["constant", "linear"] = "constant"  # MaskGIT (the autoregressive prior: constant only)
    top_k: Optional[int] = None  # autoregressive: keep the k most likely tokens (None: all)
    top_p: Optional[float] = None  # autoregressive: keep the nucleus of probability p (None: all)
    grid_images: int = 16  # samples in the periodic grid
    inpaint_images: int = 4  # token maps of the training data in the inpainting example

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        _require("SampleConfig", _at_least(self, "steps", 1), _at_least(self, "temperature", 0),
                 _at_least(self, "choice_temperature", 0), _at_least(self, "cfg_scale", 0),
                 _at_least(self, "grid_images", 0), _at_least(self, "inpaint_images", 0))


PriorKind = Literal["maskgit", "autoregressive"]
PRIOR_KINDS = typing.get_args(PriorKind)
# The architecture dataclass of each kind: what the ``model`` section of a prior config holds.
PRIOR_MODEL_CONFIGS = {"maskgit": MaskGITConfig, "autoregressive": AutoregressiveConfig}


@dataclass
class PriorConfig:
    """Everything a prior run needs: kind / model / data / train / sample.

    ``kind`` chooses the prior and with it the type of ``model``: a :class:`MaskGITConfig` (the default,
    so configs and runs from before the autoregressive prior load unchanged) or an
    :class:`AutoregressiveConfig`. The loader reads ``kind`` first and checks the ``model`` keys against
    that dataclass (``kind: autoregressive`` with ``model.mask_schedule`` is an unknown key)."""

    kind: PriorKind = "maskgit"
    model: Union[MaskGITConfig, AutoregressiveConfig] = field(default_factory=MaskGITConfig)
    data: TokenDataConfig = field(default_factory=TokenDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        if self.kind not in PRIOR_KINDS:
            raise ValueError(f"PriorConfig: kind must be one of {list(PRIOR_KINDS)}, got {self.kind!r}")
        want = PRIOR_MODEL_CONFIGS[self.kind]
        if not isinstance(self.model, want):
            if self.model == MaskGITConfig():  # PriorConfig(kind="autoregressive"): the default model of that kind
                self.model = want()
            else:
                raise ValueError(f"PriorConfig: kind {self.kind!r} needs model to be a {want.__name__}, "
                                 f"got a {type(self.model).__name__}")

    @staticmethod
    def field_types(data: dict) -> dict:
        """The ``model`` section's type follows ``kind`` (see :func:`_build`)."""
        kind = data.get("kind", "maskgit")
        return {"model": PRIOR_MODEL_CONFIGS[kind]} if kind in PRIOR_MODEL_CONFIGS else {}


@dataclass
class ClipGuidanceConfig:
    """Text guidance with CLIP (VQGAN+CLIP, Crowson et al. 2022): Adam on a tokenizer's latent z, scored by CLIP
    on random cut-outs. Defaults are the recipe's (its notebook's step size, cut-outs and noise)."""

    steps: int = 300
    lr: float = 0.1  # Adam's step size on z
    cutn: int = 32  # random cut-outs per step, each resized to CLIP's input size
    cut_pow: float = 1.0  # cut-out side = min_side + U^cut_pow · (max_side − min_side): > 1 favours small cut-outs
    augment: bool = True  # random flips, small rotations / shifts / zooms, colour jitter on the cut-outs
    noise: float = 0.1  # Gaussian noise on each cut-out, its std drawn from U(0, noise); 0 = none
    clamp: bool = True  # after each step, z is clamped per component to the codebook's range (z_min / z_max)
    init_weight: float = 0.0  # pull towards the start: + init_weight · mean((z − z₀)²) / 2 (keeps an init image)


# --------------------------------------------------------------------------------------
# Loading and saving
# --------------------------------------------------------------------------------------
T = typing.TypeVar("T")


def _coerce(value: Any, tp: Any, key: str, origin: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (lists → tuples)."""
    where = f"config key '{key}' in {origin}"
    org = typing.get_origin(tp)
    if tp is Any:
        return value
    if org in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, origin)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} matches none of {tp}")
    if org is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if org in (tuple, list):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # `attn_resolutions=16` on the command line means (16,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if org is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {list(value)}")
            items = [_coerce(v, a, key, origin) for v, a in zip(value, args)]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(v, item_tp, key, origin) for v in value]
        return tuple(items) if org is tuple else items
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, key, origin)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)  # 1e4 in YAML
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)  # YAML 1.1 reads "1e-4" as a string
                except ValueError:
                    pass
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported annotation {tp}")


def _build(cls: type[T], data: dict, prefix: str, origin: str) -> T:
    hints = typing.get_type_hints(cls)
    # A dataclass may narrow the type of a section by the section's siblings (PriorConfig: model by kind).
    narrow = getattr(cls, "field_types", None)
    if narrow is not None:
        hints.update(narrow(data))
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        full = [f"{prefix}.{k}" if prefix else k for k in unknown]
        raise ConfigError(
            f"unknown config key(s) {full} in {origin}; valid keys under "
            f"'{prefix or '<top>'}': {sorted(names)}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key, origin)
    try:
        return cls(**kwargs)
    except ConfigValueError as e:
        key = f"{prefix}.{e.key}" if prefix else e.key
        raise ConfigError(f"config key '{key}' in {origin}: {e.reason}") from None
    except ValueError as e:  # a __post_init__ check: say where the values came from
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{e} (in {origin})") from None


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: typing.Iterable[str]) -> dict:
    """``["model.base_channels=64", "train.resume=latest"]`` → nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_path(tree, key, value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(
    cls: type[T],
    source: Union[str, os.PathLike, dict, T, None] = None,
    overrides: typing.Iterable[str] = (),
) -> T:
    """Build ``cls`` from a YAML path, a dict or an instance, then apply ``key=value`` overrides.

    Raises ``ConfigError`` naming the key and the file for unknown keys and wrong types, and
    ``FileNotFoundError`` for a missing file.
    """
    origin = "<dict>"
    if source is None:
        data: dict = {}
        origin = "<defaults>"
    elif dataclasses.is_dataclass(source) and not isinstance(source, type):
        data = to_dict(source)
        origin = f"<{type(source).__name__}>"
    elif isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        origin = str(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    overrides = list(overrides)
    if overrides:
        data = _merge(data, parse_overrides(overrides))
        origin = f"{origin} + command-line overrides"
    return _build(cls, data, "", origin)


def to_dict(cfg: Any) -> dict:
    """A plain, YAML-safe dict of a config (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)



def check_config(cfg: Any, prefix: str = "") -> None:
    """Run every section's range checks again (values set after construction skip ``__post_init__``);
    ``ConfigError`` naming the dotted key of the first bad value."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_config(value, f"{prefix}{f.name}.")
    check = getattr(cfg, "check", None)
    if check is not None:
        try:
            check()
        except ConfigValueError as e:
            raise ConfigError(f"config key '{prefix}{e.key}': {e.reason}") from None


def save_config(cfg: Any, path: Union[str, os.PathLike]) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
