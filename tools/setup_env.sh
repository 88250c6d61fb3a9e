#!/usr/bin/env bash
# Create .venv in the repository root and install movq into it.
#
# * A torch already importable in .venv (say the user's own CUDA build) is kept.
# * Otherwise a machine with an NVIDIA driver gets pip's default (CUDA) torch, and a machine
#   without one gets the pinned CPU build, torch==2.13.0, never a multi-GB CUDA download.
# * Re-running is cheap: the package install is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing the default (CUDA) torch"
    "${pip[@]}" install torch
  else
    echo "setup: no GPU, installing the CPU build torch==2.13.0"
    "${pip[@]}" install torch==2.13.0
  fi
fi

stamp=.venv/.movq-install-stamp
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing movq and its dependencies into .venv"
  "${pip[@]}" install -e '.[dev]'
  echo "$want" > "$stamp"
fi
.venv/bin/python -c "import torch, movq; print(f'setup: ok (torch {torch.__version__})')"
