"""Triton import guard and autotune configs for kernels/vq.py.

Config shapes follow the Triton matmul tutorial (03-matrix-multiplication): 64-256 row tiles,
64-256 code tiles, 16-128 wide feature chunks, 4-8 warps, 2-4 pipeline stages; the autotuner drops
those that run out of shared memory. Under ``TRITON_INTERPRET=1`` a single small config keeps the
interpreter fast and skips benchmarking.
"""
from __future__ import annotations

import os

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


# (BLOCK_N, BLOCK_K, BLOCK_D, num_warps, num_stages). Tensor-core shapes (bf16/fp16, tf32) keep the
# [BLOCK_N, BLOCK_K] fp32 accumulator plus the resident z tile within 255 registers: ptxas -v for sm_90 showed
# no spills for these at d = 16, 64 and 256 (BLOCK_D = 128 spilled at d = 256, so 64 is the widest chunk there).
# fp32 with exact ieee products runs on FMA units, where operands sit in registers: small tiles only.
TENSOR_CORE_SHAPES = [
    (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3),
    (128, 64, 64, 8, 3), (64, 64, 64, 4, 4), (256, 128, 32, 8, 3), (128, 128, 128, 8, 3),
]
FMA_SHAPES = [(64, 64, 16, 4, 2), (64, 64, 32, 4, 2), (128, 64, 16, 8, 2), (64, 128, 16, 8, 2), (32, 64, 16, 4, 2)]
INTERPRETER_SHAPE = (32, 32, 16, 4, 1)  # BLOCK_D = 16 so d = 24 exercises the multi-chunk path in tests


def _config(shape):
    bn, bk, bd, nw, ns = shape
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd}, num_warps=nw, num_stages=ns)


def search_configs() -> list:
    """Configs for the search kernel: BLOCK_N rows x BLOCK_K codes, BLOCK_D features per tl.dot."""
    if INTERPRET or not HAS_TRITON:
        return [_config(INTERPRETER_SHAPE)]
    return [_config(s) for s in TENSOR_CORE_SHAPES + FMA_SHAPES]


def prune_search_configs(configs, named_args, **kwargs) -> list:
    """Keep the shapes meant for this math (tensor cores or FMA), clamp BLOCK_D to the padded feature
    width (>= 16 for tl.dot) and drop the duplicates that clamping makes."""
    if len(configs) == 1:
        return configs
    d_pad = kwargs.get("D_PAD", named_args.get("D_PAD"))
    z = named_args.get("z_ptr")
    fma = getattr(z, "dtype", None) is not None and str(z.dtype) == "torch.float32" and \
        kwargs.get("DOT_PRECISION", named_args.get("DOT_PRECISION")) == "ieee"
    wanted = set(FMA_SHAPES if fma else TENSOR_CORE_SHAPES)
    seen, out = set(), []
    for cfg in configs:
        kw = dict(cfg.kwargs)
        if (kw["BLOCK_N"], kw["BLOCK_K"], kw["BLOCK_D"], cfg.num_warps, cfg.num_stages) not in wanted:
            continue
        kw["BLOCK_D"] = min(kw["BLOCK_D"], d_pad)
        key = (tuple(sorted(kw.items())), cfg.num_warps, cfg.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return out


def backward_blocks(d: int) -> tuple[int, int, int]:
    """(BLOCK_R rows, BLOCK_D >= d features, num_warps) for the memory-bound backward kernels.

    Whole rows per tile (the cosine chain rule needs each row's dot product); ~4K elements per
    program keeps registers low at d = 512.
    """
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(128, 4096 // block_d))
    return block_r, block_d, 4
