"""Triton import guard and the search kernel's autotune configs for kernels/vq.py.

The configs are tables by math (bf16/fp16 tensor cores, tf32 tensor cores, exact fp32 on FMA units) and by the
padded feature width D_PAD, checked ahead of time: tests/test_kernels_aot.py compiles every config
:func:`select_search_shapes` can return, for sm_80 and sm_90, and fails on register spills or on shared
memory over the target's limit (the table it writes is benchmarks/results/kernels_aot_*.md). At run time the
pruner also drops every config whose shared-memory estimate exceeds the device's limit, so a card with less
shared memory keeps only the configs that fit. Under ``TRITON_INTERPRET=1`` a single small config keeps the
interpreter fast and skips benchmarking.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the torch reference still works where Triton is absent (macOS, Windows)
    HAS_TRITON = False

    class _NoTriton:
        """Stand-in so the kernel file imports; the launchers are never reached without Triton."""

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def autotune(*_, **__):
            return lambda f: f

        @staticmethod
        def Config(*_, **__):
            return None

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n):
            return 1 << max(0, int(n) - 1).bit_length()

    triton = tl = _NoTriton()

# Kernels are built for the interpreter or for the GPU when they are decorated, i.e. at import time.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

MATHS = ("bf16", "tf32", "ieee")  # fp16 z shares the bf16 tables (same operand width)
WIDTHS = (16, 32, 64, 128, 256, 512)  # D_PAD values: max(16, next_pow2(d))
# The search keeps its row tile resident (one tile of D_PAD features, loaded once) up to these widths, and
# streams wider rows in chunks of this many features per tl.dot. Exact fp32 (FMA units) unrolls each dot over
# its width in registers: wide resident rows spill and take minutes to compile, so it goes in narrow chunks.
RESIDENT_MAX = {"bf16": 256, "tf32": 256, "ieee": 32}
CHUNK_D = {"bf16": 64, "tf32": 64, "ieee": 32}


class SearchShape(NamedTuple):
    block_n: int  # rows per program
    block_k: int  # codes per tile
    num_warps: int
    num_stages: int


S = SearchShape
# Chosen from ahead-of-time compiles for sm_80 and sm_90 (kernels/_aot.py; the committed table is
# benchmarks/results/kernels_aot_sm80_sm90.md): no spills, and mostly 4-warp tiles that leave room for >= 2 CTAs
# per SM, so that one CTA's min/argmin runs while another's tensor-core work does (the loop itself waits for
# each tile's dot: issuing the next dot before the current argmin in the source made Triton 3.9 drop its
# cp.async pipelining and spill, see kernels/README.md). One wider tile per width for large N.
SEARCH_TABLE: dict[str, dict[int, list[SearchShape]]] = {
    "bf16": {
        16: [S(64, 64, 4, 3), S(128, 64, 4, 3), S(64, 128, 4, 3)],
        32: [S(64, 64, 4, 3), S(128, 64, 4, 3), S(64, 128, 4, 3)],
        64: [S(64, 64, 4, 3), S(64, 128, 4, 3), S(128, 64, 8, 3)],
        128: [S(64, 64, 4, 3), S(128, 64, 8, 3)],
        256: [S(64, 64, 4, 2), S(64, 64, 4, 3), S(128, 64, 8, 2)],
        512: [S(64, 64, 4, 3)],
    },
    "tf32": {
        16: [S(64, 64, 4, 3)],
        32: [S(64, 64, 4, 3)],
        64: [S(64, 64, 4, 3), S(128, 64, 8, 3)],
        128: [S(64, 64, 4, 3)],
        256: [S(64, 32, 4, 3), S(64, 64, 4, 2)],
        512: [S(64, 32, 4, 2)],
    },
    "ieee": {  # exact fp32 on the FMA units: small tiles (each dot is unrolled into FFMAs in registers)
        16: [S(64, 32, 4, 2), S(32, 64, 4, 2)],
        32: [S(32, 64, 4, 2)],
        64: [S(32, 64, 4, 2)],
        128: [S(32, 64, 4, 2)],
        256: [S(32, 64, 4, 2)],
        512: [S(32, 64, 4, 2)],
    },
}
del S
INTERPRETER_SHAPE = SearchShape(32, 32, 4, 1)

# Usable dynamic shared memory per block by compute capability (the CUDA occupancy tables: opt-in maximum).
SMEM_PER_BLOCK = {(8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376, (9, 0): 232448}


def smem_limit(capability: tuple[int, int]) -> int:
    return SMEM_PER_BLOCK.get(tuple(capability), 101376 if capability[0] == 8 else 232448)


def _elem_bytes(math: str) -> int:
    return 2 if math == "bf16" else 4


def block_d_for(math: str, d_pad: int) -> int:
    """BLOCK_D, features per tl.dot: the whole padded row (resident) or a chunk. Not tuned: the launcher
    passes it, so the interpreter's single config covers both paths too."""
    return d_pad if d_pad <= RESIDENT_MAX[math] else CHUNK_D[math]


