"""Judge class-conditional samples of the shapes dataset (``movq-judge``, tools/judge_samples.py): the class
accuracy and diversity of each tools/sample.py folder, next to the judge's accuracy on real images
(and, with ``--tokenizer``, on the tokenizer's reconstructions of them: the ceiling of any prior).

    python tools/judge_samples.py maskgit=runs/tiny/maskgit/samples autoregressive=runs/tiny/ar/samples \\
        --tokenizer runs/tiny --json runs/tiny/judge.json

A folder is named ``NAME=DIR`` (or just ``DIR``); its ``sampling.json`` (written by tools/sample.py) says
which class each sample was drawn for (the label rule, the classes) and the images must be of one size,
the size the judge is trained at. The judge (movq/evaluation/judge.py) is trained on real shapes images
of that size on first use (half a CPU minute at 32²) and cached in ``$MOVQ_CACHE_DIR`` (default
``~/.cache/movq``) under a name that hashes its recipe; later runs load it. ``--target`` (default 0.9)
is the issue's bar: sample accuracy at least that fraction of the accuracy on real images; the exit
code is 0 either way (the figures are the output), 2 for bad input.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from movq.cli import setup_logging
from movq.utils import atomic_write, cache_dir, output_problem

log = logging.getLogger("judge")

TARGET = 0.9  # sample accuracy ≥ 90% of the judge's accuracy on real images (issue 16)
JUDGE_INPUT = 16  # the judge's convolutions see 16² (its images are average-pooled down first)


class JudgeError(ValueError):
    """Bad input to the judge tool; printed as one line."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", nargs="+", metavar="[NAME=]DIR", help="tools/sample.py output folders")
    p.add_argument("--tokenizer", help="also judge this tokenizer's reconstructions of the real images")
    p.add_argument("--real", type=int, default=512, help="held-out real images (the shapes val split)")
    p.add_argument("--target", type=float, default=TARGET, help="bar on accuracy relative to real images")
    p.add_argument("--json", metavar="OUT", help="write the figures as JSON")
    p.add_argument("--cache-dir", help="where trained judges are kept (default $MOVQ_CACHE_DIR or ~/.cache/movq)")
    args = p.parse_args(argv)
    if args.real < 16:
        p.error("--real must be >= 16")
    if args.json and output_problem(args.json):
        p.error(f"--json: {output_problem(args.json)}")
    return args


def _named(spec: str) -> tuple[str, Path]:
    name, sep, folder = spec.partition("=")
    return (name, Path(folder)) if sep and name else (Path(spec).name or spec, Path(spec))


