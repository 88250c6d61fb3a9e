"""MoVQ: a VQGAN whose decoder is modulated by the quantized map (Zheng et al., NeurIPS 2022).

    x ─► Encoder ─► quant_conv ─► MultichannelQuantizer ─► zq ─► post_quant_conv ─► Decoder(·, zq) ─► x̂

The encoder and decoder are the taming-transformers VQGAN (Esser et al. 2021). With
``model.norm="spatial"`` every norm of the decoder (res blocks, attention, output) is a
``SpatialNorm`` conditioned on ``zq``, the quantized map *before* ``post_quant_conv``; with
``"group"`` it is the plain VQGAN baseline. Images are float tensors in [-1, 1], ``[B, 3, H, W]``.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from movq.config import ModelConfig, MoVQConfig, TokenizerConfig, load_config
from movq.models.layers import AttnBlock, Downsample, Norm, ResnetBlock, SpatialNorm, Upsample
from movq.models.pretrained import PretrainedModel
from movq.models.quantizer import MultichannelQuantizer, QuantizerOutput


def _run(block: nn.Module, x: torch.Tensor, zq: Optional[torch.Tensor], ckpt: bool) -> torch.Tensor:
    """Call ``block(x, zq)``, recomputing it in backward when gradient checkpointing is on."""
    if ckpt and torch.is_grad_enabled():
        return checkpoint(block, x, zq, use_reentrant=False)
    return block(x, zq)


class Encoder(nn.Module):
    """[B, in_channels, H, W] → [B, z_channels, H/f, W/f] with f = 2^(len(channel_mult) − 1)."""

    def __init__(self, cfg: ModelConfig, z_channels: int):
        super().__init__()
        self.cfg = cfg
        ch, g = cfg.base_channels, cfg.norm_groups
        block = dict(norm="group", num_groups=g, dropout=cfg.dropout)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        res = cfg.resolution
        in_mult = (1,) + tuple(cfg.channel_mult)
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.channel_mult):
            stage = nn.Module()
            c_in, c_out = ch * in_mult[level], ch * mult
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(c_in, c_out, **block))
                c_in = c_out
                if res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(c_out, norm="group", num_groups=g))
            if level != len(cfg.channel_mult) - 1:
                stage.downsample = Downsample(c_out)
                res //= 2
            self.down.append(stage)
        c = ch * cfg.channel_mult[-1]
        self.mid_block_1 = ResnetBlock(c, c, **block)
        self.mid_attn = AttnBlock(c, norm="group", num_groups=g) if cfg.mid_attention else None
        self.mid_block_2 = ResnetBlock(c, c, **block)
        self.norm_out = Norm(c, "group", g)
        self.conv_out = nn.Conv2d(c, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ck = self.cfg.gradient_checkpointing
        h = self.conv_in(x)
        for stage in self.down:
            for i, blk in enumerate(stage.block):
                h = _run(blk, h, None, ck)
                if len(stage.attn):
                    h = _run(stage.attn[i], h, None, ck)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = _run(self.mid_block_1, h, None, ck)
        if self.mid_attn is not None:
            h = _run(self.mid_attn, h, None, ck)
        h = _run(self.mid_block_2, h, None, ck)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(z [B, z_channels, h, w], zq [B, zq_channels, h, w]) → [B, out_channels, h·f, w·f].

    ``zq`` (C·d wide, or z_channels with ``spatial_norm_zq="post_quant"``) conditions every norm when
    ``cfg.norm == "spatial"`` and is ignored otherwise.
    """

    def __init__(self, cfg: ModelConfig, z_channels: int, zq_channels: int):
        super().__init__()
        self.cfg = cfg
        ch, g = cfg.base_channels, cfg.norm_groups
        norm = dict(norm=cfg.norm, num_groups=g, zq_channels=zq_channels, zq_conv=cfg.spatial_norm_conv)
        c = ch * cfg.channel_mult[-1]
        res = cfg.resolution // 2 ** (len(cfg.channel_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid_block_1 = ResnetBlock(c, c, dropout=cfg.dropout, **norm)
        self.mid_attn = AttnBlock(c, **norm) if cfg.mid_attention else None
        self.mid_block_2 = ResnetBlock(c, c, dropout=cfg.dropout, **norm)
        # Levels are stored low → high resolution is reversed so that up[level] mirrors down[level]
        # (taming's key layout, which keeps converted checkpoints readable).
        n_blocks = cfg.num_res_blocks + (1 if cfg.decoder_extra_block else 0)
        up = []
        for level in reversed(range(len(cfg.channel_mult))):
            stage = nn.Module()
            c_out = ch * cfg.channel_mult[level]
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(n_blocks):
                stage.block.append(ResnetBlock(c, c_out, dropout=cfg.dropout, **norm))
                c = c_out
                if res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(c, **norm))
            if level != 0:
                stage.upsample = Upsample(c)
                res *= 2
            up.insert(0, stage)
        self.up = nn.ModuleList(up)
        self.norm_out = Norm(c, cfg.norm, g, zq_channels, cfg.spatial_norm_conv)
        self.conv_out = nn.Conv2d(c, cfg.out_channels, 3, padding=1)
        if cfg.spatial_norm_init == "identity":
            for m in self.modules():
                if isinstance(m, SpatialNorm):
                    m.init_identity_()
        elif cfg.spatial_norm_init != "default":
            raise ValueError(f"model.spatial_norm_init must be 'identity' or 'default', got {cfg.spatial_norm_init!r}")

    def forward(self, z: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        ck = self.cfg.gradient_checkpointing
        h = self.conv_in(z)
        h = _run(self.mid_block_1, h, zq, ck)
        if self.mid_attn is not None:
            h = _run(self.mid_attn, h, zq, ck)
        h = _run(self.mid_block_2, h, zq, ck)
        for stage in reversed(self.up):
            for i, blk in enumerate(stage.block):
                h = _run(blk, h, zq, ck)
                if len(stage.attn):
                    h = _run(stage.attn[i], h, zq, ck)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h, zq)))


