# Two commands for a newcomer: `make demo` and `make test`. Both create .venv/ and install on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean-demo

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: on a CPU machine this picks the local CPU build, on a GPU machine the CUDA one.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m pipeline demo --out demo_output

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not gpu"

lint: $(STAMP)
	$(PY) -m ruff check .
