"""The GPU-session tools of issue 12, checked on CPU: tools/bench_kernels.py's target preset, its new baselines
and its AOT report, and tools/gpu_check.sh (syntax and dry run; the stages themselves need a GPU)."""
import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("bench_kernels")


def test_target_preset_cases(bench):
    args = argparse.Namespace(preset="target", quick=False)
    cases = bench.build_cases(args)
    assert [(c["N"], c["K"], c["d"], c["dtype"], c["mode"]) for c in cases] == [
        (65536, 16384, 64, "bf16", "fwd_bwd"), (65536, 16384, 256, "bf16", "fwd"), (65536, 1024, 64, "bf16", "fwd_bwd")]
    assert {f"{c['mode']} K={c['K']} d={c['d']}" for c in cases} == set(bench.TARGETS)


def test_check_targets_reads_the_measured_cases(bench):
    cases = [
        {"mode": "fwd_bwd", "K": 16384, "d": 64, "results": {"triton": {"median_ms": 1.0}},
         "speedup_of_triton_over": {"torch_ref": 12.0, "torch_compile": 2.0}},
        {"mode": "fwd", "K": 16384, "d": 256, "results": {"triton": {"frac_of_peak": 0.6}}, "speedup_of_triton_over": {}},
        {"mode": "fwd_bwd", "K": 1024, "d": 64, "results": {"triton": {"error": "x"}}, "speedup_of_triton_over": {}},
    ]
    t = bench.check_targets(cases)
    assert t["fwd_bwd K=16384 d=64"]["speedup_over_torch_ref"]["met"] is True
    assert t["fwd_bwd K=16384 d=64"]["speedup_over_torch_compile"]["met"] is False
    assert t["fwd K=16384 d=256"]["frac_of_peak"] == {"target": 0.5, "measured": 0.6, "met": True}
    assert t["fwd_bwd K=1024 d=64"]["median_ms"]["met"] is None  # not measured: neither met nor missed


def test_quick_run_with_the_bf16_matmul_baseline(bench, tmp_path):
    out = tmp_path / "k.json"
    assert bench.main(["--quick", "--out", str(out), "--methods", "triton", "torch_ref", "torch_ref_bf16",
                       "--cpu-reps", "1"]) == 0
    report = json.loads(out.read_text())
    for case in report["cases"]:
        res = case["results"]
        assert all("median_ms" in r and r["first_call_s"] > 0 for r in res.values()), res
        assert "BLOCK_N" in res["triton"]["autotune_config"]  # the interpreter's single config
        assert set(case["speedup_of_triton_over"]) == {"torch_ref", "torch_ref_bf16"}


def test_the_preset_refuses_to_run_without_a_gpu(bench, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(SystemExit):
        bench.main(["--preset", "target", "--out", str(tmp_path / "t.json")])


def test_aot_markdown_table(bench):
    row = dict(kernel="_vq_search_kernel", arch="sm_90", math="bf16", d=64, d_pad=64, block_n=64, block_k=64,
               block_d=64, num_warps=4, num_stages=3, regs=122, stack_bytes=0, spill_insns=0, smem_bytes=33792,
               smem_estimate=35328, ctas_per_sm=4, by_regs=4, by_smem=6, by_threads=16,
               sass_loop=dict(mma=4, ffma=32, fmnmx=0, fset=44, sel=60, ldg=8, cp_async=5, lds=4, sts=0, shfl=8,
                              spill=0, total=232))
    other = dict(kernel="_vq_backward_kernel", arch="sm_90", math="bf16", d=64, d_pad=64, block_n=64, num_warps=4,
                 regs=60, stack_bytes=0, spill_insns=None, smem_bytes=0, ctas_per_sm=8, by_regs=8, by_smem=32,
                 by_threads=16)
    report = {"triton": "3.9.0", "wall_s": 1.0, "smem_limit_per_block": {"sm_90": 232448}, "problems": [],
              "rows": [row, other]}
    md = bench.render_aot_markdown(report, {"rev": "abc", "rows": [dict(row, regs=163)]}, "cmd")
    assert "| sm_90 | bf16 | 64 (64) | 64x64x64 | 4 | 3 | 122 | 0 / 0 | 33792 (35328) | 4 (regs) |" in md
    assert "| sm_90 | bf16 | 64 | 64x64x64 | 4 | 4 | 32 | 104 | 8 | 5 | 4 | 0 | 8 | 0 | 232 | - |" in md
    assert "Before: the issue-4 search kernel (abc)" in md and "| 163 |" in md
    assert "| sm_90 | _vq_backward_kernel | 64 (64) | 64 | 4 | 60 | 0 / - | 0 | 8 (regs) |" in md


GPU_CHECK = ROOT / "tools" / "gpu_check.sh"


def test_gpu_check_parses_and_refuses_bad_usage(tmp_path):
    bash = shutil.which("bash")
    assert subprocess.run([bash, "-n", str(GPU_CHECK)]).returncode == 0
    res = subprocess.run([bash, str(GPU_CHECK)], capture_output=True, text=True)
    assert res.returncode == 2 and "usage" in res.stderr


def test_gpu_check_dry_run_lists_every_stage_within_eight_minutes(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(GPU_CHECK), "--dry-run", str(out)], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads((out / "summary.json").read_text())
    stages = [s["stage"] for s in summary["stages"]]
    assert stages == ["preflight", "gpu_tests", "kernels", "train_movq", "train_vqgan", "sampling"]
    assert all(s["status"] == "dry-run" for s in summary["stages"])
    assert sum(s["timeout_s"] for s in summary["stages"]) <= 8 * 60
    text = res.stdout
    assert "-m gpu tests/test_kernels.py" in text and "--preset target" in text
    assert "configs/imagenet256.yaml --warmup 3 --steps 50 train.mixed_precision=bf16" in text
    assert "configs/vqgan_imagenet256.yaml" in text and "bench_sampling.py --steps 8" in text
