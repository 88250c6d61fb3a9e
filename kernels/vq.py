"""Multichannel vector quantization: nearest-code search + straight-through assignment.

Reference: MoVQ (Zheng et al., "MoVQ: Modulating Quantized Vectors for High-Fidelity Image
Generation", NeurIPS 2022) splits the encoder output ``[B, C*d, h, w]`` into C channels of width d
that share one codebook ``[K, d]``; the straight-through estimator and the codebook/commitment
losses follow VQ-VAE (van den Oord et al., 2017). Kernel structure follows the Triton tutorials
(03-matrix-multiplication, 06-fused-attention): a GEMM over codebook tiles with a running
min/argmin per row, so the N x K distance matrix never exists in memory.

File order: autotune configs (kernels/_autotune.py) -> ``@triton.jit`` kernels -> launchers -> torch ``*_ref`` -> public op.

Shapes (N = B*C*h*w vectors, row n <-> (b, c, y, x) in that order):
    z         [B, C*d, h, w]  fp32 / bf16 / fp16, any strides; channel c of a cell is z[b, c*d:(c+1)*d, y, x]
    codebook  [K, d]          fp32 (upcast if not)
    z_q       [B, C*d, h, w]  dtype and memory layout of z
    indices   [B, C, h, w]    int64
    counts    [K]             int64

Launches (Triton path, Euclidean codes, unsplit search, default non-deterministic mode): forward = the prep
kernel + the search kernel (its epilogue writes z_q, indices, counts and both losses), backward = one kernel.
Which path runs on CUDA, and the fallback to torch, is kernels/_backend.py's policy.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from movq.kernels import _backend
from movq.kernels._autotune import (
    INTERPRET,
    assign_rows,
    backward_blocks,
    block_d_for,
    prep_rows,
    prune_search_configs,
    search_configs,
    tl,
    triton,
)
from movq.kernels._backend import BACKEND_ENV, BACKENDS  # noqa: F401 (re-exported)

NORM_EPS = 1e-6  # F.normalize eps for cosine codes (matches the brief; keeps zero vectors finite)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class VQResult(NamedTuple):
    """Outputs of :func:`multichannel_vq`.

    z_q: [B, C*d, h, w], dtype and layout of z; straight-through: value e, gradient identity to z.
    indices: int64 [B, C, h, w].
    counts: int64 [K], vectors assigned to each code (no grad).
    codebook_loss: fp32 scalar, mean over B*C*d*h*w elements of (sg(z) - e)^2; grad to the codebook only.
    commitment_loss: fp32 scalar, mean of (z - sg(e))^2; grad to z only. Unweighted (caller applies beta).
    """

    z_q: Tensor
    indices: Tensor
    counts: Tensor
    codebook_loss: Tensor
    commitment_loss: Tensor


# ----------------------------------------------------------------------------------------------
# input checks shared by both backends
# ----------------------------------------------------------------------------------------------


def _check_inputs(z: Tensor, codebook: Tensor, channels: int, chunk_size: int) -> tuple[int, int, int, int, int, int]:
    """Validate and return (B, C, d, h, w, K)."""
    if not isinstance(z, Tensor) or not isinstance(codebook, Tensor):
        raise TypeError(f"multichannel_vq: z and codebook must be tensors, got {type(z).__name__} and "
                        f"{type(codebook).__name__}")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"multichannel_vq: channels must be a positive int, got {channels!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"multichannel_vq: chunk_size must be a positive int, got {chunk_size!r}")
    if z.dim() != 4:
        raise ValueError(f"multichannel_vq: z must be 4-D [B, C*d, h, w], got shape {tuple(z.shape)}")
    if codebook.dim() != 2:
        raise ValueError(f"multichannel_vq: codebook must be 2-D [K, d], got shape {tuple(codebook.shape)}")
    if not z.is_floating_point() or not codebook.is_floating_point():
        raise ValueError(f"multichannel_vq: z and codebook must be floating point, got {z.dtype} and {codebook.dtype}")
    K, d = codebook.shape
    if K < 1 or d < 1:
        raise ValueError(f"multichannel_vq: codebook must be non-empty [K, d], got shape {tuple(codebook.shape)}")
    B, Cd, h, w = z.shape
    if Cd != channels * d:
        raise ValueError(f"multichannel_vq: z has {Cd} feature channels but channels * d = {channels} * {d} = "
                         f"{channels * d} (codebook shape {tuple(codebook.shape)})")
    if B * h * w == 0:
        raise ValueError(f"multichannel_vq: z is empty (shape {tuple(z.shape)}); the losses would be undefined")
    if z.device != codebook.device:
        raise ValueError(f"multichannel_vq: z is on {z.device} but codebook is on {codebook.device}")
    return B, channels, d, h, w, K


def _restore_layout(out: Tensor, like: Tensor) -> Tensor:
    """Give ``out`` (contiguous NCHW) the memory format of ``like`` (channels_last stays channels_last)."""
    if not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous(memory_format=torch.channels_last)
    return out


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

# The padded codebook has a multiple of K_ALIGN rows (>= every BLOCK_K; padding codes have 0.5||e||^2 = +inf and
# never win) and D_PAD = max(16, next_pow2(d)) columns of zeros beyond d, so the search loop loads its code tiles
# without masks and with compile-time strides.
K_ALIGN = 256


@triton.jit
def _row_offsets(offs_n, C, H, W, D: tl.constexpr, s_b, s_c, s_y, s_x, CONTIG: tl.constexpr):
    """Element offset (int64) of feature 0 of row n = ((b*C + c)*H + y)*W + x in a [B, C*D, H, W] tensor.

    CONTIG (a contiguous NCHW tensor): offset = plane * D*H*W + pixel, a form Triton's axis analysis sees as
    contiguous along n, so tiles load coalesced along the rows. Index math in int32 (N < 2**31 is checked).
    """
    n = offs_n.to(tl.int32)
    if CONTIG:
        hw = H * W
        off = (n // hw).to(tl.int64) * D * hw + (n % hw)
    else:
        x = n % W
        t = n // W
        y = t % H
        t = t // H
        c = t % C
        b = t // C
        off = b.to(tl.int64) * s_b + c.to(tl.int64) * D * s_c + y.to(tl.int64) * s_y + x.to(tl.int64) * s_x
    return off


@triton.jit
def _inv_norm_rows(x):
    """1 / max(||x_n||, 1e-6) per row of an fp32 tile (F.normalize's eps, NORM_EPS), IEEE-rounded."""
    return tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(tl.sum(x * x, axis=1)), 1e-6))


