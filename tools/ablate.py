#!/usr/bin/env python
"""Does each part of MoVQ help? Train a grid of tokenizer variants at an equal budget over seeds and
compare them on the held-out split.

    python tools/ablate.py --config configs/tiny.yaml --seeds 0 1 2 --out benchmarks/results/ablation_tiny_cpu
    python tools/ablate.py --config configs/tiny.yaml --variants spatial-single spatial-single+init-default \\
        --jobs 2 --work-dir runs/ablate-init --out runs/ablate-init/report
    python tools/ablate.py --config configs/ffhq256.yaml data.source=shards data.train=... data.val=...

Variants are ``<norm>-<channels>[+<option>...]`` (see ``movq.evaluation.ablation``): norm ``group`` |
``spatial``, channels ``single`` (one channel of width C·d) | ``multi`` (C channels of width d, the base
config's C and d), options ``init-identity``, ``init-default``, ``zq-post``, ``zq-conv``. The default grid is
{group, spatial} × {single, multi}. Every cell is the base config plus the overrides given here, its
variant's keys and ``train.seed``; steps, batch and data (order, crops, held-out split) are equal.

Each cell trains in its own process with ``movq.training.tokenizer.TokenizerTrainer`` (its run folder, metrics and
usage charts under ``--work-dir/<variant>/seed<N>/``) and is evaluated on the held-out split with its EMA
weights: PSNR, SSIM, LPIPS (when ``--lpips-vgg`` / ``--lpips-lin`` are given or the config trains with
LPIPS), codebook usage on the held-out split and over the last ``quantizer.usage_window`` training steps,
perplexity, training images/s (median of the train records) and peak memory (CUDA allocator, else peak
RSS of the cell's process). The grid is resumable: finished cells are read back, an interrupted cell
resumes from its last checkpoint. After every cell the report is rewritten: ``--out`` .json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _bench_report import device_name, versions  # noqa: E402 (tools/ is on sys.path)

from movq.config import ConfigError, TokenizerConfig, load_config, to_dict  # noqa: E402
from movq.evaluation import ablation  # noqa: E402
from movq.utils import atomic_write, output_problem


# ------------------------------------------------------------------------------ one cell (child)
def run_cell(spec_path: Path) -> int:
    """Train and evaluate one (variant, seed) cell described by ``spec_path``; write its result."""
    import torch

    from movq.training.tokenizer import TokenizerTrainer

    spec = json.loads(spec_path.read_text())
    cfg = load_config(TokenizerConfig, spec["config"])
    trainer = TokenizerTrainer(cfg)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    summary = trainer.fit()
    if summary["stopped_by_signal"]:
        return 128 + summary["stopped_by_signal"]
    if torch.cuda.is_available():
        peak, peak_kind = torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    else:
        peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"
    model = trainer.ema.model if trainer.ema is not None else trainer.acc.unwrap_model(trainer.model)
    lpips = trainer.loss_fn.lpips
    if spec["lpips"]:
        from movq.evaluation.lpips import LPIPS

        lpips = LPIPS.from_pretrained(*spec["lpips"]).to(trainer.acc.device)
    ev = ablation.evaluate_tokenizer(model, cfg, trainer.acc.device, lpips)

    records = [json.loads(line) for line in (Path(cfg.train.run_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    # The first record holds the warm-up; the median is robust to those that include an eval or a save.
    rates = [r["images_per_s"] for r in train if r["step"] > cfg.train.log_every] or [r["images_per_s"] for r in train]
    metrics = {
        "psnr": ev["psnr"], "ssim": ev["ssim"], "lpips": ev["lpips"], "val_usage": ev["codebook_usage"],
        "train_usage": train[-1].get("usage") if train else None, "perplexity": ev["perplexity"],
        "train_perplexity": train[-1].get("perplexity") if train else None,
        "images_per_s": statistics.median(rates) if rates else None, "peak_memory_mib": peak,
    }
    result = {
        "variant": spec["variant"], "seed": spec["seed"], "key": spec["key"], "metrics": metrics,
        "peak_memory_kind": peak_kind, "steps": summary["steps"], "train_seconds": summary["seconds"],
        "final_rec_loss": train[-1].get("rec_loss") if train else None, "num_val_images": ev["num_images"],
        "eval_curve": [{k: r[k] for k in ("step", "val/psnr", "val/codebook_usage") if k in r}
                       for r in records if r["kind"] == "eval"],
        "usage_curve": [{"step": r["step"], "usage": r.get("usage")} for r in train],
        "run_dir": cfg.train.run_dir, "device": device_name(trainer.acc.device),
    }
    atomic_write(spec["result"], json.dumps(result, indent=1) + "\n")
    return 0


# ------------------------------------------------------------------------------ the grid (parent)
def _report(args, base, variants, cells, missing, failed, command) -> dict:
    names = [v.name for v in variants]
    comparisons = [{"title": t, **ablation.paired(cells, a, b)} for t, a, b in ablation.default_comparisons(names)]
    return {
        "title": args.title, "command": command, "device": cells[0]["device"] if cells else None,
        "versions": versions("accelerate"), "config": args.config, "overrides": args.overrides,
        "budget": ablation.budget(base), "seeds": args.seeds, "variants": names,
        "labels": {v.name: v.label for v in variants},
        "variant_overrides": {v.name: list(v.overrides) for v in variants},
        "aggregate": ablation.aggregate(cells, names), "comparisons": comparisons,
        "missing": missing, "failed": failed,
        "compute_seconds": sum(c["train_seconds"] for c in cells),
        "notes": args.note, "cells": cells,
    }


def _write(report: dict, out: Path) -> None:
    atomic_write(out.with_suffix(".json"), json.dumps(report, indent=1) + "\n")
    atomic_write(out.with_suffix(".md"), ablation.render_markdown(report))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="base YAML config (see configs/)")
    p.add_argument("--variants", nargs="+", default=list(ablation.DEFAULT_VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="train.max_steps of every cell (default: the config's)")
    p.add_argument("--work-dir", default="runs/ablate", help="run folders and results of the cells")
    p.add_argument("--out", default=None, help="report path without suffix (default: WORK_DIR/ablation)")
    p.add_argument("--jobs", type=int, default=1, help="cells trained at the same time")
    p.add_argument("--threads", type=int, default=None, help="OMP threads per cell (default: CPUs / jobs)")
    p.add_argument("--lpips-vgg", default=None, help="vgg16-397923af.pth: report LPIPS")
    p.add_argument("--lpips-lin", default=None, help="LPIPS v0.1 vgg.pth heads: report LPIPS")
    p.add_argument("--title", default="Does each part of MoVQ help?")
    p.add_argument("--note", action="append", default=[], help="a line added under the table")
    p.add_argument("--no-train", action="store_true", help="only write the report of the finished cells")
    p.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: run one cell
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides for every cell")
    args = p.parse_args(argv)
    if args.cell:
        return run_cell(Path(args.cell))
    if not args.config:
        p.error("--config is required")
    if args.jobs < 1 or (args.threads is not None and args.threads < 1) or (args.steps is not None and args.steps < 1):
        p.error("--jobs, --threads and --steps must be >= 1")
    if len(set(args.seeds)) != len(args.seeds) or len(set(args.variants)) != len(args.variants):
        p.error("--seeds and --variants must not repeat")
    if (args.lpips_vgg is None) != (args.lpips_lin is None):
        p.error("LPIPS needs both --lpips-vgg and --lpips-lin")
    overrides = [*args.overrides, *([f"train.max_steps={args.steps}"] if args.steps else [])]
    work = Path(args.work_dir)
    out = Path(args.out) if args.out else work / "ablation"
    for path, folder in ((work, True), (out.with_suffix(".json"), False)):
        problem = output_problem(path, folder=folder)
        if problem:
            p.error(problem)
    try:
        base = load_config(TokenizerConfig, args.config, overrides)
        variants = [ablation.parse_variant(v, base.quantizer.channels, base.quantizer.dim) for v in args.variants]
        cells = {}
        for seed in args.seeds:  # seed-major: a partial grid already compares every variant
            for v in variants:
                run_dir = work / v.name / f"seed{seed}"
                cfg = load_config(TokenizerConfig, args.config, [*overrides, *ablation.cell_overrides(v, seed, str(run_dir))])
                from movq.models.autoencoder import MoVQ

                MoVQ(cfg)  # a variant that cannot be built (e.g. channels vs norm groups) fails now
                cells[(v.name, seed)] = cfg
    except (ConfigError, FileNotFoundError, ValueError) as e:
        p.error(str(e))
    budgets = {json.dumps(ablation.budget(c), sort_keys=True) for c in cells.values()}
    assert len(budgets) == 1, budgets  # the variants' keys never touch the budget

    from movq.data.stream import build_dataset

    for split in ("train", "val"):  # builds the builtin dataset once, before the cells race for it
        build_dataset(base.data, split)

    done, pending = [], []
    for (name, seed), cfg in cells.items():
        folder = Path(cfg.train.run_dir)
        key = ablation.config_key(cfg)
        result = folder / "result.json"
        if result.is_file():
            r = json.loads(result.read_text())
            if r.get("key") != key:
                p.error(f"{result} was trained with another config (key {r.get('key')} != {key}): "
                        "use another --work-dir, or delete that cell to retrain it")
            # The key matched, so the cell is this experiment even if it was trained under another
            # name (e.g. spatial-single+init-default is spatial-single): it counts for this variant.
            done.append({**r, "variant": name})
        elif not args.no_train:
            folder.mkdir(parents=True, exist_ok=True)
            spec = {"config": to_dict(cfg), "variant": name, "seed": seed, "key": key,
                    "lpips": [args.lpips_vgg, args.lpips_lin] if args.lpips_vgg else None, "result": str(result)}
            atomic_write(folder / "cell.json", json.dumps(spec, indent=1) + "\n")
            pending.append((name, seed, folder))
    # What reproduces the table: the command without --no-train (which only re-reads finished cells).
    command = "python tools/ablate.py " + shlex.join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a != "--no-train")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    print(f"{len(done)} cell(s) done, {len(pending)} to train ({args.jobs} at a time, {threads} thread(s) each)",
          flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "WANDB_MODE": "offline"}
    failed: list[str] = []
    running: list[tuple] = []
    queue = list(pending)

    def missing():
        finished = {(r["variant"], r["seed"]) for r in done}
        return [f"{n}/seed{s}" for (n, s) in cells if (n, s) not in finished]

    _write(_report(args, base, variants, done, missing(), failed, command), out)

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    # SIGTERM (and SIGINT, which a shell's background job ignores) stop the running cells, which save
    # a checkpoint on the SIGTERM they get: a rerun of the same command resumes them.
    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        while queue or running:
            while queue and len(running) < args.jobs:
                name, seed, folder = queue.pop(0)
                log = open(folder / "log.txt", "a")
                proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--cell", str(folder / "cell.json")],
                                        stdout=log, stderr=subprocess.STDOUT, env=env)
                running.append((proc, log, name, seed, folder, time.time()))
                print(f"  started {name} seed {seed}  (log: {folder / 'log.txt'})", flush=True)
            time.sleep(1.0)
            for item in list(running):
                proc, log, name, seed, folder, t0 = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                log.close()
                if proc.returncode == 0 and (folder / "result.json").is_file():
                    r = json.loads((folder / "result.json").read_text())
                    done.append(r)
                    print(f"  done {name} seed {seed} in {(time.time() - t0) / 60:.1f} min: "
                          f"PSNR {r['metrics']['psnr']:.2f} dB, held-out usage {r['metrics']['val_usage']:.3f}", flush=True)
                else:
                    failed.append(f"{name}/seed{seed}")
                    print(f"  FAILED {name} seed {seed} (exit {proc.returncode}): see {folder / 'log.txt'}", flush=True)
                _write(_report(args, base, variants, done, missing(), failed, command), out)
    except KeyboardInterrupt:
        for proc, *_ in running:
            proc.terminate()
        for proc, *_ in running:
            proc.wait()
        print("interrupted: rerun the same command to continue", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}", flush=True)
    if failed:
        print(f"error: {len(failed)} cell(s) failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
