#!/usr/bin/env bash
# One-GPU check of movq's GPU path (issue 12), in <= 8 minutes on one H100/H200:
#
#   1. preflight      the device, its capability, the versions                          -> OUT/env.json
#   2. gpu_tests      MOVQ_TEST_GPU=1 pytest -m gpu on the kernel and quantizer tests   -> OUT/gpu_tests.xml
#   3. kernels        tools/bench_kernels.py --preset target                            -> OUT/kernels_target.json
#   4. train_movq     50 bf16 training steps of configs/imagenet256.yaml (images/s, peak memory)
#   5. train_vqgan    the same for configs/vqgan_imagenet256.yaml                        -> OUT/train_*.json
#   6. sampling       MaskGIT-base sampling at T = 8 (images/s, decoding included)       -> OUT/sampling.json
#   7. summary        one table on stdout                                               -> OUT/summary.json
#
# Each stage runs under its own timeout (the timeouts add up to 8 minutes), writes OUT/<stage>.log, and a
# failing stage does not stop the others. Exit status: 0 when every stage passed, 1 otherwise.
#
#   bash tools/gpu_check.sh OUT_DIR             # from the repository root, with one CUDA GPU
#   bash tools/gpu_check.sh --dry-run OUT_DIR   # no GPU: print the stages, check their configs, run nothing
#   bash tools/gpu_check.sh --smoke OUT_DIR     # no GPU: every stage's plumbing at CPU sizes (~2 minutes)
#
# Python: the repository's .venv if present, else python3 (override with PYTHON=...). Training uses
# synthetic images (tools/bench_train.py); the builtin dataset stands in for the config's shards, and LPIPS is
# turned off (loss.perceptual_weight=0, said in the summary) when its weights are not on this machine.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

MODE=gpu
case "${1:-}" in
  --dry-run) MODE=dry; shift ;;
  --smoke) MODE=smoke; shift ;;
