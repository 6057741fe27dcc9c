#!/usr/bin/env bash
# Creates .venv-launch: the light launcher environment (Python 3.12, nemo-run, no torch), the
# same environment a user creates on a cluster login node to submit jobs. The jobs themselves
# run the trainer from the main environment (.venv) or the container image.
#
# Installs requirements/lock-launch.txt (every package at one exact version, made from
# requirements/launch.txt by `make lock`) with --no-deps. A stamp holding a hash of this script
# and the lock makes a re-run a no-op (well under a second).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${ACE_LAUNCH_VENV:-.venv-launch}
LOCK=requirements/lock-launch.txt
want=$(cat scripts/setup_launch_env.sh "$LOCK" | sha256sum | cut -c1-16)

if [ -f "$VENV/.ace-launch-stamp" ] && [ "$(cat "$VENV/.ace-launch-stamp")" = "$want" ]; then
  exit 0
fi

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

PY=$(find_python)
echo "[setup-launch] creating $VENV with $PY"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# (The filter drops pip's notes about absent local index directories configured on some hosts.)
"$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps -r "$LOCK" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
"$VENV/bin/python" -c "import nemo_run" \
  || { echo "[setup-launch] error: nemo_run does not import in $VENV" >&2; exit 1; }
"$VENV/bin/python" -c "import torch" 2>/dev/null \
  && { echo "[setup-launch] error: torch leaked into $VENV (the launcher must stay light)" >&2; exit 1; }
echo "$want" > "$VENV/.ace-launch-stamp"
echo "[setup-launch] done"
