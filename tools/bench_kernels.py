"""Microbenchmarks of the fused multichannel VQ op (kernels/vq.py, issues 4 and 12) against its baselines.

    python tools/bench_kernels.py --preset target --out benchmarks/results/kernels_target_h100.json  # GPU, <= 5 min
    python tools/bench_kernels.py --out benchmarks/results/kernels_h100.json           # full sweep, GPU
    python tools/bench_kernels.py --quick --out benchmarks/results/kernels_cpu_quick.json  # harness check, CPU
    python tools/bench_kernels.py --aot-report benchmarks/results/kernels_aot_sm80_sm90  # compiled code, no GPU

Method follows the Triton tutorials: ``triton.testing.do_bench`` with quantiles (median, p20, p80) on
GPU; on CPU, where do_bench needs CUDA, a plain perf_counter loop. Sweep (issue 4): N = B*h*w*C for
B in {8, 64} at 16x16x4 and 32x32x4, K in {1024, 8192, 16384, 65536}, d in {8, 64, 256}, bf16 and
fp32, forward alone ("fwd": inputs without grad) and forward + backward ("fwd_bwd": upstream grads on
z_q and both losses). Baselines in the same run: the torch reference (chunked matmul form + argmin +
gather + autograd losses) with fp32 matmuls ("torch_ref") and with bf16 matmul operands
("torch_ref_bf16"), torch.compile of each, and vector-quantize-pytorch's VectorQuantize with C heads
sharing one codebook (a benchmark-only extra: skipped with a note when absent).

``--preset target`` (issue 12): only the target cases, N = 65,536 in each: K = 16,384, d = 64, bf16,
fwd+bwd (target >= 10x torch_ref, >= 3x torch_compile); d = 256 forward (C = 1, the VQGAN layout; target
>= 50% of the dense bf16 peak); K = 1024, d = 64 fwd+bwd (target <= 50 us). Designed for <= 5 minutes on
one H100/H200: three shapes, torch.compile with dynamic=False once per shape and mode, and a time budget
(``--budget-s``) after which the remaining compiled baselines are skipped with a note.

Reported per case and method: median/p20/p80 ms, TFLOP/s of the distance GEMM (2*N*K*d flops), the
fraction of the device's dense peak for the case's math (bf16/fp16 tensor cores, tf32, or fp32 FMA),
the peak memory the op adds (CUDA only), the first call's seconds (compile / autotune included), the
autotune config the Triton search chose, and the speedup of the Triton op over each baseline. The JSON
names the device and the versions. --quick: tiny shapes on CPU (Triton in its interpreter, so its
times say nothing about speed), only to check the harness end to end.

``--aot-report PREFIX``: no GPU needed; compiles every kernel in every config the pruner can pick for
sm_80 and sm_90 (movq.kernels._aot) and writes PREFIX.json and PREFIX.md (registers, spills, shared
memory, CTAs/SM, the search loop's SASS instruction mix). ``--aot-before REV`` adds the same numbers for the
search kernel as it was at git revision REV (issue 4's layout), for a before/after table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
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
from movq.utils import output_problem  # noqa: E402

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
METHODS = ("triton", "torch_ref", "torch_ref_bf16", "torch_compile", "torch_compile_bf16", "vqpytorch")
ROOT = Path(__file__).resolve().parents[1]
# (B, h, w, C, K, d, dtype, mode): N = 65,536 in each (issue 12)
TARGET_CASES = [(64, 16, 16, 4, 16384, 64, "bf16", "fwd_bwd"), (256, 16, 16, 1, 16384, 256, "bf16", "fwd"),
                (64, 16, 16, 4, 1024, 64, "bf16", "fwd_bwd")]
TARGETS = {"fwd_bwd K=16384 d=64": {"speedup_over_torch_ref": 10.0, "speedup_over_torch_compile": 3.0},
           "fwd K=16384 d=256": {"frac_of_peak": 0.5}, "fwd_bwd K=1024 d=64": {"median_ms": 0.05}}
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
    if name in ("torch_ref", "torch_ref_bf16"):
        mm = torch.bfloat16 if name.endswith("bf16") else torch.float32

        def f(z, cb):
            r = multichannel_vq_ref(z, cb, C, matmul_dtype=mm)
            return r.z_q, r.codebook_loss, r.commitment_loss
        return f
    if name in ("torch_compile", "torch_compile_bf16"):
        mm = torch.bfloat16 if name.endswith("bf16") else torch.float32
        if "fn" not in compiled:
            # one static graph per shape (the best case for compile); lift the recompile cap for the sweep
            for knob in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, 1024)
            compiled["fn"] = torch.compile(multichannel_vq_ref, dynamic=False)
        ref_c = compiled["fn"]

        def f(z, cb):
            r = ref_c(z, cb, C, matmul_dtype=mm)
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


def chosen_search_config() -> str | None:
    """The search kernel's config of its last launch (the autotuner's pick for that key)."""
    from movq.kernels import vq

    cfg = getattr(vq._vq_search_kernel, "best_config", None)
    return None if cfg is None else str(cfg)


def run_case(case: dict, methods: list[str], args, cuda: bool, compiled: dict, dev: torch.device,
             budget_left=None) -> dict:
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
        if name.startswith("torch_compile") and budget_left is not None and budget_left() <= 0:
            results[name] = {"error": f"skipped: the run passed its time budget (--budget-s {args.budget_s})"}
            continue
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
            t_first = time.perf_counter()
            fn()  # compile / autotune / warm caches, timed on its own
            if cuda:
                torch.cuda.synchronize()
            first_s = time.perf_counter() - t_first
            for t in (z, cb):
                t.grad = None
            med, p20, p80 = time_fn(fn, cuda, [z, cb] if train else None, args.rep_ms, args.cpu_reps)
            tflops = flops / (med * 1e-3) / 1e12
            results[name] = {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "gemm_tflops": tflops,
                             "frac_of_peak": (tflops / peak) if peak else None,
                             "peak_mem_added_mb": peak_mem_added_mb(fn, cuda), "first_call_s": first_s}
            if name == "triton":
                results[name]["autotune_config"] = chosen_search_config()
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
    if getattr(args, "preset", None) == "target" and not args.quick:
        grid = TARGET_CASES
    elif args.quick:
        grid = [(1, 4, 4, 4, 16, 8, "fp32", "fwd"), (1, 4, 4, 4, 16, 8, "fp32", "fwd_bwd"),
                (1, 4, 4, 4, 64, 8, "bf16", "fwd"), (1, 4, 4, 4, 64, 8, "bf16", "fwd_bwd")]
    else:
        grid = [(B, s, s, 4, K, d, dt, mode) for B in args.B for s in args.hw for K in args.K for d in args.d
                for dt in args.dtypes for mode in args.modes]
    return [{"B": B, "h": h, "w": w, "C": C, "N": B * h * w * C, "K": K, "d": d, "dtype": dt, "mode": mode}
            for B, h, w, C, K, d, dt, mode in grid]


# ----------------------------------------------------------------------------------------------
# --aot-report: the compiled code, read without a GPU
# ----------------------------------------------------------------------------------------------

# The search kernel as of issue 4 (before issue 12): its signature and its pruner, for --aot-before REV.
_LEGACY_SCRIPT = r"""
import json, sys
from movq.kernels import _aot
from movq.kernels import _autotune as at
specs = []
for arch in _aot.ARCHS:
    for math in ("bf16",):
        for d in (64, 256):
            d_pad = max(16, 1 << (d - 1).bit_length())
            seen = set()
            for bn, bk, bd, nw, ns in at.TENSOR_CORE_SHAPES:
                bd = min(bd, d_pad)
                if (bn, bk, bd, nw, ns) in seen:
                    continue
                seen.add((bn, bk, bd, nw, ns))
                args = dict(z_ptr="*bf16", cbd_ptr="*bf16", hn_ptr="*fp32", cbf_ptr="*fp32", zq_ptr="*bf16",
                            idx_ptr="*i64", counts_ptr="*i32", sqerr_ptr="*fp32", pval_ptr="*fp32", pidx_ptr="*i32",
                            N=_aot._N, K=_aot._K, D=d, C=_aot._C, H=_aot._H, W=_aot._W, N_LOG2=("i32", 17), SPLIT=1)
                for pre in ("s_z", "s_q"):
                    args.update({pre + a: v for a, v in zip("bcyx", _aot._z_strides(d))})
                consts = dict(COSINE=True, FUSED=True, Z_CONTIG=True, Q_CONTIG=True, D_PAD=d_pad, DOT_PRECISION="ieee",
                              UPCAST=False, BF16_BITS=False, BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd)
                label = dict(math=math, d=d, d_pad=d_pad, block_n=bn, block_k=bk, block_d=bd, num_warps=nw,
                             num_stages=ns)
                specs.append(_aot.Spec("_vq_search_kernel", arch, label, args, consts, nw, ns))