esac
OUT=${1:-}
if [ -z "$OUT" ] || [ $# -ne 1 ]; then
  echo "usage: bash tools/gpu_check.sh [--dry-run|--smoke] OUT_DIR" >&2
  exit 2
fi
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
STAGES="$OUT/stages.tsv"
: > "$STAGES"
export WANDB_MODE=offline WANDB_SILENT=true TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
[ "$MODE" = gpu ] && unset TRITON_INTERPRET

# name, timeout (s), command...: run it, log it, record "name rc seconds timeout" in stages.tsv
stage() {
  local name=$1 limit=$2
  shift 2
  if [ "$MODE" = dry ]; then
    printf '[dry-run] %-12s timeout %4ss: %.160s\n' "$name" "$limit" "$(echo "$*" | tr '\n' ' ' | tr -s ' ')"
    printf '%s\tdry-run\t0\t%s\n' "$name" "$limit" >> "$STAGES"
    return 0
  fi
  local start end rc
  start=$(date +%s.%N)
  timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  local secs
  secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$limit" >> "$STAGES"
  local what="ok"
  [ "$rc" -ne 0 ] && what="FAILED (exit $rc$( [ "$rc" -eq 124 ] && echo ', timed out'))"
  printf '[%s] %s in %ss (log: %s)\n' "$name" "$what" "$secs" "$OUT/$name.log"
}

# LPIPS weights present? (resolution as LPIPS.from_pretrained does it, without loading VGG)
LPIPS_OVERRIDE=()
if ! "$PY" -c "from movq import lpips as l; l._resolve(None, l.VGG_FILENAME, l.VGG_URL, None, l._torch_hub_dir()); \
l._resolve(None, l.LIN_FILENAME, l.LIN_URL, None, l._lpips_package_dir())" > /dev/null 2>&1; then
  LPIPS_OVERRIDE=(loss.perceptual_weight=0)
fi
DATA_OVERRIDES=(data.source=builtin data.builtin_train_size=16 data.builtin_val_size=4 data.num_workers=0
                "data.cache_dir=$OUT/cache")

if [ "$MODE" = smoke ]; then  # CPU sizes: the same stages and outputs, the harness only
  TINY=(model.resolution=16 data.image_size=16 model.base_channels=8 model.norm_groups=4
        discriminator.base_channels=8 quantizer.codebook_size=64 quantizer.dim=8)
  TESTS=(tests/test_kernels.py -k "backend_selection or tiny_shapes")
  KERNELS=(--quick --cpu-reps 1)
  TRAIN_MOVQ=(--config configs/tiny.yaml --warmup 0 --steps 1 --batch-size 2 "${TINY[@]}" quantizer.channels=2)
  TRAIN_VQGAN=(--config configs/tiny.yaml --warmup 0 --steps 1 --batch-size 2 "${TINY[@]}" quantizer.channels=1)
  SAMPLING=(--quick --steps 8 --batch-sizes 2 --warmup 0 --repeats 1)
else
  TESTS=(-m gpu tests/test_kernels.py tests/test_kernels_launches.py tests/test_quantizer.py)
  KERNELS=(--preset target --budget-s 150 --rep-ms 50 --methods triton torch_ref torch_ref_bf16 torch_compile vqpytorch)
  TRAIN_MOVQ=(--config configs/imagenet256.yaml --warmup 3 --steps 50 train.mixed_precision=bf16
              "${DATA_OVERRIDES[@]}" "${LPIPS_OVERRIDE[@]}")
  TRAIN_VQGAN=(--config configs/vqgan_imagenet256.yaml --warmup 3 --steps 50 train.mixed_precision=bf16
               "${DATA_OVERRIDES[@]}" "${LPIPS_OVERRIDE[@]}")
  SAMPLING=(--steps 8 --batch-sizes 128 --ar-batch-sizes 32 --warmup 1 --repeats 2)
fi

if [ "$MODE" = dry ]; then  # the training configs and their overrides must load (cheap: no model is built)
  if ! "$PY" -c "import sys; from movq.config import TokenizerConfig, load_config
for cfg in sys.argv[1:3]: load_config(TokenizerConfig, cfg, sys.argv[3:])" configs/imagenet256.yaml \
      configs/vqgan_imagenet256.yaml train.mixed_precision=bf16 "${DATA_OVERRIDES[@]}" "${LPIPS_OVERRIDE[@]}"; then
    echo "[dry-run] the training configs or their overrides do not load" >&2
    exit 1
  fi
fi

echo "gpu_check: mode $MODE, python $PY, results in $OUT"
stage preflight 20 "$PY" -c "
import json, sys, torch
from importlib import metadata
dev = torch.cuda.is_available()
info = {'cuda_available': dev, 'device': torch.cuda.get_device_name(0) if dev else 'cpu',
        'capability': list(torch.cuda.get_device_capability(0)) if dev else None, 'torch': torch.__version__,
        'cuda': torch.version.cuda, 'triton': metadata.version('triton'), 'mode': sys.argv[2],
        'lpips': sys.argv[3] == '0'}
json.dump(info, open(sys.argv[1], 'w'), indent=1)
print(json.dumps(info))
sys.exit(0 if dev or sys.argv[2] != 'gpu' else 3)
" "$OUT/env.json" "$MODE" "${#LPIPS_OVERRIDE[@]}"
# the tests take each key's first config (MOVQ_VQ_AUTOTUNE=0: no benchmarking of every config per key, which
# would compile ~3x as many kernels); the benchmark stage tunes as a user's run does
stage gpu_tests 95 env MOVQ_TEST_GPU="$([ "$MODE" = gpu ] && echo 1 || echo 0)" MOVQ_VQ_AUTOTUNE=0 \
  "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" --junitxml="$OUT/gpu_tests.xml"
stage kernels 210 "$PY" tools/bench_kernels.py "${KERNELS[@]}" --out "$OUT/kernels_target.json"
stage train_movq 55 "$PY" tools/bench_train.py "${TRAIN_MOVQ[@]}" --out "$OUT/train_imagenet256.json"
stage train_vqgan 55 "$PY" tools/bench_train.py "${TRAIN_VQGAN[@]}" --out "$OUT/train_vqgan_imagenet256.json"
stage sampling 45 "$PY" tools/bench_sampling.py "${SAMPLING[@]}" --out "$OUT/sampling.json"

"$PY" - "$OUT" "$MODE" <<'EOF'
"""The summary: every stage's status and the numbers a reader wants first."""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, mode = Path(sys.argv[1]), sys.argv[2]


def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None


stages = []
for line in (out / "stages.tsv").read_text().splitlines():
    name, rc, secs, limit = line.split("\t")
    stages.append({"stage": name, "status": "dry-run" if rc == "dry-run" else ("ok" if rc == "0" else f"exit {rc}"),
                   "seconds": float(secs), "timeout_s": int(limit)})
summary = {"mode": mode, "env": load("env.json"), "stages": stages}
try:
    suite = ET.parse(out / "gpu_tests.xml").getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    summary["gpu_tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except (OSError, ET.ParseError, AttributeError):
    summary["gpu_tests"] = None
k = load("kernels_target.json")
if k:
    summary["kernels"] = [{"case": f"{c['mode']} N={c['N']} K={c['K']} d={c['d']} {c['dtype']}",
                           "triton_ms": c["results"].get("triton", {}).get("median_ms"),
                           "speedup_over": c["speedup_of_triton_over"],
                           "autotune_config": c["results"].get("triton", {}).get("autotune_config"),
                           "triton_peak_mem_added_mb": c["results"].get("triton", {}).get("peak_mem_added_mb")}
                          for c in k["cases"]]
    summary["kernel_targets"] = k.get("targets")
for key, name in (("train_movq", "train_imagenet256.json"), ("train_vqgan", "train_vqgan_imagenet256.json")):
    t = load(name)
    summary[key] = t and {"images_per_s": t["images_per_s"], "peak_memory_mib": t["peak_memory_mib"],
                          "mixed_precision": t["mixed_precision"], "lpips": t["lpips"], "steps": t["steps_timed"]}
s = load("sampling.json")
summary["sampling"] = s and s["summary"]
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

print(f"\ngpu_check summary ({mode}; device: {(summary['env'] or {}).get('device', '?')})")
for st in stages:
    print(f"  {st['stage']:<12} {st['status']:<10} {st['seconds']:7.1f} s (timeout {st['timeout_s']} s)")
if summary["gpu_tests"]:
    g = summary["gpu_tests"]
    print(f"  gpu tests: {g['tests']} run, {g['failures']} failed, {g['errors']} errors, {g['skipped']} skipped")
for c in summary.get("kernels", []):
    sp = ", ".join(f"{m} {v:.2f}x" for m, v in c["speedup_over"].items())
    ms = c["triton_ms"]
    print(f"  kernels {c['case']}: triton {ms if ms is None else round(ms, 4)} ms; speedup over {sp or '-'}")
for key in ("train_movq", "train_vqgan"):
    t = summary[key]
    if t:
        print(f"  {key}: {t['images_per_s']:.1f} images/s, peak {t['peak_memory_mib']:.0f} MiB "
              f"({t['mixed_precision']}, lpips {'on' if t['lpips'] else 'off'})")
if summary["sampling"]:
    print(f"  sampling T=8: {summary['sampling']['best_images_per_s_T8']} images/s "
          f"(batch {summary['sampling']['best_batch_T8']})")
print(f"wrote {out / 'summary.json'}")
sys.exit(0 if all(st["status"] in ("ok", "dry-run") for st in stages) else 1)
EOF
