"""Microbenchmarks of the fused multichannel VQ op (kernels/vq.py, issue 4) against its baselines.

    python tools/bench_kernels.py --out benchmarks/results/kernels_h100.json           # full sweep, GPU
    python tools/bench_kernels.py --quick --out benchmarks/results/kernels_cpu_quick.json  # harness check, CPU

Method follows the Triton tutorials: ``triton.testing.do_bench`` with quantiles (median, p20, p80) on
GPU; on CPU, where do_bench needs CUDA, a plain perf_counter loop. Sweep (issue 4): N = B*h*w*C for
B in {8, 64} at 16x16x4 and 32x32x4, K in {1024, 8192, 16384, 65536}, d in {8, 64, 256}, bf16 and
fp32, forward alone ("fwd": inputs without grad) and forward + backward ("fwd_bwd": upstream grads on
z_q and both losses). Baselines in the same run: the torch reference (chunked matmul form + argmin +
gather + autograd losses), torch.compile of it, and vector-quantize-pytorch's VectorQuantize with C
heads sharing one codebook (a benchmark-only extra: skipped with a note when absent).

Reported per case and method: median/p20/p80 ms, TFLOP/s of the distance GEMM (2*N*K*d flops), the
fraction of the device's dense peak for the case's math (bf16/fp16 tensor cores, tf32, or fp32 FMA),
the peak memory the op adds (CUDA only) and the speedup of the Triton op over each baseline. The JSON
names the device and the versions. --quick: tiny shapes on CPU (Triton in its interpreter, so its
times say nothing about speed), only to check the harness end to end.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# The Triton kernels are built for the interpreter or the GPU when kernels/ is imported: decide first.
if "--quick" in sys.argv and os.environ.get("TRITON_INTERPRET") is None:
    try:
        import torch as _t

        if not _t.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _bench_report import check_out, device_name, versions, write_report  # noqa: E402 (tools/ is on sys.path)

from movq.kernels import multichannel_vq, multichannel_vq_ref  # noqa: E402
from movq.kernels._autotune import HAS_TRITON  # noqa: E402

# Dense peak TFLOP/s (no sparsity) from the vendors' data sheets, by math: first matching name wins.
PEAKS_TFLOPS = [
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),  # SXM
    ("H200", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("GH200", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "tf32": 183.0, "fp32": 91.6}),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
METHODS = ("triton", "torch_ref", "torch_compile", "vqpytorch")
MODES = ("fwd", "fwd_bwd")
BETA = 0.25  # commitment weight used for the upstream gradient (any constant would do)


def device_peak(name: str) -> dict | None:
    for key, peaks in PEAKS_TFLOPS:
        if key in name:
            return peaks
    return None


def math_of(dtype: str, tf32: bool) -> str:
    return "bf16" if dtype in ("bf16", "fp16") else ("tf32" if tf32 else "fp32")


def time_fn(fn, cuda: bool, grad_to_none, rep_ms: int, cpu_reps: int) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds."""
    if cuda:
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, grad_to_none=grad_to_none,
                                    quantiles=[0.5, 0.2, 0.8])
        return float(q[0]), float(q[1]), float(q[2])
    fn()  # warm-up (compilation, caches)
    times = []
    for _ in range(cpu_reps):
        for t in grad_to_none or []:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    qs = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return statistics.median(times), qs[1], qs[7]


def peak_mem_added_mb(fn, cuda: bool) -> float | None:
    """Peak CUDA memory above what was allocated before one call (outputs and saved tensors included)."""
    if not cuda:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    keep = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del keep
    return peak / 2**20