rows = _aot.compile_all(specs, int(sys.argv[2]) if len(sys.argv) > 2 else None, sass_for=lambda s: True)
open(sys.argv[1], "w").write(json.dumps({"rows": rows}, indent=1) + "\n")
"""


def _aot_env(extra_path: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _aot_before(rev: str, out: Path, workers: int | None) -> None:
    """Compile the search kernel of git revision ``rev`` (its own kernels/ files, today's _aot.py)."""
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "movq" / "kernels"
        pkg.mkdir(parents=True)
        (pkg.parent / "__init__.py").write_text("")
        for name in ("vq.py", "_autotune.py", "__init__.py"):
            text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:kernels/{name}"], capture_output=True,
                                  text=True, check=True).stdout
            (pkg / name).write_text(text)
        (pkg / "_aot.py").write_text((ROOT / "kernels" / "_aot.py").read_text())
        cmd = [sys.executable, "-c", _LEGACY_SCRIPT, str(out)] + ([str(workers)] if workers else [])
        subprocess.run(cmd, env=_aot_env(tmp), check=True, cwd=tmp)


def _fmt_tile(r: dict) -> str:
    return f"{r['block_n']}x{r['block_k']}x{r['block_d']}" if "block_k" in r else f"{r['block_n']} rows"


def _fmt_spills(r: dict) -> str:
    insns = r.get("spill_insns")
    return f"{r['stack_bytes']} / {'-' if insns is None else insns}"


