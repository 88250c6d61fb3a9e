"""Every kernel of kernels/vq.py, in every config the pruner can pick, compiled ahead of time for sm_80 (A100)
and sm_90 (H100/H200) on this CPU machine: no compile error, no register spill, shared memory within the
target's per-block limit and within the pruner's estimate (so the pruner never keeps a config the device
cannot launch). The interpreter never runs Triton's compiler; this is where compile-only errors show up.

One subprocess (the kernels must be imported without TRITON_INTERPRET) compiles everything in parallel with
Triton's on-disk cache, so a rerun on unchanged kernels is fast. The committed table of the same run is
benchmarks/results/kernels_aot_sm80_sm90.md (tools/bench_kernels.py --aot-report).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from movq.kernels import _autotune as at

ROOT = Path(__file__).resolve().parents[1]


def _triton_with_nvidia_tools():
    triton = pytest.importorskip("triton")
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (tools / "ptxas").exists() or not (tools / "cuobjdump").exists():
        pytest.skip("triton without its NVIDIA backend tools (ptxas, cuobjdump)")
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip(f"the ahead-of-time compile API used here is Triton 3.9's (found {triton.__version__})")
    return triton


@pytest.fixture(scope="module")
def aot_rows(tmp_path_factory):
    _triton_with_nvidia_tools()
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "movq.kernels._aot", str(out)], capture_output=True, text=True,
                         env=env, timeout=1200, cwd=ROOT)
    assert out.exists(), res.stderr[-3000:]
    report = json.loads(out.read_text())
    report["returncode"] = res.returncode
    return report


@pytest.mark.slow
def test_every_config_compiles_without_spills_within_shared_memory(aot_rows):
    assert aot_rows["problems"] == [] and aot_rows["returncode"] == 0, "\n".join(aot_rows["problems"])
    rows = aot_rows["rows"]
    for arch in ("sm_80", "sm_90"):
        search = [r for r in rows if r["arch"] == arch and r["kernel"] == "_vq_search_kernel"]
        # every (math, width) the op can meet has its configs compiled
        assert {(r["math"], r["d_pad"]) for r in search} == {(m, w) for m in at.MATHS for w in at.WIDTHS}
        for kernel in ("_vq_prep_kernel", "_vq_assign_kernel", "_vq_backward_kernel", "_vq_codebook_grad_kernel"):
            assert {r["d_pad"] for r in rows if r["arch"] == arch and r["kernel"] == kernel} == set(at.WIDTHS)
        for r in search:
            assert r["regs"] <= 255 and r["ctas_per_sm"] >= 1 and r["smem_bytes"] <= r["smem_limit"], r


@pytest.mark.slow
def test_four_warp_tensor_core_configs_fit_two_ctas_per_sm(aot_rows):
    """The 4-warp bf16 search configs at d <= 128 leave room for >= 2 CTAs per SM (registers and shared
    memory), so one CTA's min/argmin overlaps another's tensor-core work."""
    rows = [r for r in aot_rows["rows"] if r["kernel"] == "_vq_search_kernel" and r["math"] == "bf16"
            and r["num_warps"] == 4 and r["d_pad"] <= 128]
    assert rows
    for r in rows:
        assert r["ctas_per_sm"] >= 2, r


def test_every_code_tile_divides_the_codebook_padding():
    """The search loads code tiles without masks: K is padded to a multiple of K_ALIGN, which every BLOCK_K of
    the tables (and the interpreter's) must divide."""
    from movq.kernels.vq import K_ALIGN

    shapes = [s for by_width in at.SEARCH_TABLE.values() for lst in by_width.values() for s in lst]
    assert all(K_ALIGN % s.block_k == 0 for s in shapes + [at.INTERPRETER_SHAPE])


def test_the_pruner_drops_what_does_not_fit():
    """Against a card with 99 KB of shared memory per block (sm_86), the d = 256 configs whose estimate is
    above it are dropped; with no capability nothing is filtered; a width outside the tables is an error."""
    full = at.select_search_shapes("bf16", 256)
    small = at.select_search_shapes("bf16", 256, (8, 6))
    assert set(small) <= set(full) and small
    assert all(at.smem_estimate(s, "bf16", 256) <= at.smem_limit((8, 6)) for s in small) or len(small) == 1
    assert all(s in small for s in full if at.smem_estimate(s, "bf16", 256) <= at.smem_limit((8, 6)))
    assert at.select_search_shapes("bf16", 64, (9, 0)) == at.SEARCH_TABLE["bf16"][64]
    with pytest.raises(ValueError, match="D_PAD"):
        at.select_search_shapes("bf16", 48)
    with pytest.raises(ValueError, match="math"):
        at.select_search_shapes("fp8", 64)
