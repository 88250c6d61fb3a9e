"""Export a movq ``MoVQ`` as a diffusers ``VQModel`` folder (``config.json`` +
``diffusion_pytorch_model.safetensors``) that ``diffusers.VQModel.from_pretrained`` loads.

diffusers' ``VQModel`` is the taming-transformers VQGAN (Esser et al., CVPR 2021); with
``norm_type="spatial"`` it is the MoVQ decoder of Kandinsky 2.x (Zheng et al., NeurIPS 2022). The weights
go through the same key map as the import (:func:`movq.interop.convert.source_key_map`, read backwards),
so diffusers → movq → diffusers gives the same tensors back, and a fine-tuned Kandinsky MoVQ can be put
back into a Kandinsky pipeline (``KandinskyV22Pipeline.from_pretrained(..., movq=VQModel.from_pretrained(DST))``).

What a VQModel can hold, and so what exports:

* one quantizer channel (``quantizer.channels == 1``). diffusers quantizes each latent cell as one vector
  with one code id; a multichannel model's C codes per cell from one shared codebook of width d have no
  diffusers class (a VQModel with ``vq_embed_dim = C·d`` would need a codebook of K^C vectors);
* an encoder whose first level keeps ``conv_in``'s width (``channel_mult[0] == 1``: diffusers' ``conv_in``
  outputs ``block_out_channels[0]``), decoder levels of ``num_res_blocks + 1`` blocks
  (``decoder_extra_block``, taming's layout), plain (not l2-normalised) codes;
* ``norm="spatial"`` only as Kandinsky has it: 32 norm groups (diffusers' ``SpatialNorm`` hard-codes 32),
  the decoder conditioned on a map as wide as the latent (``vq_embed_dim == latent_channels``) and no 3×3
  conv on it (MoVQGAN's ``add_conv``, ``model.spatial_norm_conv``, has no diffusers counterpart).

Training-only settings export with a note, as they change no output: β and which term it weights
(diffusers' ``VectorQuantizer`` is taming's ``legacy=True``, β = 0.25 on the codebook term), EMA codebook
updates, k-means init, dead-code restarts, dropout (VQModel has no dropout setting).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from movq.config import MoVQConfig
from movq.interop.checkpoint_io import ConvertError
from movq.interop.convert import _FRESH, TAMING_GROUPS, source_key_map
from movq.models.autoencoder import MoVQ
from movq.utils import PathLike, atomic_write, save_state_dict

log = logging.getLogger(__name__)

DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DIFFUSERS_CONFIG_NAME = "config.json"
# Written as config.json's _diffusers_version when diffusers is not installed; mid_block_add_attention,
# the newest VQModel key used here, exists since diffusers 0.26.
MIN_DIFFUSERS_VERSION = "0.26.0"
TARGETS = ("diffusers",)


@dataclass
class ExportResult:
    """The diffusers config written, and what about the model did not carry over (training-only)."""

    config: dict
    notes: list[str] = field(default_factory=list)


def _attention_levels(config: MoVQConfig) -> list[int]:
    m = config.model
    return [i for i in range(len(m.channel_mult)) if m.resolution >> i in m.attn_resolutions]


def diffusers_config(config: MoVQConfig) -> ExportResult:
    """The diffusers ``VQModel`` config of a movq tokenizer, or a ``ConvertError`` saying why none holds it."""
    m, q = config.model, config.quantizer
    if q.channels != 1:
        raise ConvertError(
            f"this model quantizes C = {q.channels} channels per latent cell, each a code of width {q.dim} from "
            f"one shared codebook of {q.codebook_size}; diffusers' VQModel quantizes a cell as one vector with one "
            "code id, so no diffusers class can hold a multichannel MoVQ (only C = 1 models export: the VQGAN twins "
            "and Kandinsky-style MoVQ). Share it as a movq folder instead (save_pretrained / push_to_hub)")
    problems = []
    if q.cosine:
        problems.append("quantizer.cosine=true: diffusers' VectorQuantizer compares raw, not l2-normalised, "
                        "vectors, so its tokens would differ")
    if m.spatial_norm_conv:
        problems.append("model.spatial_norm_conv=true (MoVQGAN's add_conv): diffusers' SpatialNorm has no conv "
                        "on the quantized map")
    if not m.decoder_extra_block:
        problems.append("model.decoder_extra_block=false: diffusers' decoder levels have num_res_blocks + 1 blocks")
    if m.channel_mult[0] != 1:
        problems.append(f"model.channel_mult[0]={m.channel_mult[0]}: diffusers' encoder conv_in outputs "
                        "block_out_channels[0] channels, movq's base_channels")
    latent = m.z_channels or q.dim
    if m.norm == "spatial" and m.norm_groups != TAMING_GROUPS:
        problems.append(f"model.norm_groups={m.norm_groups} with norm='spatial': diffusers' SpatialNorm always "
                        f"uses {TAMING_GROUPS} groups")
    if m.norm == "spatial" and latent != q.dim:
        problems.append(f"model.z_channels={m.z_channels} with norm='spatial': diffusers conditions the decoder on "
                        f"a map of latent_channels, which must then equal the code width {q.dim}")
    if problems:
        raise ConvertError("cannot export to a diffusers VQModel: " + "; ".join(problems))
    attn = set(_attention_levels(config))
    n = len(m.channel_mult)
    try:
        version = metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        version = MIN_DIFFUSERS_VERSION
    cfg = {
        "_class_name": "VQModel",
        "_diffusers_version": version,
        "act_fn": "silu",
        "block_out_channels": [m.base_channels * c for c in m.channel_mult],
        "down_block_types": ["AttnDownEncoderBlock2D" if i in attn else "DownEncoderBlock2D" for i in range(n)],
        "force_upcast": False,
        "in_channels": m.in_channels,
        "latent_channels": latent,
        "layers_per_block": m.num_res_blocks,
        "lookup_from_codebook": False,
        "mid_block_add_attention": m.mid_attention,
        "norm_num_groups": m.norm_groups,
        "norm_type": m.norm,
        "num_vq_embeddings": q.codebook_size,
        "out_channels": m.out_channels,
        "sample_size": m.resolution,
        "scaling_factor": 0.18215,  # VQModel's default; Kandinsky's pipelines do not read it
        "up_block_types": ["AttnUpDecoderBlock2D" if n - 1 - i in attn else "UpDecoderBlock2D" for i in range(n)],
        "vq_embed_dim": q.dim,
    }
    notes = []
    if q.beta_on != "codebook" or q.beta != 0.25:
        notes.append(f"quantizer β={q.beta} on the {q.beta_on} term: diffusers' VectorQuantizer is taming's "
                     "legacy=True (β 0.25 on the codebook term); outputs are equal, only a fine-tuning in diffusers "
                     "would weight its loss terms that way")
    if q.ema or q.kmeans_init or q.dead_code_threshold > 0:
        notes.append("EMA codebook updates / k-means init / dead-code restarts are movq training settings; the "
                     "exported codebook is the current one")
    if m.dropout > 0:
        notes.append(f"model.dropout={m.dropout} is not kept (VQModel has no dropout setting); eval outputs are "
                     "unaffected")
    return ExportResult(cfg, notes)


def diffusers_state_dict(model: MoVQ) -> dict[str, torch.Tensor]:
    """``model``'s weights under diffusers' ``VQModel`` key names (attention projections as Linear)."""
    state = model.state_dict()
    kmap = source_key_map(model.config, "diffusers", model)
    left = set(state) - set(kmap) - set(_FRESH)
    if left:  # every weight must reach the export; only the quantizer's training statistics stay behind
        raise ConvertError(f"no diffusers key for {sorted(left)[:8]}")
    out = {}
    for mk, (dk, how) in kmap.items():
        t = state[mk]
        out[dk] = t[:, :, 0, 0] if how == "linear" and t.dim() == 4 else t  # [C, C, 1, 1] conv ≡ Linear [C, C]
    return out


def export_diffusers(model: MoVQ, dst: PathLike) -> ExportResult:
    """Write ``model`` into ``dst`` as a diffusers ``VQModel`` folder; returns its config and notes."""
    result = diffusers_config(model.config)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    weights = {k: v.float() for k, v in diffusers_state_dict(model).items()}
    save_state_dict(weights, dst / DIFFUSERS_WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write(dst / DIFFUSERS_CONFIG_NAME, json.dumps(result.config, indent=2, sort_keys=True) + "\n")
    for note in result.notes:
        log.info("export to diffusers: %s", note)
    return result
