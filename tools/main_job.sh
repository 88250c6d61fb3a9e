#!/usr/bin/env bash
# The README's main job: train the tiny MoVQ tokenizer and the tiny MaskGIT prior on the built-in
# offline dataset (a 2-core CPU: ~10 minutes), then sample. Everything lands under runs/tiny/.
#   images/recon_*.png          held-out originals (top) and reconstructions (bottom)
#   prior/images/samples_*.png  class-conditional samples (one photograph-class per column)
#   prior/images/inpaint_*.png  original | centre masked | filled in by the prior
#   prior/samples/              PNGs + samples.npz (for tools/fid.py), grid.png, steps.png
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
rm -rf runs/tiny  # a fresh demo each time (the trainers refuse to start over in a folder with checkpoints)
$py tools/train_tokenizer.py --config configs/tiny.yaml "$@"
$py tools/tokenize_dataset.py --tokenizer runs/tiny builtin runs/tiny/tokens --overwrite
$py tools/train_prior.py --config configs/maskgit_tiny.yaml
$py tools/sample.py --checkpoint runs/tiny/prior --num-samples 28 --out runs/tiny/prior/samples --grid --steps-strip --overwrite
echo "main job done: see runs/tiny/images and runs/tiny/prior/images"
