"""Ahead-of-time compile of kernels/vq.py for sm_80 and sm_90 on a machine without a GPU, and what the
compiled code says: registers, spills, shared memory, an occupancy estimate and the search loop's instruction mix.

Every kernel is built with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` in every
config the pruner (kernels/_autotune.py) can pick, with the argument specialisation a real launch would get
(16-byte aligned pointers, integers divisible by 16, unit strides as constants), and read back with the
``cuobjdump`` that ships in the triton wheel. tests/test_kernels_aot.py runs this in a subprocess (the kernels
must be imported without ``TRITON_INTERPRET``) and fails on spills or on shared memory over the target's limit;
``tools/bench_kernels.py --aot-report`` writes the table (benchmarks/results/kernels_aot_*.json|md).

Library-side rules hold: nothing here prints or parses a command line; :func:`main` is the subprocess entry
(``python -m movq.kernels._aot OUT.json``) used by the test and the tool.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple, Optional

ARCHS = (80, 90)
# CUDA occupancy tables: registers per SM, max threads and CTAs per SM, shared memory per SM and the usable
# maximum per block (opt-in), and the 1 KB the runtime reserves per CTA.
REGS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048
MAX_CTAS_PER_SM = 32
SMEM_PER_SM = {80: 167936, 90: 233472}
SMEM_PER_BLOCK = {80: 166912, 90: 232448}
SMEM_RESERVED_PER_CTA = 1024

# A representative launch: B=64 images of 16x16 cells, C=4 channels, contiguous NCHW.
_B, _C, _H, _W = 64, 4, 16, 16
_N = _B * _C * _H * _W
_K = 16384
_DTYPES = {"bf16": "bf16", "fp16": "fp16", "tf32": "fp32", "ieee": "fp32"}


class Spec(NamedTuple):
    kernel: str  # attribute name in movq.kernels.vq
    arch: int
    label: dict  # what the table shows: math, d, config, flags
    args: dict  # name -> value (int / float) or pointer type ("*bf16"); constexprs separately
    constexprs: dict
    num_warps: int
    num_stages: int


# ----------------------------------------------------------------------------------------------
# what to compile
# ----------------------------------------------------------------------------------------------


def _z_strides(d: int) -> tuple[int, int, int, int]:
    return (_C * d * _H * _W, _H * _W, _W, 1)


def search_specs(arch: int, maths=None, widths=None) -> list[Spec]:
    """The search kernel in every shape select_search_shapes() keeps for this target, per math and width.

    Flags are the heaviest specialisation of each config: cosine codes (the per-row norms live through the
    loop) with the fused epilogue (z_q, indices, counts and the loss atomics after the loop)."""
    from movq.kernels import _autotune as at

    specs = []
    for math in maths or at.MATHS:
        for d_pad in widths or at.WIDTHS:
            d = d_pad if d_pad > 16 else 8  # d = 8 pads to 16: the masked-column case
            for shape in at.select_search_shapes(math, d_pad, (arch // 10, arch % 10)):
                dt = _DTYPES[math]
                args = dict(z_ptr=f"*{dt}", cbd_ptr=f"*{dt}", hn_ptr="*fp32", cbf_ptr="*fp32", zq_ptr=f"*{dt}",
                            idx_ptr="*i64", counts_ptr="*i64", sqerr_ptr="*fp32", lcb_ptr="*fp32", lcm_ptr="*fp32",
                            pval_ptr="*fp32", pidx_ptr="*i32", N=_N, K=_K, C=_C, H=_H, W=_W, N_LOG2=("i32", _N.bit_length()),
                            SPLIT=1, loss_scale=0.5)
                for pre, st in (("s_z", _z_strides(d)), ("s_q", _z_strides(d))):
                    args.update({f"{pre}{a}": v for a, v in zip("bcyx", st)})
                consts = dict(D=d, D_PAD=d_pad, COSINE=True, FUSED=True, ROW_ERR=False, Z_CONTIG=True, Q_CONTIG=True,
                              DOT_PRECISION="tf32" if math == "tf32" else "ieee", UPCAST=False, BF16_BITS=False,
                              EPI_D=min(d_pad, 64),
                              BLOCK_N=shape.block_n, BLOCK_K=shape.block_k, BLOCK_D=at.block_d_for(math, d_pad))
                label = dict(math=math, d=d, d_pad=d_pad, block_n=shape.block_n, block_k=shape.block_k,
                             block_d=at.block_d_for(math, d_pad), num_warps=shape.num_warps, num_stages=shape.num_stages,
                             smem_estimate=at.smem_estimate(shape, math, d_pad))
                specs.append(Spec("_vq_search_kernel", arch, label, args, consts, shape.num_warps, shape.num_stages))
    return specs


def other_specs(arch: int, widths=None) -> list[Spec]:
    """The prep, split-K assign, backward and deterministic codebook-gradient kernels at every width (their
    tiles follow from the width alone: prep_rows / backward_blocks), bf16 z, heaviest flags."""
    from movq.kernels import _autotune as at

    specs = []
    for d_pad in widths or at.WIDTHS:
        d = d_pad if d_pad > 16 else 8
        zs = _z_strides(d)
        base = dict(D=d, D_PAD=d_pad)
        rows = at.prep_rows(d_pad)
        specs.append(Spec("_vq_prep_kernel", arch, dict(math="bf16", d=d, d_pad=d_pad, block_n=rows),
                          dict(cb_ptr="*fp32", cbf_ptr="*fp32", cbd_ptr="*bf16", hn_ptr="*fp32", counts_ptr="*i64",
                               lcb_ptr="*fp32", lcm_ptr="*fp32", gcb_ptr="*fp32", K=_K, s_k=d, s_d=1),
                          dict(base, SEPARATE_CBD=True, ZERO_GCB=True, BF16_BITS=False, BLOCK_R=rows), 4, 1))
        a = dict(z_ptr="*bf16", cbf_ptr="*fp32", zq_ptr="*bf16", idx_ptr="*i64", counts_ptr="*i64", sqerr_ptr="*fp32",
                 lcb_ptr="*fp32", lcm_ptr="*fp32", pval_ptr="*fp32", pidx_ptr="*i32", N=_N, C=_C, H=_H, W=_W, SPLIT=4,
                 loss_scale=0.5)
        a.update({f"s_z{x}": v for x, v in zip("bcyx", zs)})
        a.update({f"s_q{x}": v for x, v in zip("bcyx", zs)})
        an = at.assign_rows(d_pad)
        specs.append(Spec("_vq_assign_kernel", arch, dict(math="bf16", d=d, d_pad=d_pad, block_n=an), a,
                          dict(base, COSINE=True, ROW_ERR=False, Z_CONTIG=True, Q_CONTIG=True, BF16_BITS=False,
                               BLOCK_N=an, BLOCK_D=min(d_pad, 64)), 4, 1))
        block_r, warps = at.backward_blocks(d_pad)
        b = dict(z_ptr="*bf16", gzq_ptr="*bf16", gz_ptr="*bf16", cbf_ptr="*fp32", idx_ptr="*i64", gcb_ptr="*fp32",
                 g_cb_ptr="*fp32", g_cm_ptr="*fp32", N=_N, C=_C, H=_H, W=_W, coef=0.5)
        for pre in ("s_z", "s_g", "s_o"):
            b.update({f"{pre}{x}": v for x, v in zip("bcyx", zs)})
        specs.append(Spec("_vq_backward_kernel", arch, dict(math="bf16", d=d, d_pad=d_pad, block_n=block_r), b,
                          dict(base, COSINE=True, HAS_GZQ=True, HAS_GCM=True, NEED_GZ=True, ATOMIC_CB=True,
                               Z_CONTIG=True, G_CONTIG=True, O_CONTIG=True, BF16_BITS=False, BLOCK_R=block_r), warps, 1))
        c = dict(z_ptr="*bf16", cbf_ptr="*fp32", order_ptr="*i64", offsets_ptr="*i64", gcb_ptr="*fp32",
                 g_cb_ptr="*fp32", C=_C, H=_H, W=_W, coef=0.5)
        c.update({f"s_z{x}": v for x, v in zip("bcyx", zs)})
        specs.append(Spec("_vq_codebook_grad_kernel", arch, dict(math="bf16", d=d, d_pad=d_pad, block_n=block_r), c,
                          dict(base, COSINE=True, Z_CONTIG=True, BLOCK_R=block_r), warps, 1))
    return specs


def all_specs(archs=ARCHS) -> list[Spec]:
    return [s for arch in archs for s in search_specs(arch) + other_specs(arch)]


# ----------------------------------------------------------------------------------------------
# compile and read back
# ----------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing (a triton wheel without its NVIDIA tools?)")
    return str(path)


def _signature(fn, spec: Spec) -> tuple[dict, dict, dict]:
    """What the launcher's specialisation gives this call: pointer / int / float types, divisibility by 16 and
    integers equal to 1 as constants."""
    sig, consts, attrs = {}, dict(spec.constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in spec.constexprs:
            sig[name] = "constexpr"
            continue
        value = spec.args[name]
        if isinstance(value, tuple):  # (type, value): not specialised (do_not_specialize)
            sig[name] = value[0]
        elif isinstance(value, str):
            sig[name] = value
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        elif value == 1:
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_BRA_TARGET = re.compile(r"`?\(?\.?L?_?x?_?(0x[0-9a-f]+)\)?")
# instruction classes of the mix table (base mnemonic before the first '.')
MIX_CLASSES = {
    "mma": ("HGMMA", "HMMA"), "ffma": ("FFMA",), "fmnmx": ("FMNMX",), "fset": ("FSETP", "FSET", "ISETP"),
    "sel": ("SEL", "FSEL"), "ldg": ("LDG",), "cp_async": ("LDGSTS", "LDGDEPBAR", "UTMALDG", "UBLKCP"),
    "lds": ("LDS", "LDSM"), "sts": ("STS",), "shfl": ("SHFL",), "bar": ("BAR", "SYNCS", "WARPSYNC"),
    "wgmma_sync": ("WARPGROUP",), "spill": ("STL", "LDL"),
}


def parse_sass(sass: str) -> dict:
    """Instruction counts of the whole kernel and of its main loop (the backward branch whose body holds the
    most MMA/FFMA instructions), plus whether min/argmin work sits between an HGMMA and the wait for it."""
    insns = []
    for m in _INSN.finditer(sass):
        insns.append((int(m.group(1), 16), m.group(3), m.group(4)))
    loops = []
    for addr, op, rest in insns:
        if op.split(".")[0] == "BRA":
            t = re.search(r"0x([0-9a-f]+)", rest)
            if t and int(t.group(1), 16) < addr:
                loops.append((int(t.group(1), 16), addr))

    def mix(lo, hi):
        counts = {k: 0 for k in MIX_CLASSES}
        total = 0
        for addr, op, _ in insns:
            if lo <= addr <= hi:
                total += 1
                base = op.split(".")[0]
                for k, names in MIX_CLASSES.items():
                    if base in names:
                        counts[k] += 1
        counts["total"] = total
        return counts

    best = None
    for lo, hi in loops:
        m = mix(lo, hi)
        score = m["mma"] + m["ffma"]
        if best is None or score > best[0] or (score == best[0] and hi - lo > best[1][1] - best[1][0]):
            best = (score, (lo, hi), m)
    out = {"kernel": mix(0, 1 << 62), "loop": best[2] if best else None}
    if best:  # reduction instructions issued while a wgmma group is in flight (before its wait)
        lo, hi = best[1]
        in_flight, overlapped = False, 0
        for addr, op, _ in insns:
            if not lo <= addr <= hi:
                continue
            base = op.split(".")[0]
            if base == "HGMMA":
                in_flight = True
            elif op.startswith("WARPGROUP.DEPBAR") or (base == "WARPGROUP" and "DEPBAR" in op):
                in_flight = False
            elif in_flight and base in ("FMNMX", "FSETP", "FSEL", "SEL", "FADD", "FFMA"):
                overlapped += 1
        out["loop"]["argmin_under_wgmma"] = overlapped
    return out


def occupancy(arch: int, regs: int, smem_block: int, num_warps: int) -> dict:
    """CTAs per SM allowed by registers (allocated per warp in units of 256), shared memory and threads."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (REGS_PER_SM // regs_per_warp) // num_warps
    by_smem = SMEM_PER_SM[arch] // (smem_block + SMEM_RESERVED_PER_CTA) if smem_block else MAX_CTAS_PER_SM
    by_threads = MAX_THREADS_PER_SM // (32 * num_warps)
    ctas = max(0, min(by_regs, by_smem, by_threads, MAX_CTAS_PER_SM))
    return {"ctas_per_sm": ctas, "by_regs": by_regs, "by_smem": by_smem, "by_threads": by_threads,
            "warps_per_sm": ctas * num_warps}