def _fmt_ctas(r: dict) -> str:
    lim = min(("regs", r["by_regs"]), ("smem", r["by_smem"]), ("threads", r["by_threads"]), key=lambda t: t[1])[0]
    return f"{r['ctas_per_sm']} ({lim})"


def _loop_mix(r: dict) -> str:
    m = r.get("sass_loop") or {}
    if not m:
        return "| - |" * 1
    red = m["fmnmx"] + m["fset"] + m["sel"]
    under = m.get("argmin_under_wgmma") if r["arch"] == "sm_90" else None
    return (f"| {m['mma']} | {m['ffma']} | {red} | {m['ldg']} | {m['cp_async']} | {m['lds']} | {m['sts']} | "
            f"{m['shfl']} | {m['spill']} | {m['total']} | {'-' if under is None else under} |")


def render_aot_markdown(report: dict, before: dict | None, command: str) -> str:
    rows = report["rows"]
    lines = [
        "# kernels/vq.py compiled ahead of time for sm_80 and sm_90 (no GPU)",
        "",
        f"Produced by `{command}` (triton {report['triton']}, the wheel's ptxas and cuobjdump; "
        f"this run took {report['wall_s']} s; compiles already in Triton's on-disk cache are reused). "
        "Every kernel in every config the pruner "
        "(kernels/_autotune.py) can pick, with the heaviest flags (cosine codes, fused epilogue) and a real "
        "launch's specialisation (B=64, 16x16, C=4, K=16,384). tests/test_kernels_aot.py fails on any spill, on "
        "shared memory over the limit and on a pruner estimate below the compiled figure.",
        "",
        f"Limits per block: {', '.join(f'{a} {v} B' for a, v in report['smem_limit_per_block'].items())}. "
        "CTAs/SM: the occupancy estimate from registers (allocated per warp in units of 256 of a 64K file), "
        "shared memory per SM (164 / 228 KB, 1 KB reserved per CTA) and threads (2048), with the limiter named.",
        "",
        f"Problems: {len(report['problems'])}" + ("" if not report["problems"] else
                                                  "\n\n" + "\n".join(f"* {p}" for p in report["problems"])),
        "",
        "## Search kernel",
        "",
        "| arch | math | d (D_PAD) | BLOCK_N x BLOCK_K x BLOCK_D | warps | stages | regs | spills (stack B / STL+LDL) "
        "| shared mem B (estimate) | CTAs/SM |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kernel"] != "_vq_search_kernel":
            continue
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['math']} | {r['d']} | {_fmt_tile(r)} | {r['num_warps']} | "
                         f"{r['num_stages']} | error: {r['error'][:80]} | | | |")
            continue
        lines.append(f"| {r['arch']} | {r['math']} | {r['d']} ({r['d_pad']}) | {_fmt_tile(r)} | {r['num_warps']} | "
                     f"{r['num_stages']} | {r['regs']} | {_fmt_spills(r)} | "
                     f"{r['smem_bytes']} ({r.get('smem_estimate')}) | {_fmt_ctas(r)} |")
    head = ("| arch | math | d | tile | warps | MMA | FFMA | FMNMX+FSETP+SEL | LDG | LDGSTS | LDS | STS | SHFL "
            "| STL+LDL | total | under wgmma |")
    lines += ["", "## Search loop: SASS instruction mix (main loop, one code tile per iteration)", "",
              "MMA = HGMMA (sm_90) or HMMA (sm_80) instructions; FMNMX+FSETP+SEL = the min/argmin fold; "
              "LDGSTS = cp.async copies of the pipelined code tiles (sm_80 and sm_90 alike here); under wgmma "
              "(sm_90) = float/select instructions issued between an HGMMA and the wait for it, i.e. work of "
              "this CTA overlapping its own tensor-core work (0: each dot is waited on at once).", "",
              head, "|" + "---|" * 16]
    for r in rows:
        if r["kernel"] == "_vq_search_kernel" and "error" not in r and r.get("sass_loop"):
            lines.append(f"| {r['arch']} | {r['math']} | {r['d']} | {_fmt_tile(r)} | {r['num_warps']} {_loop_mix(r)}")
    if before is not None:
        lines += ["", f"## Before: the issue-4 search kernel ({before['rev']}), bf16, same launch", "",
                  "| arch | d | tile | warps | stages | regs | spills (stack B / STL+LDL) | shared mem B | CTAs/SM |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in before["rows"]:
            if "error" in r:
                lines.append(f"| {r['arch']} | {r['d']} | {_fmt_tile(r)} | {r['num_warps']} | {r['num_stages']} | "
                             f"error | | | |")
                continue
            lines.append(f"| {r['arch']} | {r['d']} | {_fmt_tile(r)} | {r['num_warps']} | {r['num_stages']} | "
                         f"{r['regs']} | {_fmt_spills(r)} | {r['smem_bytes']} | {_fmt_ctas(r)} |")
        lines += ["", head, "|" + "---|" * 16]
        for r in before["rows"]:
            if "error" not in r and r.get("sass_loop"):
                lines.append(f"| {r['arch']} | {r['math']} | {r['d']} | {_fmt_tile(r)} | {r['num_warps']} "
                             f"{_loop_mix(r)}")
    lines += ["", "## Other kernels (tiles follow from the width)", "",
              "| arch | kernel | d (D_PAD) | rows per program | warps | regs | spills (stack B / STL+LDL, - = SASS not read) "
              "| shared mem B | CTAs/SM |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kernel"] == "_vq_search_kernel":
            continue
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['kernel']} | {r['d']} | | | error: {r['error'][:80]} | | | |")
            continue
        lines.append(f"| {r['arch']} | {r['kernel']} | {r['d']} ({r['d_pad']}) | {r['block_n']} | "
                     f"{r['num_warps']} | {r['regs']} | {_fmt_spills(r)} | {r['smem_bytes']} | "
                     f"{_fmt_ctas(r)} |")
    return "\n".join(lines) + "\n"


