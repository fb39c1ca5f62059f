# Two commands do all the set-up on a fresh machine:
#   make book   builds the HTML book into _build/html
#   make test   runs derivlib's tests, every notebook under nbval, the book build, and
#               every page of the built book in headless Chromium
# Both create .venv on first use and install requirements.txt into it; `make test` also
# installs Debian's chromium (apt-get) and the npm packages of package.json (MathJax).

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CHROMIUM := /usr/bin/chromium
NODE_MODULES := node_modules/.package-lock.json
# Installs Debian packages, or says why it cannot.
APT_INSTALL = command -v apt-get >/dev/null || { echo "make: the browser test needs Debian's $(1), and there is no apt-get here to install it" >&2; exit 1; }; \
	apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(1)
export JAX_PLATFORMS := cpu
export PYTHONHASHSEED := 0
# JAX keeps what it compiles in .cache/jax, so a warm run skips most compilation (the
# tests compile many small shapes). The cache is keyed by JAX's version and the
# compiled program, so a stale entry is never used; `make clean` empties it.
export JAX_COMPILATION_CACHE_DIR := $(CURDIR)/.cache/jax
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS := 0
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES := 0
# Test processes, one per core (pytest-xdist). `--dist loadfile` runs each file in one
# process: all cells of a notebook share one kernel, in order. (pytest 9 derives node ids
# in a way that xdist's `loadgroup` cannot extend, so finer groups are not available.)
WORKERS ?= auto

.PHONY: book test browser-deps notebooks benchmark clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build . -W -n --keep-going --all

test: $(STAMP) browser-deps
	$(BIN)/python -m pytest -n $(WORKERS) --dist loadfile --nbval --nbval-current-env tests book

# What tests/test_browser.py needs besides .venv: a browser, and MathJax to serve it.
browser-deps: $(CHROMIUM) $(NODE_MODULES)

$(CHROMIUM):
	$(call APT_INSTALL,chromium)

$(NODE_MODULES): package.json package-lock.json
	command -v npm >/dev/null || { $(call APT_INSTALL,npm); }
	npm ci --no-audit --no-fund

notebooks: $(STAMP)
	$(BIN)/python scripts/run_notebooks.py

benchmark: $(STAMP)
	for script in benchmarks/*.py; do $(BIN)/python "$$script"; done

clean:
	rm -rf _build .cache
