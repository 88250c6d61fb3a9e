"""Sample images from a trained prior, MaskGIT (parallel decoding) or autoregressive (token by token with
a KV cache), then decode them with the MoVQ decoder.

    accelerate launch tools/sample.py --checkpoint CKPT --num-samples 50000 --out samples/
        [--class-label K | --classes all] [--cfg-scale 2] [--temperature 1] [--seed 0] [--batch-size 32]
        [--steps 8] [--choice-temperature 4.5] [--cfg-schedule linear]      # MaskGIT
        [--top-k 100] [--top-p 0.95]                                        # autoregressive
        [--size H W | --cells H W] [--overlap N] [--tokenizer TOK] [--grid] [--steps-strip]
    python tools/sample.py --checkpoint runs/tiny/maskgit --num-samples 8 --out edits/ \
        --edit photo.jpg --box 16,16,48,48 [--outpaint]
    python tools/sample.py --checkpoint PRIOR --num-samples 8 --out cond/ \
        --condition edges|segmentation|lowres --condition-image FILE

CKPT is a run folder (newest checkpoint), a checkpoint folder (its ema/, else model/) or a model
folder of either prior; which one it is comes from its config.json. The tokenizer defaults to the one
the prior's tokens came from (its config's data.tokenizer). OUT/.sample_spec.json records the weights
and settings: a rerun resumes only the same sampling (anything else is refused unless --overwrite).

Writes ``OUT/NNNNNN.png`` (unique global indices) and ``OUT/samples.npz`` (uint8 [N, H, W, 3] under
``arr_0``, for tools/fid.py). Work is split as DiT's sample_ddp.py does: N is padded up to a
multiple of the global batch (batch size × processes); rank r draws indices
``i·global + r·B + [0, B)`` in iteration i and only indices < N are written. The noise of a batch
is seeded by (seed, its first index), so a rerun with the same settings skips the existing PNGs
and reproduces the rest. Class labels: ``--classes all`` cycles index mod num_classes (the default
when sampling); edits are unconditional (the null class) unless ``--class-label`` or ``--classes all``
is given, since the image's class is unknown; classifier-free guidance then has no class to guide
towards and is off.

Larger images (``--size H W`` in pixels, multiples of the tokenizer's downsampling factor, or ``--cells
H W`` in tokens; at least the training size): the autoregressive prior slides taming's window of the
training grid over the larger grid (each token sees the already-sampled tokens of the window around
it); MaskGIT decodes training-size windows one after another, ``--overlap`` cells shared with the
windows before (default half a window), those tokens known (movq/generation/canvas.py). The
tokenizer is convolutional, so it decodes any size.

Editing (MaskGIT; ``--edit IMAGE --box x0,y0,x1,y1``, box in pixels of IMAGE): the image is centre-cropped
to a square and resized to the prior's resolution, encoded, the tokens of the cells touching the box
are masked (``--outpaint``: every cell not inside the box), and the prior fills them in
``--num-samples`` variations; ``OUT/edit.png`` shows the image, its reconstruction by the tokenizer,
the masked reconstruction, and below them the results. The autoregressive prior cannot fill a box
(a token sees only the tokens before it in raster order), so it takes no ``--edit``.

Image conditions (a prior trained with ``model.condition``, either kind; ``--condition`` must name its kind):
the condition is made from ``--condition-image`` as in training (movq/data/conditions.py): ``edges``: Canny
edges of FILE, or FILE itself when it already is a black-and-white line drawing (a sketch); ``segmentation``:
FILE is a label PNG (palette index or grey value = class id); ``lowres``: FILE is the small image and the
samples are factor× its size (super-resolution in one command). A FILE of another size than the training
condition's is resized to it (nearest for label maps and line drawings), with a log line. Writes
``OUT/condition.png`` (the condition), the samples, and ``OUT/strip.png`` (the condition, at the samples'
size, then up to 8 samples, side by side). Classes default to the null class (as for edits); classifier-free
guidance (``--cfg-scale``) then guides towards the condition alone (its unconditional branch drops class and
condition together).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from movq.cli import setup_logging
from movq.utils import atomic_path, atomic_write, output_problem, sha256_file

log = logging.getLogger("sample")

GRID_MAX = 64  # images in --grid
STRIP_ROWS = 4  # samples in --steps-strip
STRIP_SAMPLES = 8  # samples beside the condition in strip.png
SPEC_NAME = ".sample_spec.json"


def parse_box(text: str) -> tuple[float, float, float, float]:
    parts = text.split(",")
    try:
        box = tuple(float(p) for p in parts)
    except ValueError:
        box = ()
    if len(box) != 4:
        raise argparse.ArgumentTypeError(f"--box must be four numbers x0,y0,x1,y1, got {text!r}")
    return box  # type: ignore[return-value]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run, checkpoint or model folder of a prior")
    p.add_argument("--num-samples", type=int, required=True, help="images to write")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, help="MaskGIT: decoding steps T (default: the config's sample.steps)")
    cls = p.add_mutually_exclusive_group()
    cls.add_argument("--class-label", type=int, help="one class for every sample")
    cls.add_argument("--classes", choices=["all"],
                     help="cycle through all classes (the default, except with --edit: the null class)")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--cfg-schedule", choices=["constant", "linear"], help="MaskGIT: guidance over the steps")
    p.add_argument("--temperature", type=float, help="token sampling temperature")
    p.add_argument("--choice-temperature", type=float, help="MaskGIT: Gumbel noise on the re-masking confidence")
    p.add_argument("--top-k", type=int, help="autoregressive: sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="autoregressive: sample within the nucleus of probability p")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                      help="image size in pixels, at least the training size (default: the training size)")
    size.add_argument("--cells", type=int, nargs=2, metavar=("H", "W"), help="the same as a token grid")
    p.add_argument("--overlap", type=int,
                   help="MaskGIT at --size: cells shared by neighbouring windows (default: half a window)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="samples per step per process")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the prior's data.tokenizer)")
    p.add_argument("--model", choices=["ema", "model"], default="ema", help="weights of a checkpoint folder")
    p.add_argument("--grid", action="store_true", help=f"also write grid.png of the first {GRID_MAX}")
    p.add_argument("--steps-strip", action="store_true", help="also write steps.png: the decoding steps")
    p.add_argument("--save-tokens", action="store_true", help="also write tokens/NNNNNN.npy (uint16 [C, h, w])")
    p.add_argument("--edit", metavar="IMAGE", help="inpaint (or outpaint) this image")
    p.add_argument("--box", type=parse_box, help="x0,y0,x1,y1 in pixels of IMAGE (with --edit)")
    p.add_argument("--outpaint", action="store_true", help="regenerate outside the box instead of inside")
    p.add_argument("--condition", choices=["edges", "segmentation", "lowres"],
                   help="the image condition of a conditional prior (with --condition-image)")
    p.add_argument("--condition-image", metavar="FILE",
                   help="the picture the condition is made from (edges: any image or a line drawing; "
                        "segmentation: a label PNG; lowres: the small image)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace samples in OUT made with other settings or another checkpoint (else refused)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--cpu", action="store_true", help="force CPU (needed for a multi-process CPU run)")
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1:
        p.error("--num-samples and --batch-size must be >= 1")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    if args.top_k is not None and args.top_k < 1:
        p.error("--top-k must be >= 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error("--top-p must lie in (0, 1]")
    for flag in ("size", "cells"):
        if getattr(args, flag) is not None and min(getattr(args, flag)) < 1:
            p.error(f"--{flag} must be positive")
    if args.overlap is not None and args.overlap < 0:
        p.error("--overlap must be >= 0")
    if args.edit and (args.size or args.cells):
        p.error("--edit works at the training size: leave out --size / --cells")
    if bool(args.edit) != (args.box is not None):
        p.error("--edit and --box go together")
    if args.outpaint and not args.edit:
        p.error("--outpaint needs --edit and --box")
    if bool(args.condition) != bool(args.condition_image):
        p.error("--condition and --condition-image go together")
    if args.condition and (args.edit or args.size or args.cells):
        p.error("--condition samples at the training size and does not edit: leave out --edit / --size / --cells")
    problem = output_problem(args.out, folder=True)
    if problem:
        p.error(f"--out: {problem}")
    return args


class SampleError(ValueError):
    """Bad input to the sampler; printed as one line."""


def _label_rule(args, num_classes: int) -> str:
    """How samples get class labels: "null" (unconditional), "cycle" (index mod num_classes) or "class K"."""
    if args.class_label is not None:
        return f"class {args.class_label}"
    if num_classes == 0 or ((args.edit or args.condition) and args.classes is None):
        return "null"
    return "cycle"


def _condition_source(args, model, device):
    """(condition uint8 [1, ch, H', W'] on ``device``, how it was made) from ``--condition-image``, checked
    against the prior's condition; a ``SampleError`` for a prior without one, or with another kind."""
    from movq.data.conditions import ConditionError, condition_from_picture, read_label_map
    from movq.data.decode import SkipSample, decode_image

    cc = model.config.condition
    if cc is None and args.condition:
        raise SampleError(f"--condition {args.condition}: the prior has no image condition (its model.condition is null)")
    if cc is not None and not args.condition:
        raise SampleError(f"the prior is conditioned on {cc.kind}: pass --condition {cc.kind} --condition-image FILE")
    if cc is None:
        return None, None
    if args.condition != cc.kind:
        raise SampleError(f"--condition {args.condition}: the prior is conditioned on {cc.kind}")
    if cc.size is None:
        raise SampleError("the prior's model.condition.size is unknown (set when it is trained on a token folder)")
    path = Path(args.condition_image)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SampleError(f"--condition-image {path}: {e.strerror or type(e).__name__}") from None
    try:
        if cc.kind == "segmentation":
            picture = read_label_map(data, str(path))
        else:
            img, _ = decode_image(data)
            picture = np.asarray(img, dtype=np.uint8)
        cond, how = condition_from_picture(cc, picture, tuple(cc.size))
    except (ConditionError, SkipSample) as e:
        raise SampleError(f"--condition-image {path}: {e}") from None
    log.info("condition (%s) from %s: %s, %d×%d", cc.kind, path, how, cond.shape[-1], cond.shape[-2])
    return torch.from_numpy(cond)[None].to(device), how


