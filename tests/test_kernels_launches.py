"""GPU kernels launched by one forward + backward of the fused VQ op, counted without a GPU.

Under the Triton interpreter a TorchDispatchMode sees every aten op the op runs, and a wrapper of the
interpreter's launch counts the Triton kernels (torch ops that the interpreter itself runs to copy arguments
are not counted). An aten op counts as one launch unless it only makes a view or allocates (torch.empty
launches nothing on CUDA). The count covers multichannel_vq and its backward, including the autograd
engine's hand-over of the gradients to fresh leaves; not the quantizer's own statistics around it
(movq/quantizer.py) and not the caller's upstream gradients. The GPU twin counts CUDA kernels and memsets
with the profiler.
"""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from movq.kernels import multichannel_vq
from movq.kernels._autotune import INTERPRET

MAX_LAUNCHES = 4  # issue 12: one fwd+bwd at K = 1024
_ALLOCATING = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh", "set_"}


class _LaunchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.torch_ops: list[str] = []
        self.triton: list[str] = []
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and not func.is_view and name not in _ALLOCATING:
            self.torch_ops.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _count_launches():
    from triton.runtime.interpreter import InterpretedFunction

    counter = _LaunchCounter()
    real = InterpretedFunction.run

    def run(self, *args, **kwargs):
        counter.triton.append(self.__name__)
        counter.paused += 1  # the interpreter's own argument copies are not GPU kernels
        try:
            return real(self, *args, **kwargs)
        finally:
            counter.paused -= 1

    InterpretedFunction.run = run
    try:
        with counter:
            yield counter
    finally:
        InterpretedFunction.run = real


def _case(K=1024, d=64, dtype=torch.bfloat16, B=2, C=4, hw=4, device="cpu"):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, C * d, hw, hw, generator=g).to(device, dtype).requires_grad_(True)
    cb = torch.randn(K, d, generator=g).to(device).requires_grad_(True)
    gzq = torch.randn(z.shape, generator=g).to(device, dtype)
    ones = torch.ones((), device=device)
    beta = torch.full((), 0.25, device=device)
    return z, cb, gzq, ones, beta, C


def _fwd_bwd(z, cb, gzq, ones, beta, C, **kw):
    out = multichannel_vq(z, cb, C, backend="triton", **kw)
    torch.autograd.backward([out.z_q, out.codebook_loss, out.commitment_loss], [gzq, ones, beta])
    return out


@pytest.mark.skipif(not INTERPRET, reason="counts under the Triton interpreter")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fwd_bwd_launches_at_most_four_at_k1024(dtype):
    case = _case(dtype=dtype)
    with _count_launches() as c:
        out = _fwd_bwd(*case)
    launches = c.triton + c.torch_ops
    assert len(launches) <= MAX_LAUNCHES, launches
    # what the 3 are: the prep kernel (codebook copies, norms, every zero-fill), the search with its epilogue
    # (z_q, indices, counts, both losses) and the backward (both gradients); no torch op at all
    assert c.triton == ["_vq_prep_kernel", "_vq_search_kernel", "_vq_backward_kernel"] and c.torch_ops == []
    z, cb = case[0], case[1]
    assert z.grad is not None and cb.grad is not None and int(out.counts.sum()) == out.indices.numel()


@pytest.mark.skipif(not INTERPRET, reason="counts under the Triton interpreter")
def test_launches_of_the_other_modes():
    """Forward alone is 2 launches. Cosine codes add torch's F.normalize of the codebook and its autograd
    backward (17 aten ops; not folded: cosine is off in every config). Deterministic mode adds the fixed-order
    loss sum and the sort and offsets behind the per-code gradient kernel."""
    z, cb, gzq, ones, beta, C = _case(K=256, d=16)
    with torch.no_grad(), _count_launches() as c:
        multichannel_vq(z, cb, C, backend="triton")
    assert c.triton == ["_vq_prep_kernel", "_vq_search_kernel"] and c.torch_ops == []
    case = _case(K=256, d=16)
    with _count_launches() as c:
        _fwd_bwd(*case, cosine=True)
    assert c.triton == ["_vq_prep_kernel", "_vq_search_kernel", "_vq_backward_kernel"]
    assert 0 < len(c.torch_ops) <= 17 and c.torch_ops[0] == "aten.linalg_vector_norm.default", c.torch_ops
    case = _case(K=256, d=16)
    with _count_launches() as c:
        _fwd_bwd(*case, deterministic=True)
    assert c.triton == ["_vq_prep_kernel", "_vq_search_kernel", "_vq_backward_kernel", "_vq_codebook_grad_kernel"]
    assert sorted(c.torch_ops) == sorted(["aten.sum.default", "aten.mul.Tensor", "aten.clone.default",
                                          "aten.sort.stable", "aten.zeros.default", "aten.cumsum.out"]), c.torch_ops


@pytest.mark.skipif(not INTERPRET, reason="counts under the Triton interpreter")
def test_second_backward_of_a_retained_graph_is_still_correct():
    """The first backward takes the prep kernel's zeroed gradient buffer (it may become cb.grad); a second
    backward through the same graph gets a fresh one instead of adding into the first."""
    z, cb, gzq, ones, beta, C = _case(K=64, d=16)
    out = multichannel_vq(z, cb, C, backend="triton")
    first = torch.autograd.grad(out.codebook_loss, cb, retain_graph=True)[0].clone()
    second = torch.autograd.grad(out.codebook_loss, cb)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert first.abs().sum() > 0


@pytest.mark.gpu
def test_gpu_fwd_bwd_kernels_at_k1024():
    from torch.profiler import ProfilerActivity, profile

    case = _case(B=64, hw=16, device="cuda")
    _fwd_bwd(*case)  # compile and autotune first
    for t in case[:2]:
        t.grad = None
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _fwd_bwd(*case)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) <= MAX_LAUNCHES, kernels
