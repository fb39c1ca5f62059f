# Two commands do all the set-up on a fresh machine:
#   make book   builds the HTML book into _build/html
#   make test   runs derivlib's tests, every notebook under nbval, and the book build
# Both create .venv on first use and install requirements.txt into it.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export JAX_PLATFORMS := cpu
export PYTHONHASHSEED := 0

.PHONY: book test notebooks benchmark clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build . -W -n --keep-going --all

test: $(STAMP)
	$(BIN)/python -m pytest --nbval --nbval-current-env tests book

notebooks: $(STAMP)
	$(BIN)/python scripts/run_notebooks.py

benchmark: $(STAMP)
	for script in benchmarks/*.py; do $(BIN)/python "$$script"; done

clean:
	rm -rf _build