@triton.jit
def _inv_norm(z_ptr, zoff, mask_n, s_c, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """:func:`_inv_norm_rows` of z's rows read in BLOCK_D-wide chunks, fp32 [BLOCK_N]."""
    ss = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):  # loops, not unrolled here and below: unrolled chunks cost registers
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m = mask_n[:, None] & (offs_d < D)[None, :]
        x = tl.load(z_ptr + zoff[:, None] + offs_d[None, :].to(tl.int64) * s_c, mask=m, other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    return tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(ss), 1e-6))


@triton.jit
def _cast_out(x, dtype: tl.constexpr, BF16_BITS: tl.constexpr):
    """x.to(dtype), rounding to nearest even. BF16_BITS (interpreter + bf16 only): the interpreter's fp32 -> bf16
    cast truncates, so round by hand on the bits (finite values; NaN payloads are not preserved)."""
    if BF16_BITS:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        y = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def _vq_prep_kernel(
    cb_ptr, cbf_ptr, cbd_ptr, hn_ptr, counts_ptr, lcb_ptr, lcm_ptr, gcb_ptr,
    K, s_k, s_d,
    D: tl.constexpr, D_PAD: tl.constexpr, SEPARATE_CBD: tl.constexpr, ZERO_GCB: tl.constexpr,
    BF16_BITS: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Everything the search needs from the codebook, and every zero-fill, in one launch.

    Program i, codes [i*BLOCK_R, (i+1)*BLOCK_R) of the padded codebook: the fp32 copy cbf [K_pad, D_PAD] (a new
    tensor: backward must read the codes of this forward even when the caller rewrites the codebook in place),
    the dot-dtype copy cbd (bf16/fp16 z), 0.5||e||^2 (+inf on padding codes), counts = 0, the codebook
    gradient buffer = 0 (when the backward will accumulate into it by atomics) and, in program 0, both losses = 0.
    """
    pid = tl.program_id(0)
    offs_k = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, D_PAD)
    valid = offs_k < K
    m = valid[:, None] & (offs_d < D)[None, :]
    e = tl.load(cb_ptr + offs_k[:, None].to(tl.int64) * s_k + offs_d[None, :] * s_d, mask=m, other=0.0)
    e = e.to(tl.float32)
    tile = offs_k[:, None] * D_PAD + offs_d[None, :]
    tl.store(cbf_ptr + tile, e)
    if SEPARATE_CBD:
        tl.store(cbd_ptr + tile, _cast_out(e, cbd_ptr.dtype.element_ty, BF16_BITS))
    tl.store(hn_ptr + offs_k, tl.where(valid, 0.5 * tl.sum(e * e, axis=1), float("inf")))
    tl.store(counts_ptr + offs_k, tl.zeros([BLOCK_R], dtype=tl.int64), mask=valid)
    if ZERO_GCB:
        tl.store(gcb_ptr + offs_k[:, None] * D + offs_d[None, :], tl.zeros([BLOCK_R, D_PAD], dtype=tl.float32), mask=m)
    if pid == 0:
        tl.store(lcb_ptr, 0.0)
        tl.store(lcm_ptr, 0.0)


@triton.jit
def _code_scores(zt, z_ptr, zoff, mask_n, s_zc, cbd_ptr, k0,
                 D: tl.constexpr, D_PAD: tl.constexpr, RESIDENT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """z_n . e_k for the program's rows and codes [k0, k0 + BLOCK_K): fp32 [BLOCK_N, BLOCK_K].

    RESIDENT: one tl.dot of the resident row tile zt [BLOCK_N, D_PAD]; else BLOCK_D-wide chunks of z re-read
    per code tile (d > 256 only)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if RESIDENT:
        offs_d = tl.arange(0, D_PAD)
        et = tl.load(cbd_ptr + offs_k[None, :] * D_PAD + offs_d[:, None])  # [D_PAD, BLOCK_K]; padded: no mask
        if UPCAST:
            et = et.to(tl.float32)
        acc = tl.dot(zt, et, input_precision=DOT_PRECISION)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D_PAD, BLOCK_D):  # a loop, not unrolled: Triton pipelines it with num_stages buffers
            offs_d = d0 + tl.arange(0, BLOCK_D)
            zc = tl.load(z_ptr + zoff[:, None] + offs_d[None, :].to(tl.int64) * s_zc,
                         mask=mask_n[:, None] & (offs_d < D)[None, :], other=0.0)
            et = tl.load(cbd_ptr + offs_k[None, :] * D_PAD + offs_d[:, None])
            if UPCAST:
                zc = zc.to(tl.float32)
                et = et.to(tl.float32)
            acc = tl.dot(zc, et, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _fold_tile(acc, hn, inv, k0, best_v, best_i, COSINE: tl.constexpr):
    """Running (min, argmin) of 0.5||e||^2 - z.e over one more code tile. Ties go to the smallest code, like
    torch.argmin: leftmost within the tile, strict '<' across tiles (visited in increasing k)."""
    if COSINE:
        dist = hn[None, :] - acc * inv[:, None]
    else:
        dist = hn[None, :] - acc
    tile_min, tile_arg = tl.min(dist, axis=1, return_indices=True, return_indices_tie_break_left=True)
    upd = tile_min < best_v
    return tl.where(upd, tile_min, best_v), tl.where(upd, k0 + tile_arg, best_i)


@triton.jit
def _assign_rows(z_ptr, cbf_ptr, zq_ptr, idx_ptr, counts_ptr, sqerr_ptr, lcb_ptr, lcm_ptr, offs_n, mask_n, zoff, qoff,
                 best_i, inv, s_zc, s_qc, loss_scale,
                 D: tl.constexpr, D_PAD: tl.constexpr, ROW_ERR: tl.constexpr, BF16_BITS: tl.constexpr,
                 BLOCK_N: tl.constexpr, EPI_D: tl.constexpr):
    """Epilogue: gather e = codebook[best_i] in fp32, write z_q (z's dtype and layout), the int64 indices, the
    counts (integer atomics: exact in any order) and the losses, mean_j (z_nj * inv_n - e_j)^2 over all rows,
    as fp32 atomics of each program's partial sum (ROW_ERR: each row's error instead, summed in torch in a
    fixed order, for deterministic mode). z is re-read in EPI_D-wide chunks (an L2 hit, just read by the
    search): keeping the row tile in registers through the loop for this costs more than it saves."""
    code = best_i.to(tl.int64)
    sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, EPI_D):
        offs_d = d0 + tl.arange(0, EPI_D)
        m = mask_n[:, None] & (offs_d < D)[None, :]
        cols = offs_d[None, :].to(tl.int64)
        x = tl.load(z_ptr + zoff[:, None] + cols * s_zc, mask=m, other=0.0).to(tl.float32) * inv[:, None]
        e = tl.load(cbf_ptr + code[:, None] * D_PAD + cols, mask=m, other=0.0)
        diff = x - e
        sq += tl.sum(diff * diff, axis=1)
        tl.store(zq_ptr + qoff[:, None] + cols * s_qc, _cast_out(e, zq_ptr.dtype.element_ty, BF16_BITS), mask=m)
    tl.store(idx_ptr + offs_n, code, mask=mask_n)
    # relaxed: no ordering with other memory is needed (the default acq_rel compiles to a barrier per atomic)
    tl.atomic_add(counts_ptr + best_i, tl.full([BLOCK_N], 1, tl.int64), mask=mask_n, sem="relaxed")
    if ROW_ERR:
        tl.store(sqerr_ptr + offs_n, sq, mask=mask_n)
    else:
        part = tl.sum(sq, axis=0) * loss_scale
        tl.atomic_add(lcb_ptr, part, sem="relaxed")
        tl.atomic_add(lcm_ptr, part, sem="relaxed")


