#!/usr/bin/env bash
# Run every CPU benchmark of megatron-ace, one after the other, and keep each one's JSON.
#
#   bash bench/run_all.sh                 # all of them, JSON into bench/out/
#   bash bench/run_all.sh weight_sync     # only the named ones (file names without bench_ / .py)
#
# Uses the repository's .venv (override with PYTHON=...). Each benchmark measures its own
# baseline in the same run, so ratios stay meaningful on a busy machine; the load average is
# logged before each one because the absolute figures are not. A failing benchmark is reported
# and the others still run; the exit code is the number of failures. GPU figures come from
# bench/gpu_check.sh, run separately on a CUDA machine.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
OUT="${BENCH_OUT:-$REPO/bench/out}"
mkdir -p "$OUT"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export VLLM_ENABLE_V1_MULTIPROCESSING="${VLLM_ENABLE_V1_MULTIPROCESSING:-0}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

# name | arguments (besides --out)
BENCHES=(
  "packing|"
  "math_reward|"
  "code_reward|--tests 400 --workers 2"
  "train_step|"
  "convert|--preset tiny --preset qwen2.5-0.5b"
  "checkpoint|--preset qwen2.5-0.5b"
  "rollout|"
  "weight_sync|"
  "grpo_update|"
  "thd_attention|"
  "grpo_iteration|--steps 11"
)

failures=0
for entry in "${BENCHES[@]}"; do
  name="${entry%%|*}"
  args="${entry#*|}"
  if (($#)) && [[ ! " $* " == *" $name "* ]]; then
    continue
  fi
  script="$REPO/bench/bench_$name.py"
  if [[ ! -f "$script" ]]; then
    echo "== $name: $script not found, skipped" >&2
    failures=$((failures + 1))
    continue
  fi
  echo "== $name ($(date -u +%H:%M:%S), load average $(cut -d' ' -f1-3 /proc/loadavg))"
  start=$(date +%s)
  # shellcheck disable=SC2086  # args is a word list on purpose
  if "$PY" "$script" $args --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1; then
    tail -n 25 "$OUT/$name.log"
    echo "== $name: ok in $(($(date +%s) - start)) s -> $OUT/$name.json"
  else
    echo "== $name: FAILED after $(($(date +%s) - start)) s; last lines of $OUT/$name.log:" >&2
    tail -n 20 "$OUT/$name.log" >&2
    failures=$((failures + 1))
  fi
done
exit "$failures"
