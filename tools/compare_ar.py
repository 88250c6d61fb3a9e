#!/usr/bin/env python
"""How should the autoregressive prior order the C tokens of a cell? Train each factorization of
movq.models.autoregressive on the same token folder with the same budget, then measure held-out
bits per token and sampling speed.

    python tools/compare_ar.py --train runs/x/tokens_train --val runs/x/tokens_val \\
        --steps 400 --out benchmarks/results/ar_factorization_cpu.json

Every variant gets the same data order, steps, batch, optimizer, width, heads and spatial depth
(``--depth``); ``depth`` adds ``--depth-layers`` layers of depth transformer (its parameter count is
reported). Held-out bits/token: the mean next-token NLL over all tokens of the val folder, with the
true labels, in bits (log2 K is a uniform guess). Sampling: median seconds of ``--repeats`` batches
of ``--sample-batch`` class-conditional samples (cfg_scale 1, temperature 1) after a warm-up, as
tokens/s and images/s (the tokens of one image; decoding to pixels is the same for all and left
out); ``--steps 0`` measures sampling speed only (random weights: speed does not depend on them),
so that all variants can be timed back to back under the same load. Training is timed in wall and
in CPU seconds (the latter is the fairer figure on a shared machine). With ``--save DIR`` the trained
weights go to DIR/<variant>.safetensors.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _bench_report import check_out, device_name, versions, write_report  # noqa: E402 (tools/ is on sys.path)

from movq.data.tokens import TokenDataset  # noqa: E402
from movq.generation.autoregressive import sample  # noqa: E402
from movq.models.autoregressive import FACTORIZATIONS, AutoregressivePrior  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="token folder to train on (tools/tokenize_dataset.py)")
    p.add_argument("--val", required=True, help="held-out token folder (same tokenizer)")
    p.add_argument("--variants", nargs="+", default=list(FACTORIZATIONS), choices=FACTORIZATIONS)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=4, help="spatial transformer layers")
    p.add_argument("--depth-layers", type=int, default=1, help="depth transformer layers (variant depth)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--window", type=int, default=0, help="attention window in cells (0 = full)")
    p.add_argument("--sample-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--save", help="folder for the trained weights (<variant>.safetensors)")
    p.add_argument("--out", help="JSON report path")
    args = p.parse_args(argv)
    if min(args.batch, args.sample_batch, args.repeats) < 1 or args.steps < 0:
        p.error("--batch, --sample-batch and --repeats must be >= 1, --steps >= 0")
    check_out(p, args)
    return args


def lr_at(step: int, steps: int, lr: float, warmup: int = 20) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def held_out_bits(model, data: TokenDataset, batch: int = 64) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch):
        b = data.take(slice(i, i + batch))
        labels = b["label"].clamp(min=0) if model.num_classes else None
        logits = model(b["tokens"], labels).float()
        total += F.cross_entropy(logits.flatten(0, -2), b["tokens"].flatten(), reduction="sum").item()
        count += b["tokens"].numel()
    return total / count / math.log(2)


def run_variant(name: str, args, train: TokenDataset, val: TokenDataset) -> dict:
    c, h, w = train.shape
    cfg = dict(codebook_size=train.codebook_size, channels=c, grid=[h, w], num_classes=len(train.classes),
               factorization=name, width=args.width, depth=args.depth, depth_layers=args.depth_layers,
               heads=args.heads, window=args.window, dropout=0.0, attn_dropout=0.0, class_dropout=0.1)
    torch.manual_seed(args.seed)
    model = AutoregressivePrior(cfg)
    opt = torch.optim.AdamW(model.param_groups(0.01), lr=args.lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(args.seed)
    batches = train.batches(args.batch, seed=args.seed)
    model.train()
    t0, c0, train_bits = time.perf_counter(), time.process_time(), []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        b = next(batches)
        loss, logs = model.training_loss(b["tokens"], b["label"].clamp(min=0), generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        train_bits.append(logs["bits_per_token"].item())
        if (step + 1) % 50 == 0:
            print(f"  {name} step {step + 1}: {sum(train_bits[-50:]) / 50:.3f} bits/token", flush=True)
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    bits = held_out_bits(model, val) if args.steps else None  # --steps 0: sampling speed only
    model.eval()
    labels = torch.arange(args.sample_batch) % max(1, model.num_classes)
    sample(model, labels[:2], generator=torch.Generator().manual_seed(0))  # warm-up
    times = []
    for r in range(args.repeats):
        t = time.perf_counter()
        sample(model, labels, generator=torch.Generator().manual_seed(r))
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    if args.save:
        from safetensors.torch import save_file

        Path(args.save).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(args.save) / f"{name}.safetensors"))
    tokens = c * h * w
    return {"factorization": name, "params": model.num_params(), "sequence_length": model.config.seq_len,
            "train_seconds": round(train_s, 1), "train_cpu_seconds": round(train_cpu, 1),
            "train_bits_per_token_last50": round(sum(train_bits[-50:]) / len(train_bits[-50:]), 4) if train_bits else None,
            "val_bits_per_token": round(bits, 4) if bits is not None else None, "sample_batch": args.sample_batch,
            "sample_seconds_median": round(med, 3), "sample_seconds_min": round(min(times), 3),
            "tokens_per_s": round(args.sample_batch * tokens / med, 1), "images_per_s": round(args.sample_batch / med, 2),
            "config": cfg}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train, val = TokenDataset(args.train), TokenDataset(args.val)
    if train.shape != val.shape or train.codebook_size != val.codebook_size or train.classes != val.classes:
        print("error: --train and --val hold tokens of different shapes, codebooks or classes", file=sys.stderr)
        return 2
    results = []
    for name in args.variants:
        print(f"training {name} ...", flush=True)
        results.append(run_variant(name, args, train, val))
        r = results[-1]
        print(f"{name}: {r['params']} params, held-out {r['val_bits_per_token']} bits/token, "
              f"train {r['train_seconds']} s, sampling {r['tokens_per_s']} tokens/s = {r['images_per_s']} images/s",
              flush=True)
    c, h, w = train.shape
    print(f"\n{'variant':8} {'params':>8} {'val bits/token':>15} {'train s':>8} {'tokens/s':>9} {'images/s':>9}")
    for r in results:
        print(f"{r['factorization']:8} {r['params']:8d} {str(r['val_bits_per_token']):>15} {r['train_seconds']:8.1f} "
              f"{r['tokens_per_s']:9.1f} {r['images_per_s']:9.2f}")
    if args.out:
        report = {"benchmark": "ar_factorization", "device": device_name("cpu"), "versions": versions(),
                  "tokens": {"train": str(args.train), "val": str(args.val), "train_count": len(train),
                             "val_count": len(val), "shape": [c, h, w], "codebook_size": train.codebook_size,
                             "classes": len(train.classes)},
                  "budget": {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed},
                  "uniform_bits_per_token": round(math.log2(train.codebook_size), 4),
                  "results": results, "command": " ".join(["python", "tools/compare_ar.py", *(argv or sys.argv[1:])])}
        write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
