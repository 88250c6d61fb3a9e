"""Convert pretrained MoVQ / VQGAN checkpoints into a movq ``MoVQ``.

Three source layouts, all the same taming-style VQGAN underneath (Esser et al., "Taming Transformers
for High-Resolution Image Synthesis", CVPR 2021) with single-channel quantization (C = 1):

* ``diffusers``: a ``VQModel`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors|.bin``),
  e.g. the MoVQ of Kandinsky 2.x (``norm_type="spatial"``; Zheng et al., NeurIPS 2022). Blocks are
  ``down_blocks.i.resnets.j`` / ``attentions.j`` with Linear ``to_q/to_k/to_v/to_out.0`` projections
  and ``up_blocks`` stored high → low level (reversed against taming).
* ``movqgan``: ai-forever/MoVQGAN ``MOVQ``: taming's encoder plus ``MOVQDecoder`` whose norms are
  ``SpatialNorm`` (``norm_layer``, ``conv_y``, ``conv_b``, optional ``conv`` for ``add_conv``).
* ``taming``: taming-transformers ``VQModel`` (``encoder.down.i.block.j``, ``mid.block_1``,
  ``quantize.embedding.weight``; LDM's VQ first stages share it).

All three quantizers are taming's ``VectorQuantizer2`` with ``legacy=True``, which puts β on the
codebook term; converted configs say so with ``quantizer.beta_on="codebook"``. taming's optional
index remapping (a ``quantize.used`` buffer) becomes a codebook of only the used codes, in ``used``
order, so token ids equal taming's remapped ids wherever the nearest code is a used one. Where it is
not, taming quantizes to that unused code and gives it a random id; the converted model takes the
nearest used code instead (deterministic). ``--remap full`` keeps every code and taming's original
ids, for reconstructions equal to taming's everywhere.

A conversion is all-or-nothing: a source key that no movq key takes (other than the loss /
discriminator, EMA copies and the remap table, which are dropped by name), a movq key without a
source, or a shape that disagrees is a ``ConvertError`` listing them. Files are read without running
pickled code (safetensors, or ``torch.load(weights_only=True)`` with inert stand-ins for the
non-tensor objects Lightning stores beside the weights; see ``movq.checkpoint_io``).
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import yaml

from movq.config import MoVQConfig, load_config
from movq.interop.checkpoint_io import ConvertError, load_checkpoint
from movq.models.autoencoder import MoVQ
from movq.utils import atomic_write

log = logging.getLogger(__name__)

SOURCES = ("diffusers", "movqgan", "taming")
# attn_resolutions are feature-map sizes at this nominal input size (the models are convolutional,
# so it only places attention); 256 reproduces the numbers in taming's and MoVQGAN's configs.
NOMINAL_RESOLUTION = 256
TAMING_GROUPS = 32  # taming's Normalize and diffusers' SpatialNorm hard-code 32 groups
DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)
# quantizer statistics that start fresh: they are movq training state, not weights
_FRESH = ("quantizer.initted", "quantizer.step", "quantizer.last_used", "quantizer.usage_ema",
          "quantizer.cluster_size", "quantizer.embed_avg")
_EMA_MODULES = ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv")  # MoVQGAN's LitEma copies
_DIFFUSERS_DEFAULTS = dict(  # VQModel.__init__ defaults, for keys a config.json leaves out
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"],
    block_out_channels=[64], layers_per_block=1, act_fn="silu", latent_channels=3, num_vq_embeddings=256,
    norm_num_groups=32, vq_embed_dim=None, norm_type="group", mid_block_add_attention=True,
)
_DIFFUSERS_IGNORED = {"sample_size", "scaling_factor", "force_upcast", "lookup_from_codebook"}


@dataclass
class ConvertResult:
    """A converted model plus what was deliberately left behind (for the log and ``conversion.json``)."""

    model: MoVQ
    source: str
    dropped: dict[str, int] = field(default_factory=dict)  # reason → number of source keys
    notes: list[str] = field(default_factory=list)


def _read_yaml(path: Union[str, os.PathLike]) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path} is not valid YAML/JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a mapping at the top level")
    return data


# --------------------------------------------------------------------------------------
# Source configs → MoVQConfig
# --------------------------------------------------------------------------------------
def _nominal(levels: int, attn_levels: set[int]) -> tuple[int, list[int]]:
    """(resolution, attn_resolutions) that put attention at ``attn_levels`` (level i has size R / 2^i)."""
    resolution = max(NOMINAL_RESOLUTION, 2 ** (levels - 1))
    return resolution, sorted((resolution >> i for i in attn_levels), reverse=True)


def _tokenizer_config(model: dict, quantizer: dict, origin: str) -> MoVQConfig:
    try:
        return load_config(MoVQConfig, {"model": model, "quantizer": quantizer})
    except ValueError as e:
        raise ConvertError(f"{origin}: inferred an unsupported configuration: {e}") from None


def config_from_diffusers(cfg: dict, origin: str = "config.json") -> MoVQConfig:
    """The movq config of a diffusers ``VQModel`` ``config.json`` (only plain VQGAN / MoVQ block types)."""
    cls = cfg.get("_class_name")
    if cls is not None and cls != "VQModel":
        raise ConvertError(f"{origin} describes a diffusers {cls}, not a VQModel")
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS
                     and k not in _DIFFUSERS_IGNORED)
    if unknown:
        log.warning("%s: ignoring unknown VQModel config keys %s", origin, unknown)
    c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in cfg.items() if k in _DIFFUSERS_DEFAULTS}}
    boc, down, up = list(c["block_out_channels"]), list(c["down_block_types"]), list(c["up_block_types"])
    n = len(boc)
    if not (n == len(down) == len(up)) or n < 1:
        raise ConvertError(f"{origin}: block_out_channels, down_block_types and up_block_types differ in length")
    if c["act_fn"] != "silu":
        raise ConvertError(f"{origin}: act_fn {c['act_fn']!r} is not supported (movq uses silu)")
    if c["norm_type"] not in ("group", "spatial"):
        raise ConvertError(f"{origin}: norm_type {c['norm_type']!r} is not 'group' or 'spatial'")
    enc_ok, dec_ok = {"DownEncoderBlock2D", "AttnDownEncoderBlock2D"}, {"UpDecoderBlock2D", "AttnUpDecoderBlock2D"}
    if not set(down) <= enc_ok or not set(up) <= dec_ok:
        raise ConvertError(f"{origin}: block types {sorted(set(down) - enc_ok) + sorted(set(up) - dec_ok)} "
                           f"are not supported (only {sorted(enc_ok | dec_ok)})")
    enc_attn = {i for i, t in enumerate(down) if t.startswith("Attn")}
    dec_attn = {n - 1 - i for i, t in enumerate(up) if t.startswith("Attn")}  # up_blocks run low → high res
    if enc_attn != dec_attn:
        raise ConvertError(f"{origin}: attention at encoder levels {sorted(enc_attn)} but decoder levels "
                           f"{sorted(dec_attn)}; movq places attention symmetrically")
    base = boc[0]
    if any(b % base for b in boc):
        raise ConvertError(f"{origin}: block_out_channels {boc} are not multiples of the first ({base})")
    groups = int(c["norm_num_groups"])
    if c["norm_type"] == "spatial" and groups != TAMING_GROUPS:
        raise ConvertError(f"{origin}: norm_num_groups={groups} with norm_type='spatial' is not supported "
                           f"(diffusers' SpatialNorm always uses {TAMING_GROUPS} groups)")
    latent = int(c["latent_channels"])
    dim = int(c["vq_embed_dim"] or latent)
    if c["norm_type"] == "spatial" and dim != latent:
        raise ConvertError(f"{origin}: norm_type='spatial' needs vq_embed_dim == latent_channels, "
                           f"got {dim} and {latent}")
    resolution, attn_res = _nominal(n, enc_attn)
    model = dict(
        in_channels=int(c["in_channels"]), out_channels=int(c["out_channels"]), resolution=resolution,
        base_channels=base, channel_mult=[b // base for b in boc], num_res_blocks=int(c["layers_per_block"]),
        attn_resolutions=attn_res, z_channels=latent, norm=c["norm_type"],
        norm_groups=groups, decoder_extra_block=True, mid_attention=bool(c["mid_block_add_attention"]),
    )
    quantizer = dict(codebook_size=int(c["num_vq_embeddings"]), channels=1, dim=dim, beta=0.25, beta_on="codebook")
    return _tokenizer_config(model, quantizer, origin)


def _ddconfig_from_yaml(data: dict, origin: str) -> dict:
    """``{ddconfig, n_embed, embed_dim}`` from a taming / MoVQGAN YAML, its ``params`` or a bare ddconfig."""
    target = str((data.get("model") or {}).get("target", ""))
    if "Gumbel" in target or "EMAVQ" in target:
        raise ConvertError(f"{origin}: {target} is not supported (only VQModel / MOVQ with VectorQuantizer)")
    params = (data.get("model") or {}).get("params") or data.get("params") or data
    dd = params.get("ddconfig", params if "ch" in params else None)
    if not isinstance(dd, dict):
        raise ConvertError(f"{origin}: no ddconfig found (expected model.params.ddconfig or a bare ddconfig)")
    bad = {k: dd[k] for k, ok in (("double_z", False), ("resamp_with_conv", True), ("give_pre_end", False),
                                  ("tanh_out", False), ("use_linear_attn", False)) if k in dd and dd[k] != ok}
    if dd.get("attn_type", "vanilla") != "vanilla":
        bad["attn_type"] = dd["attn_type"]
    if bad:
        raise ConvertError(f"{origin}: ddconfig settings {bad} are not supported")
    return {"ddconfig": dd, "n_embed": params.get("n_embed"), "embed_dim": params.get("embed_dim")}


def _count(state: dict, fmt: str) -> int:
    n = 0
    while fmt.format(n) in state:
        n += 1
    return n


def config_from_vqgan(state: dict, source: str, source_config: Optional[dict] = None,
                      origin: str = "checkpoint") -> MoVQConfig:
    """Infer the movq config of a taming / MoVQGAN state dict from its shapes, checked against the
    optional source YAML (``source_config`` as read, e.g. ``model.params.ddconfig``)."""
    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise ConvertError(f"{origin} does not look like a {source} VQGAN: key '{key}' is missing"
                               f"{_format_hint(state, source)}")
        return state[key]

    if "quantize.embed.weight" in state and "quantize.proj.weight" in state:
        raise ConvertError(f"{origin} is a taming GumbelVQ (quantize.proj / quantize.embed): not supported")
    w_in = need("encoder.conv_in.weight")
    ch, in_channels = w_in.shape[0], w_in.shape[1]
    n = _count(state, "encoder.down.{}.block.0.conv1.weight")
    if n == 0:
        need("encoder.down.0.block.0.conv1.weight")
    mult = []
    for i in range(n):
        c = need(f"encoder.down.{i}.block.0.conv1.weight").shape[0]
        if c % ch:
            raise ConvertError(f"{origin}: level {i} has {c} channels, not a multiple of conv_in's {ch}")
        mult.append(c // ch)
    num_res_blocks = _count(state, "encoder.down.0.block.{}.conv1.weight")
    dec_blocks = _count(state, "decoder.up.0.block.{}.conv1.weight")
    if dec_blocks not in (num_res_blocks, num_res_blocks + 1):
        raise ConvertError(f"{origin}: {dec_blocks} decoder blocks per level for {num_res_blocks} encoder blocks")
    enc_attn = {i for i in range(n) if f"encoder.down.{i}.attn.0.q.weight" in state}
    dec_attn = {i for i in range(n) if f"decoder.up.{i}.attn.0.q.weight" in state}
    if enc_attn != dec_attn:
        raise ConvertError(f"{origin}: attention at encoder levels {sorted(enc_attn)} but decoder levels "
                           f"{sorted(dec_attn)}")
    z_channels = need("encoder.conv_out.weight").shape[0]
    embed_dim = need("quant_conv.weight").shape[0]
    n_embed, code_dim = need("quantize.embedding.weight").shape
    out_ch = need("decoder.conv_out.weight").shape[0]
    spatial = "decoder.norm_out.conv_y.weight" in state
    add_conv = "decoder.norm_out.conv.weight" in state
    if source == "taming" and spatial:
        raise ConvertError(f"{origin} has a SpatialNorm (MoVQ) decoder: convert it with --from movqgan")
    if source == "movqgan" and not spatial:
        raise ConvertError(f"{origin} has a plain GroupNorm decoder (a taming VQGAN): convert it with --from taming")
    if code_dim != embed_dim:
        raise ConvertError(f"{origin}: codebook width {code_dim} differs from quant_conv's {embed_dim} outputs")
    (resolution, attn_res), dropout = _nominal(n, enc_attn), 0.0
    if source_config is not None:
        dd = source_config["ddconfig"]
        resolution = int(dd.get("resolution", resolution))
        attn_res = sorted(int(r) for r in dd.get("attn_resolutions", []))
        dropout = float(dd.get("dropout", 0.0))
        yaml_attn = {i for i in range(n) if resolution >> i in attn_res}
        expect = {"ch": ch, "ch_mult": mult, "num_res_blocks": num_res_blocks, "z_channels": z_channels,
                  "in_channels": in_channels, "out_ch": out_ch, "add_conv": add_conv}
        wrong = {k: (dd[k], v) for k, v in expect.items()
                 if k in dd and (list(dd[k]) if k == "ch_mult" else dd[k]) != v}
        if yaml_attn != enc_attn:
            wrong["attention levels"] = (sorted(yaml_attn), sorted(enc_attn))
        for k, v in (("n_embed", n_embed), ("embed_dim", embed_dim)):
            if source_config.get(k) is not None and source_config[k] != v:
                wrong[k] = (source_config[k], v)
        if wrong:
            raise ConvertError(f"{origin}: the source config disagrees with the weights "
                               f"(key: (config, checkpoint)): {wrong}")
    model = dict(
        in_channels=in_channels, out_channels=out_ch, resolution=resolution, base_channels=ch, channel_mult=mult,
        num_res_blocks=num_res_blocks, attn_resolutions=attn_res, dropout=dropout, z_channels=z_channels,
        norm="spatial" if spatial else "group", norm_groups=TAMING_GROUPS,
        decoder_extra_block=dec_blocks == num_res_blocks + 1, mid_attention="encoder.mid.attn_1.q.weight" in state,
        spatial_norm_conv=add_conv,
    )
    quantizer = dict(codebook_size=n_embed, channels=1, dim=embed_dim, beta=0.25, beta_on="codebook")
    return _tokenizer_config(model, quantizer, origin)


def _format_hint(state: dict, expected: str) -> str:
    keys = list(state)
    if any(".down_blocks." in k or ".up_blocks." in k for k in keys):
        guess = "diffusers"
    elif any(k.startswith("decoder.") and ".norm_layer." in k for k in keys):
        guess = "movqgan"
    elif any(k.startswith("encoder.down.") for k in keys):
        guess = "taming"
    else:
        marker = ".encoder.conv_in.weight"
        # the tokenizer of a taming / LDM model is its first stage; list it first, then any other (cond_stage_model.)
        prefixed = sorted((k[: -len(marker)] for k in keys if k.endswith(marker)),
                          key=lambda p: (p != "first_stage_model", p))
        if prefixed:
            options = " or ".join(f"--prefix {p}." for p in prefixed)
            return f" (the model sits under {', '.join(repr(p + '.') for p in prefixed)}: pass {options})"
        if any(k.startswith(("ema_encoder.", "model_ema.")) for k in keys) and not any(
                k.startswith("encoder.") for k in keys):
            return (" (only EMA copies of the weights are in this file (ema_* / model_ema.* keys); convert "
                    "the checkpoint that holds the model's own weights)")
        return f" (first keys: {keys[:4]})"
    return "" if guess == expected else f" (the keys look like a {guess} checkpoint: try --from {guess})"


# --------------------------------------------------------------------------------------
# Key maps: every movq key → (source key, transform)
# --------------------------------------------------------------------------------------
def _vqgan_key(key: str) -> tuple[str, str]:
    """movq key → taming / MoVQGAN key (same module tree; only norm wrappers and mid names differ)."""
    if key == "quantizer.codebook":
        return "quantize.embedding.weight", "copy"
    key = re.sub(r"^(encoder|decoder)\.mid_block_(\d)\.", r"\1.mid.block_\2.", key)
    key = re.sub(r"^(encoder|decoder)\.mid_attn\.", r"\1.mid.attn_1.", key)
    key = key.replace(".inner.norm.", ".norm_layer.").replace(".inner.conv_zq.", ".conv.").replace(".inner.", ".")
    return key, "copy"


def _diffusers_norm(parts: list[str]) -> list[str]:
    """``inner.weight`` (GroupNorm) → ``weight``; ``inner.norm.weight`` (SpatialNorm) → ``norm_layer.weight``."""
    assert parts[0] == "inner"
    if parts[1] == "norm":
        return ["norm_layer"] + parts[2:]
    return parts[1:]


def _diffusers_resnet(parts: list[str]) -> list[str]:
    head = {"nin_shortcut": "conv_shortcut"}.get(parts[0], parts[0])
    return [head] + (_diffusers_norm(parts[1:]) if head in ("norm1", "norm2") else parts[1:])


def _diffusers_attn(parts: list[str]) -> tuple[list[str], str]:
    if parts[0] == "norm":
        spatial = parts[2] in ("norm", "conv_y", "conv_b")
        return ["spatial_norm" if spatial else "group_norm"] + _diffusers_norm(parts[1:]), "copy"
    proj = {"q": ["to_q"], "k": ["to_k"], "v": ["to_v"], "proj_out": ["to_out", "0"]}[parts[0]]
    return proj + parts[1:], "linear" if parts[-1] == "weight" else "copy"


def _diffusers_key(key: str, levels: int) -> tuple[str, str]:
    """movq key → diffusers VQModel key; ``"linear"``: a [C, C] Linear weight for our [C, C, 1, 1] conv."""
    if key == "quantizer.codebook":
        return "quantize.embedding.weight", "copy"
    top, *p = key.split(".")
    if top in ("quant_conv", "post_quant_conv") or p[0] in ("conv_in", "conv_out"):
        return key, "copy"
    out, how = [top], "copy"
    if p[0] == "norm_out":
        out += ["conv_norm_out"] + _diffusers_norm(p[1:])
    elif p[0] in ("mid_block_1", "mid_block_2"):
        out += ["mid_block", "resnets", str(int(p[0][-1]) - 1)] + _diffusers_resnet(p[1:])
    elif p[0] == "mid_attn":
        tail, how = _diffusers_attn(p[1:])
        out += ["mid_block", "attentions", "0"] + tail
    elif p[0] in ("down", "up"):
        i = int(p[1])
        out += ["down_blocks", str(i)] if p[0] == "down" else ["up_blocks", str(levels - 1 - i)]
        if p[2] == "block":
            out += ["resnets", p[3]] + _diffusers_resnet(p[4:])
        elif p[2] == "attn":
            tail, how = _diffusers_attn(p[4:])
            out += ["attentions", p[3]] + tail
        else:  # downsample.conv / upsample.conv
            out += [{"downsample": "downsamplers", "upsample": "upsamplers"}[p[2]], "0"] + p[3:]
    else:
        raise KeyError(key)
    return ".".join(out), how


def source_key_map(config: MoVQConfig, source: str, model: Optional[MoVQ] = None) -> dict[str, tuple[str, str]]:
    """``{movq key: (source key, transform)}`` for every weight of ``MoVQ(config)`` (not the quantizer's
    training statistics, which start fresh). ``transform`` is ``"copy"`` or ``"linear"``."""
    if source not in SOURCES:
        raise ConvertError(f"unknown source {source!r}; choose one of {list(SOURCES)}")
    keys = [k for k in (model or MoVQ(config)).state_dict() if k not in _FRESH]
    levels = len(config.model.channel_mult)
    kmap = {k: (_diffusers_key(k, levels) if source == "diffusers" else _vqgan_key(k)) for k in keys}
    assert len({s for s, _ in kmap.values()}) == len(kmap), "key map is not one-to-one"
    return kmap


def _ema_key(key: str, style: str) -> str:
    """Where LitEma keeps the EMA copy of ``key``: dots dropped, under the module's or the model's EMA."""
    if style == "model_ema":  # latent-diffusion: one LitEma over the whole model
        return "model_ema." + key.replace(".", "")
    module, rest = key.split(".", 1) if "." in key else (key, "")
    return f"ema_{module}." + rest.replace(".", "")  # MoVQGAN: one LitEma per module


# --------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------
def _listing(keys: list[str], limit: int = 10) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{keys[:limit]}{more}"


def convert_state_dict(source: str, state: dict[str, torch.Tensor], config: MoVQConfig, *,
                       use_ema: bool = False, remap: str = "subset", origin: str = "state dict") -> ConvertResult:
    """Map a source state dict onto ``MoVQ(config)``; every key is accounted for or it raises.

    ``use_ema``: take the LitEma copies (MoVQGAN ``ema_<module>.*``, LDM ``model_ema.*``).
    ``remap``: with a taming ``quantize.used`` table, ``"subset"`` keeps only the used codes in
    ``used`` order (token ids = taming's remapped ids; ``config`` must already have
    ``codebook_size = len(used)``, as :func:`convert` arranges); ``"full"`` keeps every code and
    original ids. Raises ``ConvertError`` for unmapped, missing, misshapen or non-finite weights.
    """
    if remap not in ("subset", "full"):
        raise ConvertError(f"remap must be 'subset' or 'full', got {remap!r}")
    state = dict(state)
    result_dropped: dict[str, int] = {}
    notes: list[str] = []

    def drop(reason: str, keys: list[str]) -> None:
        if keys:
            result_dropped[reason] = result_dropped.get(reason, 0) + len(keys)
            for k in keys:
                state.pop(k)

    drop("loss: discriminator / LPIPS", [k for k in state if k.startswith("loss.")])
    drop("colorize buffer (segmentation display)", [k for k in state if k == "colorize"])
    used = state.pop("quantize.used", None)
    module_ema = {f"ema_{m}" for m in _EMA_MODULES}
    ema = {k: state.pop(k) for k in list(state) if k.split(".")[0] in module_ema or k.startswith("model_ema.")}
    ema_style = "model_ema" if any(k.startswith("model_ema.") for k in ema) else "module"
    if use_ema and not ema:
        raise ConvertError(f"{origin} has no EMA weights (no 'ema_encoder.*' or 'model_ema.*' keys)")
    try:
        model = MoVQ(config)
    except ValueError as e:
        raise ConvertError(f"{origin}: movq cannot build the inferred architecture: {e}") from None
    own = model.state_dict()
    kmap = source_key_map(config, source, model)
    if use_ema:
        missing_ema = []
        for sk, _ in kmap.values():
            ek = _ema_key(sk, ema_style)
            if ek in ema:
                state[sk] = ema.pop(ek)
            else:
                missing_ema.append(ek)
        if missing_ema:
            raise ConvertError(f"{origin}: EMA copies missing for {_listing(missing_ema)}")
        if ema:
            result_dropped["EMA bookkeeping (decay, num_updates) and EMA copies of other modules"] = len(ema)
        notes.append("weights taken from the EMA copies")
    elif ema:
        result_dropped["EMA copies (use_ema / --ema takes them instead)"] = len(ema)

    wanted = {sk for sk, _ in kmap.values()}
    missing = [sk for sk in wanted if sk not in state]
    unmapped = [k for k in state if k not in wanted]
    if missing or unmapped:
        raise ConvertError(
            f"{origin} does not match the inferred {source} architecture: "
            + (f"{len(missing)} weight(s) missing {_listing(missing)}" if missing else "")
            + ("; " if missing and unmapped else "")
            + (f"{len(unmapped)} source key(s) not mapped {_listing(unmapped)}" if unmapped else "")
            + _format_hint(state, source)
        )

    new, bad_shapes, non_finite = {}, [], []
    for mk, (sk, how) in kmap.items():
        t = state[sk]
        if how == "linear" and t.dim() == 2:
            t = t[:, :, None, None]  # Linear [C_out, C_in] ≡ 1×1 conv [C_out, C_in, 1, 1]
        if mk == "quantizer.codebook" and used is not None and remap == "subset":
            t = t[used.long()]
        if t.shape != own[mk].shape:
            bad_shapes.append(f"{sk} {tuple(t.shape)} → {mk} {tuple(own[mk].shape)}")
            continue
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            non_finite.append(sk)
        new[mk] = t.to(own[mk].dtype)
    if bad_shapes:
        raise ConvertError(f"{origin}: shapes disagree with the inferred architecture: {_listing(bad_shapes, 6)}")
    if non_finite:
        raise ConvertError(f"{origin}: non-finite values in {_listing(non_finite)}")
    if used is not None:
        result_dropped["remap table quantize.used (applied)" if remap == "subset" else "remap table quantize.used"] = 1
        notes.append(f"taming remap: codebook reduced to the {len(used)} used codes; token i is taming's remapped id i"
                     if remap == "subset" else "taming remap table ignored: tokens are original codebook ids")
    model.load_state_dict({**own, **new}, strict=True)
    model.eval()
    return ConvertResult(model=model, source=source, dropped=result_dropped, notes=notes)


def _check_used(used: torch.Tensor, n_embed: int, origin: str) -> None:
    if used.dim() != 1 or used.is_floating_point() or used.numel() < 2:
        raise ConvertError(f"{origin}: quantize.used must be a 1-D integer tensor of ≥ 2 code ids, got "
                           f"{used.dtype} {tuple(used.shape)}")
    if int(used.min()) < 0 or int(used.max()) >= n_embed or used.unique().numel() != used.numel():
        raise ConvertError(f"{origin}: quantize.used must hold distinct ids in [0, {n_embed})")


_DIFFUSERS_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _diffusers_current_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename pre-0.14 diffusers attention keys (``query/key/value/proj_attn``) as diffusers itself does."""
    pattern = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
    return {pattern.sub(lambda m: m.group(1) + _DIFFUSERS_OLD_ATTN[m.group(2)] + ".", k): v for k, v in state.items()}