def compile_spec(spec: Spec, sass: bool = False) -> dict:
    """Compile one spec; its resources (and the SASS mix when ``sass``), or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    import movq.kernels.vq as vq

    fn = getattr(vq, spec.kernel)
    while not isinstance(fn, JITFunction):  # through the autotuner
        fn = fn.fn
    sig, consts, attrs = _signature(fn, spec)
    row = {"kernel": spec.kernel, "arch": f"sm_{spec.arch}", "num_warps": spec.num_warps,
           "num_stages": spec.num_stages, **spec.label}
    t0 = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", spec.arch, 32),
                           options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    except Exception as err:  # noqa: BLE001 - reported per config; the test fails on it
        row["error"] = f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(k.asm["cubin"])
        res = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                             text=True, check=True).stdout
        m = _RES.search(res)
        if not m:
            row["error"] = f"cuobjdump: no resource line in {res!r}"
            return row
        regs, stack, static_smem, local = map(int, m.groups())
        # spills need a stack frame (ptxas puts them there); the SASS, read only when asked, counts the STL/LDL
        mix = None
        if sass:
            mix = parse_sass(subprocess.run([_tool("cuobjdump"), "--dump-sass", str(cubin)], capture_output=True,
                                            text=True, check=True).stdout)
    dynamic = int(k.metadata.shared)
    smem = dynamic + static_smem
    row.update(regs=regs, stack_bytes=stack, local_bytes=local, spill_insns=mix["kernel"]["spill"] if mix else None,
               smem_bytes=smem, smem_limit=SMEM_PER_BLOCK[spec.arch],
               **occupancy(spec.arch, regs, smem, spec.num_warps))
    row["spills"] = bool(stack or local or (mix and mix["kernel"]["spill"]))
    row["over_smem"] = smem > SMEM_PER_BLOCK[spec.arch]
    if mix:
        row["sass_kernel"] = mix["kernel"]
        row["sass_loop"] = mix["loop"]
    return row


def _compile_star(args):
    try:
        return compile_spec(*args)
    except Exception as err:  # noqa: BLE001 - a row with the error, not a dead pool
        spec = args[0]
        return {"kernel": spec.kernel, "arch": f"sm_{spec.arch}", "num_warps": spec.num_warps,
                "num_stages": spec.num_stages, **spec.label,
                "error": f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"}


def compile_all(specs: list[Spec], workers: Optional[int] = None, sass_for=lambda s: False) -> list[dict]:
    """Compile in parallel worker processes (forked: nothing here touches a GPU)."""
    workers = workers or max(1, min(len(specs), os.cpu_count() or 1))
    jobs = [(s, bool(sass_for(s))) for s in specs]
    if workers == 1:
        return [_compile_star(j) for j in jobs]
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as pool:
        return list(pool.map(_compile_star, jobs))


def problems(rows: list[dict]) -> list[str]:
    """One line per config that failed to compile, spills, or needs more shared memory than the target has."""
    out = []
    for r in rows:
        what = {k: r[k] for k in ("arch", "kernel", "math", "d", "block_n", "block_k", "num_warps", "num_stages")
                if k in r}
        if "error" in r:
            out.append(f"{what}: {r['error']}")
            continue
        if r["spills"]:
            out.append(f"{what}: spills (stack {r['stack_bytes']} B, local {r['local_bytes']} B, "
                       f"{r['spill_insns'] if r['spill_insns'] is not None else '?'} STL/LDL)")
        if r["over_smem"]:
            out.append(f"{what}: {r['smem_bytes']} B of shared memory > {r['smem_limit']} B")
        est = r.get("smem_estimate")
        if est is not None and r["smem_bytes"] > est:
            out.append(f"{what}: the pruner's estimate {est} B is below the compiled {r['smem_bytes']} B")
    return out


def main(argv=None) -> int:
    """``python -m movq.kernels._aot OUT.json [--archs 80 90] [--workers N] [--sass]``: compile everything,
    write the rows; exit 1 when :func:`problems` finds any (the rows are written either way)."""
    import argparse

    p = argparse.ArgumentParser(description="AOT-compile kernels/vq.py for sm_80 / sm_90 and report resources")
    p.add_argument("out", type=Path)
    p.add_argument("--archs", type=int, nargs="+", default=list(ARCHS))
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--sass", action="store_true", help="add the search loop's SASS instruction mix")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: the kernels must be built for the GPU")
    t0 = time.perf_counter()
    specs = all_specs(tuple(args.archs))
    rows = compile_all(specs, args.workers, sass_for=lambda s: args.sass and s.kernel == "_vq_search_kernel")
    import triton

    report = {"triton": triton.__version__, "archs": [f"sm_{a}" for a in args.archs],
              "smem_limit_per_block": {f"sm_{a}": SMEM_PER_BLOCK[a] for a in args.archs},
              "wall_s": round(time.perf_counter() - t0, 1), "rows": rows, "problems": problems(rows)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
