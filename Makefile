# A newcomer's two commands: `make serve` and `make test`. Both create .venv and install first.
VENV ?= .venv
PYTHON ?= python3
# torch 2.13.0: the CPU build on this project's machines (a file on disk), PyPI's CUDA build elsewhere on Linux.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: install serve test

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt "$(TORCH)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

serve: install
	$(VENV)/bin/loraswap-serve

test: install
	$(PY) -m pytest