def _reading(origin: Any, fn: Any, *args: Any) -> MoVQConfig:
    """``fn(*args)`` with a malformed value in a source config (a string for a number...) as a ConvertError."""
    try:
        return fn(*args)
    except ConvertError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ConvertError(f"{origin}: unexpected value in the source config ({type(e).__name__}: {e})") from None


def _diffusers_files(src: Path) -> tuple[Path, Path]:
    folder = src if src.is_dir() else src.parent
    cfg = folder / "config.json"
    if not cfg.is_file():
        hint = " (a pipeline folder? pass its movq/ subfolder)" if (folder / "movq" / "config.json").is_file() else ""
        raise ConvertError(f"{folder}: no config.json; --from diffusers expects a VQModel folder{hint}")
    if src.is_file():
        return cfg, src
    for name in DIFFUSERS_WEIGHTS:
        if (folder / name).is_file():
            return cfg, folder / name
    raise ConvertError(f"{folder}: no weights file (looked for {list(DIFFUSERS_WEIGHTS)})")


def convert(source: str, src: Union[str, os.PathLike], *, source_config: Union[str, os.PathLike, None] = None,
            use_ema: bool = False, remap: str = "subset", beta_on: Optional[str] = None,
            prefix: str = "") -> ConvertResult:
    """Read a source checkpoint and return the equivalent ``MoVQ`` (eval mode, fp32).

    source: ``"diffusers"`` (``src`` is a VQModel folder or its weights file), ``"movqgan"`` or
        ``"taming"`` (``src`` is a ``.ckpt`` / ``.pt`` / ``.bin`` / ``.safetensors``).
    source_config: the taming / MoVQGAN YAML (``model.params.ddconfig``), checked against the weights and
        used for ``resolution`` / ``attn_resolutions`` / ``dropout``; without it they are inferred.
    beta_on: override the converted ``quantizer.beta_on`` (default ``"codebook"``, the sources' legacy).
    prefix: take only keys under this prefix (e.g. ``"first_stage_model."`` of a taming transformer).
    """
    if source not in SOURCES:
        raise ConvertError(f"unknown source {source!r}; choose one of {list(SOURCES)}")
    src = Path(src)
    if not src.exists():
        raise ConvertError(f"{src}: no such file or folder")
    if source == "diffusers":
        if source_config is not None or prefix:
            raise ConvertError("--source-config and --prefix are for taming / MoVQGAN; a diffusers folder "
                               "carries its own config.json")
        cfg_path, weights = _diffusers_files(src)
        try:
            raw_cfg = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConvertError(f"{cfg_path} is not valid JSON: {e}") from None
        if not isinstance(raw_cfg, dict):
            raise ConvertError(f"{cfg_path}: expected a JSON object")
        state = _diffusers_current_names(load_checkpoint(weights))
        config = _reading(cfg_path, config_from_diffusers, raw_cfg, str(cfg_path))
        origin = str(weights)
    else:
        if src.is_dir():
            raise ConvertError(f"{src} is a folder; --from {source} expects a checkpoint file "
                               f"(a diffusers VQModel folder? use --from diffusers)")
        state = load_checkpoint(src)
        origin = str(src)
        src_cfg = None
        if source_config:
            src_cfg = _reading(source_config, _ddconfig_from_yaml, _read_yaml(source_config), str(source_config))
        if prefix:
            inside = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not inside:
                raise ConvertError(f"{origin}: no keys start with {prefix!r}")
            state = inside
        config = _reading(source_config or src, config_from_vqgan, state, source, src_cfg, origin)
        if "quantize.used" in state:
            _check_used(state["quantize.used"], config.quantizer.codebook_size, origin)
            if remap == "subset":
                config.quantizer.codebook_size = int(state["quantize.used"].numel())
    if beta_on is not None:
        if beta_on not in ("commitment", "codebook"):
            raise ConvertError(f"beta_on must be 'commitment' or 'codebook', got {beta_on!r}")
        config.quantizer.beta_on = beta_on
    if any(t.dtype != torch.float32 for t in state.values() if t.is_floating_point()):
        log.info("%s: weights are not all fp32; movq stores them as fp32", origin)
    result = convert_state_dict(source, state, config, use_ema=use_ema, remap=remap, origin=origin)
    for reason, count in result.dropped.items():
        log.info("%s: dropped %d key(s): %s", origin, count, reason)
    return result


def save_converted(result: ConvertResult, dst: Union[str, os.PathLike], src: str = "") -> Path:
    """``save_pretrained`` into ``dst`` plus a ``conversion.json`` saying what was converted and dropped."""
    dst = Path(dst)
    source = {"format": result.source, "file": str(src), **({"notes": result.notes} if result.notes else {})}
    result.model.save_pretrained(dst, model_card_kwargs={"source": source})
    info = {"source_format": result.source, "source": str(src), "dropped_keys": result.dropped, "notes": result.notes}
    atomic_write(dst / "conversion.json", json.dumps(info, indent=2) + "\n")
    return dst
