# `make demo` and `make test` work on a fresh machine: they create .venv, install the project
# with its test extras, install the few Debian tools the suite needs (when root), then run.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint bench soak clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)
	@bash scripts/system-deps.sh

demo: setup
	$(PY) -m locksmith.demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

# The semaphore under a random etcd fault schedule (locksmith/soak.py); SOAK_DURATION in seconds.
SOAK_DURATION ?= 600
soak: setup
	$(PY) -m locksmith.soak --duration $(SOAK_DURATION)

bench: setup
	$(PY) benchmarks/semaphore.py
	$(PY) benchmarks/apply.py
	$(PY) benchmarks/agent_idle.py
	$(PY) benchmarks/fleetlock.py
	$(PY) benchmarks/rollout.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