def aot_report(p, args) -> int:
    prefix = args.aot_report
    json_out, md_out = prefix.with_suffix(".json"), prefix.with_suffix(".md")
    for out in (json_out, md_out):
        problem = output_problem(out)
        if problem:
            p.error(f"--aot-report: {problem}")
    cmd = [sys.executable, "-m", "movq.kernels._aot", str(json_out), "--sass"]
    if args.aot_workers:
        cmd += ["--workers", str(args.aot_workers)]
    rc = subprocess.run(cmd, env=_aot_env(), cwd=ROOT).returncode
    if not json_out.exists():
        print(f"bench_kernels: the AOT compile wrote nothing (exit {rc})", file=sys.stderr)
        return 2
    report = json.loads(json_out.read_text())
    before = None
    if args.aot_before:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "before.json"
            _aot_before(args.aot_before, out, args.aot_workers)
            before = {"rev": args.aot_before, **json.loads(out.read_text())}
        report["before"] = before
        json_out.write_text(json.dumps(report, indent=1) + "\n")
    command = "python tools/bench_kernels.py --aot-report " + str(prefix) + (
        f" --aot-before {args.aot_before}" if args.aot_before else "")
    md_out.write_text(render_aot_markdown(report, before, command))
    print(f"wrote {json_out} and {md_out} ({len(report['rows'])} compiled kernels, "
          f"{len(report['problems'])} problems, {report['wall_s']} s)")
    return 1 if report["problems"] else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, help="JSON file to write (required unless --aot-report)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, CPU is fine (checks the harness only)")
    p.add_argument("--preset", choices=["target"], help="only issue 12's target cases (GPU, <= 5 minutes)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip the remaining torch.compile baselines after this many seconds (default 270 with "
                        "--preset target, none otherwise)")
    p.add_argument("--aot-report", type=Path, metavar="PREFIX",
                   help="compile every kernel config for sm_80/sm_90 (no GPU) and write PREFIX.json and PREFIX.md")
    p.add_argument("--aot-before", metavar="REV", help="with --aot-report: also the search kernel at git REV")
    p.add_argument("--aot-workers", type=int, default=None, help="parallel compile processes (default: all CPUs)")
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
    if args.aot_report is not None:
        return aot_report(p, args)
    if args.out is None:
        p.error("--out is required (or use --aot-report)")
    check_out(p, args)
    if args.budget_s is None and args.preset == "target" and not args.quick:
        args.budget_s = 270.0

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    if not cuda and not args.quick:
        p.error("the full sweep and --preset target need a CUDA device; use --quick on CPU")
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
    budget_left = (lambda: args.budget_s - (time.time() - t0)) if args.budget_s else None
    for case in build_cases(args):
        rec = run_case(case, methods, args, cuda, compiled, dev, budget_left)
        cases.append(rec)
        cols = "  ".join(f"{m}={r['median_ms']:.3f}ms" if "median_ms" in r else f"{m}=ERR"
                         for m, r in rec["results"].items())
        print(f"N={rec['N']:>7} K={rec['K']:>6} d={rec['d']:>3} {rec['dtype']:>4} {rec['mode']:<7} {cols}", flush=True)
    report = {
        "benchmark": "multichannel_vq (kernels/vq.py, issue 4)",
        "device": device_name(dev),
        "versions": versions("vector_quantize_pytorch"),
        "settings": {"quick": args.quick, "tf32": args.tf32, "rep_ms": args.rep_ms, "cpu_reps": args.cpu_reps,
                     "methods": methods, "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
                     "preset": args.preset, "budget_s": args.budget_s},
        "flops_definition": "2*N*K*d (the distance GEMM); the same count for every method and mode",
        "notes": notes,
        "wall_s": time.time() - t0,
        "cases": cases,
    }
    if args.preset == "target" and not args.quick:
        report["targets"] = check_targets(cases)
    write_report(report, args.out, f" ({len(cases)} cases, {report['wall_s']:.1f}s)")
    return 0


def check_targets(cases: list[dict]) -> dict:
    """Issue 12's targets against the measured cases: {name: {metric: {"target", "measured", "met"}}}."""
    out = {}
    for case in cases:
        name = f"{case['mode']} K={case['K']} d={case['d']}"
        if name not in TARGETS:
            continue
        tri = case["results"].get("triton", {})
        got = {"speedup_over_torch_ref": case["speedup_of_triton_over"].get("torch_ref"),
               "speedup_over_torch_compile": case["speedup_of_triton_over"].get("torch_compile"),
               "frac_of_peak": tri.get("frac_of_peak"), "median_ms": tri.get("median_ms")}
        out[name] = {}
        for metric, target in TARGETS[name].items():
            v = got[metric]
            met = None if v is None else (v <= target if metric == "median_ms" else v >= target)
            out[name][metric] = {"target": target, "measured": v, "met": met}
    return out


if __name__ == "__main__":
    sys.exit(main())