def _write_png(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def _edit_source(args, tokenizer, hw: tuple[int, int], device):
    """(image [1, 3, S, S] in [-1, 1], tokens [1, C, h, w], known bool [h, w], box in crop pixels)."""
    from movq.data.decode import SkipSample, crop_square, decode_image, images_from_uint8
    from movq.generation.maskgit import box_mask

    path = Path(args.edit)
    if not path.is_file():
        raise SampleError(f"--edit {path}: no such file")
    try:
        img, _ = decode_image(path.read_bytes())
    except SkipSample as e:
        raise SampleError(f"--edit {path}: not a usable image ({e})") from None
    W, H = img.size
    x0, y0, x1, y1 = args.box
    if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
        raise SampleError(f"--box {args.box} must satisfy 0 <= x0 < x1 <= {W} and 0 <= y0 < y1 <= {H} (the image is {W}×{H})")
    f = tokenizer.downsample_factor
    size = hw[0] * f
    if hw[0] != hw[1]:
        raise SampleError(f"editing needs a square token grid, the prior's is {hw}")
    side = min(W, H)
    left, top, scale = (W - side) // 2, (H - side) // 2, size / side
    box = [min(max((x0 - left) * scale, 0), size), min(max((y0 - top) * scale, 0), size),
           min(max((x1 - left) * scale, 0), size), min(max((y1 - top) * scale, 0), size)]
    if box[2] <= box[0] or box[3] <= box[1]:
        raise SampleError(f"--box {args.box} lies outside the centre square ({left}, {top}, {left + side}, {top + side}) that is edited")
    crop, _ = crop_square(img, size)
    x = images_from_uint8(torch.from_numpy(np.array(crop, dtype=np.uint8))[None]).to(device)
    with torch.no_grad():
        tokens = tokenizer.encode(x).indices
    known = box_mask(hw[0], hw[1], box, image_size=size, inside=not args.outpaint).to(device)
    return x, tokens, known, box


def _resolve(flag: str, path, kind: Optional[str], prefer: str = "ema"):
    """The model folder ``path`` names (``kind`` None: a prior of either kind), or a ``SampleError`` that
    names the flag."""
    from movq.generation.sampler import resolve_prior_dir
    from movq.models.pretrained import resolve_pretrained

    try:  # a local run / checkpoint / model folder, or a Hub repo id through the Hub cache
        return resolve_prior_dir(path, prefer) if kind is None else resolve_pretrained(path, kind=kind, prefer=prefer)
    except (OSError, ValueError) as e:
        raise SampleError(f"{flag} {path}: {e}") from None


MASKGIT_FLAGS = ("steps", "choice_temperature", "cfg_schedule", "overlap", "edit")
AUTOREGRESSIVE_FLAGS = ("top_k", "top_p")


def _check_flags(args, kind: str) -> None:
    """Flags of the other prior are an error, not silently ignored."""
    other = AUTOREGRESSIVE_FLAGS if kind == "maskgit" else MASKGIT_FLAGS
    given = [f"--{f.replace('_', '-')}" for f in other if getattr(args, f) not in (None, False)]
    if given:
        name = "a MaskGIT" if kind == "maskgit" else "an autoregressive"
        why = " (it cannot fill a box: a token sees only the tokens before it)" if args.edit else ""
        raise SampleError(f"{', '.join(given)} do(es) not apply to {name} prior{why}")


def _target_grid(args, train_grid: tuple[int, int], factor: int) -> tuple[int, int]:
    """The token grid to sample: the training grid, or what --size / --cells ask for (checked)."""
    if args.cells:
        grid = tuple(args.cells)
    elif args.size:
        if args.size[0] % factor or args.size[1] % factor:
            raise SampleError(f"--size {args.size[0]} {args.size[1]}: both must be multiples of the tokenizer's "
                              f"downsampling factor {factor}")
        grid = (args.size[0] // factor, args.size[1] // factor)
    else:
        return train_grid
    if grid[0] < train_grid[0] or grid[1] < train_grid[1]:
        h, w = train_grid
        raise SampleError(f"--size / --cells: the grid {grid[0]}×{grid[1]} is smaller than the training grid {h}×{w} "
                          f"({h * factor}×{w * factor} pixels)")
    if args.overlap is not None and not args.overlap < min(train_grid):
        raise SampleError(f"--overlap {args.overlap} must be less than the window {train_grid[0]}×{train_grid[1]}")
    return grid  # type: ignore[return-value]


def _prepare_out(out: Path, spec: dict, overwrite: bool) -> Optional[str]:
    """Resume only samples made the same way: OUT/.sample_spec.json records how; returns an error."""
    out.mkdir(parents=True, exist_ok=True)
    spec = json.loads(json.dumps(spec))  # tuples → lists, as read back
    path = out / SPEC_NAME
    old = json.loads(path.read_text()) if path.is_file() else None
    existing = list(out.glob("[0-9]*.png"))
    if old != spec and (existing or old is not None):
        if not overwrite:
            what = ", ".join(sorted(k for k in set(old or {}) | set(spec) if (old or {}).get(k) != spec.get(k)))
            return (f"{out} holds samples made with other settings ({what} differ); "
                    "pass --overwrite to replace them, or use a new folder")
        extras = ("samples.npz", "sampling.json", "grid.png", "steps.png", "edit.png", "edit_source.npz",
                  "condition.png", "strip.png")
        for stale in existing + [out / name for name in extras] + list(out.glob("tokens/*.npy")):
            stale.unlink(missing_ok=True)
    atomic_write(path, json.dumps(spec, indent=1))
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from movq.data.decode import images_from_uint8, images_to_uint8
    from movq.evaluation.visualize import save_grid
    from movq.generation.autoregressive import UNSAMPLED
    from movq.generation.maskgit import generate
    from movq.generation.sampler import (
        batch_seed,
        grid_columns,
        load_prior,
        load_tokenizer_for,
        plan_batches,
        prior_kind,
        rows_of,
        sample_labels,
        sample_prior,
        shade_cells,
        tokens_to_images,
        with_sample_overrides,
    )
    from movq.models.pretrained import WEIGHTS_NAME

    acc = Accelerator(cpu=args.cpu or not torch.cuda.is_available())
    rank, world, dev = acc.process_index, acc.num_processes, acc.device
    try:
        prior_dir = _resolve("--checkpoint", args.checkpoint, None, args.model)
        model, defaults = load_prior(prior_dir, map_location=str(dev))
        kind = prior_kind(model)
        _check_flags(args, kind)
        nc = model.num_classes
        if nc == 0 and args.class_label is not None:
            raise SampleError("--class-label given but the prior is unconditional (model.num_classes = 0)")
        if args.class_label is not None and not 0 <= args.class_label < nc:
            raise SampleError(f"--class-label {args.class_label} is outside [0, {nc})")
        tok_path = args.tokenizer or defaults.tokenizer
        if not tok_path:
            raise SampleError("no tokenizer to decode the tokens: pass --tokenizer (a MoVQ checkpoint folder)")
        tok_dir = _resolve("--tokenizer", tok_path, "MoVQ")
        tokenizer = load_tokenizer_for(model, tok_dir, dev)
        grid = _target_grid(args, model.config.grid_hw, tokenizer.downsample_factor)
        large = grid != model.config.grid_hw
        if args.steps_strip and large:
            raise SampleError("--steps-strip shows the sampler at the training size: leave out --size / --cells")
        edit = _edit_source(args, tokenizer, model.config.grid_hw, dev) if args.edit else None
        condition, condition_how = _condition_source(args, model, dev)
    except (SampleError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rule = _label_rule(args, nc)
    # null-class samples have nothing to guide towards: guidance is off for them (recorded as scale 1)
    settings = with_sample_overrides(defaults.sample, steps=args.steps, temperature=args.temperature,
                                     choice_temperature=args.choice_temperature, cfg_scale=args.cfg_scale,
                                     cfg_schedule=args.cfg_schedule, top_k=args.top_k, top_p=args.top_p)
    if rule == "null" and condition is None:
        settings = with_sample_overrides(settings, cfg_scale=1.0)
    if kind == "maskgit":
        opts = dict(steps=settings.steps, temperature=settings.temperature,
                    choice_temperature=settings.choice_temperature, schedule=model.config.mask_schedule)
        guidance = dict(cfg_scale=settings.cfg_scale, cfg_schedule=settings.cfg_schedule)
    else:
        if settings.cfg_schedule != "constant":  # a MaskGIT setting in the prior's defaults
            settings = with_sample_overrides(settings, cfg_schedule="constant")
        opts = dict(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
        guidance = dict(cfg_scale=settings.cfg_scale)
    overlap = args.overlap if large and kind == "maskgit" else None
    out = Path(args.out)
    error = None
    if acc.is_main_process:
        spec = {"prior_sha256": sha256_file(prior_dir / WEIGHTS_NAME),
                "tokenizer_sha256": sha256_file(tok_dir / WEIGHTS_NAME), "seed": args.seed,
                "batch_size": args.batch_size, "labels": rule, "kind": kind, "grid": list(grid), "overlap": overlap,
                "bf16": args.bf16, "save_tokens": args.save_tokens, "device": dev.type, **opts, **guidance,
                "edit_sha256": sha256_file(args.edit) if args.edit else None, "box": args.box, "outpaint": args.outpaint}
        if condition is not None:  # only when set: folders sampled before the option still resume
            spec.update(condition=args.condition, condition_sha256=sha256_file(args.condition_image))
        trained_on = defaults.tokenizer_sha256
        if trained_on and trained_on != spec["tokenizer_sha256"]:
            print(f"warning: the prior learned tokens of another tokenizer ({defaults.tokenizer}, sha256 "
                  f"{trained_on[:12]}...); decoded with {tok_path} its samples will not look right", file=sys.stderr)
        error = _prepare_out(out, spec, args.overwrite)
        if args.save_tokens:
            (out / "tokens").mkdir(exist_ok=True)
    errors = [e for e in (gather_object([error]) if world > 1 else [error]) if e]
    if errors:
        print(f"error: {errors[0]}", file=sys.stderr)
        return 2

    def sample(index: np.ndarray, history: bool = False):
        labels = sample_labels(rule, nc, index, dev)
        g = torch.Generator(dev).manual_seed(batch_seed(args.seed, int(index[0])))
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
            if edit:
                return generate(model, labels, num_samples=len(index), generator=g, return_history=history,
                                tokens=edit[1].expand(len(index), -1, -1, -1), known_mask=edit[2], **guidance, **opts)
            return sample_prior(model, labels, settings, num_samples=len(index), generator=g,
                                grid=grid, overlap=overlap, return_history=history, condition=condition)

    def to_images(tokens: torch.Tensor) -> torch.Tensor:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
            return tokens_to_images(tokenizer, tokens)

    n, b = args.num_samples, args.batch_size
    plan = plan_batches(n, rank, world, b)
    progress = None
    if acc.is_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(plan), unit="batch", desc=f"sampling ({world} process(es))", dynamic_ncols=True)
    t0, made = time.time(), 0
    for index in plan:
        todo = [i for i in index if i < n and not (out / f"{i:06d}.png").is_file()]
        if todo:
            tokens = sample(index)
            images = images_to_uint8(to_images(tokens)).cpu().numpy()
            for j, i in enumerate(index):
                if i in todo:
                    _write_png(images[j], out / f"{i:06d}.png")
                    if args.save_tokens:
                        np.save(out / "tokens" / f"{i:06d}.npy", tokens[j].cpu().numpy().astype(np.uint16))
            made += len(todo)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(img_s=f"{made * world / max(time.time() - t0, 1e-9):.1f}")
    if progress is not None:
        progress.close()
    seconds = time.time() - t0
    made_all = sum(gather_object([made])) if world > 1 else made
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return 0

    missing = [i for i in range(n) if not (out / f"{i:06d}.png").is_file()]
    if missing:
        print(f"error: {len(missing)} sample(s) missing in {out}, e.g. {missing[:3]}", file=sys.stderr)
        return 1
    def read(i: int) -> np.ndarray:
        with Image.open(out / f"{i:06d}.png") as im:
            return np.asarray(im.convert("RGB"))

    arrays = np.stack([read(i) for i in range(n)])
    with atomic_path(out / "samples.npz") as tmp:
        np.savez(tmp, arr_0=arrays)
    if args.grid:
        shown = images_from_uint8(torch.from_numpy(arrays[:GRID_MAX]))
        columns = grid_columns(nc if args.class_label is None else 0)  # one class per column
        save_grid(rows_of(shown, columns), out / "grid.png")
    if args.steps_strip:
        # The first batch again, with its history: the strip's rows end in 000000.png, 000001.png, ...
        _, hist = sample(plan_batches(n, 0, world, b)[0], history=True)
        rows = min(STRIP_ROWS, n, b)
        states = hist.states[:rows]  # [rows, T, C, h, w]
        if kind == "maskgit":  # step k's prediction, greyed by the share of each cell still masked after it
            frames = [to_images(hist.predictions[:rows, k]).cpu() for k in range(states.shape[1])]
            known = [(states[:, k] != model.mask_id).float().mean(1).cpu() for k in range(len(frames))]
        else:  # the canvas after each k-th of the cells, cells not drawn yet in grey
            frames = [to_images(states[:, k].clamp(min=0)).cpu() for k in range(states.shape[1])]
            known = [(states[:, k] != UNSAMPLED).float().mean(1).cpu() for k in range(len(frames))]
        shaded = [shade_cells(fr, kn) for fr, kn in zip(frames, known)]
        save_grid([torch.stack([sh[r] for sh in shaded]) for r in range(rows)], out / "steps.png")
    if edit is not None:
        x, tokens, known, _ = edit
        source = x.cpu().float().clamp(-1, 1)
        recon = to_images(tokens).cpu()  # the tokenizer's ceiling: what the known tokens decode to
        results = images_from_uint8(torch.from_numpy(arrays[:GRID_MAX]))
        first = torch.cat([source, recon, shade_cells(recon, known[None].cpu())])
        save_grid([first, *rows_of(results, 8)], out / "edit.png")
        np.savez(out / "edit_source.npz", tokens=tokens[0].cpu().numpy().astype(np.uint16), known=known.cpu().numpy())
    if condition is not None:
        from movq.data.conditions import condition_pictures

        cc = model.config.condition
        save_grid([condition_pictures(cc, condition)], out / "condition.png", pad=0)
        shown = images_from_uint8(torch.from_numpy(arrays[:STRIP_SAMPLES]))
        save_grid([torch.cat([condition_pictures(cc, condition, tuple(shown.shape[-2:])), shown])], out / "strip.png")
    info = {"num_samples": n, "generated_now": made_all, "seconds": seconds, "processes": world,
            "images_per_s": made_all / seconds if made_all and seconds > 0 else None, "device": str(dev),
            "checkpoint": str(args.checkpoint), "kind": kind, "tokenizer": str(tok_path), "seed": args.seed,
            "grid": list(grid), "image_size": list(arrays.shape[1:3]), "overlap": overlap, **opts, **guidance,
            "labels": rule, "num_classes": nc, "classes": defaults.classes, "edit": args.edit, "box": args.box,
            "outpaint": args.outpaint, "condition": args.condition, "condition_image": args.condition_image,
            "condition_made": condition_how}
    atomic_write(out / "sampling.json", json.dumps(info, indent=1))
    rate = f"{made_all / seconds:.1f} images/s" if made_all and seconds > 0 else "nothing new to sample"
    print(f"{n} samples in {out} (samples.npz: {arrays.shape}); {made_all} generated in {seconds:.1f} s, {rate}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
