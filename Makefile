# `make demo` and `make test` do all set-up themselves (scripts/setup_env.sh; a no-op once done).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup setup-launch demo test test-slow lint-docker bench clean

setup:
	@bash scripts/setup_env.sh

demo: setup
	$(PY) -m megatron_ace.cli demo --compare-fixed

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

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
