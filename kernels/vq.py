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
"""
from __future__ import annotations

import logging
import os
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from movq.kernels._autotune import (
    HAS_TRITON,
    INTERPRET,
    backward_blocks,
    prune_search_configs,
    search_configs,
    tl,
    triton,
)

log = logging.getLogger(__name__)

BACKEND_ENV = "MOVQ_VQ_BACKEND"
BACKENDS = ("triton", "torch")
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


@triton.jit
def _row_offsets(offs_n, C, H, W, D, s_b, s_c, s_y, s_x, CONTIG: tl.constexpr):
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
def _inv_norm(z_ptr, zoff, mask_n, D, s_c, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """1 / max(||z_n||, 1e-6) per row (F.normalize's eps, NORM_EPS), fp32 [BLOCK_N]."""
    ss = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m = mask_n[:, None] & (offs_d < D)[None, :]
        x = tl.load(z_ptr + zoff[:, None] + offs_d[None, :].to(tl.int64) * s_c, mask=m, other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    return tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(ss), 1e-6))  # IEEE-rounded (plain sqrt / '/' are approximate)


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
def _assign_rows(z_ptr, cbf_ptr, zq_ptr, idx_ptr, counts_ptr, sqerr_ptr, offs_n, mask_n, zoff, qoff, best_i, inv,
                 D, s_zc, s_qc, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BF16_BITS: tl.constexpr):
    """Epilogue: gather e = codebook[best_i] in fp32, write z_q (z's dtype and layout), indices, counts and
    the row's exact squared error sum_j (z_nj * inv_n - e_j)^2 (fp32; the losses are its mean)."""
    code = best_i.to(tl.int64)
    sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m = mask_n[:, None] & (offs_d < D)[None, :]
        cols = offs_d[None, :].to(tl.int64)
        x = tl.load(z_ptr + zoff[:, None] + cols * s_zc, mask=m, other=0.0).to(tl.float32) * inv[:, None]
        e = tl.load(cbf_ptr + code[:, None] * D + cols, mask=m, other=0.0)
        diff = x - e
        sq += tl.sum(diff * diff, axis=1)
        tl.store(zq_ptr + qoff[:, None] + cols * s_qc, _cast_out(e, zq_ptr.dtype.element_ty, BF16_BITS), mask=m)
    tl.store(idx_ptr + offs_n, code, mask=mask_n)
    tl.store(sqerr_ptr + offs_n, sq, mask=mask_n)
    # integer atomics: the counts are exact whatever the order; relaxed: no ordering with other memory is needed
    # (the default acq_rel semantics compiles to a memory barrier around every atomic)
    tl.atomic_add(counts_ptr + best_i, tl.full([BLOCK_N], 1, tl.int32), mask=mask_n, sem="relaxed")


# DOT_PRECISION is in the key because prune_search_configs picks tensor-core or FMA shapes by it: without it an
# fp32 call with allow_tf32 would hand its tuned tensor-core tile to later exact (ieee) calls of the same size.
@triton.autotune(configs=search_configs(), key=["K", "D_PAD", "N_LOG2", "SPLIT", "DOT_PRECISION"],
                 prune_configs_by={"early_config_prune": prune_search_configs}, reset_to_zero=["counts_ptr"])
