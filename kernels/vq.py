"""Multichannel vector quantization: nearest-code search + straight-through assignment.

Reference: MoVQ (Zheng et al., "MoVQ: Modulating Quantized Vectors for High-Fidelity Image
Generation", NeurIPS 2022) splits the encoder output ``[B, C*d, h, w]`` into C channels of width d
that share one codebook ``[K, d]``; the straight-through estimator and the codebook/commitment
losses follow VQ-VAE (van den Oord et al., 2017). Kernel structure follows the Triton tutorials
(03-matrix-multiplication, 06-fused-attention): a GEMM over codebook tiles with a running
min/argmin per row, so the N x K distance matrix never exists in memory.

File order: autotune configs -> ``@triton.jit`` kernels -> launchers -> torch ``*_ref`` -> public op.

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
        zq = zv + (e - zv).detach()  # straight-through
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
    if backend not in BACKENDS:
        raise ValueError(f"multichannel_vq: unknown backend {backend!r} from {source}; expected one of {BACKENDS}")
    if backend == "triton" and not z.is_cuda and not _interpreter_on():
        raise ValueError(f"multichannel_vq: backend 'triton' (from {source}) got a {z.device.type} tensor; Triton "
                         "kernels need a CUDA tensor, or set TRITON_INTERPRET=1 before importing kernels to run "
                         "them in Triton's interpreter on CPU (slow; for tests)")
    return backend


def multichannel_vq(z: Tensor, codebook: Tensor, channels: int, *, cosine: bool = False,
                    backend: Optional[str] = None, deterministic: bool = False, allow_tf32: bool = False,
                    chunk_size: int = 8192) -> VQResult:
    """Nearest-code search + straight-through assignment for multichannel VQ.

    z [B, C*d, h, w] (fp32/bf16/fp16), codebook [K, d] -> VQResult(z_q, indices, counts, codebook_loss,
    commitment_loss). ``backend``: "triton" | "torch" | None (=$MOVQ_VQ_BACKEND, else triton on CUDA,
    torch elsewhere). ``deterministic``: Triton backward without float atomics (bit-reproducible).
    ``allow_tf32``: fp32 inputs may search with tf32 tensor cores. ``chunk_size``: rows per chunk of the
    torch search.
    """
    _check_inputs(z, codebook, channels, chunk_size)
    if resolve_backend(z, backend) == "torch":
        return multichannel_vq_ref(z, codebook, channels, cosine=cosine, chunk_size=chunk_size)
    return _multichannel_vq_triton(z, codebook, channels, cosine=cosine, deterministic=deterministic,
                                   allow_tf32=allow_tf32)


def _multichannel_vq_triton(z, codebook, channels, *, cosine, deterministic, allow_tf32):
    raise NotImplementedError("multichannel_vq: the Triton backend is not implemented yet (issue 4); "
                              f"use backend='torch' or {BACKEND_ENV}=torch")