class EncodeOutput(NamedTuple):
    """``MoVQ.encode``: the quantized map, the tokens and the quantizer's loss terms."""

    z_q: torch.Tensor  # [B, C·d, h, w]
    indices: torch.Tensor  # int64 [B, C, h, w]
    quant: QuantizerOutput  # loss, codebook_loss, commitment_loss, perplexity, usage


class MoVQ(PretrainedModel, tags=["image-tokenizer", "vqgan", "movq"]):
    """Encoder → quant_conv → multichannel quantizer → post_quant_conv → Decoder(·, zq).

    Built from a :class:`MoVQConfig` (or a :class:`TokenizerConfig`, whose ``model`` and ``quantizer``
    sections it takes); ``save_pretrained`` / ``from_pretrained`` keep the architecture only."""

    config_class = MoVQConfig
    card_title = "MoVQ image tokenizer"

    @classmethod
    def card_summary(cls, config: MoVQConfig) -> str:
        m, q = config.model, config.quantizer
        f = 2 ** (len(m.channel_mult) - 1)
        decoder = ("a decoder modulated by the quantized map (SpatialNorm, MoVQ: Zheng et al., NeurIPS 2022)"
                   if m.norm == "spatial" else "a plain GroupNorm decoder (the VQGAN baseline)")
        return (f"A VQ image tokenizer with {decoder}: {m.resolution}² images → {m.resolution // f}² cells × "
                f"{q.channels} channel(s) (f{f}), one codebook of {q.codebook_size} codes of width {q.dim}. "
                "Images are [B, 3, H, W] in [-1, 1]; tokens are int64 [B, C, h, w].")

    def __init__(self, config: Union[MoVQConfig, TokenizerConfig]):
        super().__init__()
        self.config = MoVQConfig(model=config.model, quantizer=config.quantizer)
        m, q = config.model, config.quantizer
        if len(m.channel_mult) < 1:
            raise ValueError("model.channel_mult needs at least one level")
        if m.spatial_norm_conv and m.norm != "spatial":
            raise ValueError("model.spatial_norm_conv needs model.norm='spatial'")
        if m.spatial_norm_zq not in ("quantized", "post_quant"):
            raise ValueError(f"model.spatial_norm_zq must be 'quantized' or 'post_quant', got {m.spatial_norm_zq!r}")
        zq_channels = q.channels * q.dim
        z_channels = m.z_channels or zq_channels
        self._zq_post = m.spatial_norm_zq == "post_quant"
        self.downsample_factor = 2 ** (len(m.channel_mult) - 1)
        self.encoder = Encoder(m, z_channels)
        self.quant_conv = nn.Conv2d(z_channels, zq_channels, 1)
        self.quantizer = MultichannelQuantizer(q)
        self.post_quant_conv = nn.Conv2d(zq_channels, z_channels, 1)
        self.decoder = Decoder(m, z_channels, z_channels if self._zq_post else zq_channels)

    @classmethod
    def from_config(cls, config: Union[str, os.PathLike, dict, TokenizerConfig], overrides=()) -> MoVQ:
        return cls(load_config(TokenizerConfig, config, overrides))

    # ------------------------------------------------------------------ the two halves
    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Replicate-pad H and W up to a multiple of the downsampling factor."""
        f = self.downsample_factor
        H, W = x.shape[-2:]
        ph, pw = (-H) % f, (-W) % f
        return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x

    def encode(self, x: torch.Tensor) -> EncodeOutput:
        """x [B, 3, H, W] in [-1, 1] → EncodeOutput with h = ⌈H / f⌉, w = ⌈W / f⌉."""
        q = self.quantizer(self.encode_latent(x))
        return EncodeOutput(q.z_q, q.indices, q)

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, H, W] in [-1, 1] → z [B, C·d, ⌈H/f⌉, ⌈W/f⌉], the continuous latent before quantization
        (what CLIP guidance optimises)."""
        if x.dim() != 4 or x.shape[1] != self.config.model.in_channels:
            raise ValueError(
                f"expected images [B, {self.config.model.in_channels}, H, W], got {tuple(x.shape)}"
            )
        if x.numel() == 0:
            raise ValueError(f"expected a non-empty batch of images, got shape {tuple(x.shape)}")
        return self.quant_conv(self.encoder(self._pad(x)))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q [B, C·d, h, w] → images [B, 3, h·f, w·f]."""
        z = self.post_quant_conv(z_q)
        return self.decoder(z, z if self._zq_post else z_q)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices int64 [B, C, h, w] → images [B, 3, h·f, w·f]."""
        return self.decode(self.quantizer.lookup(indices))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, EncodeOutput]:
        """x [B, 3, H, W] → (x̂ [B, 3, H, W], EncodeOutput); odd sizes are padded, then cropped."""
        enc = self.encode(x)
        x_rec = self.decode(enc.z_q)
        return x_rec[..., : x.shape[-2], : x.shape[-1]], enc

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight: the adaptive GAN weight is measured on it."""
        return self.decoder.conv_out.weight
