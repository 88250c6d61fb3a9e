"""The benchmark tools (tools/bench_*.py) and what they share (tools/_bench_report.py): device name,
versions, the atomic JSON write, and cheap end-to-end runs whose reports keep the committed files'
fields (benchmarks/results/), so that new runs stay comparable with them."""
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))  # the tools import their siblings from there

import _bench_report  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def fields(obj, wildcard=(), path="") -> set:
    """Every key path of a JSON value (``/cases[]/results/*/median_ms``); the children of a dict under
    a key in ``wildcard`` (keyed by method name, say) become ``*``."""
    out = set()
    if isinstance(obj, dict):
        for key, value in obj.items():
            sub = f"{path}/{'*' if path.rsplit('/', 1)[-1] in wildcard else key}"
            out |= {sub} | fields(value, wildcard, sub)
    elif isinstance(obj, list):
        for value in obj:
            out |= fields(value, wildcard, path + "[]")
    return out


def assert_fields_kept(new: dict, committed_name: str, wildcard=()) -> None:
    committed = json.loads((RESULTS / committed_name).read_text())
    assert new.keys() == committed.keys(), committed_name
    missing = fields(committed, wildcard) - fields(new, wildcard)
    assert not missing, f"{committed_name}: fields no longer written: {sorted(missing)}"
    assert new["device"].startswith("CPU (") and new["versions"]["torch"] == torch.__version__


def test_device_name_names_the_cpu():
    name = _bench_report.device_name(torch.device("cpu"))
    assert name.startswith("CPU (") and name.endswith(f", {torch.get_num_threads()} threads)"), name
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
              if line.startswith("model name")]
    if models:
        assert models[0] in name, name
    assert _bench_report.device_name("cpu") == name


def test_versions_report_every_package_and_none_when_absent():
    v = _bench_report.versions("vector_quantize_pytorch", "no-such-package-movq-test")
    assert list(v) == ["python", "torch", "cuda", "triton", "vector_quantize_pytorch", "no-such-package-movq-test"]
    assert v["torch"] == torch.__version__ and v["cuda"] == torch.version.cuda
    assert v["python"] == ".".join(map(str, sys.version_info[:3]))
    assert v["no-such-package-movq-test"] is None
    try:
        import triton
    except ImportError:
        assert v["triton"] is None
    else:
        assert v["triton"] == triton.__version__


def test_write_report_is_atomic(tmp_path, capsys):
    out = tmp_path / "new" / "folder" / "r.json"
    assert _bench_report.write_report({"a": [1, 2.5], "b": None}, out, " (detail)") == out
    assert json.loads(out.read_text()) == {"a": [1, 2.5], "b": None} and out.read_text().endswith("}\n")
    assert capsys.readouterr().out == f"wrote {out} (detail)\n"
    _bench_report.write_report({"a": 2}, str(out))
    assert json.loads(out.read_text()) == {"a": 2}
    with pytest.raises(TypeError):
        _bench_report.write_report({"a": object()}, out)  # not JSON: the previous file stays
    assert json.loads(out.read_text()) == {"a": 2}
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]  # no temporary file left


def test_bench_kernels_quick_keeps_the_committed_fields(tmp_path):
    bench = importlib.import_module("bench_kernels")
    out = tmp_path / "k.json"
    assert bench.main(["--quick", "--out", str(out), "--methods", "torch_ref", "triton", "--cpu-reps", "1"]) == 0
    report = json.loads(out.read_text())
    assert_fields_kept(report, "kernels_cpu_quick.json", wildcard=("results", "speedup_of_triton_over"))
    assert "vector_quantize_pytorch" in report["versions"] and len(report["cases"]) == 4
    assert all("median_ms" in r for case in report["cases"] for r in case["results"].values()), report["cases"]


def test_bench_train_tiny_step_keeps_the_committed_fields(tmp_path, capsys):
    bench = importlib.import_module("bench_train")
    out = tmp_path / "t.json"
    assert bench.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--warmup", "0", "--steps", "1",
                       "--batch-size", "2", "--out", str(out), "model.resolution=16", "data.image_size=16",
                       "model.base_channels=8", "model.norm_groups=4", "discriminator.base_channels=8"]) == 0
    report = json.loads(out.read_text())
    assert_fields_kept(report, "train_tiny_cpu.json")
    assert report["steps_timed"] == 1 and report["batch_per_step"] == 2 and report["gan"] and report["images_per_s"] > 0
    assert json.loads(capsys.readouterr().out.split(f"wrote {out}")[0]) == report  # printed, then written


def test_bench_sampling_quick_keeps_the_committed_fields(tmp_path):
    bench = importlib.import_module("bench_sampling")
    out = tmp_path / "b.json"
    assert bench.main(["--quick", "--out", str(out), "--batch-sizes", "2", "--steps", "2", "--warmup", "0",
                       "--repeats", "1"]) == 0
    report = json.loads(out.read_text())
    assert_fields_kept(report, "sampling_cpu_quick.json")
    methods = {(r["method"], r["steps"]) for r in report["results"]}
    assert methods == {("maskgit", 2), ("autoregressive", 16)}
    assert report["results"][0]["ratio_to_autoregressive"] > 0
    # the real autoregressive prior at about MaskGIT's parameter count
    assert report["prior"]["autoregressive"]["factorization"] == "depth"
    assert 0.95 < report["prior"]["parameter_ratio"] < 1.05, report["prior"]


def test_bench_ar_window_quick_keeps_the_committed_fields(tmp_path):
    bench = importlib.import_module("bench_ar_window")
    out = tmp_path / "w.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert_fields_kept(report, "ar_window_cpu.json")
    rows = {(r["grid"], r["window"]): r for r in report["cached_sampling"]}
    # the windowed cache does not grow with the grid; the full one does
    assert rows[(4, 4)]["kv_cache_bytes"] == rows[(8, 4)]["kv_cache_bytes"]
    assert rows[(8, "full")]["kv_cache_bytes"] == 4 * rows[(4, "full")]["kv_cache_bytes"]
    assert [r["grid"] for r in report["sliding_window_large"]] == [4, 8]


def test_compare_ar_keeps_the_committed_fields(tmp_path):
    from collections import Counter

    import numpy as np

    from movq.data.tokens import finish_shard, prepare_output, write_token_manifest

    rng = np.random.default_rng(0)
    for name in ("train", "val"):
        folder = tmp_path / name
        prepare_output(folder, {"channels": 2, "height": 2, "width": 3, "codebook_size": 8, "classes": ["a", "b"]})
        samples = [(f"{i:04d}", rng.integers(0, 8, (2, 2, 3)).astype(np.uint16), i % 2) for i in range(6)]
        finish_shard(folder, 0, samples, Counter(), Counter())
        write_token_manifest(folder, 1)
    bench = importlib.import_module("compare_ar")
    out = tmp_path / "c.json"
    assert bench.main(["--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"), "--steps", "2",
                       "--batch", "4", "--width", "16", "--depth", "1", "--heads", "2", "--sample-batch", "2",
                       "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert_fields_kept(report, "ar_factorization_cpu.json")
    assert [r["factorization"] for r in report["results"]] == ["flat", "cell", "depth"]
    assert all(0 < r["val_bits_per_token"] < 10 for r in report["results"])
