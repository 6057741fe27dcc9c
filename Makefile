# `make demo` and `make test` do all set-up themselves (scripts/setup_env.sh; a no-op once done).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow lint clean

setup:
	@bash scripts/setup_env.sh

demo: setup
	$(PY) -m megatron_ace.cli demo

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Slower checks (larger models, long soak tests): `make test-slow`.
test-slow: setup
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

clean:
	rm -rf .venv .venv-launch runs