# D is in the key because prune_search_configs picks the tile by the padded width and DOT_PRECISION because it
# picks tensor-core or FMA shapes by it: without it an fp32 call with tf32 would hand its tuned tensor-core tile to
# later exact (ieee) calls of the same size. Benchmarking a config accumulates into the counts and the losses:
# the autotuner zeroes them before each trial and after the last.
@triton.autotune(configs=search_configs(), key=["K", "D", "N_LOG2", "SPLIT", "DOT_PRECISION"],
                 prune_configs_by={"early_config_prune": prune_search_configs},
                 reset_to_zero=["counts_ptr", "lcb_ptr", "lcm_ptr"])
@triton.jit(do_not_specialize=["N_LOG2"])  # a tuning key only: its divisibility by 16 must not recompile
def _vq_search_kernel(
    z_ptr, cbd_ptr, hn_ptr, cbf_ptr,  # z [B, C*D, H, W]; padded codebook in the dot dtype; 0.5||e||^2; fp32 codes
    zq_ptr, idx_ptr, counts_ptr, sqerr_ptr, lcb_ptr, lcm_ptr,  # outputs when FUSED (SPLIT == 1)
    pval_ptr, pidx_ptr,  # [SPLIT, N] partial min / argmin when not FUSED
    N, K, C, H, W, N_LOG2, SPLIT, loss_scale,
    s_zb, s_zc, s_zy, s_zx, s_qb, s_qc, s_qy, s_qx,
    D: tl.constexpr, D_PAD: tl.constexpr, COSINE: tl.constexpr, FUSED: tl.constexpr, ROW_ERR: tl.constexpr,
    Z_CONTIG: tl.constexpr, Q_CONTIG: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BF16_BITS: tl.constexpr, EPI_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (i, s): rows [i*BLOCK_N, (i+1)*BLOCK_N) against the codes of split s, in BLOCK_K tiles.

    argmin_k ||z - e_k||^2 = argmin_k (0.5*||e_k||^2 - z.e_k): one tl.dot per tile plus one FMA, then a row
    min/argmin of the tile folded into a running [BLOCK_N] best. RESIDENT (d <= 256 on tensor cores): the rows
    are loaded once and stay in the program for every code tile. The loop is pipelined by Triton (num_stages
    cp.async buffers of code tiles); the tensor cores overlap the min/argmin across CTAs, the configs leaving
    room for several per SM (issuing the next tile's dot before this tile's argmin made Triton 3.9 drop the
    cp.async pipeline and spill: kernels/README.md).
    """
    RESIDENT: tl.constexpr = BLOCK_D >= D_PAD  # the launcher's block_d_for(): whole rows or chunks
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    zoff = _row_offsets(offs_n, C, H, W, D, s_zb, s_zc, s_zy, s_zx, Z_CONTIG)
    if RESIDENT:
        offs_d = tl.arange(0, D_PAD)
        zt = tl.load(z_ptr + zoff[:, None] + offs_d[None, :].to(tl.int64) * s_zc,
                     mask=mask_n[:, None] & (offs_d < D)[None, :], other=0.0)  # [BLOCK_N, D_PAD], z's dtype
        if UPCAST:
            zt = zt.to(tl.float32)
        if COSINE:
            inv = _inv_norm_rows(zt.to(tl.float32))
        else:
            inv = tl.full([BLOCK_N], 1.0, tl.float32)
    else:
        zt = tl.zeros([1], dtype=tl.float32)  # unused: the chunks are read per tile
        if COSINE:
            inv = _inv_norm(z_ptr, zoff, mask_n, s_zc, D, BLOCK_N, BLOCK_D)
        else:
            inv = tl.full([BLOCK_N], 1.0, tl.float32)

    k_per = tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K  # a whole number of tiles: no tile straddles two splits
    k_lo = pid_s * k_per
    k_hi = tl.minimum(k_lo + k_per, K)
    best_v = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_i = tl.zeros([BLOCK_N], tl.int32) + k_lo  # k_lo, not 0: a NaN row still gets a code of this split
    for k0 in range(k_lo, k_hi, BLOCK_K):
        acc = _code_scores(zt, z_ptr, zoff, mask_n, s_zc, cbd_ptr, k0, D, D_PAD, RESIDENT, DOT_PRECISION, UPCAST,
                           BLOCK_N, BLOCK_K, BLOCK_D)
        hn = tl.load(hn_ptr + k0 + tl.arange(0, BLOCK_K))  # padding codes: +inf, never chosen
        best_v, best_i = _fold_tile(acc, hn, inv, k0, best_v, best_i, COSINE)

    if FUSED:
        qoff = _row_offsets(offs_n, C, H, W, D, s_qb, s_qc, s_qy, s_qx, Q_CONTIG)
        _assign_rows(z_ptr, cbf_ptr, zq_ptr, idx_ptr, counts_ptr, sqerr_ptr, lcb_ptr, lcm_ptr, offs_n, mask_n, zoff,
                     qoff, best_i, inv, s_zc, s_qc, loss_scale, D, D_PAD, ROW_ERR, BF16_BITS, BLOCK_N, EPI_D)
    else:
        tl.store(pval_ptr + pid_s * N + offs_n, best_v, mask=mask_n)
        tl.store(pidx_ptr + pid_s * N + offs_n, best_i, mask=mask_n)


@triton.jit
def _vq_assign_kernel(
    z_ptr, cbf_ptr, zq_ptr, idx_ptr, counts_ptr, sqerr_ptr, lcb_ptr, lcm_ptr, pval_ptr, pidx_ptr,
    N, C, H, W, SPLIT, loss_scale,
    s_zb, s_zc, s_zy, s_zx, s_qb, s_qc, s_qy, s_qx,
    D: tl.constexpr, D_PAD: tl.constexpr, COSINE: tl.constexpr, ROW_ERR: tl.constexpr, Z_CONTIG: tl.constexpr,
    Q_CONTIG: tl.constexpr, BF16_BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Split-K search: reduce the SPLIT partial (min, argmin) in split order (ties -> smallest code), then assign."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    best_v = tl.load(pval_ptr + offs_n, mask=mask_n, other=0.0)
    best_i = tl.load(pidx_ptr + offs_n, mask=mask_n, other=0)
    for s in range(1, SPLIT):
        v = tl.load(pval_ptr + s * N + offs_n, mask=mask_n, other=0.0)
        i = tl.load(pidx_ptr + s * N + offs_n, mask=mask_n, other=0)
        upd = v < best_v
        best_v = tl.where(upd, v, best_v)
        best_i = tl.where(upd, i, best_i)
    zoff = _row_offsets(offs_n, C, H, W, D, s_zb, s_zc, s_zy, s_zx, Z_CONTIG)
    qoff = _row_offsets(offs_n, C, H, W, D, s_qb, s_qc, s_qy, s_qx, Q_CONTIG)
    if COSINE:
        inv = _inv_norm(z_ptr, zoff, mask_n, s_zc, D, BLOCK_N, BLOCK_D)
    else:
        inv = tl.full([BLOCK_N], 1.0, tl.float32)
    _assign_rows(z_ptr, cbf_ptr, zq_ptr, idx_ptr, counts_ptr, sqerr_ptr, lcb_ptr, lcm_ptr, offs_n, mask_n, zoff, qoff,
                 best_i, inv, s_zc, s_qc, loss_scale, D, D_PAD, ROW_ERR, BF16_BITS, BLOCK_N, BLOCK_D)


@triton.jit
def _vq_backward_kernel(
    z_ptr, gzq_ptr, gz_ptr, cbf_ptr, idx_ptr, gcb_ptr, g_cb_ptr, g_cm_ptr,  # g_cb, g_cm: the losses' 0-d grads
    N, C, H, W, coef,  # coef = 2 / (N*D): d mean(x^2) / dx
    s_zb, s_zc, s_zy, s_zx, s_gb, s_gc, s_gy, s_gx, s_ob, s_oc, s_oy, s_ox,
    D: tl.constexpr, D_PAD: tl.constexpr, COSINE: tl.constexpr, HAS_GZQ: tl.constexpr, HAS_GCM: tl.constexpr,
    NEED_GZ: tl.constexpr, ATOMIC_CB: tl.constexpr, Z_CONTIG: tl.constexpr, G_CONTIG: tl.constexpr,
    O_CONTIG: tl.constexpr, BF16_BITS: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Per row: dL/dz = g_zq + coef*g_commit * (zn - e), chained through F.normalize when COSINE; with ATOMIC_CB
    also codebook[idx] += coef*g_codebook * (e - zn) by fp32 atomics (order-dependent rounding). The loss
    gradients are read on the device: no host sync, no torch op to scale them."""
    offs_n = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    offs_d = tl.arange(0, D_PAD)
    cols = offs_d[None, :].to(tl.int64)
    m = mask_n[:, None] & (offs_d < D)[None, :]
    zoff = _row_offsets(offs_n, C, H, W, D, s_zb, s_zc, s_zy, s_zx, Z_CONTIG)
    x = tl.load(z_ptr + zoff[:, None] + cols * s_zc, mask=m, other=0.0).to(tl.float32)
    if COSINE:
        nrm = tl.sqrt_rn(tl.sum(x * x, axis=1))
        inv = tl.div_rn(1.0, tl.maximum(nrm, 1e-6))
        x = x * inv[:, None]
    code = tl.load(idx_ptr + offs_n, mask=mask_n, other=0)
    e = tl.load(cbf_ptr + code[:, None] * D_PAD + cols, mask=m, other=0.0)
    if NEED_GZ:
        if HAS_GCM:
            g = (tl.load(g_cm_ptr).to(tl.float32) * coef) * (x - e)
        else:
            g = tl.zeros([BLOCK_R, D_PAD], dtype=tl.float32)
        if HAS_GZQ:
            goff = _row_offsets(offs_n, C, H, W, D, s_gb, s_gc, s_gy, s_gx, G_CONTIG)
            g += tl.load(gzq_ptr + goff[:, None] + cols * s_gc, mask=m, other=0.0).to(tl.float32)
        if COSINE:  # d(x/max(|x|,eps)): (g - xn (xn.g)) / |x| above eps, g / eps below
            proj = tl.sum(x * g, axis=1)
            g = tl.where((nrm > 1e-6)[:, None], g - x * proj[:, None], g) * inv[:, None]
        ooff = _row_offsets(offs_n, C, H, W, D, s_ob, s_oc, s_oy, s_ox, O_CONTIG)
        tl.store(gz_ptr + ooff[:, None] + cols * s_oc, _cast_out(g, gz_ptr.dtype.element_ty, BF16_BITS), mask=m)
    if ATOMIC_CB:
        c_cb = tl.load(g_cb_ptr).to(tl.float32) * coef
        tl.atomic_add(gcb_ptr + code[:, None] * D + cols, c_cb * (e - x), mask=m, sem="relaxed")


@triton.jit
def _vq_codebook_grad_kernel(
    z_ptr, cbf_ptr, order_ptr, offsets_ptr, gcb_ptr, g_cb_ptr,  # order: rows sorted by code (stable); offsets [K+1]
    C, H, W, coef, s_zb, s_zc, s_zy, s_zx,
    D: tl.constexpr, D_PAD: tl.constexpr, COSINE: tl.constexpr, Z_CONTIG: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Deterministic codebook gradient: program k sums coef*g_codebook * (e_k - zn) over its rows in a fixed
    order (stable sort, fixed tile shape, fixed tree reduction), so repeated runs are bit-identical."""
    k = tl.program_id(0)
    start = tl.load(offsets_ptr + k)
    end = tl.load(offsets_ptr + k + 1)
    offs_d = tl.arange(0, D_PAD)
    cols = offs_d[None, :].to(tl.int64)
    mask_d = offs_d < D
    e = tl.load(cbf_ptr + k * D_PAD + offs_d)
    acc = tl.zeros([BLOCK_R, D_PAD], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask_r = rows < end
        n = tl.load(order_ptr + rows, mask=mask_r, other=0)
        m = mask_r[:, None] & mask_d[None, :]
        zoff = _row_offsets(n, C, H, W, D, s_zb, s_zc, s_zy, s_zx, Z_CONTIG)
        x = tl.load(z_ptr + zoff[:, None] + cols * s_zc, mask=m, other=0.0).to(tl.float32)
        if COSINE:
            x = x * _inv_norm_rows(x)[:, None]
        acc += tl.where(m, e[None, :] - x, 0.0)
    c_cb = tl.load(g_cb_ptr).to(tl.float32) * coef
    tl.store(gcb_ptr + k * D + offs_d, tl.sum(acc, axis=0) * c_cb, mask=mask_d)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _split_k(n_rows: int, K: int, device: torch.device) -> int:
    """Split the codebook across programs when the row tiles alone cannot fill the GPU (small N, big K)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_tiles = triton.cdiv(n_rows, 128)
    split = 1
    while row_tiles * split < 2 * sms and K // (2 * split) >= 1024:
        split *= 2
    return split


def padded_width(d: int) -> int:
    """D_PAD: the codebook's padded width, a power of two >= 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(d))


class _Forward(NamedTuple):
    zq: Tensor  # like z
    idx: Tensor  # int64 [N]
    counts: Tensor  # int64 [K]
    codebook_loss: Tensor  # fp32 0-d
    commitment_loss: Tensor  # fp32 0-d
    cbf: Tensor  # fp32 [K_pad, D_PAD]: the codes of this forward, padded
    gcb: Optional[Tensor]  # fp32 [K, D] zero-filled for the backward's atomics, or None


def _vq_forward(z: Tensor, codebook: Tensor, channels: int, *, cosine: bool, allow_tf32: bool,
                deterministic: bool = False, zero_gcb: bool = False, split_k: Optional[int] = None) -> _Forward:
    """z [B, C*D, H, W], codebook [K, D] (any float dtype; already normalised when cosine) -> :class:`_Forward`.

    Two launches when the search is not split (the prep kernel, then the search with its fused epilogue), three
    with split-K; deterministic mode adds the losses' fixed-order sum in torch. Memory added: O(N + K*D).
    """
    B, _, H, W = z.shape
    K, D = codebook.shape
    C = channels
    N = B * C * H * W
    if N >= 2**31:
        raise ValueError(f"multichannel_vq: {N} vectors; the triton backend indexes rows in int32 (< 2**31). "
                         "Quantize in smaller batches or use backend='torch'")
    d_pad = padded_width(D)
    k_pad = triton.cdiv(K, K_ALIGN) * K_ALIGN
    split = split_k if split_k is not None else _split_k(N, K, z.device)
    split = max(1, min(split, K, 65535))  # the grid's second dimension
    if k_pad * d_pad >= 2**31 or split * N >= 2**31:
        raise ValueError(f"multichannel_vq: codebook {K}x{D} or {split} x {N} partial results exceed the triton "
                         "backend's int32 indexing (< 2**31); use backend='torch'")
    dev = z.device
    low_precision = z.dtype in (torch.bfloat16, torch.float16)
    # torch.empty launches nothing: every buffer below is written by the kernels (zero-fills in the prep kernel)
    cbf = torch.empty(k_pad, d_pad, dtype=torch.float32, device=dev)
    cbd = torch.empty(k_pad, d_pad, dtype=z.dtype, device=dev) if low_precision else cbf  # tensor-core operand
    hn = torch.empty(k_pad, dtype=torch.float32, device=dev)
    counts = torch.empty(K, dtype=torch.int64, device=dev)
    lcb = torch.empty((), dtype=torch.float32, device=dev)
    lcm = torch.empty((), dtype=torch.float32, device=dev)
    gcb = torch.empty(K, D, dtype=torch.float32, device=dev) if zero_gcb else None
    zq = torch.empty_like(z)
    idx = torch.empty(N, dtype=torch.int64, device=dev)
    sqerr = torch.empty(N if deterministic else 1, dtype=torch.float32, device=dev)
    bf16_bits = INTERPRET and z.dtype == torch.bfloat16
    block_r = prep_rows(d_pad)
    _vq_prep_kernel[(k_pad // block_r,)](
        codebook, cbf, cbd, hn, counts, lcb, lcm, gcb if gcb is not None else cbf, K, *codebook.stride(),
        D=D, D_PAD=d_pad, SEPARATE_CBD=low_precision, ZERO_GCB=gcb is not None, BF16_BITS=bf16_bits,
        BLOCK_R=block_r, num_warps=4,
    )
    fused = split == 1
    pval = torch.empty((split, N) if not fused else (1,), dtype=torch.float32, device=dev)
    pidx = torch.empty((split, N) if not fused else (1,), dtype=torch.int32, device=dev)
    precision = "tf32" if (allow_tf32 and not low_precision and not INTERPRET) else "ieee"
    math = "bf16" if low_precision else ("tf32" if precision == "tf32" else "ieee")
    loss_scale = 1.0 / (N * D)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), split)

    _vq_search_kernel[grid](
        z, cbd, hn, cbf, zq, idx, counts, sqerr, lcb, lcm, pval, pidx,
        N, K, C, H, W, N.bit_length(), split, loss_scale, *z.stride(), *zq.stride(),
        D=D, D_PAD=d_pad, COSINE=cosine, FUSED=fused, ROW_ERR=deterministic, Z_CONTIG=z.is_contiguous(),
        Q_CONTIG=zq.is_contiguous(), DOT_PRECISION=precision,
        UPCAST=INTERPRET and low_precision,  # the interpreter's bf16/fp16 tl.dot is wrong: do it in fp32
        BF16_BITS=bf16_bits, EPI_D=min(d_pad, 64), BLOCK_D=block_d_for(math, d_pad),
    )
    if not fused:
        block_n = 32 if INTERPRET else assign_rows(d_pad)
        _vq_assign_kernel[(triton.cdiv(N, block_n),)](
            z, cbf, zq, idx, counts, sqerr, lcb, lcm, pval, pidx, N, C, H, W, split, loss_scale,
            *z.stride(), *zq.stride(),
            D=D, D_PAD=d_pad, COSINE=cosine, ROW_ERR=deterministic, Z_CONTIG=z.is_contiguous(),
            Q_CONTIG=zq.is_contiguous(), BF16_BITS=bf16_bits, BLOCK_N=block_n, BLOCK_D=min(d_pad, 64), num_warps=4,
        )
    if deterministic:  # a fixed-order sum instead of the atomics: bit-reproducible losses
        lcb = sqerr.sum() * loss_scale
        lcm = lcb.clone()
    return _Forward(zq, idx, counts, lcb, lcm, cbf, gcb)


def _vq_backward(z: Tensor, cbf: Tensor, idx: Tensor, counts: Tensor, g_zq: Optional[Tensor],
                 g_cb: Optional[Tensor], g_cm: Optional[Tensor], gcb: Optional[Tensor], *, channels: int, D: int,
                 cosine: bool, need_gz: bool, need_gcb: bool,
                 deterministic: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Gradients of sum(g_zq * z_q) + g_cb*codebook_loss + g_cm*commitment_loss (g_*: 0-d, None = 0).

    Returns dL/dz (dtype and layout of z) and dL/dcodes (fp32 [K, D]); None where not needed. ``gcb``: a
    zero-filled [K, D] buffer for the atomics (from the forward's prep kernel), or None to allocate one.
    One launch in the default (atomic) mode.
    """
    B, _, H, W = z.shape
    K = counts.shape[0]
    d_pad = cbf.shape[1]
    N = idx.numel()
    coef = 2.0 / (N * D)
    block_r, warps = backward_blocks(d_pad)
    gz = torch.empty_like(z) if need_gz else None
    atomic = need_gcb and not deterministic
    if need_gcb:
        if gcb is None:
            gcb = torch.zeros(K, D, dtype=torch.float32, device=z.device) if atomic else \
                torch.empty(K, D, dtype=torch.float32, device=z.device)
        g_cb = g_cb if g_cb.dtype == torch.float32 else g_cb.float()
    else:
        gcb = None
    if g_cm is not None and g_cm.dtype != torch.float32:
        g_cm = g_cm.float()
    if need_gz or atomic:
        gzq = g_zq if g_zq is not None else z  # dummy pointer when HAS_GZQ is False
        out = gz if gz is not None else z
        _vq_backward_kernel[(triton.cdiv(N, block_r),)](
            z, gzq, out, cbf, idx, gcb if gcb is not None else cbf, g_cb if atomic else cbf,
            g_cm if g_cm is not None else cbf, N, channels, H, W, coef, *z.stride(), *gzq.stride(), *out.stride(),
            D=D, D_PAD=d_pad, COSINE=cosine, HAS_GZQ=g_zq is not None, HAS_GCM=g_cm is not None, NEED_GZ=need_gz,
            ATOMIC_CB=atomic, Z_CONTIG=z.is_contiguous(), G_CONTIG=gzq.is_contiguous(), O_CONTIG=out.is_contiguous(),
            BF16_BITS=INTERPRET and z.dtype == torch.bfloat16, BLOCK_R=block_r, num_warps=warps,
        )
    if need_gcb and deterministic:
        order = torch.sort(idx, stable=True).indices  # rows grouped by code, ties in row order
        offsets = torch.zeros(K + 1, dtype=torch.int64, device=z.device)
        torch.cumsum(counts, 0, out=offsets[1:])
        _vq_codebook_grad_kernel[(K,)](
            z, cbf, order, offsets, gcb, g_cb, channels, H, W, coef, *z.stride(),
            D=D, D_PAD=d_pad, COSINE=cosine, Z_CONTIG=z.is_contiguous(), BLOCK_R=block_r, num_warps=warps,
        )
    return gz, gcb


def _vq_backward_ref(z: Tensor, cbf: Tensor, idx: Tensor, g_zq: Optional[Tensor], g_cb: Optional[Tensor],
                     g_cm: Optional[Tensor], *, channels: int, K: int, D: int, cosine: bool, need_gz: bool,
                     need_gcb: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """:func:`_vq_backward` in torch (autograd through the reference's formulas with the indices fixed): the
    fallback when a backward kernel fails to compile or launch after its forward ran on Triton."""
    B, _, h, w = z.shape
    zl = z.detach().requires_grad_(need_gz)
    with torch.enable_grad(), torch.autocast(device_type=z.device.type, enabled=False):
        zv = zl.float().reshape(B, channels, D, h, w).permute(0, 1, 3, 4, 2).reshape(-1, D)  # [N, D]
        if cosine:
            zv = F.normalize(zv, dim=-1, eps=NORM_EPS)
        e = cbf[idx, :D]  # [N, D]
        gz = None
        if need_gz:
            total = zv.new_zeros(())
            if g_zq is not None:  # straight-through: d z_q / d zv is the identity
                gv = g_zq.float().reshape(B, channels, D, h, w).permute(0, 1, 3, 4, 2).reshape(-1, D)
                total = total + (zv * gv).sum()
            if g_cm is not None:
                total = total + g_cm.float() * (zv - e).pow(2).mean()
            gz, = torch.autograd.grad(total, zl)
            gz = gz.to(z.dtype)
    gcb = None
    if need_gcb:
        diff = (e - zv.detach()) * (g_cb.float() * (2.0 / zv.numel()))
        gcb = torch.zeros(K, D, dtype=torch.float32, device=z.device).index_add_(0, idx, diff)
    return gz, gcb


# ----------------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def _nearest_ref(zv: Tensor, cb: Tensor, chunk_size: int, matmul_dtype: torch.dtype = torch.float32) -> Tensor:
    """argmin_k ||zv_n - cb_k||^2 for zv [N, d], cb [K, d] (fp32), in row chunks: never N x K at once.
    ``matmul_dtype``: the operands' dtype of the z.e matmul (bf16: tensor-core speed, fp32 norms and sums)."""
    e_sq = (cb * cb).sum(1)  # [K]
    cbt = cb.t().to(matmul_dtype)
    out = torch.empty(zv.shape[0], dtype=torch.int64, device=zv.device)
    for start in range(0, zv.shape[0], chunk_size):
        chunk = zv[start:start + chunk_size]  # [n, d]
        dots = (chunk.to(matmul_dtype) @ cbt).float()
        dist = (chunk * chunk).sum(1, keepdim=True) - 2.0 * dots + e_sq  # [n, K]
        out[start:start + chunk_size] = dist.argmin(1)
    return out


def multichannel_vq_ref(z: Tensor, codebook: Tensor, channels: int, *, cosine: bool = False,
                        chunk_size: int = 8192, matmul_dtype: torch.dtype = torch.float32) -> VQResult:
    """Torch reference of :func:`multichannel_vq` (plain autograd; fp32 distances whatever autocast says).

    z [B, C*d, h, w], codebook [K, d] -> VQResult (see its docstring for shapes). ``matmul_dtype``: operand
    dtype of the search's z.e matmul (torch.bfloat16 for the bf16 baseline of tools/bench_kernels.py; the
    default fp32 is the reference proper).
    """
    B, C, d, h, w, K = _check_inputs(z, codebook, channels, chunk_size)
    with torch.autocast(device_type=z.device.type, enabled=False):
        # 'b (c d) h w -> (b c h w) d': channel-major split of the feature dim
        zv = z.float().reshape(B, C, d, h, w).permute(0, 1, 3, 4, 2).reshape(-1, d)  # [N, d]
        cb = codebook.float()  # [K, d]
        if cosine:
            zv = F.normalize(zv, dim=-1, eps=NORM_EPS)
            cb = F.normalize(cb, dim=-1, eps=NORM_EPS)
        idx = _nearest_ref(zv.detach(), cb.detach(), chunk_size, matmul_dtype)  # [N]
        e = cb[idx]  # [N, d]; gather -> index_add backward into the codebook
        codebook_loss = (zv.detach() - e).pow(2).mean()
        commitment_loss = (zv - e.detach()).pow(2).mean()
        zq = e.detach() + (zv - zv.detach())  # straight-through: value exactly e, gradient only to z
        zq = zq.reshape(B, C, h, w, d).permute(0, 1, 4, 2, 3).reshape(B, C * d, h, w).to(z.dtype)
    counts = torch.bincount(idx, minlength=K)
    return VQResult(_restore_layout(zq, z), idx.reshape(B, C, h, w), counts, codebook_loss, commitment_loss)


# ----------------------------------------------------------------------------------------------
# public op
# ----------------------------------------------------------------------------------------------


def resolve_backend(z: Tensor, backend: Optional[str] = None) -> str:
    """backend argument > $MOVQ_VQ_BACKEND > "triton" on CUDA, "torch" elsewhere (before any fallback: see
    kernels/_backend.py for when the default Triton choice falls back to torch)."""
    return _backend.resolve(z, backend)[0]


def _policy_key(z: Tensor, d: int, cosine: bool, precision: str, deterministic: bool) -> tuple:
    return (str(z.device), z.dtype, d, cosine, precision, deterministic)


def multichannel_vq(z: Tensor, codebook: Tensor, channels: int, *, cosine: bool = False,
                    backend: Optional[str] = None, deterministic: Optional[bool] = None,
                    allow_tf32: Optional[bool] = None, chunk_size: int = 8192) -> VQResult:
    """Nearest-code search + straight-through assignment for multichannel VQ.

    z [B, C*d, h, w] (fp32/bf16/fp16), codebook [K, d] -> VQResult(z_q, indices, counts, codebook_loss,
    commitment_loss). ``backend``: "triton" | "torch" | None (=$MOVQ_VQ_BACKEND, else triton on CUDA, torch
    elsewhere; the default falls back to torch with one warning where Triton cannot run, a named backend
    raises instead). ``deterministic``: Triton losses and backward without float atomics (bit-reproducible);
    None follows ``torch.are_deterministic_algorithms_enabled()``. ``allow_tf32``: fp32 inputs may search with
    tf32 tensor cores; None follows torch's fp32 matmul precision (either API). ``chunk_size``: rows per chunk
    of the torch search.
    """
    _check_inputs(z, codebook, channels, chunk_size)
    name, forced = _backend.resolve(z, backend)
    if name == "torch":
        return multichannel_vq_ref(z, codebook, channels, cosine=cosine, chunk_size=chunk_size)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if allow_tf32 is None:
        allow_tf32 = _backend.tf32_allowed()
    if forced:
        return _multichannel_vq_triton(z, codebook, channels, cosine=cosine, deterministic=deterministic,
                                       allow_tf32=allow_tf32, policy_key=None)
    reason = _backend.unsupported_reason(z)
    precision = "tf32" if allow_tf32 and z.dtype == torch.float32 else "ieee"
    key = _policy_key(z, codebook.shape[1], cosine, precision, deterministic)
    if reason is not None:
        _backend.record_fallback(key, reason)
    if _backend.fallback_reason(key) is not None:
        return multichannel_vq_ref(z, codebook, channels, cosine=cosine, chunk_size=chunk_size)
    try:
        res = _multichannel_vq_triton(z, codebook, channels, cosine=cosine, deterministic=deterministic,
                                      allow_tf32=allow_tf32, policy_key=key)
        if key not in _backend._VERIFIED and z.is_cuda and not torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize(z.device)  # once per key: a failed launch surfaces here, not in a later op
        _backend._VERIFIED.add(key)
        return res
    except Exception as err:  # noqa: BLE001 - the policy: any Triton failure of the default path falls back
        if not _backend.is_fallback_error(err):
            raise
        _backend.record_fallback(key, f"the Triton forward failed ({_backend.describe_error(err)})")
        return multichannel_vq_ref(z, codebook, channels, cosine=cosine, chunk_size=chunk_size)


class _MultichannelVQ(torch.autograd.Function):
    """Fused forward (prep + search with its epilogue) and backward (one kernel by default).

    ``codebook`` is the caller's [K, d] (any float dtype) or, for cosine codes, its fp32 normalisation (autograd
    chains the gradient through F.normalize). ``policy_key``: None when Triton was forced (errors raise); else
    the fallback key, and a failing backward kernel is replaced by :func:`_vq_backward_ref` with a warning.
    """

    @staticmethod
    def forward(ctx, z, codebook, channels, cosine, deterministic, allow_tf32, policy_key):
        zero_gcb = ctx.needs_input_grad[1] and not deterministic  # the backward's atomics start from the prep's 0s
        fw = _vq_forward(z, codebook, channels, cosine=cosine, allow_tf32=allow_tf32, deterministic=deterministic,
                         zero_gcb=zero_gcb)
        ctx.save_for_backward(z, fw.cbf, fw.idx, fw.counts)
        ctx.gcb = fw.gcb  # handed to the first backward only: it may become the codebook's .grad
        ctx.channels, ctx.cosine, ctx.deterministic, ctx.policy_key = channels, cosine, deterministic, policy_key
        ctx.cb_dtype, ctx.D = codebook.dtype, codebook.shape[1]
        ctx.mark_non_differentiable(fw.idx, fw.counts)
        ctx.set_materialize_grads(False)  # an unused output sends None: skip its term
        return fw.zq, fw.idx, fw.counts, fw.codebook_loss, fw.commitment_loss

    @staticmethod
    @once_differentiable
    def backward(ctx, g_zq, _g_idx, _g_counts, g_codebook, g_commit):
        z, cbf, idx, counts = ctx.saved_tensors
        need_gz = ctx.needs_input_grad[0] and (g_zq is not None or g_commit is not None)
        need_gcb = ctx.needs_input_grad[1] and g_codebook is not None
        if not (need_gz or need_gcb):
            return None, None, None, None, None, None, None
        gcb_buf, ctx.gcb = ctx.gcb, None
        kw = dict(channels=ctx.channels, D=ctx.D, cosine=ctx.cosine, need_gz=need_gz, need_gcb=need_gcb)
        try:
            gz, gcb = _vq_backward(z, cbf, idx, counts, g_zq, g_codebook, g_commit, gcb_buf,
                                   deterministic=ctx.deterministic, **kw)
            if (ctx.policy_key is not None and ("bwd", ctx.policy_key) not in _backend._VERIFIED and z.is_cuda
                    and not torch.cuda.is_current_stream_capturing()):
                torch.cuda.synchronize(z.device)
            _backend._VERIFIED.add(("bwd", ctx.policy_key))
        except Exception as err:  # noqa: BLE001 - see forward; forced Triton raises
            if ctx.policy_key is None or not _backend.is_fallback_error(err):
                raise
            _backend.record_fallback(ctx.policy_key, f"the Triton backward failed ({_backend.describe_error(err)})")
            gz, gcb = _vq_backward_ref(z, cbf, idx, g_zq, g_codebook, g_commit, K=counts.shape[0], **kw)
        if gcb is not None and gcb.dtype != ctx.cb_dtype:
            gcb = gcb.to(ctx.cb_dtype)
        return gz, gcb, None, None, None, None, None


def _multichannel_vq_triton(z: Tensor, codebook: Tensor, channels: int, *, cosine: bool, deterministic: bool,
                            allow_tf32: bool, policy_key: Optional[tuple] = None) -> VQResult:
    if z.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"multichannel_vq: the triton backend takes z in {_FLOAT_DTYPES}, got {z.dtype}; "
                         "use backend='torch'")
    B, _, h, w = z.shape
    with torch.autocast(device_type=z.device.type, enabled=False):
        # cosine: K x d in torch, and autograd chains the codebook gradient through it; else the prep kernel
        # reads the caller's codebook (its fp32 copy is a new tensor, see _vq_prep_kernel)
        codes = F.normalize(codebook.float(), dim=-1, eps=NORM_EPS) if cosine else codebook
        args = (z, codes, channels, cosine, deterministic, allow_tf32, policy_key)
        if z.is_cuda:
            with torch.cuda.device(z.device):
                zq, idx, counts, lcb, lcm = _MultichannelVQ.apply(*args)
        else:
            zq, idx, counts, lcb, lcm = _MultichannelVQ.apply(*args)
    return VQResult(zq, idx.view(B, channels, h, w), counts, lcb, lcm)
