#!/usr/bin/env bash
# The README's main job, on the built-in shapes dataset (movq/data/shapes.py: 8 shape classes, drawn
# offline): train the MoVQ tokenizer, encode the dataset into tokens, train both priors (MaskGIT and
# the autoregressive transformer, side by side, one core each), sample them class-conditionally at
# the training size and at 2x, then judge the samples: a classifier trained on real shapes images
# gives the class accuracy of the samples and their diversity, next to its accuracy on real images
# and on the tokenizer's reconstructions. Everything lands under runs/shapes/:
#   images/recon_*.png               held-out originals (top) and reconstructions (bottom)
#   maskgit/, ar/                    the priors' runs (checkpoints, metrics.jsonl, images/, train.log)
#   maskgit/samples/, ar/samples/    256 samples (class = index mod 8), grid.png: one class per column
#   maskgit/samples_2x/, ar/samples_2x/   64² samples (2x the training size), grid.png
#   judge.json                       the judge's figures (also printed at the end)
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
out=runs/shapes
# The tokenizer (and the judge) use MOVQ_THREADS threads, each prior one. On a machine busy with other
# jobs set MOVQ_THREADS=1: two threads made the tokenizer's steps 20x slower there (README).
threads=${MOVQ_THREADS:-2}
rm -rf "$out"  # a fresh demo each time (the trainers refuse to start over in a folder with checkpoints)
start=$(date +%s)
stamp() { echo "[main job] $1 at $(( $(date +%s) - start )) s"; }

OMP_NUM_THREADS=$threads $py tools/train_tokenizer.py --config configs/shapes.yaml train.run_dir=$out "$@"
stamp "tokenizer trained"
OMP_NUM_THREADS=$threads $py tools/tokenize_dataset.py --tokenizer $out shapes $out/tokens --builtin-size 4096 --overwrite
stamp "dataset tokenized"

# Both priors at once, one core each (their logs: $out/{maskgit,ar}/train.log; the summaries follow).
mkdir -p $out/maskgit $out/ar
OMP_NUM_THREADS=1 $py tools/train_prior.py --config configs/maskgit_shapes.yaml > $out/maskgit/train.log 2>&1 &
mg=$!
OMP_NUM_THREADS=1 $py tools/train_prior.py --config configs/ar_shapes.yaml > $out/ar/train.log 2>&1 &
ar=$!
status=0
wait $mg || status=$?
wait $ar || status=$?
tail -n 13 $out/maskgit/train.log
tail -n 13 $out/ar/train.log
if [ $status -ne 0 ]; then echo "a prior's training failed (exit $status): see $out/*/train.log" >&2; exit $status; fi
stamp "priors trained"

# Samples: 256 per prior at the training size (for the judge), 16 at 2x (64²: the 8x8 cells become
# 16x16; the autoregressive prior slides its window over them, MaskGIT decodes overlapping windows).
both() {  # run "$@ PRIOR" for both priors at once, one core each; fail if either fails
  OMP_NUM_THREADS=1 "$@" maskgit & local a=$!
  OMP_NUM_THREADS=1 "$@" ar & local b=$!
  local rc=0
  wait $a || rc=$?
  wait $b || rc=$?
  return $rc
}
sample() { $py tools/sample.py --checkpoint $out/$3 --num-samples $1 --batch-size $1 --out $out/$3/$2 --grid --overwrite "${@:4}"; }
sample_at_2x() { sample 16 samples_2x "$1" --size 64 64; }
sample_256() { sample 256 samples "$1"; }
both sample_256
both sample_at_2x
stamp "sampled"

OMP_NUM_THREADS=$threads $py tools/judge_samples.py maskgit=$out/maskgit/samples autoregressive=$out/ar/samples \
  --tokenizer $out --json $out/judge.json
stamp "main job done"
echo "see $out/images, $out/{maskgit,ar}/samples*/grid.png and $out/judge.json"