def read_sample_folder(folder: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(uint8 images [N, H, W, 3], intended labels [N], sampling.json)`` of a tools/sample.py folder."""
    from movq.data.shapes import SHAPE_CLASSES
    from movq.generation.sampler import sample_labels

    info_path = folder / "sampling.json"
    if not info_path.is_file():
        raise JudgeError(f"{folder}: no sampling.json (not a finished tools/sample.py folder)")
    info = json.loads(info_path.read_text())
    files = sorted(p for p in folder.glob("*.png") if re.fullmatch(r"\d{6}\.png", p.name))
    if len(files) != info.get("num_samples"):
        raise JudgeError(f"{folder}: {len(files)} NNNNNN.png samples but sampling.json says {info.get('num_samples')}")
    if list(info.get("classes") or []) != list(SHAPE_CLASSES):
        raise JudgeError(f"{folder}: the prior's classes {info.get('classes')} are not the shapes dataset's "
                         f"{list(SHAPE_CLASSES)}; the judge knows those only")
    rule = info.get("labels")
    if rule == "null" or rule is None:
        raise JudgeError(f"{folder}: unconditional samples (labels {rule!r}) have no intended class to judge")
    index = np.array([int(p.stem) for p in files])
    labels = sample_labels(rule, int(info["num_classes"]), index, "cpu").numpy()
    images = []
    for p in files:
        with Image.open(p) as im:
            images.append(np.asarray(im.convert("RGB")))
    sizes = {im.shape for im in images}
    if len(sizes) != 1:
        raise JudgeError(f"{folder}: samples of several sizes {sorted(sizes)}")
    return np.stack(images), labels, info


def judge_for(size: int, cache: Optional[str]):
    """The cached judge of images of ``size`` (trained and saved first if missing)."""
    from movq.evaluation.judge import JudgeConfig, pretrained_judge

    if size % JUDGE_INPUT:
        raise JudgeError(f"samples of {size}² cannot be judged: the judge takes multiples of {JUDGE_INPUT} pixels")
    cfg = JudgeConfig(image_size=size, downsample=size // JUDGE_INPUT)
    root = cache_dir(cache)
    root.mkdir(parents=True, exist_ok=True)
    return pretrained_judge(root, cfg)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    import torch

    from movq.evaluation.judge import class_accuracy, judge_samples, real_reference

    t0 = time.time()
    try:
        folders = [(name, *read_sample_folder(folder), folder) for name, folder in map(_named, args.samples)]
        sizes = {imgs.shape[1:3] for _, imgs, _, _, _ in folders}
        if len(sizes) != 1 or len(next(iter(sizes))) != 2 or len(set(next(iter(sizes)))) != 1:
            raise JudgeError(f"all sample folders must hold square images of one size, got {sorted(sizes)}")
        size = next(iter(sizes))[0]
        judge = judge_for(size, args.cache_dir)
        real_x, real_y = real_reference(judge.config, args.real)
        report: dict = {"judge": {"image_size": size, "recipe": judge.config.key(),
                                  "real_images": args.real, "classes": list(judge.classes)},
                        "target_relative_accuracy": args.target}
        real_acc = class_accuracy(judge, real_x, real_y)
        report["real"] = {"accuracy": real_acc}
        if args.tokenizer:
            from movq.evaluation.judge import as_judge_input
            from movq.models.autoencoder import MoVQ

            tok = MoVQ.from_pretrained(args.tokenizer).eval()
            x = as_judge_input(real_x)
            with torch.no_grad():
                rec = torch.cat([tok.decode_indices(tok.encode(x[i : i + 64]).indices).clamp(-1, 1)
                                 for i in range(0, len(x), 64)])
            if rec.shape[-1] != size:
                raise JudgeError(f"--tokenizer {args.tokenizer} reconstructs {rec.shape[-1]}² images, the samples are {size}²")
            acc = class_accuracy(judge, rec, real_y)
            report["reconstructions"] = {"tokenizer": str(args.tokenizer), "accuracy": acc,
                                         "relative_accuracy": acc / max(real_acc, 1e-12)}
        report["samples"] = {}
        for name, images, labels, info, folder in folders:
            r = judge_samples(judge, images, labels, real=(real_x, real_y))
            r.update(folder=str(folder), num_samples=len(images), kind=info.get("kind"),
                     meets_target=r["relative_accuracy"] >= args.target,
                     settings={k: info.get(k) for k in ("steps", "temperature", "top_k", "top_p", "cfg_scale",
                                                         "cfg_schedule", "choice_temperature") if k in info})
            report["samples"][name] = r
    except (JudgeError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report["seconds"] = time.time() - t0
    if args.json:
        atomic_write(args.json, json.dumps(report, indent=1) + "\n")
    print(format_report(report))
    return 0


def format_report(report: dict) -> str:
    """The one-screen table of a report."""
    rule = "=" * 64
    lines = ["", rule, f" shapes judge ({report['judge']['image_size']}² images, 8 classes; chance 0.125)",
             f" real images:      accuracy {report['real']['accuracy']:.3f}"]
    if "reconstructions" in report:
        r = report["reconstructions"]
        lines.append(f" reconstructions:  accuracy {r['accuracy']:.3f}  ({r['relative_accuracy']:.1%} of real)")
    for name, r in report["samples"].items():
        mark = "meets" if r["meets_target"] else "misses"
        lines.append(f" {name + ':':<17} accuracy {r['accuracy']:.3f}  ({r['relative_accuracy']:.1%} of real, "
                     f"{mark} {report['target_relative_accuracy']:.0%})  diversity {r['diversity']:.2f}"
                     f"  [{r['num_samples']} samples]")
    lines += [" diversity: within-class feature spread / that of real images (1 = as varied as the data)", rule]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
