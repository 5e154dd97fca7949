# lcjax: the README's commands. Every target creates .venv with python3 if it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export JAX_PLATFORMS ?= cpu

.PHONY: quickstart test test-slow lint bench install

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(PY) scripts/train.py --config configs/quickstart.py --workdir runs/quickstart

# 3 workers on 2 cores: XLA compiles on one thread and tests wait on subprocesses, so a
# third worker fills the idle time; worksteal keeps the long tests from ending alone.
PYTEST_WORKERS ?= -n 3 --dist worksteal

test: install
	$(PY) -m pytest -q $(PYTEST_WORKERS)

test-slow: install
	$(PY) -m pytest -q $(PYTEST_WORKERS) -m slow

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) scripts/bench.py