def make_method(name: str, C: int, d: int, cb: torch.Tensor, tf32: bool, compiled: dict):
    """Return f(z, codebook) -> (z_q, codebook_loss, commitment_loss) or raise with a reason to skip."""
    if name == "triton":
        if not HAS_TRITON:
            raise RuntimeError("triton is not installed")

        def f(z, cb):
            r = multichannel_vq(z, cb, C, backend="triton", allow_tf32=tf32)
            return r.z_q, r.codebook_loss, r.commitment_loss
        return f
    if name == "torch_ref":
        def f(z, cb):
            r = multichannel_vq_ref(z, cb, C)
            return r.z_q, r.codebook_loss, r.commitment_loss
        return f
    if name == "torch_compile":
        if "fn" not in compiled:
            # one static graph per shape (the best case for compile); lift the recompile cap for the sweep
            for knob in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, 1024)
            compiled["fn"] = torch.compile(multichannel_vq_ref, dynamic=False)
        ref_c = compiled["fn"]

        def f(z, cb):
            r = ref_c(z, cb, C)
            return r.z_q, r.codebook_loss, r.commitment_loss
        return f
    if name == "vqpytorch":
        try:
            from vector_quantize_pytorch import VectorQuantize
        except ImportError as err:
            raise RuntimeError("vector-quantize-pytorch is not installed (benchmark-only extra: "
                               "pip install vector-quantize-pytorch)") from err
        vq = VectorQuantize(dim=C * d, codebook_size=cb.shape[0], codebook_dim=d, heads=C,
                            separate_codebook_per_head=False, channel_last=False, accept_image_fmap=True,
                            rotation_trick=False, ema_update=False, learnable_codebook=True,
                            commitment_weight=1.0).to(cb.device)
        with torch.no_grad():
            vq._codebook.embed.copy_(cb.detach().view_as(vq._codebook.embed))  # the same codes as the others

        def f(z, _cb):
            zq, _, loss = vq(z)
            return zq, loss.sum(), None
        return f
    raise ValueError(f"unknown method {name!r}; expected one of {METHODS}")


