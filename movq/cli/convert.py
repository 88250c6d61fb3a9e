"""Convert a pretrained MoVQ / VQGAN checkpoint into a movq ``save_pretrained`` folder, or a movq
tokenizer into a diffusers ``VQModel`` folder.

    python tools/convert.py --from diffusers kandinsky-2-2-decoder/movq runs/kandinsky-movq
    python tools/convert.py --from movqgan movqgan_270M.ckpt runs/movqgan-270m [--ema]
    python tools/convert.py --from taming vqgan_imagenet_f16_16384/checkpoints/last.ckpt runs/vqgan-f16 \\
        --source-config vqgan_imagenet_f16_16384/configs/model.yaml
    python tools/convert.py --to diffusers runs/kandinsky-movq-ft runs/kandinsky-movq-ft-diffusers

--from: SRC is a diffusers VQModel folder (config.json + diffusion_pytorch_model.safetensors|.bin) or a
MoVQGAN / taming .ckpt, .pt, .bin or .safetensors state dict. DST gets model.safetensors, config.json,
conversion.json and a model card; load it with ``MoVQ.from_pretrained(DST)``.
--to diffusers: SRC is a movq model, checkpoint (its ema/) or run folder, or a Hub repo id, of a C = 1
model; DST gets config.json + diffusion_pytorch_model.safetensors for ``diffusers.VQModel.from_pretrained``.
Exit status 2 on any error.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from movq.interop.checkpoint_io import ConvertError
from movq.interop.convert import SOURCES, convert, save_converted
from movq.interop.export import DIFFUSERS_WEIGHTS_NAME, TARGETS


def export(args) -> int:
    from movq.interop.export import export_diffusers
    from movq.models.autoencoder import MoVQ

    dst = Path(args.dst)
    if (dst / DIFFUSERS_WEIGHTS_NAME).exists() and not args.force:
        print(f"error: {dst} already holds {DIFFUSERS_WEIGHTS_NAME}; pass --force to overwrite it", file=sys.stderr)
        return 2
    try:
        model = MoVQ.from_pretrained(args.src)
        result = export_diffusers(model, dst)
    except (ConvertError, FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {args.src}: {e}", file=sys.stderr)
        return 2
    c = result.config
    print(f"exported {args.src} → {dst} (diffusers VQModel, norm_type={c['norm_type']!r})")
    print(f"  block_out_channels {c['block_out_channels']}, latent {c['latent_channels']}, "
          f"{c['num_vq_embeddings']} codes of width {c['vq_embed_dim']}; load with diffusers.VQModel.from_pretrained")
    for note in result.notes:
        print(f"  note: {note}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    way = parser.add_mutually_exclusive_group(required=True)
    way.add_argument("--from", dest="source", choices=SOURCES, help="layout of SRC (into movq)")
    way.add_argument("--to", dest="target", choices=TARGETS, help="write the movq model SRC in this layout")
    parser.add_argument("src", help="--from: a diffusers VQModel folder, or a .ckpt / .pt / .bin / .safetensors file; "
                                    "--to: a movq model / checkpoint / run folder or Hub repo id")
    parser.add_argument("dst", help="output folder")
    parser.add_argument("--source-config", help="taming / MoVQGAN YAML (model.params.ddconfig) to check against")
    parser.add_argument("--ema", action="store_true",
                        help="use the checkpoint's EMA weights (MoVQGAN ema_*, LDM model_ema)")
    parser.add_argument("--remap", choices=("subset", "full"), default="subset",
                        help="taming index remap (quantize.used): keep only the used codes (default) or all")
    parser.add_argument("--beta-on", choices=("codebook", "commitment"), default=None,
                        help="which loss term β weights when fine-tuning (default: codebook, the sources' legacy)")
    parser.add_argument("--prefix", default="", help="convert only keys under this prefix, e.g. first_stage_model.")
    parser.add_argument("--force", action="store_true", help="overwrite an existing model in DST")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.target:
        given = [f for f, v in (("--source-config", args.source_config), ("--ema", args.ema), ("--prefix", args.prefix),
                                ("--beta-on", args.beta_on), ("--remap", args.remap != "subset")) if v]
        if given:
            parser.error(f"{', '.join(given)}: only with --from")
        return export(args)

    dst = Path(args.dst)
    if (dst / "model.safetensors").exists() and not args.force:
        print(f"error: {dst} already holds a movq checkpoint; pass --force to overwrite it", file=sys.stderr)
        return 2
    try:
        result = convert(args.source, args.src, source_config=args.source_config, use_ema=args.ema,
                         remap=args.remap, beta_on=args.beta_on, prefix=args.prefix)
        save_converted(result, dst, src=args.src)
    except (ConvertError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m, q = result.model.config.model, result.model.config.quantizer
    n_params = sum(p.numel() for p in result.model.parameters())
    print(f"converted {args.source} {args.src} → {dst}")
    print(f"  f{result.model.downsample_factor}, channels {m.base_channels}×{list(m.channel_mult)}, "
          f"{m.num_res_blocks} res blocks, attention at {list(m.attn_resolutions)} (of {m.resolution}), "
          f"decoder norm {m.norm}; {q.codebook_size} codes of width {q.dim}; {n_params / 1e6:.1f}M parameters")
    for reason, count in result.dropped.items():
        print(f"  dropped {count} key(s): {reason}")
    for note in result.notes:
        print(f"  note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
