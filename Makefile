# A newcomer's two commands: `make serve` and `make test`. Both create .venv and install first.
VENV ?= .venv
PYTHON ?= python3
# torch 2.13.0: the CPU build on this project's machines (a file on disk), PyPI's CUDA build elsewhere on Linux.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: install serve test docker-e2e

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

# Builds the Docker image, starts the compose CPU service, calls it from the host, tears it down.
# Needs Docker (or root and apt-get, to install and start Debian's docker.io); see scripts/docker_e2e.sh.
docker-e2e:
	bash scripts/docker_e2e.sh
