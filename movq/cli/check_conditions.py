"""Check that image-conditional priors follow their conditions, on the built-in shapes data (CPU is enough).

    python tools/check_conditions.py --tokenizer runs/shapes --work runs/conditions --train \\
        [--kinds edges lowres segmentation] [--priors maskgit ar] [--steps maskgit=600 ar=500] \\
        [--num-conditions 64] [--cfg-scales 1 3] [--json benchmarks/results/conditions_cpu.json]

``--tokenizer`` is a tokenizer trained on the shapes data (the main job's ``runs/shapes``, or its first step
alone: ``tools/train_tokenizer.py --config configs/shapes.yaml``). For each kind, ``--train`` first runs the
commands a user would (printed as they run): ``tools/tokenize_dataset.py --tokenizer TOK shapes WORK/KIND/tokens
--condition KIND`` and, both priors at once (one core each), ``tools/train_prior.py --config
configs/{maskgit,ar}_shapes.yaml data.tokens=... train.run_dir=WORK/KIND/{maskgit,ar} model.num_classes=0
model.condition.kind=KIND train.max_steps=N``. Without ``--train`` the priors are read from those run folders.

Then each prior samples one image per held-out condition (the first N images of the shapes validation split,
conditions made exactly as in training) with the condition (each ``--cfg-scale``) and with the null condition
(the same prior's unconditional branch: null condition, null class, no guidance), with the same noise, and the
samples are scored (movq/evaluation/conditions.py): edges → edge F1 with a 1-px tolerance, lowres → PSNR of the
downsampled sample against the input, segmentation → IoU of the shape mask. Prints a table and writes JSON
(the command, settings, per-prior figures, the machine) and WORK/KIND/PRIOR_strip.png (conditions, conditional
samples, unconditional samples).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from movq.cli import setup_logging
from movq.utils import atomic_write

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("edges", "lowres", "segmentation")
PRIORS = {"maskgit": "maskgit", "ar": "autoregressive"}
DEFAULT_STEPS = {"maskgit": 600, "ar": 500}
STRIP_COLUMNS = 8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="a MoVQ tokenizer trained on the shapes data")
    p.add_argument("--work", default="runs/conditions", help="token folders and prior runs: WORK/KIND/{tokens,maskgit,ar}")
    p.add_argument("--train", action="store_true", help="tokenize and train the priors first")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--priors", nargs="+", choices=list(PRIORS), default=list(PRIORS))
    p.add_argument("--steps", nargs="+", default=[], metavar="PRIOR=N", help="training steps (default maskgit=600 ar=500)")
    p.add_argument("--builtin-size", type=int, default=4096, help="shapes training images to tokenize")
    p.add_argument("--num-conditions", type=int, default=64, help="held-out conditions (shapes val images)")
    p.add_argument("--cfg-scales", type=float, nargs="+", default=[1.0, 3.0], help="guidance of the conditional samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="benchmarks/results/conditions_cpu.json")
    args = p.parse_args(argv)
    steps = dict(DEFAULT_STEPS)
    for item in args.steps:
        name, _, n = item.partition("=")
        if name not in PRIORS or not n.isdigit() or int(n) < 1:
            p.error(f"--steps: expected maskgit=N or ar=N with N >= 1, got {item!r}")
        steps[name] = int(n)
    args.steps = steps
    if args.num_conditions < 2:
        p.error("--num-conditions must be >= 2")
    return args


def _run(cmd: list[str], log: Path) -> subprocess.Popen:
    print("+ " + " ".join(cmd) + f"  > {log}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def train(args, kind: str) -> None:
    """Tokenize the shapes data with the condition, then train the priors (in parallel, one core each)."""
    work, py = Path(args.work) / kind, sys.executable
    tokens = work / "tokens"
    if not (tokens / "manifest.json").is_file():
        extra = ["--condition-classes", "9"] if kind == "segmentation" else []
        proc = _run([py, "tools/tokenize_dataset.py", "--tokenizer", str(args.tokenizer), "shapes", str(tokens),
                     "--builtin-size", str(args.builtin_size), "--condition", kind, *extra], work / "tokenize.log")
        if proc.wait():
            raise SystemExit(f"error: tokenizing for {kind} failed: see {work / 'tokenize.log'}")
    procs = []
    seg_classes = ["model.condition.num_classes=9"] if kind == "segmentation" else []
    for name in args.priors:
        run = work / name
        if (run / "checkpoints").is_dir():
            print(f"  {run} has checkpoints: kept (delete it to train again)")
            continue
        steps = args.steps[name]
        procs.append((name, _run([py, "tools/train_prior.py", "--config", f"configs/{name}_shapes.yaml",
                                  f"data.tokens={tokens}", f"train.run_dir={run}", "model.num_classes=0",
                                  f"model.condition.kind={kind}", *seg_classes, f"train.max_steps={steps}",
                                  f"train.eval_every={steps}", f"train.save_every={steps}", "sample.grid_images=16",
                                  "sample.inpaint_images=0"], work / f"{name}.log")))
    for name, proc in procs:
        if proc.wait():
            raise SystemExit(f"error: training the {name} prior for {kind} failed: see {work / (name + '.log')}")


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    from movq.data.decode import images_from_uint8
    from movq.evaluation.conditions import METRICS, check_prior, held_out, report
    from movq.evaluation.visualize import save_grid
    from movq.generation.sampler import load_prior, load_tokenizer_for
    from movq.models.pretrained import resolve_pretrained

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    t0 = time.time()
    results = {}
    for kind in args.kinds:
        if args.train:
            train(args, kind)
        results[kind] = {"metric": METRICS[kind]}
        for name in args.priors:
            run = Path(args.work) / kind / name
            try:
                prior, defaults = load_prior(run)
                tokenizer = load_tokenizer_for(prior, resolve_pretrained(args.tokenizer, kind="MoVQ"), "cpu")
            except (OSError, ValueError) as e:
                print(f"error: {run}: {e} (train it with --train)", file=sys.stderr)
                return 2
            cc = prior.config.condition
            if cc is None or cc.kind != kind:
                print(f"error: {run} is not a prior conditioned on {kind}", file=sys.stderr)
                return 2
            size = tokenizer.config.model.resolution
            real, conds = held_out(cc, args.num_conditions, size)
            t1 = time.time()
            check = check_prior(_drawer(prior, tokenizer, defaults.sample), cc, conds, tuple(args.cfg_scales), args.seed,
                                real=real, reconstruct=functools.partial(_reconstruct, tokenizer))
            figures = report(check)
            steps = json.loads((run / "checkpoints" / sorted(os.listdir(run / "checkpoints"))[-1] /
                                "trainer_state.json").read_text()).get("step")
            results[kind][name] = {"kind": PRIORS[name], "run": str(run), "train_steps": steps,
                                   "sample_settings": {k: v for k, v in vars(defaults.sample).items()
                                                       if k in ("steps", "temperature", "choice_temperature", "top_k", "top_p")},
                                   "seconds": round(time.time() - t1, 1), **figures}
            from movq.data.conditions import condition_pictures

            cond_pics = condition_pictures(cc, torch.from_numpy(conds[:STRIP_COLUMNS]), (size, size))
            guided = f"conditional_cfg{args.cfg_scales[-1]:g}"
            rows = [cond_pics] + [images_from_uint8(torch.from_numpy(check.samples[k][:STRIP_COLUMNS]))
                                  for k in (guided, "unconditional")]
            save_grid(rows, Path(args.work) / kind / f"{name}_strip.png")
            _print(kind, name, figures)
        _write(args, argv, results, t0)  # after every kind: a long run keeps what it has measured
    print(f"wrote {args.json} ({time.time() - t0:.0f} s)")
    return 0


def _write(args, argv, results: dict, t0: float) -> None:
    info = {
        "command": "python tools/check_conditions.py " + " ".join(sys.argv[1:] if argv is None else map(str, argv)),
        "what": "samples of image-conditional priors scored against held-out conditions of the shapes val split, with "
                "the condition (conditional_cfgS: guidance S) and with the null condition (unconditional: the same prior's "
                "CFG null branch); difference = paired mean of conditional - unconditional",
        "settings": {"kinds": args.kinds, "priors": args.priors, "train_steps": args.steps,
                     "num_conditions": args.num_conditions, "cfg_scales": args.cfg_scales, "seed": args.seed,
                     "tokenizer": str(args.tokenizer), "builtin_size": args.builtin_size},
        "results": results,
        "machine": {"device": "cpu", "gpu": None, "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "omp_threads": os.environ.get("OMP_NUM_THREADS")},
        "seconds": round(time.time() - t0, 1),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.json, json.dumps(info, indent=1) + "\n")


def _drawer(prior, tokenizer, settings):
    """``draw(conditions or None, n, cfg_scale, generator)`` of :func:`movq.evaluation.conditions.check_prior`:
    the prior's samples (null class; the null condition for None), decoded, uint8 [n, S, S, 3]."""
    import dataclasses

    from movq.data.decode import images_to_uint8
    from movq.generation.sampler import sample_prior, tokens_to_images

    @torch.no_grad()
    def draw(conditions, n: int, scale: float, generator: torch.Generator):
        s = dataclasses.replace(settings, cfg_scale=scale)
        tokens = sample_prior(prior, None, s, num_samples=n, generator=generator, condition=conditions)
        return images_to_uint8(tokens_to_images(tokenizer, tokens)).cpu().numpy()

    return draw


@torch.no_grad()
def _reconstruct(tokenizer, images):
    from movq.data.decode import images_from_uint8, images_to_uint8
    from movq.generation.sampler import tokens_to_images

    x = images_from_uint8(torch.from_numpy(images)).contiguous()
    return images_to_uint8(tokens_to_images(tokenizer, tokenizer.encode(x).indices)).cpu().numpy()


def _print(kind: str, name: str, figures: dict) -> None:
    cells = [f"{k}: {v['mean']:.3f} ± {v['sem']:.3f}" for k, v in figures.items() if k != "difference"]
    diff = ", ".join(f"{k}: {v['mean']:+.3f} ± {v['sem']:.3f}" for k, v in figures["difference"].items())
    print(f"{kind:>12} {name:>7}  " + "; ".join(cells) + f"  | difference {diff}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