@triton.jit(do_not_specialize=["N_LOG2"])  # a tuning key only: its divisibility by 16 must not recompile
def _vq_search_kernel(
    z_ptr, cbd_ptr, hn_ptr, cbf_ptr,  # z [B, C*D, H, W]; codebook [K, D] in the dot dtype; 0.5||e||^2 [K]; fp32 [K, D]
    zq_ptr, idx_ptr, counts_ptr, sqerr_ptr,  # outputs when FUSED (SPLIT == 1)
    pval_ptr, pidx_ptr,  # [SPLIT, N] partial min / argmin when not FUSED
    N, K, D, C, H, W, N_LOG2, SPLIT,
    s_zb, s_zc, s_zy, s_zx, s_qb, s_qc, s_qy, s_qx,
    COSINE: tl.constexpr, FUSED: tl.constexpr, Z_CONTIG: tl.constexpr, Q_CONTIG: tl.constexpr,
    D_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BF16_BITS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (i, s): rows [i*BLOCK_N, (i+1)*BLOCK_N) against codes of split s, streamed in BLOCK_K tiles.

    argmin_k ||z - e_k||^2 = argmin_k (0.5*||e_k||^2 - z.e_k): one tl.dot per tile plus one FMA, then a row
    min/argmin of the tile (mostly in-thread in the MMA layout) folded into a running [BLOCK_N] best. Ties go
    to the smallest code index, like torch.argmin: leftmost within a tile, strict '<' across tiles.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    zoff = _row_offsets(offs_n, C, H, W, D, s_zb, s_zc, s_zy, s_zx, Z_CONTIG)
    if COSINE:
        inv = _inv_norm(z_ptr, zoff, mask_n, D, s_zc, BLOCK_N, BLOCK_D)
    else:
        inv = tl.full([BLOCK_N], 1.0, tl.float32)

    k_per = tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K
    k_lo = pid_s * k_per
    k_hi = tl.minimum(k_lo + k_per, K)
    best_v = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_i = tl.zeros([BLOCK_N], tl.int32) + k_lo  # k_lo, not 0: a NaN row still gets a code of this split
    offs_dd = tl.arange(0, BLOCK_D)
    if D_PAD <= BLOCK_D:  # the whole (padded) row fits one tile: load z once, keep it for every code tile
        zt = tl.load(z_ptr + zoff[:, None] + offs_dd[None, :].to(tl.int64) * s_zc,
                     mask=mask_n[:, None] & (offs_dd < D)[None, :], other=0.0)
        if UPCAST:
            zt = zt.to(tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        if D_PAD <= BLOCK_D:
            et = tl.load(cbd_ptr + offs_k[None, :] * D + offs_dd[:, None],
                         mask=mask_k[None, :] & (offs_dd < D)[:, None], other=0.0)  # [BLOCK_D, BLOCK_K]
            if UPCAST:
                et = et.to(tl.float32)
            acc = tl.dot(zt, et, acc, input_precision=DOT_PRECISION)
        else:
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + offs_dd
                zc = tl.load(z_ptr + zoff[:, None] + offs_d[None, :].to(tl.int64) * s_zc,
                             mask=mask_n[:, None] & (offs_d < D)[None, :], other=0.0)
                et = tl.load(cbd_ptr + offs_k[None, :] * D + offs_d[:, None],
                             mask=mask_k[None, :] & (offs_d < D)[:, None], other=0.0)
                if UPCAST:
                    zc = zc.to(tl.float32)
                    et = et.to(tl.float32)
                acc = tl.dot(zc, et, acc, input_precision=DOT_PRECISION)
        hn = tl.load(hn_ptr + offs_k, mask=mask_k, other=float("inf"))  # masked codes never win
        if COSINE:
            dist = hn[None, :] - acc * inv[:, None]
        else:
            dist = hn[None, :] - acc
        tile_min, tile_arg = tl.min(dist, axis=1, return_indices=True, return_indices_tie_break_left=True)
        upd = tile_min < best_v
        best_v = tl.where(upd, tile_min, best_v)
        best_i = tl.where(upd, k0 + tile_arg, best_i)

    if FUSED:
        qoff = _row_offsets(offs_n, C, H, W, D, s_qb, s_qc, s_qy, s_qx, Q_CONTIG)
        _assign_rows(z_ptr, cbf_ptr, zq_ptr, idx_ptr, counts_ptr, sqerr_ptr, offs_n, mask_n, zoff, qoff, best_i,
                     inv, D, s_zc, s_qc, BLOCK_N, BLOCK_D, BF16_BITS)
    else:
        tl.store(pval_ptr + pid_s * N + offs_n, best_v, mask=mask_n)
        tl.store(pidx_ptr + pid_s * N + offs_n, best_i, mask=mask_n)


@triton.jit
def _vq_assign_kernel(
    z_ptr, cbf_ptr, zq_ptr, idx_ptr, counts_ptr, sqerr_ptr, pval_ptr, pidx_ptr,
    N, D, C, H, W, SPLIT,
    s_zb, s_zc, s_zy, s_zx, s_qb, s_qc, s_qy, s_qx,
    COSINE: tl.constexpr, Z_CONTIG: tl.constexpr, Q_CONTIG: tl.constexpr, BF16_BITS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
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
        inv = _inv_norm(z_ptr, zoff, mask_n, D, s_zc, BLOCK_N, BLOCK_D)
    else:
        inv = tl.full([BLOCK_N], 1.0, tl.float32)
    _assign_rows(z_ptr, cbf_ptr, zq_ptr, idx_ptr, counts_ptr, sqerr_ptr, offs_n, mask_n, zoff, qoff, best_i, inv,
                 D, s_zc, s_qc, BLOCK_N, BLOCK_D, BF16_BITS)


@triton.jit
def _vq_backward_kernel(
    z_ptr, gzq_ptr, gz_ptr, cbf_ptr, idx_ptr, gcb_ptr, scale_ptr,  # scale = [2*g_codebook, 2*g_commit] / numel
    N, D, C, H, W,
    s_zb, s_zc, s_zy, s_zx, s_gb, s_gc, s_gy, s_gx, s_ob, s_oc, s_oy, s_ox,
    COSINE: tl.constexpr, HAS_GZQ: tl.constexpr, NEED_GZ: tl.constexpr, ATOMIC_CB: tl.constexpr,
    Z_CONTIG: tl.constexpr, G_CONTIG: tl.constexpr, O_CONTIG: tl.constexpr, BF16_BITS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per row: dL/dz = g_zq + 2*g_commit/numel * (zn - e), chained through F.normalize when COSINE; with
    ATOMIC_CB also codebook[idx] += 2*g_codebook/numel * (e - zn) by fp32 atomics (order-dependent rounding)."""
    offs_n = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    cols = offs_d[None, :].to(tl.int64)
    m = mask_n[:, None] & (offs_d < D)[None, :]
    zoff = _row_offsets(offs_n, C, H, W, D, s_zb, s_zc, s_zy, s_zx, Z_CONTIG)
    x = tl.load(z_ptr + zoff[:, None] + cols * s_zc, mask=m, other=0.0).to(tl.float32)
    if COSINE:
        nrm = tl.sqrt_rn(tl.sum(x * x, axis=1))
        inv = tl.div_rn(1.0, tl.maximum(nrm, 1e-6))
        x = x * inv[:, None]
    code = tl.load(idx_ptr + offs_n, mask=mask_n, other=0)
    e = tl.load(cbf_ptr + code[:, None] * D + cols, mask=m, other=0.0)
    if NEED_GZ:
        c_commit = tl.load(scale_ptr + 1)
        g = c_commit * (x - e)
        if HAS_GZQ:
            goff = _row_offsets(offs_n, C, H, W, D, s_gb, s_gc, s_gy, s_gx, G_CONTIG)
            g += tl.load(gzq_ptr + goff[:, None] + cols * s_gc, mask=m, other=0.0).to(tl.float32)
        if COSINE:  # d(x/max(|x|,eps)): (g - xn (xn.g)) / |x| above eps, g / eps below
            proj = tl.sum(x * g, axis=1)
            g = tl.where((nrm > 1e-6)[:, None], g - x * proj[:, None], g) * inv[:, None]
        ooff = _row_offsets(offs_n, C, H, W, D, s_ob, s_oc, s_oy, s_ox, O_CONTIG)
        tl.store(gz_ptr + ooff[:, None] + cols * s_oc, _cast_out(g, gz_ptr.dtype.element_ty, BF16_BITS), mask=m)
    if ATOMIC_CB:
        c_cb = tl.load(scale_ptr)
        tl.atomic_add(gcb_ptr + code[:, None] * D + cols, c_cb * (e - x), mask=m, sem="relaxed")


@triton.jit
def _vq_codebook_grad_kernel(
    z_ptr, cbf_ptr, order_ptr, offsets_ptr, gcb_ptr, scale_ptr,  # order: rows sorted by code (stable); offsets [K+1]
    D, C, H, W, s_zb, s_zc, s_zy, s_zx,
    COSINE: tl.constexpr, Z_CONTIG: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Deterministic codebook gradient: program k sums 2*g_codebook/numel * (e_k - zn) over its rows in a fixed
    order (stable sort, fixed tile shape, fixed tree reduction), so repeated runs are bit-identical."""
    k = tl.program_id(0)
    start = tl.load(offsets_ptr + k)
    end = tl.load(offsets_ptr + k + 1)
    offs_d = tl.arange(0, BLOCK_D)
    cols = offs_d[None, :].to(tl.int64)
    mask_d = offs_d < D
    e = tl.load(cbf_ptr + k * D + offs_d, mask=mask_d, other=0.0)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask_r = rows < end
        n = tl.load(order_ptr + rows, mask=mask_r, other=0)
        m = mask_r[:, None] & mask_d[None, :]
        zoff = _row_offsets(n, C, H, W, D, s_zb, s_zc, s_zy, s_zx, Z_CONTIG)
        x = tl.load(z_ptr + zoff[:, None] + cols * s_zc, mask=m, other=0.0).to(tl.float32)
        if COSINE:
            x = x * tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(tl.sum(x * x, axis=1)), 1e-6))[:, None]
        acc += tl.where(m, e[None, :] - x, 0.0)
    c_cb = tl.load(scale_ptr)
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


def _vq_forward(z: Tensor, cbf: Tensor, channels: int, *, cosine: bool, allow_tf32: bool,
                split_k: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """z [B, C*D, H, W], cbf fp32 [K, D] (already normalised when cosine) -> z_q (like z), indices int64 [N],
    counts int64 [K], per-row squared error fp32 [N]. Memory added: O(N + K*D)."""
    B, _, H, W = z.shape
    K, D = cbf.shape
    C = channels
    N = B * C * H * W
    if N >= 2**31:
        raise ValueError(f"multichannel_vq: {N} vectors; the triton backend indexes rows in int32 (< 2**31). "
                         "Quantize in smaller batches or use backend='torch'")
    cbf = cbf.detach().contiguous()
    low_precision = z.dtype in (torch.bfloat16, torch.float16)
    cbd = cbf.to(z.dtype) if low_precision else cbf  # tensor-core operand; the gather and losses stay fp32
    hn = 0.5 * (cbf * cbf).sum(1)
    zq = torch.empty_like(z)
    idx = torch.empty(N, dtype=torch.int64, device=z.device)
    counts = torch.zeros(K, dtype=torch.int32, device=z.device)
    sqerr = torch.empty(N, dtype=torch.float32, device=z.device)
    split = split_k if split_k is not None else _split_k(N, K, z.device)
    split = max(1, min(split, K, 65535))  # the grid's second dimension
    if K * D >= 2**31 or split * N >= 2**31:
        raise ValueError(f"multichannel_vq: codebook {K}x{D} or {split} x {N} partial results exceed the triton "
                         "backend's int32 indexing (< 2**31); use backend='torch'")
    fused = split == 1
    pval = torch.empty((split, N) if not fused else (1,), dtype=torch.float32, device=z.device)
    pidx = torch.empty((split, N) if not fused else (1,), dtype=torch.int32, device=z.device)
    precision = "tf32" if (allow_tf32 and not low_precision and not INTERPRET) else "ieee"
    d_pad = max(16, triton.next_power_of_2(D))

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), split)

    _vq_search_kernel[grid](
        z, cbd, hn, cbf, zq, idx, counts, sqerr, pval, pidx,
        N, K, D, C, H, W, N.bit_length(), split, *z.stride(), *zq.stride(),
        COSINE=cosine, FUSED=fused, Z_CONTIG=z.is_contiguous(), Q_CONTIG=zq.is_contiguous(), D_PAD=d_pad,
        DOT_PRECISION=precision,
        UPCAST=INTERPRET and low_precision,  # the interpreter's bf16/fp16 tl.dot is wrong: do it in fp32
        BF16_BITS=INTERPRET and z.dtype == torch.bfloat16,
    )
    if not fused:
        block_n = 32 if INTERPRET else 128
        _vq_assign_kernel[(triton.cdiv(N, block_n),)](
            z, cbf, zq, idx, counts, sqerr, pval, pidx, N, D, C, H, W, split, *z.stride(), *zq.stride(),
            COSINE=cosine, Z_CONTIG=z.is_contiguous(), Q_CONTIG=zq.is_contiguous(),
            BF16_BITS=INTERPRET and z.dtype == torch.bfloat16, BLOCK_N=block_n,
            BLOCK_D=min(d_pad, 64), num_warps=4,
        )
    return zq, idx, counts.long(), sqerr


def _vq_backward(z: Tensor, cbf: Tensor, idx: Tensor, counts: Tensor, g_zq: Optional[Tensor], scale: Tensor, *,
                 channels: int, cosine: bool, need_gz: bool, need_gcb: bool,
                 deterministic: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Gradients of sum(g_zq * z_q) + g_cb*codebook_loss + g_commit*commitment_loss; scale = [2 g_cb, 2 g_commit]/numel.

    Returns dL/dz (dtype and layout of z) and dL/dcbf (fp32 [K, D]); None where not needed.
    """
    B, _, H, W = z.shape
    K, D = cbf.shape
    N = idx.numel()
    block_r, block_d, warps = backward_blocks(D)
    gz = torch.empty_like(z) if need_gz else None
    gcb = torch.zeros(K, D, dtype=torch.float32, device=z.device) if need_gcb else None
    atomic = need_gcb and not deterministic
    if need_gz or atomic:
        gzq = g_zq if g_zq is not None else z  # dummy pointer when HAS_GZQ is False
        out = gz if gz is not None else z
        _vq_backward_kernel[(triton.cdiv(N, block_r),)](
            z, gzq, out, cbf, idx, gcb if gcb is not None else cbf, scale, N, D, channels, H, W,
            *z.stride(), *gzq.stride(), *out.stride(),
            COSINE=cosine, HAS_GZQ=g_zq is not None, NEED_GZ=need_gz, ATOMIC_CB=atomic, Z_CONTIG=z.is_contiguous(),
            G_CONTIG=gzq.is_contiguous(), O_CONTIG=out.is_contiguous(),
            BF16_BITS=INTERPRET and z.dtype == torch.bfloat16, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        )
    if need_gcb and deterministic:
        order = torch.sort(idx, stable=True).indices  # rows grouped by code, ties in row order
        offsets = torch.zeros(K + 1, dtype=torch.int64, device=z.device)
        torch.cumsum(counts, 0, out=offsets[1:])
        _vq_codebook_grad_kernel[(K,)](
            z, cbf, order, offsets, gcb, scale, D, channels, H, W, *z.stride(),
            COSINE=cosine, Z_CONTIG=z.is_contiguous(), BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        )
    return gz, gcb


# ----------------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def _nearest_ref(zv: Tensor, cb: Tensor, chunk_size: int) -> Tensor:
    """argmin_k ||zv_n - cb_k||^2 for zv [N, d], cb [K, d] (fp32), in row chunks: never N x K at once."""
    e_sq = (cb * cb).sum(1)  # [K]
    out = torch.empty(zv.shape[0], dtype=torch.int64, device=zv.device)
    for start in range(0, zv.shape[0], chunk_size):
        chunk = zv[start:start + chunk_size]  # [n, d]
        dist = (chunk * chunk).sum(1, keepdim=True) - 2.0 * (chunk @ cb.t()) + e_sq  # [n, K]
        out[start:start + chunk_size] = dist.argmin(1)
    return out


def multichannel_vq_ref(z: Tensor, codebook: Tensor, channels: int, *, cosine: bool = False,
                        chunk_size: int = 8192) -> VQResult:
    """Torch reference of :func:`multichannel_vq` (plain autograd; fp32 distances whatever autocast says).

    z [B, C*d, h, w], codebook [K, d] -> VQResult (see its docstring for shapes).
    """
    B, C, d, h, w, K = _check_inputs(z, codebook, channels, chunk_size)
    with torch.autocast(device_type=z.device.type, enabled=False):
        # 'b (c d) h w -> (b c h w) d': channel-major split of the feature dim
        zv = z.float().reshape(B, C, d, h, w).permute(0, 1, 3, 4, 2).reshape(-1, d)  # [N, d]
        cb = codebook.float()  # [K, d]
        if cosine:
            zv = F.normalize(zv, dim=-1, eps=NORM_EPS)
            cb = F.normalize(cb, dim=-1, eps=NORM_EPS)
        idx = _nearest_ref(zv.detach(), cb.detach(), chunk_size)  # [N]
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


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(z: Tensor, backend: Optional[str] = None) -> str:
    """backend argument > $MOVQ_VQ_BACKEND > "triton" on CUDA, "torch" elsewhere."""
    source = "backend argument"
    if backend is None:
        env = os.environ.get(BACKEND_ENV, "").strip()
        if env:
            backend, source = env.lower(), f"${BACKEND_ENV}"
        else:
            backend = "triton" if z.is_cuda else "torch"
        if backend == "triton" and not HAS_TRITON:
            log.warning("multichannel_vq: Triton is not installed; using the torch reference on %s", z.device)
            backend = "torch"
    if backend not in BACKENDS:
        raise ValueError(f"multichannel_vq: unknown backend {backend!r} from {source}; expected one of {BACKENDS}")
    if backend == "triton" and not HAS_TRITON:
        raise ValueError(f"multichannel_vq: backend 'triton' (from {source}) needs the triton package "
                         "(pip install triton, Linux); use backend='torch'")
    if backend == "triton" and not z.is_cuda and not _interpreter_on():
        raise ValueError(f"multichannel_vq: backend 'triton' (from {source}) got a {z.device.type} tensor; Triton "
                         "kernels need a CUDA tensor, or set TRITON_INTERPRET=1 before importing kernels to run "
                         "them in Triton's interpreter on CPU (slow; for tests)")
    if backend == "triton" and not z.is_cuda and not INTERPRET:
        raise ValueError("multichannel_vq: TRITON_INTERPRET=1 was set after kernels/vq.py was imported; the kernels "
                         "were built for the GPU. Set it before the first import of kernels (e.g. in conftest.py)")
    if backend == "triton" and z.is_cuda and INTERPRET:
        raise ValueError("multichannel_vq: kernels were imported under TRITON_INTERPRET=1 (CPU interpreter) but z is "
                         "on CUDA; unset TRITON_INTERPRET or move z to the CPU")
    return backend


def multichannel_vq(z: Tensor, codebook: Tensor, channels: int, *, cosine: bool = False,
                    backend: Optional[str] = None, deterministic: Optional[bool] = None,
                    allow_tf32: Optional[bool] = None, chunk_size: int = 8192) -> VQResult:
    """Nearest-code search + straight-through assignment for multichannel VQ.

    z [B, C*d, h, w] (fp32/bf16/fp16), codebook [K, d] -> VQResult(z_q, indices, counts, codebook_loss,
    commitment_loss). ``backend``: "triton" | "torch" | None (=$MOVQ_VQ_BACKEND, else triton on CUDA,
    torch elsewhere). ``deterministic``: Triton backward without float atomics (bit-reproducible); None
    follows ``torch.are_deterministic_algorithms_enabled()``. ``allow_tf32``: fp32 inputs may search with
    tf32 tensor cores; None follows ``torch.backends.cuda.matmul.allow_tf32``. ``chunk_size``: rows per
    chunk of the torch search.
    """
    _check_inputs(z, codebook, channels, chunk_size)
    if resolve_backend(z, backend) == "torch":
        return multichannel_vq_ref(z, codebook, channels, cosine=cosine, chunk_size=chunk_size)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    return _multichannel_vq_triton(z, codebook, channels, cosine=cosine, deterministic=deterministic,
                                   allow_tf32=allow_tf32)


class _MultichannelVQ(torch.autograd.Function):
    """Fused forward (search + assignment + squared error) and backward; cbf is the fp32 (normalised) codebook."""

    @staticmethod
    def forward(ctx, z, cbf, channels, cosine, deterministic, allow_tf32):
        zq, idx, counts, sqerr = _vq_forward(z, cbf, channels, cosine=cosine, allow_tf32=allow_tf32)
        loss = sqerr.sum() / (idx.numel() * cbf.shape[1])
        ctx.save_for_backward(z, cbf, idx, counts)
        ctx.channels, ctx.cosine, ctx.deterministic = channels, cosine, deterministic
        ctx.mark_non_differentiable(idx, counts)
        ctx.set_materialize_grads(False)  # an unused output sends None: skip its term
        return zq, idx, counts, loss, loss.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, g_zq, _g_idx, _g_counts, g_codebook, g_commit):
        z, cbf, idx, counts = ctx.saved_tensors
        need_gz = ctx.needs_input_grad[0] and (g_zq is not None or g_commit is not None)
        need_gcb = ctx.needs_input_grad[1] and g_codebook is not None
        if not (need_gz or need_gcb):
            return None, None, None, None, None, None
        zero = torch.zeros((), dtype=torch.float32, device=z.device)
        scale = torch.stack([(g if g is not None else zero).float().reshape(()) for g in (g_codebook, g_commit)])
        scale = (scale * (2.0 / (idx.numel() * cbf.shape[1]))).contiguous()  # stays on device: no sync
        gz, gcb = _vq_backward(z, cbf, idx, counts, g_zq, scale, channels=ctx.channels, cosine=ctx.cosine,
                               need_gz=need_gz, need_gcb=need_gcb, deterministic=ctx.deterministic)
        return gz, gcb, None, None, None, None


def _multichannel_vq_triton(z: Tensor, codebook: Tensor, channels: int, *, cosine: bool, deterministic: bool,
                            allow_tf32: bool) -> VQResult:
    if z.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"multichannel_vq: the triton backend takes z in {_FLOAT_DTYPES}, got {z.dtype}; "
                         "use backend='torch'")
    B, _, h, w = z.shape
    with torch.autocast(device_type=z.device.type, enabled=False):
        # A new tensor, never the parameter's own storage: backward reads the codes of this forward even
        # when the caller then rewrites the codebook in place (EMA updates, dead-code restarts).
        if cosine:  # K x d: cheap in torch, and autograd chains the codebook gradient through it
            cbf = F.normalize(codebook.float(), dim=-1, eps=NORM_EPS)
        else:
            cbf = codebook.to(torch.float32, copy=True)
        if z.is_cuda:
            with torch.cuda.device(z.device):
                zq, idx, counts, lcb, lcm = _MultichannelVQ.apply(z, cbf, channels, cosine, deterministic, allow_tf32)
        else:
            zq, idx, counts, lcb, lcm = _MultichannelVQ.apply(z, cbf, channels, cosine, deterministic, allow_tf32)
    return VQResult(zq, idx.view(B, channels, h, w), counts, lcb, lcm)
