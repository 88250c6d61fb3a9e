#!/usr/bin/env python
"""Time and memory per sampled token of the autoregressive prior grow with the attention window W,
not with the token grid: a benchmark on CPU.

    python tools/bench_ar_window.py --out benchmarks/results/ar_window_cpu.json
    python tools/bench_ar_window.py --quick            # seconds: checks the harness only

Part 1, the KV-cached sampler (movq.generation.autoregressive.sample) on grids of n × n cells
trained with window W (random weights: speed does not depend on them): per case the median over
``--repeats`` runs of the seconds per sampled token, over the whole grid and over its last quarter
(the steady state, where a full-attention model attends to the most keys), the CPU seconds per
token (process time: with one thread, the work done, whatever else shares the machine), and the KV cache's
bytes (all layers, keys and values: exact, from the tensors). With W fixed the figures stay flat as
n grows; with full attention (W = 0) they grow with n².

Part 2, taming's sliding window for grids larger than the training grid
(``sample_large``): a model trained on g × g cells samples m·g × m·g grids; each cell costs one
prefix pass over at most g² cells of its crop, so seconds per token stay flat in m (up to the
crop's average prefix: a cell in the crop's middle row reads about half the crop, at the training
size the average is the same, a little less near the top edge).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from _bench_report import check_out, device_name, versions, write_report  # noqa: E402 (tools/ is on sys.path)

from movq.generation.autoregressive import sample, sample_large  # noqa: E402
from movq.models.autoregressive import AutoregressivePrior  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grids", type=int, nargs="+", default=[8, 16, 32, 48], help="n of the n × n grids (part 1)")
    p.add_argument("--windows", type=int, nargs="+", default=[8, 32, 0], help="W in cells; 0 = full attention")
    p.add_argument("--train-grid", type=int, default=8, help="g, the training grid of part 2")
    p.add_argument("--scales", type=int, nargs="+", default=[1, 2, 3], help="m: part 2 samples m·g × m·g")
    p.add_argument("--factorization", default="cell", choices=["flat", "cell", "depth"])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--codebook", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the harness")
    p.add_argument("--out", help="JSON report path")
    args = p.parse_args(argv)
    if args.quick:
        args.grids, args.windows, args.scales, args.width, args.repeats = [4, 8], [4, 0], [1, 2], 32, 1
        args.train_grid = 4
    check_out(p, args)
    return args


def make_model(args, grid: int, window: int) -> AutoregressivePrior:
    torch.manual_seed(0)
    return AutoregressivePrior(dict(
        codebook_size=args.codebook, channels=args.channels, grid=grid, num_classes=10,
        factorization=args.factorization, width=args.width, depth=args.depth, heads=args.heads,
        depth_layers=1, window=window)).eval()


class _Timed:
    """Wraps model.step to record when each position finished (sample() calls it once per position)."""

    def __init__(self, model):
        self.model, self.step, self.stamps = model, model.step, []

    def __call__(self, x, pos, cache):
        out = self.step(x, pos, cache)
        self.stamps.append(time.perf_counter())
        self.cache = cache
        return out


def part1(args) -> list[dict]:
    rows = []
    for n in args.grids:
        for window in args.windows:
            if window >= n * n:
                continue
            model = make_model(args, n, window)
            labels = torch.arange(args.batch) % 10
            tokens = args.batch * args.channels * n * n
            whole, cpu, tail, cache_bytes = [], [], [], 0
            for r in range(args.repeats + 1):  # the first run warms up
                timed = _Timed(model)
                model.step = timed
                t0, c0 = time.perf_counter(), time.process_time()
                sample(model, labels, generator=torch.Generator().manual_seed(r))
                total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
                del model.step  # back to the class's method
                cache_bytes = timed.cache.nbytes
                stamps = timed.stamps
                q = len(stamps) * 3 // 4
                if r:
                    whole.append(total / tokens)
                    cpu.append(total_cpu / tokens)
                    tail_tokens = args.batch * model.config.unit_tokens * (len(stamps) - q)
                    tail.append((stamps[-1] - stamps[q - 1]) / tail_tokens)
            row = {"grid": n, "window": window or "full", "keys_per_step": 1 + model.config.window_units,
                   "s_per_token": statistics.median(whole), "cpu_s_per_token": statistics.median(cpu),
                   "s_per_token_last_quarter": statistics.median(tail),
                   "kv_cache_bytes": cache_bytes, "kv_bytes_per_sample": cache_bytes // args.batch}
            rows.append(row)
            print(f"grid {n:3d}×{n:<3d} W={str(row['window']):>4}: {1e6 * row['s_per_token']:8.1f} µs/token "
                  f"({1e6 * row['cpu_s_per_token']:8.1f} CPU) "
                  f"(last quarter {1e6 * row['s_per_token_last_quarter']:8.1f}), KV cache {cache_bytes / 2**20:7.2f} MiB",
                  flush=True)
    return rows


def part2(args) -> list[dict]:
    rows = []
    g = args.train_grid
    model = make_model(args, g, 0)
    labels = torch.arange(args.batch) % 10
    for m in args.scales:
        n = m * g
        times, cpu = [], []
        for r in range(args.repeats + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            sample_large(model, n, labels, generator=torch.Generator().manual_seed(r))
            if r:
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        tokens = args.batch * args.channels * n * n
        row = {"train_grid": g, "grid": n, "scale": m, "s_per_token": statistics.median(times) / tokens,
               "cpu_s_per_token": statistics.median(cpu) / tokens}
        rows.append(row)
        print(f"sliding window: trained {g}×{g}, sampled {n}×{n}: {1e6 * row['s_per_token']:8.1f} µs/token "
              f"({1e6 * row['cpu_s_per_token']:8.1f} CPU)", flush=True)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with torch.no_grad():
        rows1, rows2 = part1(args), part2(args)
    if args.out:
        report = {"benchmark": "ar_window", "device": device_name("cpu"), "versions": versions(),
                  "model": {"factorization": args.factorization, "width": args.width, "depth": args.depth,
                            "heads": args.heads, "channels": args.channels, "codebook_size": args.codebook},
                  "batch": args.batch, "repeats": args.repeats, "cached_sampling": rows1, "sliding_window_large": rows2,
                  "command": " ".join(["python", "tools/bench_ar_window.py", *(argv or sys.argv[1:])])}
        write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
