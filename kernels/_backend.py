"""Which path runs the VQ op: backend choice, the CUDA fallback policy and the precision flags.

Policy (issue 12). ``backend=None`` and no ``$MOVQ_VQ_BACKEND``: the torch reference off CUDA; on CUDA the
Triton kernels when the GPU is sm_80 or newer and the op compiles and launches for the call's key (device,
dtype, width, cosine, dot precision, determinism); otherwise ONE warning that names the reason and the torch
reference for that key from then on. A backend named by the argument or by ``$MOVQ_VQ_BACKEND=triton`` is
forced: every failure raises instead.

The device checks and the default choice are plain module functions (:func:`default_backend`,
:func:`device_capability`) so that tests on a CPU machine can make the interpreter stand in for an old or a
broken GPU by monkeypatching them.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Hashable
from typing import Optional

import torch
from torch import Tensor

from movq.kernels._autotune import HAS_TRITON, INTERPRET

log = logging.getLogger("movq.kernels.vq")

BACKEND_ENV = "MOVQ_VQ_BACKEND"
BACKENDS = ("triton", "torch")
MIN_CAPABILITY = (8, 0)  # bf16 tensor cores (mma.sync) and >= 163 KB of shared memory per block
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# key -> reason: keys that fell back, each warned about once
_FALLBACK: dict[Hashable, str] = {}
# keys whose first call ran (and, on CUDA, synchronised) without an error
_VERIFIED: set = set()


def tf32_allowed() -> bool:
    """Whether fp32 matmuls may use tf32, read without tripping torch's mixed-API check.

    torch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision`` ("tf32" | "ieee" | "none", the latter
    inheriting ``torch.backends.fp32_precision``); its getter resolves the inheritance and also reflects the
    legacy setters (``allow_tf32 = True`` reads back as "tf32"). Reading the legacy ``allow_tf32`` instead
    raises RuntimeError in torch 2.13 once the new API was used, so the new getter is read first and is the
    value cuBLAS itself uses. Older torch: the legacy flag.
    """
    matmul = torch.backends.cuda.matmul
    try:
        precision = matmul.fp32_precision
    except (AttributeError, RuntimeError):
        precision = None
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:  # "none" all the way up (the default: ieee), or a torch without the new API
        return bool(matmul.allow_tf32)
    except RuntimeError:  # mixed APIs on a torch whose new getter did not resolve: be exact
        return False


def default_backend(z: Tensor) -> str:
    """The backend when neither the argument nor the environment names one."""
    return "triton" if z.is_cuda else "torch"


def device_capability(device: torch.device) -> Optional[tuple[int, int]]:
    """(major, minor) of a CUDA device; None elsewhere (the interpreter has no capability to check)."""
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


def device_label(device: torch.device) -> str:
    if device.type != "cuda":
        return str(device)
    try:
        return f"{device} ({torch.cuda.get_device_name(device)})"
    except Exception:  # noqa: BLE001 - only a label
        return str(device)


def resolve(z: Tensor, backend: Optional[str] = None) -> tuple[str, bool]:
    """(backend, forced): the argument > $MOVQ_VQ_BACKEND > :func:`default_backend`. A backend chosen by
    the argument or the environment is forced (errors raise); the default may fall back."""
    source = "backend argument"
    forced = backend is not None
    if backend is None:
        env = os.environ.get(BACKEND_ENV, "").strip()
        if env:
            backend, source, forced = env.lower(), f"${BACKEND_ENV}", True
        else:
            backend = default_backend(z)
    if backend not in BACKENDS:
        raise ValueError(f"multichannel_vq: unknown backend {backend!r} from {source}; expected one of {BACKENDS}")
    if backend == "triton" and forced:
        _check_forced_triton(z, source)
    return backend, forced


def _check_forced_triton(z: Tensor, source: str) -> None:
    if not HAS_TRITON:
        raise ValueError(f"multichannel_vq: backend 'triton' (from {source}) needs the triton package "
                         "(pip install triton, Linux); use backend='torch'")
    if not z.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"multichannel_vq: backend 'triton' (from {source}) got a {z.device.type} tensor; Triton "
                         "kernels need a CUDA tensor, or set TRITON_INTERPRET=1 before importing kernels to run "
                         "them in Triton's interpreter on CPU (slow; for tests)")
    if not z.is_cuda and not INTERPRET:
        raise ValueError("multichannel_vq: TRITON_INTERPRET=1 was set after kernels/vq.py was imported; the kernels "
                         "were built for the GPU. Set it before the first import of kernels (e.g. in conftest.py)")
    if z.is_cuda and INTERPRET:
        raise ValueError("multichannel_vq: kernels were imported under TRITON_INTERPRET=1 (CPU interpreter) but z is "
                         "on CUDA; unset TRITON_INTERPRET or move z to the CPU")
    if z.dtype not in TRITON_DTYPES:
        raise ValueError(f"multichannel_vq: the triton backend takes z in {TRITON_DTYPES}, got {z.dtype}; "
                         "use backend='torch'")
    reason = capability_problem(z.device)
    if reason:
        raise RuntimeError(f"multichannel_vq: backend 'triton' (from {source}): {reason}; use backend='torch' or "
                           f"unset {BACKEND_ENV} to fall back to the torch reference")


def capability_problem(device: torch.device) -> Optional[str]:
    cap = device_capability(device)
    if cap is not None and cap < MIN_CAPABILITY:
        return (f"{device_label(device)} is sm_{cap[0]}{cap[1]}; the Triton kernels need sm_80 or newer (bf16 tensor "
                "cores, enough shared memory; older GPUs compile FMA kernels that spill)")
    return None


def unsupported_reason(z: Tensor) -> Optional[str]:
    """Why the default (unforced) Triton path cannot take z at all, or None."""
    if not HAS_TRITON:
        return "Triton is not installed"
    if z.is_cuda and INTERPRET:
        return "the kernels were imported under TRITON_INTERPRET=1 (CPU interpreter) but z is on CUDA"
    if not z.is_cuda and not INTERPRET:
        return f"Triton kernels need a CUDA tensor, got {z.device.type}"
    if z.dtype not in TRITON_DTYPES:
        return f"z is {z.dtype}; the kernels take {', '.join(str(t).replace('torch.', '') for t in TRITON_DTYPES)}"
    return capability_problem(z.device)


def fallback_reason(key: Hashable) -> Optional[str]:
    return _FALLBACK.get(key)


def record_fallback(key: Hashable, reason: str) -> None:
    """Send ``key`` to the torch reference from now on; the first time, say why (one warning per key)."""
    if key in _FALLBACK:
        return
    _FALLBACK[key] = reason
    log.warning("multichannel_vq: the Triton path is not used for %s: %s. Using the torch reference instead "
                "(set %s=triton to raise instead of falling back).", describe_key(key), reason, BACKEND_ENV)


def describe_key(key: Hashable) -> str:
    try:
        device, dtype, d, cosine, precision, deterministic = key
    except (TypeError, ValueError):
        return str(key)
    return (f"{device_label(torch.device(device))}, z {str(dtype).replace('torch.', '')}, d={d}"
            f"{', cosine' if cosine else ''}, {precision} products{', deterministic' if deterministic else ''}")


def describe_error(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def is_fallback_error(err: BaseException) -> bool:
    """Errors that mean "Triton cannot run this here" (compile, ptxas, resources, driver, launch), as opposed
    to running out of memory, which the torch path would not fix."""
    return isinstance(err, Exception) and not isinstance(err, torch.cuda.OutOfMemoryError)


def reset() -> None:
    """Forget every fallback decision and verification (tests; a new process starts empty anyway)."""
    _FALLBACK.clear()
    _VERIFIED.clear()
