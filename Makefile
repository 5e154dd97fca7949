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

test: install
	$(PY) -m pytest -q -n 2

test-slow: install
	$(PY) -m pytest -q -n 2 -m slow

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) scripts/bench.py
