#!/usr/bin/env bash
# One-GPU check of megatron-ace (about 8 minutes on one H100 / H200): parity on CUDA,
# training-step MFU against torch SDPA, 7B-shaped gather/reshard against a device copy.
#
#   bash bench/gpu_check.sh [gpu_check.py options]      e.g. --out gpu_check.json
#   PYTHON=python3.12 bash bench/gpu_check.sh --cpu-smoke
#
# Needs Python 3.12 with torch (CUDA build). megatron-core (and numpy / packaging if missing)
# are installed from the wheels in bench/wheels into a private target directory, so the system
# Python is never modified; when bench/wheels lacks them and the machine is online, they are
# downloaded there first (`pip download`), so a later offline machine can use the same folder.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$(command -v python3.12 || command -v python3)}"
WHEELS="$REPO/bench/wheels"
SITE="${ACE_GPU_SITE:-${TMPDIR:-/tmp}/ace-gpu-check-site}"
MCORE_VERSION="0.19.2"

"$PY" -c 'import sys; assert sys.version_info >= (3, 12), "megatron-core >= 0.17 needs Python >= 3.12"'
"$PY" -c 'import torch' || { echo "gpu_check: torch is not importable by $PY" >&2; exit 2; }

have() { PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import $1" 2>/dev/null; }

need=()
have megatron.core || need+=("megatron-core==$MCORE_VERSION")
have numpy || need+=("numpy")
have packaging || need+=("packaging")
# torch.utils.cpp_extension (imported by megatron-core) needs setuptools, which Python 3.12
# venvs no longer include.
have setuptools || need+=("setuptools")
if ((${#need[@]})); then
  mkdir -p "$WHEELS" "$SITE"
  for req in "${need[@]}"; do
    name="${req%%==*}"
    if ! ls "$WHEELS"/"${name//-/_}"-*.whl >/dev/null 2>&1; then
      echo "gpu_check: fetching $req into bench/wheels" >&2
      "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$WHEELS" "$req" || {
        echo "gpu_check: $req is neither in bench/wheels nor downloadable (offline?)" >&2; exit 2; }
    fi
  done
  # --no-deps: torch is the machine's own; megatron-core asks only for torch, numpy, packaging.
  "$PY" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" --target "$SITE" "${need[@]}"
fi

export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
exec "$PY" "$REPO/bench/gpu_check.py" "$@"
