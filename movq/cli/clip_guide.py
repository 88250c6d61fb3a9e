"""Text guidance with CLIP (VQGAN+CLIP): optimise a MoVQ tokenizer's latent until CLIP finds the prompt in it.

    python tools/clip_guide.py --clip clip/vit-b-32 --tokenizer runs/tok --prompt "a red apple" --out guided/
        [--prompt "a blurry photo:-0.5"] [--steps 300] [--lr 0.1] [--cutn 32] [--cut-pow 1] [--size 256 | 384x256]
        [--init-image photo.jpg [--init-weight 0.5]] [--seed 0] [--save-every 25]
    python tools/clip_guide.py --clip clip/vit-b-32 --prior runs/prior --prompt "a red apple" --out guided/
        [--prior-class K] [--tokenizer TOK]

``--clip`` is a local folder of a transformers CLIP repository (config.json, model.safetensors, vocab.json +
merges.txt or tokenizer.json), downloaded by hand, e.g. openai/clip-vit-base-patch32; nothing is downloaded here
(see movq.models.clip). Needs ``pip install 'movq[clip]'``.

The start is random codes (the recipe's), ``--init-image`` (centre-cropped to the aspect of ``--size``, resized and
encoded) or ``--prior`` (one sample of a MaskGIT or autoregressive prior, by the class its config.json names, drawn
with its sampling defaults; its tokens' codes; the prior's tokenizer unless ``--tokenizer``). An image-conditional
prior is sampled with its null condition.

Writes OUT/image.png (the result: its tokens decoded), OUT/progress.png (the image after 0, N, 2N, ... steps,
left to right; N = --save-every), OUT/tokens.npy (uint16 [C, h, w]; int32 past 65536 codes) and OUT/run.json (prompts with the CLIP
similarity of the start and the final image, settings, seed, the loss of every step, files used). The seed fixes
the start, the cut-outs, the augmentations and the noise: on CPU a rerun is identical.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from movq.cli import setup_logging
from movq.utils import atomic_path, atomic_write, output_problem, sha256_file

log = logging.getLogger("clip_guide")

RUN_NAME = "run.json"
STRIP_FRAMES = 8  # default --save-every: steps / STRIP_FRAMES


class GuideError(ValueError):
    """Bad input to the tool; printed as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (the usage is behind --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_size(text: str) -> tuple[int, int]:
    """``"S"`` or ``"WxH"`` → (H, W)."""
    parts = text.lower().split("x")
    try:
        wh = [int(p) for p in parts]
    except ValueError:
        wh = []
    if len(wh) == 1:
        wh = wh * 2
    if len(wh) != 2 or min(wh) < 1:
        raise argparse.ArgumentTypeError(f"--size must be S or WxH in pixels, got {text!r}")
    return wh[1], wh[0]


def parse_args(argv=None) -> argparse.Namespace:
    from movq.config import ClipGuidanceConfig
    from movq.generation.clip_guidance import parse_prompt

    d = ClipGuidanceConfig()
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", required=True, help="local transformers CLIP folder (config.json, model.safetensors, "
                                                 "vocab.json + merges.txt or tokenizer.json)")
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT[:WEIGHT]",
                   help="text to guide towards (repeatable; a negative weight guides away)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tokenizer", help="MoVQ run, checkpoint or model folder (default with --prior: the prior's)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--init-image", metavar="FILE", help="start from this image (encoded by the tokenizer)")
    start.add_argument("--prior", metavar="DIR", help="start from a sample of this prior (MaskGIT or autoregressive)")
    p.add_argument("--prior-class", type=int, help="class of the prior's sample (default: the null class)")
    p.add_argument("--size", type=parse_size, help="S or WxH in pixels, multiples of the tokenizer's factor "
                                                   "(default: its training resolution; with --prior its grid)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr, help="Adam's step size on z")
    p.add_argument("--cutn", type=int, default=d.cutn, help="random cut-outs per step")
    p.add_argument("--cut-pow", type=float, default=d.cut_pow, help="> 1 favours small cut-outs")
    p.add_argument("--noise", type=float, default=d.noise, help="Gaussian noise on the cut-outs (std up to this)")
    p.add_argument("--no-augment", action="store_true", help="no flips, affine moves or colour jitter")
    p.add_argument("--no-clamp", action="store_true", help="do not clamp z to the codebook's range")
    p.add_argument("--init-weight", type=float, default=d.init_weight,
                   help="keep z near its start (useful with --init-image)")
    p.add_argument("--save-every", type=int, help=f"steps between the frames of progress.png "
                                                  f"(default: steps / {STRIP_FRAMES})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is there")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in OUT")
    args = p.parse_args(argv)
    try:
        args.prompts = [parse_prompt(s) for s in args.prompt]
    except ValueError as e:
        p.error(f"--prompt: {e}")
    if not any(pr.weight for pr in args.prompts):
        p.error("--prompt: every weight is 0, there is nothing to guide towards")
    if args.steps < 1 or args.cutn < 1:
        p.error("--steps and --cutn must be >= 1")
    if not args.lr > 0 or not args.cut_pow > 0:
        p.error("--lr and --cut-pow must be > 0")
    if args.noise < 0 or args.init_weight < 0:
        p.error("--noise and --init-weight must be >= 0")
    if args.save_every is not None and args.save_every < 1:
        p.error("--save-every must be >= 1")
    if args.prior_class is not None and not args.prior:
        p.error("--prior-class needs --prior")
    if args.prior and args.size:
        p.error("--size is the prior's grid with --prior; leave it out")
    if not args.prior and not args.tokenizer:
        p.error("--tokenizer is needed (or --prior, whose tokenizer is used)")
    if args.init_image and not Path(args.init_image).is_file():
        p.error(f"--init-image {args.init_image}: no such file")
    problem = output_problem(args.out, folder=True)
    if problem:
        p.error(f"--out: {problem}")
    if (Path(args.out) / RUN_NAME).exists() and not args.overwrite:
        p.error(f"--out {args.out} holds an earlier run ({RUN_NAME}); pass --overwrite or use a new folder")
    args.save_every = args.save_every or max(1, args.steps // STRIP_FRAMES)
    return args


def _resolve(flag: str, path, kind: str) -> Path:
    from movq.models.pretrained import resolve_model_dir

    try:
        return resolve_model_dir(path, kind=kind)
    except (OSError, ValueError) as e:
        raise GuideError(f"{flag} {path}: {e}") from None


def _read_init_image(path: Path, hw: tuple[int, int], device) -> torch.Tensor:
    """An image file → ``[1, 3, H, W]`` in [-1, 1]: centre-cropped to the aspect of ``hw`` and resized."""
    from PIL import Image, ImageOps

    from movq.data.decode import SkipSample, decode_image, images_from_uint8

    try:
        img, _ = decode_image(path.read_bytes())
    except (SkipSample, OSError) as e:
        raise GuideError(f"--init-image {path}: not a usable image ({e})") from None
    img = ImageOps.fit(img, (hw[1], hw[0]), Image.Resampling.BICUBIC)
    return images_from_uint8(torch.from_numpy(np.array(img, dtype=np.uint8))[None]).contiguous().to(device)


def _start(args, device, generator: torch.Generator):
    """(tokenizer, its folder, z0 [1, C·d, h, w], what the start was, for run.json)."""
    from movq.generation.clip_guidance import latent_from_image, latent_from_tokens, random_latent
    from movq.models.autoencoder import MoVQ

    if args.prior:
        from movq.generation.sampler import load_prior, load_tokenizer_for, prior_kind, resolve_prior_dir, sample_prior

        try:
            prior_dir = resolve_prior_dir(args.prior)
        except (OSError, ValueError) as e:
            raise GuideError(f"--prior {args.prior}: {e}") from None
        prior, defaults = load_prior(prior_dir, map_location=str(device))
        nc = prior.num_classes
        if args.prior_class is not None and not 0 <= args.prior_class < nc:
            raise GuideError(f"--prior-class {args.prior_class} is outside [0, {nc})"
                             + (" (the prior is unconditional)" if nc == 0 else ""))
        tok_path = args.tokenizer or defaults.tokenizer
        if not tok_path:
            raise GuideError(f"--prior {args.prior} names no tokenizer: pass --tokenizer")
        tok_dir = _resolve("--tokenizer", tok_path, "MoVQ")
        tokenizer = load_tokenizer_for(prior, tok_dir, device)
        kind = prior_kind(prior)
        # the prior's own sampling settings, unguided (a start, not a final sample; the null class has no guidance)
        s = dataclasses.replace(defaults.sample, cfg_scale=1.0,
                                cfg_schedule="constant" if kind == "autoregressive" else defaults.sample.cfg_schedule)
        labels = None if args.prior_class is None else torch.tensor([args.prior_class], device=device)
        tokens = sample_prior(prior, labels, s, num_samples=1, generator=generator)
        start = {"kind": "prior", "prior": str(prior_dir), "prior_kind": kind, "prior_class": args.prior_class,
                 "prior_steps": s.steps if kind == "maskgit" else None}
        return tokenizer, tok_dir, latent_from_tokens(tokenizer, tokens), start

    tok_dir = _resolve("--tokenizer", args.tokenizer, "MoVQ")
    tokenizer = MoVQ.from_pretrained(tok_dir).to(device)
    f = tokenizer.downsample_factor
    hw = args.size or (tokenizer.config.model.resolution,) * 2
    if hw[0] % f or hw[1] % f:
        raise GuideError(f"--size {hw[1]}x{hw[0]} must be a multiple of the tokenizer's downsampling factor {f}")
    if args.init_image:
        image = _read_init_image(Path(args.init_image), hw, device)
        return tokenizer, tok_dir, latent_from_image(tokenizer, image), {
            "kind": "image", "image": str(args.init_image), "image_sha256": sha256_file(args.init_image)}
    return tokenizer, tok_dir, random_latent(tokenizer, (hw[0] // f, hw[1] // f), generator), {"kind": "random"}


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    from movq.config import ClipGuidanceConfig, to_dict
    from movq.evaluation.visualize import save_grid
    from movq.generation.clip_guidance import guide
    from movq.models.clip import ClipFilesError, clip_files, load_clip
    from movq.models.pretrained import WEIGHTS_NAME

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    generator = torch.Generator(device).manual_seed(args.seed)
    try:
        files = clip_files(args.clip)  # a missing file is reported before anything slow is loaded
        _quiet_transformers()
        clip = load_clip(args.clip, device)
        for prompt in args.prompts:
            try:
                clip.tokenize(prompt.text)
            except ValueError as e:
                raise GuideError(f"--prompt: {e}") from None
        tokenizer, tok_dir, z0, start = _start(args, device, generator)
    except (GuideError, ClipFilesError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = ClipGuidanceConfig(steps=args.steps, lr=args.lr, cutn=args.cutn, cut_pow=args.cut_pow,
                             augment=not args.no_augment, noise=args.noise, clamp=not args.no_clamp,
                             init_weight=args.init_weight)
    f = tokenizer.downsample_factor
    log.info("guiding a %dx%d image (%s start) with %s on %s for %d steps", z0.shape[-1] * f, z0.shape[-2] * f,
             start["kind"], args.clip, device, cfg.steps)

    from tqdm.auto import tqdm

    progress = tqdm(total=cfg.steps, unit="step", desc="CLIP guidance", dynamic_ncols=True)

    def on_step(step: int, loss: float) -> None:
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}")

    t0 = time.time()
    result = guide(tokenizer, clip, args.prompts, z0, cfg, generator=generator, snapshot_every=args.save_every,
                   callback=on_step)
    progress.close()
    seconds = time.time() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_grid([result.image * 2 - 1], out / "image.png", pad=0)
    save_grid([torch.cat([im for _, im in result.frames]) * 2 - 1], out / "progress.png")
    tokens = result.tokens[0].cpu().numpy().astype(np.uint16 if tokenizer.quantizer.codebook_size <= 2**16 else np.int32)
    with atomic_path(out / "tokens.npy") as tmp:
        np.save(tmp, tokens)
    import transformers

    info = {
        "prompts": [{"text": p.text, "weight": p.weight, "initial_similarity": a, "final_similarity": b}
                    for p, a, b in zip(args.prompts, result.initial_similarity, result.final_similarity)],
        "steps": cfg.steps, "settings": to_dict(cfg), "seed": args.seed, "start": start,
        "size": [int(result.image.shape[-2]), int(result.image.shape[-1])], "tokens_shape": list(tokens.shape),
        "loss": {"first": result.losses[0], "last": result.losses[-1], "per_step": result.losses},
        "frames": [step for step, _ in result.frames],
        "clip": {"path": str(args.clip), "weights": files["weights"].name, "weights_sha256": sha256_file(files["weights"]),
                 "image_size": clip.image_size, "embed_dim": clip.embed_dim},
        "tokenizer": {"path": str(tok_dir), "sha256": sha256_file(tok_dir / WEIGHTS_NAME)},
        "seconds": seconds, "device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
    }
    atomic_write(out / RUN_NAME, json.dumps(info, indent=1) + "\n")
    sims = ", ".join(f"{p.text!r}: {a:.4f} → {b:.4f}" for p, a, b in
                     zip(args.prompts, result.initial_similarity, result.final_similarity))
    print(f"{out / 'image.png'} after {cfg.steps} steps in {seconds:.1f} s; CLIP similarity {sims}")
    return 0


def _quiet_transformers() -> None:
    """transformers' own progress bars and notes would interleave with this tool's."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return  # load_clip says how to install it
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