def run_case(case: dict, methods: list[str], args, cuda: bool, compiled: dict, dev: torch.device) -> dict:
    B, h, w, C, K, d, dtype, mode = (case[k] for k in ("B", "h", "w", "C", "K", "d", "dtype", "mode"))
    g = torch.Generator(device="cpu").manual_seed(0)
    z0 = torch.randn(B, C * d, h, w, generator=g).to(dev, DTYPES[dtype])
    cb0 = torch.randn(K, d, generator=g).to(dev)
    train = mode == "fwd_bwd"
    z, cb = z0.clone().requires_grad_(train), cb0.clone().requires_grad_(train)
    gzq = torch.randn(z0.shape, generator=g).to(dev, z0.dtype) if train else None
    flops = 2.0 * case["N"] * K * d
    peaks = device_peak(torch.cuda.get_device_name(dev)) if cuda else None
    peak = peaks[math_of(dtype, args.tf32)] if peaks else None
    results = {}
    for name in methods:
        try:
            f = make_method(name, C, d, cb, args.tf32, compiled.setdefault(name, {}))
            if train:
                def fn(f=f):
                    zq, lcb, lcm = f(z, cb)
                    outs, grads = [zq, lcb], [gzq, torch.ones_like(lcb)]
                    if lcm is not None:
                        outs.append(lcm)
                        grads.append(torch.full_like(lcm, BETA))
                    torch.autograd.backward(outs, grads)
                    return zq
            else:
                def fn(f=f):
                    with torch.no_grad():
                        return f(z, cb)
            med, p20, p80 = time_fn(fn, cuda, [z, cb] if train else None, args.rep_ms, args.cpu_reps)
            tflops = flops / (med * 1e-3) / 1e12
            results[name] = {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "gemm_tflops": tflops,
                             "frac_of_peak": (tflops / peak) if peak else None,
                             "peak_mem_added_mb": peak_mem_added_mb(fn, cuda)}
        except Exception as err:  # noqa: BLE001 - one failing baseline must not end the sweep
            results[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
    speedup = {}
    t_tri = results.get("triton", {}).get("median_ms")
    for name, r in results.items():
        if name != "triton" and t_tri and r.get("median_ms"):
            speedup[name] = r["median_ms"] / t_tri
    return {**case, "gemm_flops": flops, "peak_tflops": peak, "math": math_of(dtype, args.tf32),
            "results": results, "speedup_of_triton_over": speedup}


def build_cases(args) -> list[dict]:
    if args.quick:
        grid = [(1, 4, 4, 4, 16, 8, "fp32", "fwd"), (1, 4, 4, 4, 16, 8, "fp32", "fwd_bwd"),
                (1, 4, 4, 4, 64, 8, "bf16", "fwd"), (1, 4, 4, 4, 64, 8, "bf16", "fwd_bwd")]
    else:
        grid = [(B, s, s, 4, K, d, dt, mode) for B in args.B for s in args.hw for K in args.K for d in args.d
                for dt in args.dtypes for mode in args.modes]
    return [{"B": B, "h": h, "w": w, "C": C, "N": B * h * w * C, "K": K, "d": d, "dtype": dt, "mode": mode}
            for B, h, w, C, K, d, dt, mode in grid]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="JSON file to write")
    p.add_argument("--quick", action="store_true", help="tiny shapes, CPU is fine (checks the harness only)")
    p.add_argument("--B", type=int, nargs="+", default=[8, 64])
    p.add_argument("--hw", type=int, nargs="+", default=[16, 32], help="square latent sizes (C = 4 channels)")
    p.add_argument("--K", type=int, nargs="+", default=[1024, 8192, 16384, 65536])
    p.add_argument("--d", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--tf32", action="store_true", help="let fp32 inputs search with tf32 (Triton op only)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per measurement")
    p.add_argument("--cpu-reps", type=int, default=3, help="timed repetitions per measurement on CPU")
    args = p.parse_args(argv)
    check_out(p, args)

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    if not cuda and not args.quick:
        p.error("the full sweep needs a CUDA device; use --quick on CPU")
    notes = []
    methods = list(args.methods)
    if not cuda:
        notes.append("CPU run: timings by time.perf_counter (do_bench needs CUDA); peak memory not measured.")
        if "triton" in methods:
            if os.environ.get("TRITON_INTERPRET") == "1":
                notes.append("Triton ran in its interpreter (TRITON_INTERPRET=1): its times check the harness only.")
            else:
                methods.remove("triton")
                notes.append("Triton skipped: no CUDA and TRITON_INTERPRET is not 1.")
    try:
        import vector_quantize_pytorch  # noqa: F401
    except ImportError:
        if "vqpytorch" in methods:
            methods.remove("vqpytorch")
            notes.append("vector-quantize-pytorch absent: its baseline skipped (pip install vector-quantize-pytorch).")
    notes.append("vqpytorch: VectorQuantize(heads=C, shared codebook, learnable codebook, no EMA, no rotation "
                 "trick); its loss is commitment only and it keeps its own layout handling.")

    compiled: dict = {}
    cases = []
    t0 = time.time()
    for case in build_cases(args):
        rec = run_case(case, methods, args, cuda, compiled, dev)
        cases.append(rec)
        cols = "  ".join(f"{m}={r['median_ms']:.3f}ms" if "median_ms" in r else f"{m}=ERR"
                         for m, r in rec["results"].items())
        print(f"N={rec['N']:>7} K={rec['K']:>6} d={rec['d']:>3} {rec['dtype']:>4} {rec['mode']:<7} {cols}", flush=True)
    report = {
        "benchmark": "multichannel_vq (kernels/vq.py, issue 4)",
        "device": device_name(dev),
        "versions": versions("vector_quantize_pytorch"),
        "settings": {"quick": args.quick, "tf32": args.tf32, "rep_ms": args.rep_ms, "cpu_reps": args.cpu_reps,
                     "methods": methods, "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"},
        "flops_definition": "2*N*K*d (the distance GEMM); the same count for every method and mode",
        "notes": notes,
        "wall_s": time.time() - t0,
        "cases": cases,
    }
    write_report(report, args.out, f" ({len(cases)} cases, {report['wall_s']:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
