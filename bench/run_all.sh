#!/usr/bin/env bash
# Every CPU benchmark, each against a baseline measured in the same run; JSON in bench/out/.
# Run after `make setup` (or via `make bench`). bench/RESULTS.md records the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
mkdir -p bench/out
export VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 TOKENIZERS_PARALLELISM=false
run() { echo; echo "=== $*"; "$PY" "$@"; }
run bench/bench_packing.py --out bench/out/packing.json
run bench/bench_math_reward.py --out bench/out/math_reward.json
run bench/bench_code_reward.py --tests 400 --workers 2 --out bench/out/code_reward.json
run bench/bench_train_step.py --out bench/out/train_step.json
run bench/bench_convert.py --preset tiny --preset qwen2.5-0.5b --out bench/out/convert.json
run bench/bench_rollout.py --out bench/out/rollout.json
run bench/bench_weight_sync.py --preset tiny --preset qwen2.5-0.5b --tp 1 --tp 2 --out bench/out/weight_sync.json
run bench/bench_grpo_iteration.py --out bench/out/grpo_iteration.json