def smem_estimate(shape: SearchShape, math: str, d_pad: int) -> int:
    """Upper estimate (bytes) of the search kernel's shared memory: num_stages pipelined buffers of the code
    tile [BLOCK_D, BLOCK_K], its 0.5||e||^2 and, when the row is streamed in chunks, the z chunk; the resident
    row tile [BLOCK_N, D_PAD] (wgmma reads it from shared memory on sm_90; on sm_80 it lives in registers, so
    the estimate is conservative there); 1 KB for reductions. tests/test_kernels_aot.py checks it against the
    compiler's figure for every config it keeps, so the pruner never keeps a config the device cannot launch."""
    es = _elem_bytes(math)
    bd = block_d_for(math, d_pad)
    resident = bd >= d_pad
    per_stage = bd * shape.block_k * es + shape.block_k * 4 + (0 if resident else shape.block_n * bd * es)
    return shape.num_stages * per_stage + (shape.block_n * bd * es if resident else 0) + 1024


def math_of(z_dtype: str, precision: str) -> str:
    if z_dtype in ("torch.bfloat16", "torch.float16"):
        return "bf16"
    return "tf32" if precision == "tf32" else "ieee"


def _config(shape: SearchShape):
    return triton.Config({"BLOCK_N": shape.block_n, "BLOCK_K": shape.block_k}, num_warps=shape.num_warps,
                         num_stages=shape.num_stages)


def select_search_shapes(math: str, d_pad: int, capability: Optional[tuple[int, int]] = None) -> list[SearchShape]:
    """The shapes the pruner can pick for this math and padded width on a device of this capability (None:
    no shared-memory filter). Never empty: the smallest shape stays if nothing fits the estimate."""
    if math not in SEARCH_TABLE:
        raise ValueError(f"unknown search math {math!r}; expected one of {MATHS}")
    if d_pad not in SEARCH_TABLE[math]:
        raise ValueError(f"D_PAD must be one of {WIDTHS}, got {d_pad}")
    shapes = SEARCH_TABLE[math][d_pad]
    if capability is None:
        return list(shapes)
    limit = smem_limit(capability)
    kept = [s for s in shapes if smem_estimate(s, math, d_pad) <= limit]
    return kept or [min(shapes, key=lambda s: smem_estimate(s, math, d_pad))]


def search_configs() -> list:
    """Every config of the tables (the autotuner's list; the pruner narrows it per call)."""
    if INTERPRET or not HAS_TRITON:
        return [_config(INTERPRETER_SHAPE)]
    shapes = dict.fromkeys(s for by_width in SEARCH_TABLE.values() for lst in by_width.values() for s in lst)
    return [_config(s) for s in shapes]


def _device_capability(tensor) -> Optional[tuple[int, int]]:
    dev = getattr(tensor, "device", None)
    if dev is None or getattr(dev, "type", None) != "cuda":
        return None
    import torch

    return tuple(torch.cuda.get_device_capability(dev))


AUTOTUNE_ENV = "MOVQ_VQ_AUTOTUNE"  # "0": the first fitting config of the table, no benchmarking (quick test runs)


def prune_search_configs(configs, named_args, **kwargs) -> list:
    """The configs of this call's math and padded width that fit the device's shared memory."""
    if len(configs) == 1:
        return configs
    d_pad = kwargs.get("D_PAD", named_args.get("D_PAD"))
    z = named_args.get("z_ptr")
    math = math_of(str(getattr(z, "dtype", "")), kwargs.get("DOT_PRECISION", named_args.get("DOT_PRECISION")))
    shapes = select_search_shapes(math, d_pad, _device_capability(z))
    if os.environ.get(AUTOTUNE_ENV, "").strip() == "0":
        shapes = shapes[:1]
    return [_config(s) for s in shapes]


def prep_rows(d_pad: int) -> int:
    """Codes per program of the prep kernel: ~4K elements, and a divisor of vq.K_ALIGN (256)."""
    return max(1, min(256, 4096 // d_pad))


def backward_blocks(d_pad: int) -> tuple[int, int]:
    """(BLOCK_R rows, num_warps) for the memory-bound backward kernels: whole rows per tile (the cosine chain
    rule needs each row's dot product), ~2K elements per program over 8 warps: 48-98 registers, 16-40 warps per
    SM on sm_80/sm_90 (4K elements over 4 warps took 195-250 registers with cosine codes: 8 warps per SM, few
    loads in flight for a memory-bound kernel)."""
    return max(1, min(64, 2048 // d_pad)), 8


def assign_rows(d_pad: int) -> int:
    """Rows per program of the split-K assign kernel (4 warps; 128 rows spilled at d >= 256)."""
    return 128 if d_pad <= 128 else 64
