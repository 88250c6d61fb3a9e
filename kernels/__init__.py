"""Fused Triton kernels (with torch references) for movq; see kernels/README.md."""
from movq.kernels.vq import BACKEND_ENV, VQResult, multichannel_vq, multichannel_vq_ref, resolve_backend

__all__ = ["BACKEND_ENV", "VQResult", "multichannel_vq", "multichannel_vq_ref", "resolve_backend"]
